"""The length head online, in the real GRPO trainer on this machine (issue 22): every round's honest error of the head
and of the naive / per-prompt history / sibling estimates, in two prompt settings.

`run` trains LenBalanceGRPOTrainer on the embedded SmolLM2 and keeps every round's training pairs (the exact tensors
the engine learned from, with each row's prompt) under DUMP/SETTING/. `evaluate` replays those rounds, in order,
through fresh engine heads (`benchmarks.forelen.online.replay_rounds`: the same scoring and `OnlineTrainer` steps as
in the trainer), with and without context features, plus the same head trained offline on all rounds, and writes
the report, which names the task the rounds were generated on (`--task`, a name of `rl_lenbalance.builtin.tasks.TASKS`).
Splitting the two lets head variants be compared on identical rollouts.

    python benchmarks/predictor_online.py run --dump /tmp/plp_rounds --rounds 20
    python benchmarks/predictor_online.py evaluate --dump /tmp/plp_rounds \
        --out docs/benchmarks/predictor_online_cpu.json
    python benchmarks/predictor_online.py run --task open_ended --dump /tmp/plp_open --rounds 20  # another task
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from _common import save_report  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer  # noqa: E402
from rl_lenbalance.builtin.models import load_model  # noqa: E402
from rl_lenbalance.builtin.tasks import TASKS  # noqa: E402
from rl_lenbalance.generation.capture import GenerationCapture, outputs_of  # noqa: E402
from rl_lenbalance.generation.decode import prompt_then_completion  # noqa: E402

SETTINGS = {  # name -> distinct prompts in the dataset (TRL's sampler reshuffles every epoch)
    "distinct": lambda rounds, prompts_per_round: rounds * prompts_per_round,  # one epoch: no prompt recurs
    "recurring": lambda rounds, prompts_per_round: 4 * prompts_per_round,  # an epoch every 4 rounds
}


EXTRA_LAYERS = (15, 22)  # besides the final hidden state: SmolLM2-135M's middle layer (of 30) and a later one


@torch.no_grad()
def extra_features(model: torch.nn.Module, config: LenBalanceConfig, max_length: int, prompts: list[list[int]],
                   completions: list[list[int]]) -> dict:
    """For head variants (issue 22 item 3): the PLP features the hooks would have recorded at `EXTRA_LAYERS`
    (teacher-forced replay through the policy of this round), and each completion's token entropies (B, W) (entry j:
    the entropy of the distribution token j was drawn from; NaN past the end)."""
    def forward(input_ids, attention_mask, position_ids):
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)

    out = {}
    for layer in EXTRA_LAYERS:
        capture = GenerationCapture(model, lambda z: z.new_zeros(len(z)), replace(config, feature_layer=layer),
                                    max_length)
        out[f"layer{layer}"] = capture.replay(prompts, completions, forward).recorded
    width = max(map(len, completions))
    input_ids, mask, positions = prompt_then_completion(prompts, completions, width, 0)
    with outputs_of({"norm": model.get_decoder()}) as seen:
        forward(input_ids, mask, positions)
    prompt_width = input_ids.size(1) - width
    entropy = capture.entropy(seen["norm"])[:, prompt_width - 1 : prompt_width - 1 + width]
    generated_mask = mask[:, prompt_width:]
    out["entropy"] = entropy.masked_fill(generated_mask == 0, float("nan")).half()
    return out


def run_setting(name: str, args: argparse.Namespace) -> None:
    """Train on `args.task` for `args.rounds` generation rounds, saving each round's training pairs, its prompts'
    keys and the task's name."""
    out = Path(args.dump) / name
    out.mkdir(parents=True, exist_ok=True)
    prompts_per_round = args.completions // args.generations
    make_dataset, reward_funcs = TASKS[args.task]
    dataset = make_dataset(SETTINGS[name](args.rounds, prompts_per_round), seed=args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rl_lenbalance_plp_"), use_cpu=True, max_steps=args.rounds, seed=args.seed,
        per_device_train_batch_size=args.completions, gradient_accumulation_steps=1, num_generations=args.generations,
        max_completion_length=args.max_length, temperature=1.0, top_k=0, beta=0.0, loss_type="dapo",
        learning_rate=1e-6, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    trainer = LenBalanceGRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=reward_funcs, args=config, train_dataset=dataset,
        lenbalance_config=LenBalanceConfig(max_overhead=1.0, compaction=True, training_plan="sorted",
                                           rebucket=True, log_table_every=0),  # a probe: live predictions at t=32
    )
    engine, learn_round = trainer.lenbalance, trainer.lenbalance.learn_round
    generate, saved = trainer._generate_single_turn, {}

    def dump_round(waves, lengths, own_ids, gather):
        pairs = engine.training_pairs(waves, lengths)
        metrics, table = learn_round(waves, lengths, own_ids, gather)
        saved.update(pairs={k: v.half() if v.is_floating_point() and v.dim() == 2 else v
                            for k, v in vars(pairs).items()},
                     max_length=args.max_length, trainer_metrics=metrics, task=args.task)
        print(f"{name} round {engine.rounds - 1}: " + ", ".join(
            f"{k.split('/')[-1]}={v:.2f}" for k, v in metrics.items() if "mae" in k or "kendall" in k), flush=True)
        return metrics, table

    def generate_and_dump(prompt_ids, *rest, **kwargs):
        result = generate(prompt_ids, *rest, **kwargs)
        completions = result[0] if isinstance(result, tuple) else result
        saved["extra"] = extra_features(trainer.model, trainer.lenbalance_config, args.max_length, prompt_ids,
                                        completions)
        torch.save(saved, out / f"round_{engine.rounds - 1:03d}.pt")
        return result

    engine.learn_round, trainer._generate_single_turn = dump_round, generate_and_dump
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["run", "evaluate"])
    parser.add_argument("--dump", required=True, help="Folder of the saved rounds (one subfolder per setting).")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--task", default="arithmetic", choices=list(TASKS),
                        help="run: the prompts and rewards (rl_lenbalance.builtin.tasks.TASKS); evaluate reads it "
                             "back.")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--completions", type=int, default=32, help="Completions per round.")
    parser.add_argument("--generations", type=int, default=2, help="Completions per prompt (GRPO's G).")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="evaluate: the JSON report.")
    parser.add_argument("--variants", nargs="+", help="evaluate: replay only these head variants (default: all).")
    args = parser.parse_args()
    if args.phase == "run":
        for name in args.settings:
            run_setting(name, args)
        return
    from benchmarks.forelen.online import evaluate_rounds

    results = [evaluate_rounds(Path(args.dump) / name, name, seed=args.seed, only=args.variants)
               for name in args.settings]
    save_report(args.out, results)


if __name__ == "__main__":
    main()
