"""Reordering and rebalancing change nothing that is learned: two real gloo processes, stock vs rl-lenbalance
(GRPOTrainer and RLOOTrainer).

The tiny model runs in float64 so that "equal up to float error" can be asserted tightly (1e-8 relative): in
float32 the two runs differ by ~2e-5 relative, the size of stock TRL's own run-to-run reordering noise, because
group-normalised advantages make the gradient a small difference of large terms.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "distributed" / "exactness_worker.py"


@pytest.mark.slow
def test_stock_and_lenbalance_learn_the_same_parameters(tiny_model_dir, tmp_path):
    out = tmp_path / "exactness.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER), str(tiny_model_dir),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    settings = {(r["loss_type"], r["grad_acc"], r["num_iterations"], r["steps_per_generation"], r["plan"])
                for r in results}
    assert settings == {(loss_type, g, n, g, "sorted_uneven" if n == 1 else "auto")
                        for loss_type in ("dapo", "grpo", "dr_grpo") for g in (1, 2) for n in (1, 2)} | {
        ("grpo", 1, 1, 2, "sorted_uneven"), ("dapo", 2, 1, 4, "sorted_uneven"), ("rloo", 2, 1, 2, "sorted_uneven"),
        ("rloo", 2, 2, 2, "auto"), ("dapo", 2, 1, 2, "packed@60"), ("grpo", 2, 2, 2, "shared_prompt"),
        ("dapo", 2, 1, 2, "shared_prompt@60")}
    for r in results:
        assert r["world_size"] == 2
        assert r["moved"] > 1e-4, r  # parameters really moved, so equality below means something
        assert r["max_rel_diff"] < 1e-8, r
        assert r["pad_frac"] <= r["pad_frac_stock"] and r["slowest_rank_vs_stock"] <= 1.0 + 1e-9, r
    # rows really were regrouped, trimmed and moved between ranks (with one micro-batch per rank, moving rows
    # would make the slowest rank slower than stock here, so the plan keeps them: nothing to compare there)
    regrouped = [r for r in results if r["grad_acc"] == 2]
    assert all(r["pad_frac"] < r["pad_frac_stock"] for r in regrouped), regrouped
    assert any(r["rows_moved"] > 0 for r in regrouped), regrouped
    # micro-batches of unequal rows (row-mean losses reweighted) were trained, for every loss type, where asked for
    uneven = {r["loss_type"] for r in results if any(len(set(sizes)) > 1 for sizes in r["microbatch_rows"])}
    assert uneven == {"dapo", "grpo", "dr_grpo", "rloo"}, [(r["loss_type"], r["microbatch_rows"]) for r in results]
    assert all(len(set(sizes)) == 1 for r in results if r["plan"] == "auto" for sizes in r["microbatch_rows"])
    # padding-free layouts really ran: every loss forward was one sequence (stock's are the padded rectangle), and
    # under a dense-mask limit of 60 tokens each micro-batch ran as several
    free = {r["plan"]: r for r in results if r["plan"].startswith(("packed", "shared_prompt"))}
    assert all(rows == 1 for r in free.values() for rows in r["loss_forward_rows"]), free
    assert all(rows > 1 for r in results if r["plan"] == "sorted_uneven" for rows in r["loss_forward_rows"])
    assert all(len(free[p]["loss_forward_rows"]) > sum(map(len, free[p]["microbatch_rows"])) for p in
               ("packed@60", "shared_prompt@60")), free
    assert free["packed@60"]["pad_frac"] == 0.0 and free["shared_prompt"]["pad_frac"] < 0.0  # prompts computed once


@pytest.mark.slow
def test_greedy_generation_rebucketed_across_two_ranks_equals_stock(embedded_dir, tmp_path):
    """Rows running after the probe move to the other rank, are continued there, and come back in stock's order."""
    worker = Path(__file__).parent / "distributed" / "rebucket_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(embedded_dir),
           str(tmp_path / "rebucket")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rebucket.{rank}.json").read_text()) for rank in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2 and r["rounds"] == 2
        assert r["equal"] == [True, True], r  # round 1: stock order; round 2: re-bucketed across ranks
    assert min(ranks[0]["lengths"]) > max(ranks[1]["lengths"])  # the ranks really were unbalanced
    metrics = ranks[0]["metrics"]  # reduced over ranks: the same on both
    assert metrics["rows_moved_across_ranks"] == [0.0, metrics["rows_moved_across_ranks"][1]]
    assert metrics["rows_moved_across_ranks"][1] > 0 and metrics["reprefill_tokens"][1] > 0
    assert metrics["decode_slots"][1] == metrics["real_tokens"][1]  # compaction: every slot a real token
    assert metrics["rank_imbalance"][1] < metrics["rank_imbalance_stock"][1]


@pytest.mark.slow
def test_admitted_backends_balanced_across_two_ranks_return_stocks_rows_and_parameters(eos_tiny_model_dir, tmp_path):
    """vLLM (colocate stand-in) and continuous batching: rows dealt to the other rank by predicted work are generated
    there and come back to their rows; TRL receives stock's rows, rewards, advantages and logprobs, in stock's order,
    and learns stock's parameters."""
    from collections import Counter

    worker = Path(__file__).parent / "distributed" / "admitted_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
           str(eos_tiny_model_dir), str(tmp_path / "admitted")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"admitted.{rank}.json").read_text()) for rank in (0, 1)]
    for backend in ("vllm", "cb"):
        r0, r1 = ranks[0][backend], ranks[1][backend]
        rounds = r0["rounds"]
        assert r0["world_size"] == r1["world_size"] == 2 and rounds == r1["rounds"] == 4
        for r in (r0, r1):  # what TRL received, row for row in stock's order, every round
            for stock, ours in zip(r["stock"], r["ours"], strict=True):
                for key in ("prompts", "completions", "rewards", "advantages", "logprobs"):
                    assert ours[key] == stock[key], (backend, r["rank"], key)
        for stock0, stock1 in zip(r0["stock"], r1["stock"], strict=True):  # rank 0 held the long answers
            assert min(map(len, stock0["completions"])) > max(map(len, stock1["completions"])), backend
        # rows generated on the other rank, round by round (prompts differ between the ranks within a round)
        elsewhere = []
        for n in range(rounds):
            stock = [Counter(map(tuple, r["submitted_stock"][n])) for r in (r0, r1)]
            ours = [Counter(map(tuple, r["submitted_ours"][n])) for r in (r0, r1)]
            assert sum(ours, Counter()) == sum(stock, Counter()), (backend, n)  # the same requests in all
            elsewhere.append(sum((o - s).total() for o, s in zip(ours, stock)))
        assert all(r["submitted_ours"][0] == r["submitted_stock"][0] for r in (r0, r1)), backend  # round 1: stock's
        assert elsewhere[0] == 0 and sum(elsewhere) > 0, (backend, elsewhere)  # rows really moved between ranks
        assert r0["rows_moved"] == r1["rows_moved"] == [float(m) for m in elsewhere], (backend, r0["rows_moved"])
        assert r0["max_rel_diff"] < 1e-8, (backend, r0["max_rel_diff"])
    assert all(rnd["logprobs"] for r in ranks for rnd in r["vllm"]["stock"])  # vLLM's logprobs were compared
    assert ranks[0]["vllm"]["moved"] > 1e-3  # the vLLM run learned (greedy groups have zero advantages)
