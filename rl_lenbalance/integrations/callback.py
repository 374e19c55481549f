"""`LenBalanceCallback`: the one line a user adds to a TRL trainer to get rl-lenbalance."""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import LenBalanceConfig
from ..predictor import PLPHead
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
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", SUBFOLDER)
        if state.global_step > 0 and os.path.isdir(checkpoint):
            self.load(checkpoint)
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
        """Write the head (safetensors + JSON) and its online-training state into `directory`."""
        self.trainer.lenbalance.head.save_pretrained(directory)
        torch.save(self.trainer.lenbalance.state_dict(), os.path.join(directory, STATE_NAME))

    def load(self, directory: str) -> None:
        """Restore what `save` wrote (the checkpoint of a resumed run)."""
        engine = self.trainer.lenbalance
        head = PLPHead.from_pretrained(directory, expected_hidden_size=engine.head.config.hidden_size)
        engine.head.load_state_dict(head.state_dict())
        engine.load_state_dict(torch.load(os.path.join(directory, STATE_NAME), weights_only=False))


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
