"""Would n-gram drafts from a GRPO group's own text shorten generation on this device? (issue 30, item 1)

Offline, from real rollouts of a recipe (by default the quickstart: embedded SmolLM2, temperature 1, 128 tokens,
8 completions per prompt): the tokens per decode step that prompt-lookup drafts of k tokens would give (lockstep walk
and position-averaged expectation, see `benchmarks.forelen.spec`), the measured cost of a decode step that verifies
P positions per row, and the two combined into a predicted generation time per round against stock.

    flock /tmp/cpu.lock python benchmarks/spec_offline.py --rounds 4 --out docs/benchmarks/spec_offline_cpu.json
    # smoke test
    python benchmarks/spec_offline.py --rounds 1 --prompts 2 --max-new-tokens 16 --cost-rows 8 --cost-positions 1 3 \
        --cost-repeats 1 --out /tmp/spec.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import save_report  # noqa: E402
from transformers import DynamicCache, GenerationConfig  # noqa: E402

from benchmarks.forelen.spec import (  # noqa: E402
    averaged_schedule,
    expected_accepted,
    interpolated_cost,
    lockstep_walk,
    match_length,
    position_drafts,
    schedule_seconds,
    stock_schedule,
    walk_schedule,
)
from rl_lenbalance.builtin.models import load_model  # noqa: E402
from rl_lenbalance.builtin.tasks import TASKS  # noqa: E402
from rl_lenbalance.cli.recipe import load_recipe  # noqa: E402
from rl_lenbalance.generation.decode import _logits_processor, left_pad, prompt_then_completion  # noqa: E402

SOURCES = {"self": False, "group": True}  # own output + prompt; and the siblings' outputs so far


def generation_config(training, tokenizer, max_new_tokens: int) -> GenerationConfig:
    """The GenerationConfig TRL's GRPOTrainer builds from the recipe (grpo_trainer.py, non-vLLM path)."""
    if training.repetition_penalty != 1.0 or training.generation_kwargs:
        raise ValueError("spec_offline supports temperature/top_k/top_p/min_p only (the teacher-forced pass applies "
                         "the processors position by position); unset repetition_penalty and generation_kwargs.")
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            temperature=training.temperature, top_p=training.top_p, top_k=training.top_k,
                            min_p=training.min_p, repetition_penalty=training.repetition_penalty,
                            disable_compile=True)


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def rollouts(model, tokenizer, config: GenerationConfig, prompts: list[list[int]], group: int, seed: int
             ) -> list[list[int]]:
    """`group` sampled completions of each prompt in one `generate` call (prompts repeated as TRL repeats them)."""
    rows = [prompt for prompt in prompts for _ in range(group)]
    input_ids, attention_mask, _ = left_pad(rows, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return [until_eos(row, tokenizer.eos_token_id) for row in out[:, input_ids.shape[1]:].tolist()]


@torch.no_grad()
def policy_probs(model, config: GenerationConfig, prompt: list[int], completions: list[list[int]], pad: int
                 ) -> list[torch.Tensor]:
    """Each completion's next-token distributions at its positions ([len, vocab]), after the sampling processors,
    from one teacher-forced forward of the group."""
    width = max(len(c) for c in completions)
    ids, mask, positions = prompt_then_completion([prompt] * len(completions), completions, width, pad)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    start = len(prompt) - 1  # the logits at the prompt's last token predict the first completion token
    processors = _logits_processor(config, mask)
    out = []
    for row, completion in enumerate(completions):
        scores = logits[row, start:start + len(completion)].float()
        scores = processors(ids[row:row + 1].expand(len(completion), -1), scores)  # stateless warpers only
        out.append(torch.softmax(scores, dim=-1))
    return out


@torch.no_grad()
def step_costs(model, rows: list[int], positions: list[int], context: int, repeats: int) -> dict:
    """Median seconds of one forward of `positions` new tokens per row over a KV cache of `context` tokens."""
    vocab = model.config.vocab_size
    table = {}
    for r in rows:
        cache = DynamicCache(config=model.config)
        generator = torch.Generator().manual_seed(r)
        model(input_ids=torch.randint(vocab, (r, context), generator=generator),
              attention_mask=torch.ones(r, context, dtype=torch.long), cache=cache, use_cache=True, logits_to_keep=1)
        for p in positions:
            ids = torch.randint(vocab, (r, p), generator=generator)
            position_ids = torch.arange(context, context + p).expand(r, -1)
            attention_mask = torch.ones(r, context + p, dtype=torch.long)  # as the decode loop passes one
            seconds = []
            for _ in range(repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      use_cache=True, logits_to_keep=p)
                seconds.append(time.perf_counter() - start)
                cache.crop(-p)
            table[r, p] = statistics.median(seconds[1:])
            print(f"step cost rows={r} positions={p}: {1000 * table[r, p]:.1f} ms", flush=True)
    return table


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=4, help="Generate calls of --prompts prompts each.")
    parser.add_argument("--prompts", type=int, default=8, help="Prompts per generate call.")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--round-sizes", type=int, nargs="+", default=[2, 8],
                        help="Prompts per round in the prediction (the quickstart generates 2 prompts x 8 a step).")
    parser.add_argument("--cost-rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--cost-positions", type=int, nargs="+", default=[1, 3, 5, 9])
    parser.add_argument("--cost-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    recipe = load_recipe(args.recipe)
    training = recipe.training
    group, cap = training.num_generations, args.max_new_tokens or training.max_completion_length
    model, tokenizer = load_model(recipe.model.name_or_path, dtype=recipe.model.dtype)
    model.eval()
    config = generation_config(training, tokenizer, cap)
    dataset = TASKS[recipe.task.name][0](recipe.task.num_prompts, recipe.task.seed)
    if args.rounds * args.prompts > len(dataset):
        raise ValueError(f"--rounds x --prompts = {args.rounds * args.prompts} is more than the recipe's "
                         f"task.num_prompts={len(dataset)}; lower --rounds or --prompts.")
    messages = [dataset[i]["prompt"] for i in range(args.rounds * args.prompts)]
    prompt_ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)
                  ["input_ids"] for m in messages]

    # 1. rollouts; 2. teacher-forced probabilities; drafts at every position and the probabilities they need
    groups = []  # per prompt: its prompt ids, completions, and per source the known draft probabilities per position
    gen_seconds = 0.0
    for rnd in range(args.rounds):
        chunk = prompt_ids[rnd * args.prompts:(rnd + 1) * args.prompts]
        start = time.perf_counter()
        completions = rollouts(model, tokenizer, config, chunk, group, args.seed + rnd)
        gen_seconds += time.perf_counter() - start
        for i, prompt in enumerate(chunk):
            texts = completions[i * group:(i + 1) * group]
            probs = policy_probs(model, config, prompt, texts, tokenizer.pad_token_id)
            known = {}
            for source, siblings in SOURCES.items():
                known[source] = []
                for row, text in enumerate(texts):
                    per_position = []
                    for pos, proposal in enumerate(position_drafts(prompt, texts, row, max(args.ks), siblings, cap)):
                        m = match_length(proposal, text[pos:])
                        per_position.append([float(probs[row][pos + j, proposal[j]])
                                             for j in range(min(m + 1, len(proposal), len(text) - pos))])
                    known[source].append(per_position)
            sampled_logp = [float(torch.log(probs[row][torch.arange(len(t)), torch.tensor(t)]).mean())
                            for row, t in enumerate(texts)]
            groups.append({"prompt": prompt, "texts": texts, "known": known, "sampled_logp": sampled_logp})
        print(f"round {rnd}: generated {sum(map(len, completions))} tokens in {time.perf_counter() - start:.1f} s",
              flush=True)

    # 4. the cost side
    context = round(statistics.mean(map(len, prompt_ids))) + cap // 2
    table = step_costs(model, args.cost_rows, args.cost_positions, context, args.cost_repeats)
    cost = interpolated_cost(table)

    # 3. acceptance, per source and k, on all rows and on the rows that set their round's length (longest ones)
    lengths = [len(t) for g in groups for t in g["texts"]]

    def longest_rows(prompts_per_round: int) -> set[int]:
        rows_per_round = prompts_per_round * group
        out = set()
        for start in range(0, len(lengths), rows_per_round):
            longest = max(lengths[start:start + rows_per_round])
            out |= {start + i for i, n in enumerate(lengths[start:start + rows_per_round]) if n == longest}
        return out

    acceptance, prediction = [], []
    for source, siblings in SOURCES.items():
        for k in args.ks:
            walks = [walk for g in groups for walk in lockstep_walk(g["prompt"], g["texts"], k, siblings, cap)]
            walks_3gram = [walk for g in groups  # drafting only where the last 3 tokens matched
                           for walk in lockstep_walk(g["prompt"], g["texts"], k, siblings, cap, min_n=3)]
            averaged = [statistics.mean(expected_accepted(known[:k]) + 1 for known in g["known"][source][row])
                        for g in groups for row in range(group)]
            drafted = [sum(1 for known in g["known"][source][row] if known) / len(g["texts"][row])
                       for g in groups for row in range(group)]
            for rows_name, prompts_per_round in [("all", None)] + [(f"longest_of_{p * group}", p)
                                                                   for p in args.round_sizes]:
                rows = range(len(lengths)) if prompts_per_round is None else sorted(longest_rows(prompts_per_round))
                acceptance.append({
                    "source": source, "k": k, "rows": rows_name, "n_rows": len(rows),
                    "walk_tokens_per_step": round(sum(lengths[r] for r in rows) / sum(len(walks[r]) for r in rows), 3),
                    "walk_tokens_per_step_3gram_only": round(
                        sum(lengths[r] for r in rows) / sum(len(walks_3gram[r]) for r in rows), 3),
                    "expected_tokens_per_step_position_mean": round(statistics.mean(averaged[r] for r in rows), 3),
                    "positions_with_a_draft": round(statistics.mean(drafted[r] for r in rows), 3),
                })
            # 5. predicted generation seconds per round
            for prompts_per_round in args.round_sizes:
                n = prompts_per_round * group
                rounds = [range(s, min(s + n, len(lengths))) for s in range(0, len(lengths), n)]
                sums = dict.fromkeys(("stock", "compaction", "walk_fixed_k", "walk_k_where_matched",
                                      "walk_k_where_matched_ragged", "walk_k_where_3gram_matched",
                                      "position_mean_fixed_k"), 0.0)
                steps = dict.fromkeys(("stock", "speculation_walk", "speculation_walk_3gram_only"), 0)
                for rr in rounds:
                    round_lengths = [lengths[r] for r in rr]
                    round_walks = [walks[r] for r in rr]
                    sums["stock"] += schedule_seconds(stock_schedule(round_lengths), cost)
                    sums["compaction"] += schedule_seconds(stock_schedule(round_lengths, compaction=True), cost)
                    sums["walk_fixed_k"] += schedule_seconds(walk_schedule(round_walks, k), cost)
                    sums["walk_k_where_matched"] += schedule_seconds(walk_schedule(round_walks, k, "matched"), cost)
                    sums["walk_k_where_matched_ragged"] += schedule_seconds(
                        walk_schedule(round_walks, k, "ragged"), cost)
                    sums["walk_k_where_3gram_matched"] += schedule_seconds(
                        walk_schedule([walks_3gram[r] for r in rr], k, "matched"), cost)
                    sums["position_mean_fixed_k"] += schedule_seconds(
                        averaged_schedule(round_lengths, [averaged[r] for r in rr], k), cost)
                    steps["stock"] += max(round_lengths)
                    steps["speculation_walk"] += max(len(w) for w in round_walks)
                    steps["speculation_walk_3gram_only"] += max(len(walks_3gram[r]) for r in rr)
                prediction.append({
                    "source": source, "k": k, "rows_per_round": n, "rounds": len(rounds),
                    "decode_steps_per_round": {name: n / len(rounds) for name, n in steps.items()},
                    "seconds_per_round": {name: round(s / len(rounds), 3) for name, s in sums.items()},
                    "speedup_vs_stock": {name: ratio(sums["stock"], s) for name, s in sums.items() if name != "stock"},
                    "speedup_vs_compaction": {name: ratio(sums["compaction"], s) for name, s in sums.items()
                                              if name not in ("stock", "compaction")},
                })

    for row in acceptance + prediction:
        print(row, flush=True)
    completions_stats = {
        "rows": len(lengths), "mean_length": round(statistics.mean(lengths), 1),
        "at_cap": sum(n == cap for n in lengths),
        "mean_log_p_sampled": round(statistics.mean(v for g in groups for v in g["sampled_logp"]), 3),
        "generate_seconds": round(gen_seconds, 1),
    }
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {
        "max_new_tokens": cap, "num_generations": group, "temperature": training.temperature,
        "top_k": training.top_k, "top_p": training.top_p, "min_p": training.min_p, "cost_context_tokens": context,
        "torch_threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    save_report(args.out, acceptance + prediction, extra={
        "settings": settings, "completions": completions_stats,
        "step_cost_seconds": [{"rows": r, "positions": p, "seconds": round(s, 5)} for (r, p), s in table.items()]})


if __name__ == "__main__":
    main()
