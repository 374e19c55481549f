"""The loss phase's forward + backward over one optimizer step's rows, four ways, on this machine's CPU: stock's
padded micro-batches, `packed` (rl_lenbalance.loss.packed), and the two known ways of computing each group's prompt
once: (a) the prompt's key/value cache computed once with gradients and indexed to the rows, then the completions
run padded against it; (b) a tree mask (rl_lenbalance.loss.shared_prompt, the one kept).

The rows are quickstart-like: GRPO groups of 8 completions, prompts of 38-83 tokens (mean ~60), completions of
24-128 (mean ~76), random token ids, the embedded SmolLM2-135M in float32 with sdpa. Stock and packed run stock's
micro-batches (`--micro-batch` rows in a random order, padded to the step's widest prompt and completion, as TRL pads
the generation batch); the shared-prompt ways run `plan_shared_prompt`'s micro-batches under `--token-budget`. Every
way computes log-probs and entropies at temperature 1 and back-propagates the same loss; the variants take turns in
an order reversed every repeat, the first round is a warm-up and is dropped.

    python benchmarks/shared_prompt_forward.py --out docs/benchmarks/shared_prompt_forward_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import save_report  # noqa: E402

from rl_lenbalance.builtin.models import load_model  # noqa: E402
from rl_lenbalance.loss.packed import _ChunkedLogpEntropy, packed_logps_and_entropies  # noqa: E402
from rl_lenbalance.loss.shared_prompt import plan_shared_prompt, prompt_groups, shared_prompt_logps_and_entropies  # noqa: E402


def make_step(groups: int, group_size: int, vocab: int, seed: int):
    """One optimizer step's rows in TRL's layout, padded to the step's widest prompt and completion."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(38, 84, (groups,), generator=generator).repeat_interleave(group_size)
    lengths = torch.randint(24, 129, (groups * group_size,), generator=generator)
    width, completion = int(prompt_lengths.max()), int(lengths.max())
    prompts = torch.randint(10, vocab, (groups, width), generator=generator).repeat_interleave(group_size, 0)
    input_ids = torch.cat([prompts, torch.randint(10, vocab, (len(lengths), completion), generator=generator)], 1)
    columns = torch.arange(width + completion)
    attention_mask = ((columns >= width - prompt_lengths[:, None]) & (columns < width + lengths[:, None])).long()
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask, completion


def stock_forward(model, input_ids, attention_mask, logits_to_keep):
    """The padded micro-batch, logits at every completion column (padding included), as TRL's logits path."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
    labels = input_ids[:, -logits_to_keep:]
    logps, entropy = _ChunkedLogpEntropy.apply(logits[:, :-1].flatten(0, 1), labels.flatten(), 1.0, 512, True)
    return logps.view(labels.shape), entropy.view(labels.shape)


def cached_prompt_forward(model, input_ids, attention_mask, logits_to_keep):
    """Way (a): the group's prompt (all but its last column) through the model once with a cache, the cache indexed
    to the rows, then [last prompt token, completion] padded against it at stock's positions."""
    prompt_width = input_ids.shape[1] - logits_to_keep
    groups = prompt_groups(input_ids, attention_mask, logits_to_keep)
    firsts = torch.tensor([groups.tolist().index(g) for g in range(int(groups.max()) + 1)])
    trunk = slice(0, prompt_width - 1)
    out = model(input_ids=input_ids[firsts, trunk], attention_mask=attention_mask[firsts, trunk], use_cache=True,
                logits_to_keep=1)
    cache = out.cache
    cache.batch_select_indices(groups)
    positions = torch.arange(prompt_width - 1, input_ids.shape[1] - 1).expand(len(groups), -1)
    logits = model(input_ids=input_ids[:, prompt_width - 1:-1], attention_mask=attention_mask[:, :-1],
                   position_ids=positions, cache=cache, use_cache=True).logits
    real = attention_mask[:, prompt_width:].bool()
    logps, entropy = _ChunkedLogpEntropy.apply(logits[real], input_ids[:, prompt_width:][real], 1.0, 512, True)

    def scatter(values):
        return values.new_zeros(real.shape).masked_scatter(real, values)

    return scatter(logps), scatter(entropy)


def tree_forward(model, input_ids, attention_mask, logits_to_keep):
    return shared_prompt_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)


def packed_forward(model, input_ids, attention_mask, logits_to_keep):
    return packed_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)


def run(model, forward, step, microbatches) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Forward + backward of every micro-batch (gradients accumulate): seconds, the step's log-probs, entropies."""
    input_ids, attention_mask, width = step
    logps = torch.zeros(input_ids.shape[0], width, dtype=torch.promote_types(model.dtype, torch.float32))
    entropy = torch.zeros_like(logps)
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for rows in microbatches:
        lp, ent = forward(model, input_ids[rows], attention_mask[rows], width)
        mask = attention_mask[rows, -width:]
        ((lp * mask).sum() + 0.1 * (ent * mask).sum()).backward()
        logps[rows], entropy[rows] = lp.detach(), ent.detach()
    return time.perf_counter() - start, logps, entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=2, help="groups per optimizer step (quickstart: 2)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (quickstart: 8)")
    parser.add_argument("--micro-batch", type=int, default=4, help="stock's rows per micro-batch (quickstart: 4)")
    parser.add_argument("--token-budget", type=int, default=1024, help="shared-prompt tokens per micro-batch")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, _ = load_model(None, dtype=torch.float32)
    model.train()
    step = make_step(args.groups, args.group_size, model.config.vocab_size, args.seed)
    input_ids, attention_mask, width = step
    rows = input_ids.shape[0]
    order = torch.randperm(rows).tolist()
    stock_batches = [order[i:i + args.micro_batch] for i in range(0, rows, args.micro_batch)]
    real = attention_mask.bool()
    groups = prompt_groups(input_ids, attention_mask, width).tolist()
    prompt_lengths, lengths = real[:, :-width].sum(1).tolist(), real[:, -width:].sum(1).tolist()
    shared_batches = plan_shared_prompt(groups, prompt_lengths, lengths, args.token_budget)
    variants = {
        "stock": (stock_forward, stock_batches),
        "packed": (packed_forward, stock_batches),
        "shared_prompt_cache": (cached_prompt_forward, shared_batches),
        "shared_prompt_tree": (tree_forward, shared_batches),
    }
    tokens = {  # tokens each way runs through the model per step
        "stock": rows * input_ids.shape[1],
        "packed": int(real.sum()) - rows,
        "shared_prompt_cache": sum(len({groups[r] for r in b}) * (input_ids.shape[1] - width - 1) + len(b) * width
                                   for b in shared_batches),
        "shared_prompt_tree": sum(sum(prompt_lengths[r] - 1 for r in {groups[r]: r for r in b}.values())
                                  + sum(lengths[r] for r in b) for b in shared_batches),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    names = list(variants)
    for repeat in range(args.repeats + 1):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            forward, batches = variants[name]
            elapsed, logps, entropy = run(model, forward, step, batches)
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            outputs[name] = (logps, entropy, grad)
            if repeat:
                seconds[name].append(elapsed)
            print(f"round {repeat} {name}: {elapsed:.2f} s", flush=True)
    reference = outputs["stock"]
    real_completion = attention_mask[:, -width:].bool()  # stock's padding positions hold values, the others' 0
    stock_s = statistics.median(seconds["stock"])
    results = []
    for name in names:
        logps, entropy, grad = outputs[name]
        median = statistics.median(seconds[name])
        results.append({
            "variant": name, "seconds_per_step": seconds[name], "median_s": median,
            "speedup_vs_stock": stock_s / median, "model_tokens": tokens[name],
            "tokens_vs_stock": tokens[name] / tokens["stock"],
            "max_abs_logp_diff_vs_stock": (logps - reference[0])[real_completion].abs().max().item(),
            "max_abs_entropy_diff_vs_stock": (entropy - reference[1])[real_completion].abs().max().item(),
            "grad_rel_diff_vs_stock": ((grad - reference[2]).abs().max() / reference[2].abs().max()).item(),
            "microbatches": len(variants[name][1]),
        })
        print(f"{name}: median {median:.2f} s, {stock_s / median:.2f}x stock, {tokens[name]} tokens", flush=True)
    settings = {"groups": args.groups, "group_size": args.group_size, "rows": rows, "prompt_width": input_ids.shape[1]
                - width, "completion_width": width, "mean_prompt": sum(prompt_lengths) / rows,
                "mean_completion": sum(lengths) / rows, "model": "embedded SmolLM2-135M-Instruct, float32, sdpa",
                "warmup_rounds": 1, "repeats": args.repeats}
    if args.out:
        save_report(args.out, [{"settings": settings}, *results])


if __name__ == "__main__":
    main()
