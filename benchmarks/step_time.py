"""Stock TRL GRPOTrainer vs rl-lenbalance variants in the real trainer, on this machine's device.

The variants take turns one optimizer step at a time, in an order reversed every step, each in a process of its own
(`rl_lenbalance.cli.compare`); phases are timed with device synchronisation; warm-up steps are dropped; medians and
ratios against stock come from the same run. On a GPU the model runs in bf16.

    # the GPU setting of issue 10 (embedded SmolLM2, 256 completions per step, up to 512 tokens)
    python benchmarks/step_time.py --steps 7 --batch 32 --grad-acc 8 --max-length 512 --out docs/benchmarks/gpu/...
    # fixed overhead per loss micro-step, CPU, a tiny model whose compute is negligible
    python benchmarks/step_time.py --model tiny --steps 4 --batch 32 --grad-acc 8 --max-length 128 --out ...
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from _common import save_report  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer  # noqa: E402
from rl_lenbalance.builtin.models import build_tiny_model, embedded_model_dir, load_model  # noqa: E402
from rl_lenbalance.builtin.tasks import REWARD_FUNCS, arithmetic_dataset  # noqa: E402
from rl_lenbalance.cli.compare import compare, print_comparison, timed  # noqa: E402

VARIANTS = {  # name -> LenBalanceConfig fields (None: stock TRL)
    "stock": None,
    "lenbalance": {},  # the defaults (training_plan 'auto'): what a user who changes nothing gets
    "lenbalance_stock_trimmed": {"training_plan": "stock_trimmed"},  # each loss strategy pinned: what 'auto' chooses
    "lenbalance_sorted": {"training_plan": "sorted"},  # from, measured in the same run
    "lenbalance_uneven": {"training_plan": "sorted_uneven"},
    "lenbalance_packed": {"training_plan": "packed"},  # padding-free loss forward (rl_lenbalance.loss.packed)
    "lenbalance_shared_prompt": {"training_plan": "shared_prompt"},  # each group's prompt computed once
    "lenbalance_generation_only": {"training_plan": "off"},  # capture + online head, stock training
    "lenbalance_compaction": {"compaction": True},
}


class ProfileStep(TrainerCallback):
    """torch.profiler over one optimizer step; its busiest operators go to `path` as a table."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path, self.profiler = step, path, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            with open(self.path, "w") as f:
                for sort in ("cpu_time_total", "self_cpu_time_total") + (
                        ("self_device_time_total",) if torch.cuda.is_available() else ()):
                    f.write(f"sorted by {sort}\n{averages.table(sort_by=sort, row_limit=40)}\n\n")
            self.profiler = None


def model_source(name: str) -> str:
    """'embedded' (SmolLM2-135M-Instruct), 'tiny' (a 2-layer random Llama, built now), or a model folder."""
    if name == "embedded":
        return str(embedded_model_dir())
    if name == "tiny":  # its end-of-sequence embedding redrawn larger, so completions end at long-tailed lengths
        folder = build_tiny_model(tempfile.mkdtemp(prefix="rl_lenbalance_tiny_"), tokenizer_from=embedded_model_dir())
        model, tokenizer = load_model(folder)
        with torch.no_grad():
            eos = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.8
            model.get_input_embeddings().weight[model.config.eos_token_id] = eos  # tied: the output row too
        model.save_pretrained(folder)
        return str(folder)
    return name


def build(args: argparse.Namespace, source: str, settings: dict | None, name: str):
    """One variant's timed trainer (in its own process, `rl_lenbalance.cli.compare`): stock TRL for `settings` None."""
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    model, tokenizer = load_model(source, dtype=torch.bfloat16 if cuda else torch.float32)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rl_lenbalance_bench_"), use_cpu=not cuda,
        bf16=cuda and not args.cb_slots,  # amp's fp32 output wrapper breaks TRL's continuous batching (bf16 weights)
        max_steps=args.steps, seed=0, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_acc, num_generations=args.generations,
        max_completion_length=args.max_length, temperature=1.0, top_k=0, beta=0.0, loss_type="dapo",
        learning_rate=args.learning_rate, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_transformers_continuous_batching=args.cb_slots > 0,
        transformers_continuous_batching_config={"max_requests_per_batch": args.cb_slots} if args.cb_slots else None,
    )
    dataset = arithmetic_dataset(max(64, args.batch * args.grad_acc * args.steps // args.generations), seed=0)
    kwargs = dict(model=model, processing_class=tokenizer, reward_funcs=REWARD_FUNCS, args=config,
                  train_dataset=dataset)
    if settings is None:
        trainer = timed(GRPOTrainer)(**kwargs)
    else:
        trainer = timed(LenBalanceGRPOTrainer)(**kwargs, lenbalance_config=LenBalanceConfig(**settings))
    if args.profile_step:
        trainer.add_callback(ProfileStep(args.profile_step, f"{args.out}.profile_{name}.txt"))
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', 'tiny', or a model folder.")
    parser.add_argument("--steps", type=int, default=7, help="Optimizer steps per variant, warm-up included.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32, help="per_device_train_batch_size")
    parser.add_argument("--grad-acc", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--variants", nargs="+", default=["stock", "lenbalance", "lenbalance_uneven",
                                                           "lenbalance_generation_only"], choices=list(VARIANTS))
    parser.add_argument("--cb-slots", type=int, default=0,
                        help="Generate with transformers continuous batching, at most this many requests at once "
                        "(fewer than the rank's rows: admission order matters). 0: plain generate.")
    parser.add_argument("--setting", default=None, help="A name for the setting, recorded in the output.")
    parser.add_argument("--profile-step", type=int, default=0,
                        help="Profile this optimizer step of every variant (torch.profiler) into "
                             "OUT.profile_VARIANT.txt.")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    source = model_source(args.model)

    variants = {name: VARIANTS[name] for name in args.variants}
    results = compare(functools.partial(build, args, source), variants, warmup=args.warmup)
    print_comparison(results)
    trainer_settings = {k: v for k, v in vars(args).items() if k not in ("out", "variants")}
    stock = next((r for r in results if r["variant"] == "stock"), None)
    for result in results:
        if stock is not None:  # same completions, same real tokens: computed tokens = real / (1 - padding fraction)
            result["loss_tokens_vs_stock"] = (1.0 - stock["loss_pad_frac"]) / (1.0 - result["loss_pad_frac"])
        result["trainer_settings"] = trainer_settings | {"device": "cuda" if cuda else "cpu",
                                                         "bf16": cuda and not args.cb_slots}
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_per_step")}), flush=True)
    save_report(args.out, results)


if __name__ == "__main__":
    main()
