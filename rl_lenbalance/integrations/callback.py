"""`LenBalanceCallback`: the one line a user adds to a TRL trainer to get rl-lenbalance."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import LenBalanceConfig
from ..predictor import PLPHead
from ..predictor.head import CONFIG_NAME, WEIGHTS_NAME
from .grpo import mix_in

SUBFOLDER = "lenbalance"
WANDB_PREFIX = "train/lenbalance/"  # transformers' WandbCallback puts training logs under "train/"
STATE_NAME = "engine_state.pt"


class LenBalanceCallback(TrainerCallback):
    """Wraps the trainer it is given (like TRL's `LogCompletionsCallback`, it needs the trainer, not the model),
    saves/restores the predictor with trainer checkpoints, and shapes the wandb run.

    Usage: `trainer.add_callback(LenBalanceCallback(trainer, LenBalanceConfig(...)))`.
    """

    def __init__(self, trainer, config: LenBalanceConfig | None = None) -> None:
        self.trainer = mix_in(trainer, config)

    def on_train_begin(self, args, state, control, **kwargs):
        resumed = self.trainer.lenbalance_resume_from  # the checkpoint `train(resume_from_checkpoint=...)` loaded
        if resumed is not None and state.global_step > 0:
            folder = os.path.join(resumed, SUBFOLDER)
            if os.path.isdir(folder):
                self.load(folder)
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
            self.save(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", SUBFOLDER))

    def on_log(self, args, state, control, logs=None, **kwargs):
        run = _wandb_run()
        every = self.trainer.lenbalance_config.log_table_every
        pairs = self.trainer.lenbalance_last_lengths
        if run is None or not every or not pairs or not state.is_world_process_zero or state.global_step % every:
            return
        import wandb

        table = wandb.Table(columns=["predicted_length", "actual_length"], data=[list(p) for p in pairs])
        run.log({f"{WANDB_PREFIX}lengths": table, "train/global_step": state.global_step})

    def save(self, directory: str) -> None:
        """Write the head (safetensors + JSON) and its online-training state into `directory`, atomically: into a
        temporary sibling folder, then renamed, so an interrupted save leaves the old folder or none, never half."""
        target = Path(directory)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
        try:
            self.trainer.lenbalance.head.save_pretrained(tmp)
            torch.save(self.trainer.lenbalance.state_dict(), tmp / STATE_NAME)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, directory: str) -> None:
        """Restore what `save` wrote (the checkpoint of a resumed run). An incomplete folder restores nothing and
        says so; non-finite weights are re-initialised (see `LenBalanceEngine.load_state_dict`)."""
        engine = self.trainer.lenbalance
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME)
                   if not os.path.isfile(os.path.join(directory, name))]
        if missing:
            warnings.warn(f"rl-lenbalance: {directory} is incomplete (no {', '.join(missing)}; an interrupted save?): "
                          "the length predictor starts fresh.")
            return
        head = PLPHead.from_pretrained(directory, expected_hidden_size=engine.head.config.hidden_size)
        engine.head.load_state_dict(head.state_dict())
        engine.load_state_dict(torch.load(os.path.join(directory, STATE_NAME), map_location="cpu", weights_only=True))


def _wandb_run():
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


def wrap_trainer(trainer, config: LenBalanceConfig | None = None):
    """rl-lenbalance for an existing GRPOTrainer/RLOOTrainer: adds a `LenBalanceCallback`; returns the trainer."""
    trainer.add_callback(LenBalanceCallback(trainer, config))
    return trainer
