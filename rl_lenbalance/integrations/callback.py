"""`EngineCallback`: keeps a trainer's rl-lenbalance engine in its checkpoints and shapes its wandb run.

It reads the trainer only through what the adapter gives it (`lenbalance`, `lenbalance_config`,
`lenbalance_resume_from`, `lenbalance_last_lengths`, `lenbalance_totals`) and never imports the adapter.
"""

from __future__ import annotations

import math
import os
import warnings

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import ledger

SUBFOLDER = "lenbalance"  # checkpoint-N/lenbalance/: the head and its online-training state
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
            else:
                warnings.warn(f"rl-lenbalance: resuming from {resumed}, which holds no {SUBFOLDER}/ folder: the "
                              "length predictor (head, optimizer, replay buffer, baseline) starts fresh at step "
                              f"{state.global_step}.")
        if "wandb" in args.report_to and _wandb_run() is not None:
            run = _wandb_run()
            run.define_metric("train/global_step")
            run.define_metric(f"{WANDB_PREFIX}*", step_metric="train/global_step")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.trainer.lenbalance.save(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
                                                      SUBFOLDER))

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
