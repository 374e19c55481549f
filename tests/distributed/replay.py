"""What the torchrun workers share: their prompts, their reward, and completions replayed as a pure function of
(prompt, its occurrence in the batch, step, rank), the same for the stock trainer and rl-lenbalance's."""

from datasets import Dataset
from trl import GRPOTrainer

PROMPTS = ["What is 2+2?", "List 5 fruits.", "Write a poem.", "Explain gravity in detail.", "Hi", "Count to 20."]


def dataset() -> Dataset:
    """PROMPTS eight times over, conversational: 48 rows."""
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS * 8])


def reward(completion_ids, **kwargs) -> list[float]:
    return [len(c) / 40.0 + (c[0] % 7) / 7.0 for c in completion_ids]


class Replay:
    """Replaces generation: `replayed(ids, k)` gives the tokens of the k-th occurrence of prompt `ids` in this rank's
    batch; every second occurrence ends with eos."""

    def replayed(self, ids: list[int], k: int) -> list[int]:
        raise NotImplementedError

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        seen: dict[tuple, int] = {}
        out = []
        for ids in prompt_ids:
            k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            out.append(self.replayed(ids, k) + ([self.eos_token_ids[0]] if k % 2 else []))
        return (out, None) if isinstance(self, GRPOTrainer) else out  # RLOO returns the ids alone
