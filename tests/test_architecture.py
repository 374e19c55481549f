"""The layout's rules and its framework-free parts: import rules, the training plan, batch trimming, the ledger,
the saved-head contract, and a rollout round run without TRL."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from helpers import make_args, make_trainer, tiny_decoder
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_lenbalance.config import LenBalanceConfig
from rl_lenbalance.generation.engine import check_head
from rl_lenbalance.ledger import (
    GenerationLedger,
    RunTotals,
    TrainingLedger,
    gather_ledgers,
    generation_metrics,
    summary,
    summary_rows,
    training_metrics,
)
from rl_lenbalance.predictor import CONTEXT_SIZE, HeadConfig
from rl_lenbalance.schedule import optimizer_steps, plan_training, take_rows, trim_padding

PACKAGE = Path(__file__).resolve().parents[1] / "rl_lenbalance"
STAGES = [  # lowest first: a module imports from its own stage or from a lower one, never from a higher one
    ["predictor", "schedule", "ledger", "builtin", "extras"],  # pure parts: the head's math, row assignments, the
    # counts, the demo's model and tasks, the optional dependencies
    ["loss"],  # training strategies, their kernels, a pass's lifecycle
    ["config"],  # the settings, checked against the registries below them
    ["generation"],  # decode loop, capture, the predictor at run time, a round's orchestration
    ["integrations"],  # TRL glue
    ["cli"],  # the command and what it runs
    ["__init__", "train"],  # the public names, the `accelerate launch -m rl_lenbalance.train` shim
]
# never reach TRL or accelerate
PURE = ["generation", "config", "ledger", "schedule", "predictor", "loss", "builtin", "extras"]


def _module_file(name: str) -> Path | None:
    """The file of `rl_lenbalance.<name>` (dotted), or None for a name that is not a module of the package."""
    path = PACKAGE.joinpath(*name.split("."))
    if path.is_dir():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _modules() -> list[str]:
    """Every module of the package, dotted (a package by its folder's name; the top `__init__` as "__init__")."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names.append(".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts))
    return names


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(package modules, outside top-level packages) that `rl_lenbalance.<name>` imports, anywhere in its code."""
    path = PACKAGE / "__init__.py" if name == "__init__" else _module_file(name)
    package = [] if name == "__init__" else name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside.add(".".join(alias.name.split(".")[1:])) if alias.name.startswith("rl_lenbalance.")
                 else outside.add(alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                outside.add(node.module.split(".")[0])
                continue
            base = package[: len(package) - node.level + 1]
            module = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:  # `from . import ledger` names a module; `from .x import f` names x
                inside.add(f"{module}.{alias.name}".strip(".") if _module_file(f"{module}.{alias.name}".strip("."))
                           else module)
    return {m for m in inside if m}, outside


def _closure(name: str) -> tuple[set[str], set[str]]:
    """Every package module `name` reaches through imports, and every outside package they import."""
    seen, outside, todo = set(), set(), [name]
    while todo:
        module = todo.pop()
        if module in seen or (_module_file(module) is None and module != "__init__"):
            continue
        seen.add(module)
        inside, out = _imports(module)
        outside |= out
        todo += inside
    return seen, outside


def _stage(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(STAGES) if top in names)


def test_the_import_reader_sees_the_adapter_import_trl():
    reached, outside = _closure("integrations.trl")
    assert {"trl", "accelerate"} <= outside
    assert {"generation.rollout", "ledger", "integrations.trl.callback", "loss.packed"} <= reached


def test_every_module_has_a_stage_and_imports_none_above_it():
    upward = []
    for module in _modules():
        inside, _ = _imports(module)
        upward += [(module, target) for target in inside if _stage(target) > _stage(module)]
    assert not upward


def test_no_import_circle():
    graph = {module: _imports(module)[0] for module in _modules()}
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, " -> ".join(path[path.index(module):] + [module])
        if module in done or module not in graph:
            return
        path.append(module)
        for target in sorted(graph[module]):
            if target != module.rsplit(".", 1)[0]:  # a package module's own `__init__` imports its children
                visit(target)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


@pytest.mark.parametrize("name", PURE)
def test_pure_parts_never_import_trl_or_accelerate(name):
    for module in [m for m in _modules() if m == name or m.startswith(f"{name}.")]:
        reached, outside = _closure(module)
        assert not {"trl", "accelerate"} & outside, (module, outside)
        assert not any(m.startswith(("integrations", "cli")) for m in reached), (module, reached)


def test_the_callback_never_imports_the_adapter():
    reached, _ = _closure("integrations.trl.callback")
    assert "integrations.trl.trainer" not in reached


def test_every_name_the_adapter_adds_to_a_trainer_says_lenbalance(tiny_model_dir, tmp_path):
    """A name without `lenbalance` in it would collide the day TRL adds one of its own."""
    from trl import GRPOTrainer

    from rl_lenbalance import LenBalanceGRPOTrainer

    def names(trainer) -> set[str]:
        return set(vars(trainer)) | set(dir(type(trainer)))

    stock = make_trainer(GRPOTrainer, tiny_model_dir, make_args(tmp_path))
    ours = make_trainer(LenBalanceGRPOTrainer, tiny_model_dir, make_args(tmp_path))
    added = names(ours) - names(stock)
    assert {"lenbalance", "lenbalance_config", "_lenbalance_loss"} <= added  # the reader sees what it adds
    assert not [name for name in added if "lenbalance" not in name]


# --- the training plan -------------------------------------------------------------------------------------------


def test_optimizer_steps_follow_stocks_shuffle():
    shuffle = [5, 2, 7, 0, 1, 3, 6, 4]  # stock's permutation: rows in the order its micro-batches take them
    assert optimizer_steps(shuffle, steps_per_generation=4, gradient_accumulation_steps=2) == [
        0, 1, 0, 1, 1, 0, 1, 0]  # positions 0-3 (rows 5, 2, 7, 0) train in step 0
    assert optimizer_steps(shuffle, 4, 4) == [0] * 8
    with pytest.raises(ValueError, match="whole optimizer steps"):
        optimizer_steps(shuffle, 4, 3)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 3))
def test_every_rank_trains_each_row_once_in_its_own_optimizer_step(data, ranks, ga, steps_per_batch, rows_per_mb):
    per_rank = rows_per_mb * ga * steps_per_batch
    total = ranks * per_rank
    completion = data.draw(st.lists(st.integers(1, 60), min_size=total, max_size=total))
    prompt = data.draw(st.lists(st.integers(1, 20), min_size=total, max_size=total))
    steps = []
    for r in range(ranks):  # each rank's own stock shuffle
        shuffle = data.draw(st.permutations(list(range(per_rank))))
        steps += optimizer_steps(shuffle, ga * steps_per_batch, ga)
    plans = [plan_training(completion, prompt, steps, ranks, r, ga) for r in range(ranks)]
    assert sorted(row for plan in plans for row in plan.rows) == list(range(total))
    for r, plan in enumerate(plans):
        assert sum(plan.sizes) == len(plan.rows) == per_rank and len(plan.sizes) == ga * steps_per_batch
        assert plan.offset == r * per_rank
        assert plan.moved_in == sum(row // per_rank != r for row in plan.rows)
        at = 0
        for k, size in enumerate(plan.sizes):  # micro-step k trains rows of optimizer step k // ga only
            assert {steps[row] for row in plan.rows[at : at + size]} == {k // ga}
            at += size
    assert all(plan.exchange == any(p.moved_in for p in plans) for plan in plans)


def test_one_rank_keeps_its_rows_sorted_by_length_inside_each_step():
    completion, prompt = [5, 40, 1, 30, 2, 50, 3, 20], [4] * 8
    plan = plan_training(completion, prompt, [0] * 8, num_ranks=1, rank=0, microbatches_per_step=2)
    assert (plan.rows, plan.sizes, plan.moved_in, plan.exchange) == ([5, 1, 3, 7, 0, 6, 4, 2], [4, 4], 0, False)


def test_a_rank_holding_the_long_rows_hands_some_to_the_other():
    completion = [90, 80, 70, 60, 1, 2, 3, 4]  # rank 0 generated every long row
    plans = [plan_training(completion, [1] * 8, [0] * 8, 2, r, 2) for r in range(2)]
    assert plans[0].exchange and plans[1].moved_in > 0

    def padded(rows, sizes):
        cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return sum((b - a) * (max(completion[i] for i in rows[a:b]) + 1) for a, b in zip(cuts, cuts[1:]))

    stock = max(4 * 91, 4 * 5)  # stock: each rank's micro-batches padded to its own widest row
    assert max(padded(p.rows, p.sizes) for p in plans) < stock


# --- trimming a batch ----------------------------------------------------------------------------------------------


def _batch() -> dict:
    prompt_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    completion_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    return {"prompt_ids": torch.arange(12).view(3, 4) * prompt_mask, "prompt_mask": prompt_mask,
            "completion_ids": torch.arange(15).view(3, 5) * completion_mask, "completion_mask": completion_mask,
            "old_per_token_logps": torch.randn(3, 5), "advantages": torch.tensor([0.5, -1.0, 0.25]),
            "num_items_in_batch": torch.tensor(6)}


def test_take_rows_and_trim_padding_cut_exactly_the_all_pad_columns():
    batch = _batch()
    picked = trim_padding(take_rows(batch, [2, 0]))
    assert picked["prompt_ids"].tolist() == [[0, 11], [2, 3]]  # rows 2 and 0 need prompt columns 2-3 only
    assert picked["completion_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert torch.equal(picked["old_per_token_logps"], batch["old_per_token_logps"][[2, 0], :3])
    assert picked["advantages"].tolist() == [0.25, 0.5] and picked["num_items_in_batch"] == 6
    kept = trim_padding(take_rows(batch, [1]), prompt=False)  # positions depend on padding: prompts stay whole
    assert kept["prompt_ids"].size(1) == 4 and kept["completion_ids"].tolist() == [[5]]
    empty = dict(batch, completion_mask=torch.zeros(3, 5, dtype=torch.long))
    assert trim_padding(empty)["completion_ids"].size(1) == 1  # TRL slices logits with [:, -width:]


# --- the ledger ----------------------------------------------------------------------------------------------------


def test_rank_ledgers_reduce_to_sums_slowest_steps_and_imbalance():
    ranks = [GenerationLedger(100, 160, 40, 40, 90, 2.0, 0.2, 0, 0), GenerationLedger(60, 120, 30, 30, 60, 4.0, 0.4,
                                                                                        12, 3)]
    gathered = gather_ledgers(ranks[0], lambda row: torch.cat([row, torch.tensor([[*vars(ranks[1]).values()]],
                                                                                     dtype=row.dtype)]))
    assert gathered == ranks
    metrics = generation_metrics(ranks)
    assert metrics["gen/decode_slots"] == 160 and metrics["gen/decode_steps"] == 40
    assert metrics["gen/slot_waste"] == pytest.approx(1 - 150 / 160)
    assert metrics["gen/rank_imbalance"] == pytest.approx(100 / 80) and metrics["gen/seconds"] == 3.0
    assert metrics["gen/rows_moved_across_ranks"] == 3 and metrics["gen/reprefill_tokens"] == 12
    train = training_metrics([TrainingLedger(100, 200, 80, 0), TrainingLedger(120, 150, 90, 2)])
    assert train["train/slowest_rank_vs_stock"] == pytest.approx(120 / 200)
    assert train["train/pad_frac"] == pytest.approx(1 - 170 / 220)


def test_the_summary_table_leaves_out_what_a_run_did_not_measure():
    totals = RunTotals()
    totals.add_generation([GenerationLedger(100, 160, 40, 40, 90, 2.0, 0.2, 0, 0)], predictor_train_s=0.3)
    totals.add_training([TrainingLedger(100, 200, 80, 0)], passes=2)
    logged = [{"lenbalance/predictor/mae_static": 9.0}, {"lenbalance/predictor/mae_static": 7.5}]
    result = summary(totals, logged, steps=2, wall_s=10.0, fallbacks=0)
    assert result["loss_pad_frac"] == pytest.approx(0.2) and result["loss_pad_frac_stock"] == pytest.approx(0.6)
    assert result["predictor_overhead_frac"] == pytest.approx(0.5 / 2.0) and math.isnan(result["mae_plp32"])
    rows = {label: values for label, *values in summary_rows(result)}
    assert rows["predictor MAE at t=0, last round"] == ["7.5 tok", "naive: not logged"]
    assert rows["loss-forward tokens that are padding"] == ["20.0%", "60.0%"]
    assert not any("t=32" in label for label in rows)


# --- the saved head's contract -------------------------------------------------------------------------------------


def test_a_saved_head_with_another_contract_is_refused_naming_the_setting():
    head = HeadConfig(hidden_size=64, max_length=128, pooling="mean", feature_layer=3)  # saved without context
    plain = {"pooling": "mean", "feature_layer": 3, "context_features": False}
    check_head(head, LenBalanceConfig(**plain), 64, 128, "p")  # the same contract: fine
    with pytest.raises(ValueError, match=r"feature_layer=3.*feature_layer=-1.*set lenbalance.feature_layer"):
        check_head(head, LenBalanceConfig(**plain | {"feature_layer": -1}), 64, 128, "p")
    with pytest.raises(ValueError, match=r"pooling='mean'.*pooling='egtp'.*set lenbalance.pooling"):
        check_head(head, LenBalanceConfig(**plain | {"pooling": "egtp"}), 64, 128, "p")
    with pytest.raises(ValueError, match=r"hidden_size=64, max_length=128.*hidden_size=576, max_length=256"):
        check_head(head, LenBalanceConfig(**plain), 576, 256, "p")
    with pytest.raises(ValueError, match=rf"context_size=0.*context_size={CONTEXT_SIZE}.*set lenbalance.context_feat"):
        check_head(head, LenBalanceConfig(pooling="mean", feature_layer=3), 64, 128, "p")  # the default reads context
    with_context = HeadConfig(hidden_size=64, max_length=128, context_size=CONTEXT_SIZE)
    check_head(with_context, LenBalanceConfig(), 64, 128, "p")
    with pytest.raises(ValueError, match=r"saved with context features"):
        check_head(with_context, LenBalanceConfig(context_features=False), 64, 128, "p")
    variant = HeadConfig(hidden_size=64, max_length=128, context_size=CONTEXT_SIZE, extra_features=4)  # a benchmark's
    with pytest.raises(ValueError, match=r"extra_features=4.*extra_features=0.*feature columns the trainer does not"):
        check_head(variant, LenBalanceConfig(), 64, 128, "p")
    older = HeadConfig(hidden_size=64, max_length=128, context_size=CONTEXT_SIZE - 1)  # fewer estimates than today
    with pytest.raises(ValueError, match=r"another set of context features .*: train a new head"):
        check_head(older, LenBalanceConfig(), 64, 128, "p")


def test_the_engine_refuses_a_head_that_would_read_another_layer(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rl_lenbalance.generation.engine import LenBalanceEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = LenBalanceEngine(model, LenBalanceConfig(feature_layer=1), max_length=16)
    trained.save(tmp_path / "head")
    with pytest.raises(ValueError, match="lenbalance.feature_layer"):
        LenBalanceEngine(model, LenBalanceConfig(predictor_path=str(tmp_path / "head")), max_length=16)
    with pytest.raises(ValueError, match="lenbalance.feature_layer"):
        LenBalanceEngine(model, LenBalanceConfig(), max_length=16).load(tmp_path / "head")
    LenBalanceEngine(model, LenBalanceConfig(feature_layer=1, predictor_path=str(tmp_path / "head")), max_length=16)


# --- a loss pass without TRL --------------------------------------------------------------------------------------


class _OneRank:
    """The `Ranks` of a single process."""

    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_a_loss_phase_without_trl_measures_every_candidate_and_trains_each_row_once_per_pass(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rl_lenbalance.loss import LAYOUT_KEY
    from rl_lenbalance.loss.phase import LossPhase, LossSettings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    warned = []
    off = LossPhase(LossSettings(training_plan="off"), model, [], lambda key, _: warned.append(key))
    assert off.tuner.candidates == ["stock"] and not off.plans(3, 1)
    phase = LossPhase(LossSettings(autotune_samples=1), model, [], lambda key, _: warned.append(key))
    assert phase.plans(3, 1) and not phase.plans(3, 2) and warned == ["steps_per_generation"]
    assert phase.tuner.candidates[0] == "stock" and "sorted" in phase.tuner.candidates
    batch, totals, ran = _batch(), RunTotals(), []
    phase.begin(batch)
    for _ in range(phase.tuner.passes_to_measure + 1):
        chosen = phase.tuner.next()
        trained = phase.start_pass(_OneRank(), lambda *_: pytest.fail("one rank exchanges no row"), totals, 3, 1)
        microbatches = phase.current.microbatches
        assert len(microbatches) == 3 and all(LAYOUT_KEY in b for b in microbatches)
        assert sorted(torch.cat([b["advantages"] for b in microbatches]).tolist()) == [-1.0, 0.25, 0.5]
        assert trained["train/pad_frac_stock"] > 0 and trained["train/pad_frac"] <= trained["train/pad_frac_stock"]
        logged, _ = phase.end_pass(_OneRank())
        assert logged[f"autotune/strategy/{chosen}"] == 1.0 and f"autotune/{chosen}_s_per_ktok" in logged
        ran.append(chosen)
    assert set(ran) == set(phase.tuner.candidates) and phase.tuner.decided
    assert logged["autotune/exploring"] == 0.0 and logged[f"autotune/choice/{phase.tuner.choice}"] == 1.0
    assert totals.loss_tokens_stock == len(ran) * 3 * (4 + 5)  # every pass counted, stock's rows padded to 4 + 5


# --- a rollout round without TRL -----------------------------------------------------------------------------------


def test_a_rollout_in_waves_with_rebucketing_returns_what_one_generate_call_returns(eos_tiny_model_dir):
    from rl_lenbalance.generation.decode import compacted_generate
    from rl_lenbalance.generation.engine import LenBalanceEngine
    from rl_lenbalance.generation.rollout import Backend, RolloutSettings, run_rollout

    model, tokenizer, generation, prompts, decode = tiny_decoder(eos_tiny_model_dir, 24, do_sample=False, copies=2)

    def forward(input_ids, attention_mask, position_ids):
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)

    expected = compacted_generate(model, prompts, generation, tokenizer.pad_token_id, min_finished=len(prompts) + 1)
    engine = LenBalanceEngine(model, LenBalanceConfig(), max_length=24)
    backend = Backend(decode, forward, gather=lambda items: items)
    for round_ in range(2):  # round 0: stock-order waves; round 1: predicted-length waves, probe, re-bucketing
        settings = RolloutSettings([tokenizer.eos_token_id], 24, compact=True, rebucket=round_ > 0, wave_size=3,
                                   probe_tokens=4)
        completions, stats = run_rollout(prompts, backend, engine, settings)
        assert completions == expected
        assert stats.lengths == {i: len(c) for i, c in enumerate(expected)}
        ledger = stats.ledger(completions)
        assert ledger.real_tokens == sum(map(len, expected)) == ledger.decode_slots  # compaction: no idle slot
        assert (ledger.reprefill_tokens > 0) == (round_ > 0 and any(len(c) > 5 for c in expected))
        metrics, table = engine.learn_round(stats.waves, stats.lengths, stats.own_ids, gather=lambda rows: rows)
        assert [actual for _, actual in table] == [len(c) for c in expected] and "predictor/mae_static" in metrics
    assert engine.rounds == 2
