"""Where length-aware scheduling pays on a GPU: loss phase and three generation regimes, stock vs predicted vs oracle.

A random-weight model of a real shape (time depends on shapes, not weights) generates completions whose lengths are
forced exactly (a logits processor for `generate`, per-request `max_new_tokens` for continuous batching). Lengths
are long-tailed and grouped like GRPO: each prompt has a typical length and its G completions scatter around it.
"Predicted" lengths are what a prompt-only predictor can know — the prompt's typical length, blurred by noise
calibrated so that its MAE over the naive constant predictor's MAE equals `--pred-mae-ratio` (the ratio measured
online on CPU with the real model). "Oracle" uses the true lengths. Every variant of a regime runs in the same
process on the same card; the script prints one JSON line per measurement.

    python benchmarks/gpu_regimes.py --out docs/benchmarks/gpu_regimes_h200.jsonl     # on the GPU machine
    python benchmarks/gpu_regimes.py --small --out /tmp/gpu_regimes_cpu.jsonl         # a seconds-long CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

from rl_lenbalance.schedule import waves_by_length

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}
EOS, PAD = 2, 0


def sorted_equal_chunks(lengths: Sequence[float], num_chunks: int) -> list[list[int]]:
    """Cut the longest-first order into `num_chunks` consecutive chunks of equal row count."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
    if len(lengths) % num_chunks:
        raise ValueError(f"cannot split {len(lengths)} rows into {num_chunks} equal chunks: "
                         f"{len(lengths)} is not divisible by {num_chunks}")
    size = len(lengths) // num_chunks
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[c * size:(c + 1) * size] for c in range(num_chunks)]


def token_budget_microbatches(lengths: Sequence[float], max_tokens: int,
                              max_rows: int | None = None) -> list[list[int]]:
    """Greedily pack the longest-first order into micro-batches whose padded size (rows times the longest
    row) stays within `max_tokens`, with at most `max_rows` rows each when given."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_tokens:
            raise ValueError(f"a sequence of length {lengths[i]} exceeds the token budget max_tokens={max_tokens}; "
                             f"raise max_tokens to at least {lengths[i]}")
        batch = batches[-1] if batches else None
        if (batch and (len(batch) + 1) * lengths[batch[0]] <= max_tokens
                and (max_rows is None or len(batch) < max_rows)):
            batch.append(i)
        else:
            batches.append([i])
    return batches


def grouped_lengths(num_prompts: int, group: int, median: float, cap: int, seed: int) -> tuple[list[int], list[float]]:
    """True lengths (prompt-major, groups contiguous as TRL generates them) and each row's prompt-level typical
    length."""
    g = torch.Generator().manual_seed(seed)
    typical = torch.exp(math.log(median) + 0.8 * torch.randn(num_prompts, generator=g))
    rows = typical.repeat_interleave(group) * torch.exp(0.5 * torch.randn(num_prompts * group, generator=g))
    return rows.clamp(4, cap).long().tolist(), typical.clamp(4, cap).repeat_interleave(group).tolist()


def calibrated_predictions(true: list[int], typical: list[float], group: int, mae_ratio: float, seed: int
                           ) -> tuple[list[float], float]:
    """Per-prompt predictions `typical × exp(σ·ε)`, σ chosen by bisection so MAE/MAE(naive) ≈ `mae_ratio`.

    Returns the predictions and the ratio reached (above the target when even σ=0 cannot reach it).
    """
    y = torch.tensor(true, dtype=torch.float64)
    naive = (y - y.mean()).abs().mean()
    eps = torch.randn(len(true) // group, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    base = torch.tensor(typical, dtype=torch.float64)

    def predict(sigma: float) -> torch.Tensor:
        return base * torch.exp(sigma * eps).repeat_interleave(group)

    def ratio(sigma: float) -> float:
        return float((predict(sigma) - y).abs().mean() / naive)

    lo, hi = 0.0, 3.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < mae_ratio else (lo, mid)
    return predict(lo).tolist(), ratio(lo)


class ForceLength(LogitsProcessor):
    """Make row i emit EOS exactly at its target length and never before."""

    def __init__(self, targets: list[int], prompt_len: int, device: torch.device):
        self.targets = torch.tensor(targets, device=device)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        done = input_ids.shape[1] - self.prompt_len + 1 >= self.targets
        scores[:, EOS] = torch.where(done, 1e4, -1e4).to(scores.dtype)
        return scores


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=8192, eos_token_id=EOS,
                             pad_token_id=PAD, attn_implementation="sdpa")
        self.model = Qwen2ForCausalLM(config).to(self.device, self.dtype).eval()
        self.vocab = config.vocab_size
        self.out = open(args.out, "a")

    def emit(self, **record) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        self.out.write(line + "\n")
        self.out.flush()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object], repeats: int = 1) -> float:
        best = float("inf")
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - start)
        return best

    # --- loss phase -------------------------------------------------------------------------------------------------

    def loss_phase(self) -> None:
        """Forward+backward over one generation batch, micro-batched as stock TRL does and as rl-lenbalance does."""
        a = self.args
        n, prompt, mb = a.loss_rows, a.loss_prompt, a.micro_batch
        lengths, _ = grouped_lengths(n // a.group, a.group, a.loss_median, a.loss_cap, seed=1)
        width = max(lengths)  # stock pads every micro-batch to the generation batch's longest completion
        stock_order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        plans = {
            "stock_trl": ([stock_order[i:i + mb] for i in range(0, n, mb)], True),
            "random_trimmed": ([stock_order[i:i + mb] for i in range(0, n, mb)], False),
            "lenbalance_sorted": (sorted_equal_chunks(lengths, n // mb), False),
            "lenbalance_token_budget": (token_budget_microbatches([prompt + x for x in lengths], a.token_budget),
                                        False),
        }
        ids = torch.randint(3, self.vocab, (n, prompt + width), device=self.device)

        def run(batches: list[list[int]], full_width: bool) -> None:
            self.model.zero_grad(set_to_none=True)
            for rows in batches:
                w = width if full_width else max(lengths[r] for r in rows)
                x = ids[rows, : prompt + w]
                mask = torch.zeros_like(x)
                for i, r in enumerate(rows):
                    mask[i, : prompt + lengths[r]] = 1
                hidden = self.model.model(input_ids=x, attention_mask=mask).last_hidden_state[:, prompt - 1:-1]
                total = 0.0
                for i in range(len(rows)):  # row-wise log-softmax bounds memory, as TRL's selective log-softmax does
                    logp = torch.log_softmax(self.model.lm_head(hidden[i]).float(), -1)
                    total = total + (logp.gather(-1, x[i, prompt:, None]).squeeze(-1) * mask[i, prompt:]).sum()
                (-total / sum(lengths)).backward()

        self.emit(phase="loss_setup", rows=n, prompt=prompt, micro_batch=mb, token_budget=a.token_budget,
                  len_median=sorted(lengths)[n // 2], len_mean=round(sum(lengths) / n, 1), len_max=width)
        real = sum(prompt + x for x in lengths)
        seconds = {}
        for name, (batches, full_width) in plans.items():
            computed = sum(len(b) * (prompt + (width if full_width else max(lengths[r] for r in b))) for b in batches)
            seconds[name] = self.timed(lambda: run(batches, full_width), repeats=2)
            self.emit(phase="loss", plan=name, seconds=round(seconds[name], 3), micro_batches=len(batches),
                      pad_frac=round(1 - real / computed, 4),
                      speedup_vs_stock=round(seconds["stock_trl"] / seconds[name], 3))
        self.model.zero_grad(set_to_none=True)

    # --- generation -------------------------------------------------------------------------------------------------

    def generation_setup(self) -> None:
        a = self.args
        self.true, typical = grouped_lengths(a.prompts, a.group, a.gen_median, a.gen_cap, seed=2)
        self.pred, reached = calibrated_predictions(self.true, typical, a.group, a.pred_mae_ratio, seed=3)
        self.prompt_ids = torch.randint(3, self.vocab, (a.prompts, a.gen_prompt), device=self.device)
        self.prompt_ids = self.prompt_ids.repeat_interleave(a.group, 0)
        n = len(self.true)
        self.emit(phase="gen_setup", rows=n, group=a.group, prompt=a.gen_prompt, len_median=sorted(self.true)[n // 2],
                  len_mean=round(sum(self.true) / n, 1), len_max=max(self.true), pred_mae_ratio_target=a.pred_mae_ratio,
                  pred_mae_ratio_reached=round(reached, 3))
        self.generate(list(range(min(n, a.wave))), max_new=8)  # warm-up

    @torch.no_grad()
    def generate(self, rows: list[int], max_new: int | None = None) -> int:
        """One `generate` call over `rows`; returns its decode steps."""
        targets = [self.true[r] for r in rows]
        ids = self.prompt_ids[rows]
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_new or max(targets), eos_token_id=EOS, pad_token_id=PAD,
                                  logits_processor=LogitsProcessorList(
                                      [ForceLength(targets, ids.shape[1], self.device)]))
        return out.shape[1] - ids.shape[1]

    def orders(self) -> dict[str, list[int]]:
        n = len(self.true)
        return {"stock": list(range(n)), "predicted": [r for w in waves_by_length(self.pred, n) for r in w],
                "oracle": [r for w in waves_by_length(self.true, n) for r in w]}

    def one_call(self) -> None:
        """All rows in one `generate` call: order cannot matter, the longest row sets the number of decode steps."""
        rows = list(range(len(self.true)))
        steps = [0]
        seconds = self.timed(lambda: steps.__setitem__(0, self.generate(rows)))
        self.emit(phase="gen_one_call", plan="any_order", seconds=round(seconds, 3), decode_steps=steps[0],
                  slot_waste=round(1 - sum(self.true) / (steps[0] * len(rows)), 4))

    def waves(self) -> None:
        """Memory-limited: `wave` rows per `generate` call, in stock order or cut from a longest-first order."""
        w, seconds = self.args.wave, {}
        for name, order in self.orders().items():
            if name not in self.args.plans.split(","):
                continue
            waves = [order[i:i + w] for i in range(0, len(order), w)]
            steps = [0]
            seconds[name] = self.timed(lambda: steps.__setitem__(0, sum(self.generate(x) for x in waves)), repeats=2)
            self.emit(phase="gen_waves", plan=name, wave=w, seconds=round(seconds[name], 3), decode_steps=steps[0],
                      slot_waste=round(1 - sum(self.true) / (steps[0] * w), 4),
                      speedup_vs_stock=round(seconds["stock"] / seconds[name], 3) if "stock" in seconds else None)
        if len(seconds) == 3:
            self.emit(phase="gen_waves_summary", fraction_of_oracle_gain=_fraction(seconds))

    def continuous_batching(self) -> None:
        """transformers continuous batching with fewer slots than requests; admission is FIFO in submission order."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        slots, seconds = self.args.slots, {}
        gen_config = GenerationConfig(do_sample=False, max_new_tokens=self.args.gen_cap, eos_token_id=-1,
                                      pad_token_id=PAD)
        cb_config = ContinuousBatchingConfig(max_requests_per_batch=slots)
        for name, order in self.orders().items():
            def run(order=order):
                with self.model.continuous_batching_context_manager(
                        generation_config=gen_config, continuous_batching_config=cb_config, block=True) as manager:
                    ids = [manager.add_request(self.prompt_ids[r].tolist(), max_new_tokens=self.true[r]) for r in order]
                    done = 0
                    while done < len(ids):
                        result = manager.get_result(timeout=1)
                        if result is None and not manager.is_running():
                            raise RuntimeError("the continuous batching thread stopped")
                        done += result is not None and result.is_finished()
            seconds[name] = self.timed(run)
            self.emit(phase="gen_continuous_batching", plan=name, slots=slots, seconds=round(seconds[name], 3),
                      speedup_vs_stock=round(seconds["stock"] / seconds[name], 3))
        self.emit(phase="gen_continuous_batching_summary", fraction_of_oracle_gain=_fraction(seconds))


def _fraction(seconds: dict[str, float]) -> float | None:
    """(stock − predicted) / (stock − oracle): how much of the oracle's time saving the predictions capture."""
    gain = seconds["stock"] - seconds["oracle"]
    return round((seconds["stock"] - seconds["predicted"]) / gain, 3) if gain > 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON-lines file to append to.")
    p.add_argument("--small", action="store_true", help="Tiny shapes and sizes: a CPU smoke run.")
    p.add_argument("--sections", default="loss,waves,one_call,continuous_batching")
    p.add_argument("--plans", default="stock,predicted,oracle", help="Which orders the waves section runs.")
    p.add_argument("--pred-mae-ratio", type=float, default=0.89,
                   help="Predictor MAE / naive MAE to emulate (0.89 = 35.6/40.0, the online EGTP static MAE measured "
                        "by the CPU quickstart with the embedded SmolLM2).")
    args = p.parse_args()
    big = dict(shape="qwen2.5-0.5b", loss_rows=192, loss_prompt=256, loss_median=500, loss_cap=2048, micro_batch=8,
               token_budget=16384, prompts=6, group=8, gen_prompt=64, gen_median=64, gen_cap=256, wave=16, slots=16)
    small = dict(shape="tiny", loss_rows=32, loss_prompt=16, loss_median=20, loss_cap=64, micro_batch=4,
                 token_budget=256, prompts=4, group=4, gen_prompt=8, gen_median=8, gen_cap=32, wave=4, slots=4)
    vars(args).update(small if args.small else big)
    bench = Bench(args)
    bench.emit(phase="setup", device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               torch=torch.__version__, **{k: v for k, v in vars(args).items() if k != "out"})
    sections = args.sections.split(",")
    if "loss" in sections:
        bench.loss_phase()
    if {"waves", "one_call", "continuous_batching"} & set(sections):
        bench.generation_setup()
    for name in ("waves", "one_call", "continuous_batching"):
        if name in sections:
            try:
                getattr(bench, name)()
            except Exception as error:  # noqa: BLE001 - one regime failing must not lose the others' numbers
                bench.emit(phase=name, error=f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
