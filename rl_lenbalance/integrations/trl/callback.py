"""`EngineCallback`: keeps a trainer's rl-lenbalance engine in its checkpoints and shapes its wandb run.

It reads the trainer only through what the adapter gives it (`lenbalance`, `lenbalance_config`,
`lenbalance_resume_from`, `lenbalance_last_lengths`, `lenbalance_totals`, `lenbalance_run_state` /
`load_lenbalance_run_state`) and never imports the adapter.
"""

from __future__ import annotations

import json
import math
import os
import warnings

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ... import ledger

SUBFOLDER = "lenbalance"  # checkpoint-N/lenbalance/: the head and its online-training state
RUN_STATE = "run_state.json"  # in SUBFOLDER: the training-plan tuner and the run totals (the capture budget)
WANDB_PREFIX = "train/lenbalance/"  # transformers' WandbCallback puts training logs under "train/"


class EngineCallback(TrainerCallback):
    """Saves the engine with every trainer checkpoint, restores it when `train` resumes one, logs the
    predicted-vs-actual lengths table to wandb, and stores the run's summary in the wandb run summary."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self._table_round: int | None = None  # the captured round whose lengths table was logged last

    def on_train_begin(self, args, state, control, **kwargs):
        resumed = self.trainer.lenbalance_resume_from  # the checkpoint `train(resume_from_checkpoint=...)` loaded
        if resumed is not None and state.global_step > 0:
            folder = os.path.join(resumed, SUBFOLDER)
            if os.path.isdir(folder):
                self.trainer.lenbalance.load(folder)
                self._load_run_state(os.path.join(folder, RUN_STATE), state.global_step)
                self._table_round = self.trainer.lenbalance.rounds  # its table was logged before the checkpoint
            else:
                warnings.warn(f"rl-lenbalance: resuming from {resumed}, which holds no {SUBFOLDER}/ folder: the "
                              "length predictor (head, optimizer, replay buffer, baseline), the training-plan tuner "
                              f"and the run totals start fresh at step {state.global_step}.")
        if "wandb" in args.report_to and _wandb_run() is not None:
            run = _wandb_run()
            run.define_metric("train/global_step")
            run.define_metric(f"{WANDB_PREFIX}*", step_metric="train/global_step")

    def _load_run_state(self, path: str, step: int) -> None:
        """Restore the tuner and the run totals saved beside the engine; a checkpoint without them (saved before
        they were, or damaged) resumes with both started over, with a warning."""
        try:
            with open(path) as file:
                self.trainer.load_lenbalance_run_state(json.load(file), path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            why = "no such file: saved by an older rl-lenbalance?" if isinstance(error, FileNotFoundError) else (
                f"{type(error).__name__}: {error}")
            warnings.warn(f"rl-lenbalance: cannot read {path} ({why}); the training-plan tuner and the run totals "
                          f"(the predictor's capture budget, the summary) start over at step {step}, so the rest of "
                          "the run may train other plans and capture other rounds than an uninterrupted one.")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # every rank restores rank 0's (the tuner decides on every rank's seconds)
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", SUBFOLDER)
            self.trainer.lenbalance.save(folder)
            tmp = os.path.join(folder, f".{RUN_STATE}.tmp-{os.getpid()}")
            with open(tmp, "w") as file:
                json.dump(self.trainer.lenbalance_run_state(), file)
            os.replace(tmp, os.path.join(folder, RUN_STATE))  # whole or absent

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Log the last captured round's predicted-vs-actual table once, at the first log after that round (rounds
        that ran without capture leave no new table: the last one is not logged again under a later step)."""
        run = _wandb_run()
        every = self.trainer.lenbalance_config.log_table_every
        pairs, captured = self.trainer.lenbalance_last_lengths, self.trainer.lenbalance.rounds
        if (run is None or not every or not pairs or not state.is_world_process_zero or state.global_step % every
                or captured == self._table_round):
            return
        import wandb

        self._table_round = captured
        table = wandb.Table(columns=["predicted_length", "actual_length", "round"],
                            data=[[*pair, captured] for pair in pairs])
        run.log({f"{WANDB_PREFIX}lengths": table, "train/global_step": state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        """Store the run's summary (`ledger.summary`, wall time: TRL's `train_runtime`) in the wandb run summary."""
        run = _wandb_run()
        if run is None or not state.is_world_process_zero:
            return
        runtime = next((row["train_runtime"] for row in reversed(state.log_history) if "train_runtime" in row),
                       math.nan)
        trainer = self.trainer
        run.summary.update(ledger.wandb_summary(ledger.summary(trainer.lenbalance_totals, state.log_history,
                                                               state.global_step, runtime,
                                                               trainer.lenbalance.fallbacks)))


def _wandb_run():
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run
