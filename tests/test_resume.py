"""Kill + resume equals an uninterrupted run, with the defaults: the training-plan tuner and the run totals (which
decide the predictor's capture budget) are saved with every checkpoint and restored, so the resumed steps train the
same plans, capture the same rounds and learn the same weights (issue 32). Older checkpoints still resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_same, make_args, make_trainer
from transformers import TrainerCallback

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer
from rl_lenbalance.cli.train import summarize
from rl_lenbalance.schedule import Autotuner

STEPS = 3


class StopAfterFirstStep(TrainerCallback):
    """Ends training once checkpoint-1 is written, as a kill after it would (nothing later reaches the disk)."""

    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


def run(model_dir, out, resume=None, callbacks=()):
    args = make_args(out, max_steps=STEPS, save_strategy="steps", save_steps=1)
    trainer = make_trainer(LenBalanceGRPOTrainer, model_dir, args, lenbalance_config=LenBalanceConfig(),
                           callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def per_step(trainer, pick):
    """`pick(row)` of each step's training log row, in step order."""
    return [pick(row) for row in trainer.state.log_history if "loss" in row]


def tuner_keys(row):
    return sorted(k for k in row if k.startswith("lenbalance/autotune/") and k.endswith("_s_per_ktok"))


@pytest.fixture(scope="module")
def runs(eos_tiny_model_dir, tmp_path_factory):
    """An uninterrupted 3-step run, and the same run stopped at checkpoint-1 and resumed from it (a new trainer)."""
    whole = run(eos_tiny_model_dir, tmp_path_factory.mktemp("whole"))
    out = tmp_path_factory.mktemp("killed")
    stopped = run(eos_tiny_model_dir, out, callbacks=[StopAfterFirstStep()])
    assert stopped.state.global_step == 1
    resumed = run(eos_tiny_model_dir, out, resume=str(out / "out" / "checkpoint-1"))
    return whole, resumed, out / "out" / "checkpoint-1"


def test_kill_and_resume_trains_what_an_uninterrupted_run_trains(runs):
    whole, resumed, _ = runs
    assert resumed.state.global_step == whole.state.global_step == STEPS
    # the tuner went on where it stopped: each step trained the same plan (the defaults explore for 11 passes)
    assert per_step(resumed, tuner_keys) == per_step(whole, tuner_keys)
    assert len(set(map(tuple, per_step(whole, tuner_keys)))) == STEPS  # three plans: a restart would repeat one
    a, b = whole._lenbalance_loss.tuner.state_dict(), resumed._lenbalance_loss.tuner.state_dict()
    assert {k: len(v) for k, v in a.pop("timings").items()} == {k: len(v) for k, v in b.pop("timings").items()}
    assert a == b  # passes, choice, rechecks (the timings are seconds: measured anew by each run)
    # the generation tuner's rounds too
    assert resumed._lenbalance_generation_tuner.passes == whole._lenbalance_generation_tuner.passes == STEPS
    # the capture budget went on where it stopped: the same rounds were captured (round 1 cost far more than the
    # default 1% of generation time, so no later round fits in either run, whatever their seconds)
    share = per_step(whole, lambda row: row["lenbalance/predictor/overhead_frac_run"])
    assert share[0] > 5 * LenBalanceConfig().max_overhead
    captured = lambda row: row["lenbalance/predictor/captured_rounds"]  # noqa: E731
    assert per_step(resumed, captured) == per_step(whole, captured)
    assert resumed.lenbalance.rounds == whole.lenbalance.rounds
    # hence bit for bit the same weights, losses and predictor state
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert per_step(resumed, lambda row: row["loss"]) == per_step(whole, lambda row: row["loss"])
    assert_same(whole.lenbalance.state_dict(), resumed.lenbalance.state_dict())
    assert_same(whole.lenbalance.head.state_dict(), resumed.lenbalance.head.state_dict())
    assert resumed.lenbalance_last_lengths == whole.lenbalance_last_lengths


def test_a_resumed_runs_totals_and_seconds_cover_every_step(runs):
    """The summary divides the run's totals by the global step count: the totals, wall time included, cover the
    steps trained before the resume too (they used to cover only this process's: 2 steps' seconds / 3)."""
    _, resumed, checkpoint = runs
    summary = summarize(resumed, wall_s=1.0)
    assert summary["steps"] == STEPS
    logged = per_step(resumed, lambda row: row["lenbalance/time/generation_s"])  # step 1's from the killed run
    assert len(logged) == STEPS and summary["generation_phase_s"] == pytest.approx(sum(logged), rel=1e-9)
    loss = per_step(resumed, lambda row: row["lenbalance/time/loss_phase_s"])
    assert summary["loss_phase_s"] == pytest.approx(sum(loss), rel=1e-9)
    saved = json.loads((checkpoint / "lenbalance" / "run_state.json").read_text())["totals"]
    earlier = resumed.lenbalance_totals.earlier_wall_s
    assert earlier == saved["earlier_wall_s"] >= saved["generation_phase_s"] + saved["loss_phase_s"] > 0
    assert summary["wall_s"] == 1.0 + earlier  # this process's seconds plus the killed run's up to its checkpoint


def test_an_older_checkpoint_without_the_run_state_still_resumes_with_a_warning(runs, eos_tiny_model_dir, tmp_path):
    _, _, checkpoint = runs
    old = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, old)
    (old / "lenbalance" / "run_state.json").unlink()
    with pytest.warns(UserWarning, match=r"cannot read .*checkpoint-1/lenbalance/run_state.json \(no such file: "
                                         r"saved by an older rl-lenbalance\?\); the training-plan tuner and the run "
                                         r"totals .* start over at step 1"):
        trainer = run(eos_tiny_model_dir, tmp_path, resume=str(old))
    assert trainer.state.global_step == STEPS
    assert trainer.lenbalance.rounds >= 1  # the predictor itself was restored


def test_the_tuner_goes_on_from_its_saved_state_as_if_never_stopped():
    """Pure: a tuner restored mid-measurement (JSON round trip) makes the choices the uninterrupted one makes, given
    the same timings; one saved over other candidates is refused."""
    speed = {"stock": 1.0, "stock_trimmed": 0.9, "sorted": 0.7, "sorted_uneven": 1.3}
    make = lambda: Autotuner(list(speed), "sorted", samples=2, recheck_every=3)  # noqa: E731
    whole, first = make(), make()
    for tuner, passes in ((whole, 20), (first, 6)):
        for _ in range(passes):
            strategy = tuner.next()
            tuner.record(strategy, speed[strategy])
    second = make()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for _ in range(14):
        strategy = second.next()
        second.record(strategy, speed[strategy])
    assert second.state_dict() == whole.state_dict() and second.choice == "sorted"
    with pytest.raises(ValueError, match=r"chose among \['stock', 'stock_trimmed', 'sorted', 'sorted_uneven'\], "
                                         r"this run among \['stock', 'sorted'\]"):
        Autotuner(["stock", "sorted"]).load_state_dict(first.state_dict())
