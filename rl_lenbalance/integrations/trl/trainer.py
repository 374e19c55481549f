"""TRL adapter: GRPOTrainer and RLOOTrainer (they share the generation and `_prepare_inputs` structure).

`LenBalanceMixin` goes in front of the TRL trainer class. Each override changes one stock method in one place and
delegates the work to the framework-free parts:
- generation (`generation.GenerationOverrides`): `_generate_single_turn` runs `rollout.run_rollout` over TRL's
  own generation, or `rollout.run_admitted` around TRL's continuous batching / vLLM call, then the engine's online
  update and the generation ledger; a `schedule.Autotuner` over the rounds' measured seconds picks stock's
  `generate` or compaction (`compaction: auto`, greedy decoding); `_generate_and_score_completions` is stock, timed;
- loss phase (`loss.LossPhaseOverrides`): `_prepare_inputs` hands each pass over a generation batch to
  `loss.phase.LossPhase` (strategy, tuner, micro-batches with their layouts, ledger, clock); `compute_loss` runs a
  micro-batch with its layout and reweights a row-mean loss; `_get_per_token_logps_and_entropies` runs the layout's
  forward; `training_step` is stock, timed, and a regrouping pass logs its per-token metrics as stock's micro-batches
  would;
- here: `train` (remembers the checkpoint it resumes) and `log` (each phase's seconds), and the run state a
  checkpoint keeps.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, fields, replace

from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOTrainer, RLOOTrainer

from ...config import LenBalanceConfig, cpu_has_fast_bf16
from ...generation.decode import exact_sampling
from ...generation.engine import LenBalanceEngine
from ...ledger import RunTotals, time_metrics
from .callback import EngineCallback
from .generation import GenerationOverrides
from .loss import LossPhaseOverrides
from .stock import stock_when_reentered


class LenBalanceMixin(GenerationOverrides, LossPhaseOverrides):
    """Mixed in front of a TRL trainer class by `LenBalanceGRPOTrainer` or `wrap_trainer`."""

    lenbalance: LenBalanceEngine
    lenbalance_config: LenBalanceConfig
    _lenbalance_stock: dict  # the TRL trainer's own methods that the mixin overrides, as they were at class creation

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        ours = [base for base in LenBalanceMixin.__mro__ if base is not object]
        stock = [base for base in cls.__mro__ if base not in ours and not issubclass(base, LenBalanceMixin)]
        overridden = {name for base in ours for name, value in vars(base).items() if hasattr(value, "__wrapped__")}
        cls._lenbalance_stock = {name: getattr(base, name) for base in reversed(stock) for name in overridden
                                 if name in vars(base)}

    def _lenbalance_setup(self, config: LenBalanceConfig | None) -> None:
        self.lenbalance_config = config = self._lenbalance_resolved(config or LenBalanceConfig())
        config.check_trainer_args(self.args)
        self._lenbalance_warned: set[str] = set()
        if self.args.bf16 and self.accelerator.device.type == "cpu" and not cpu_has_fast_bf16():
            self._lenbalance_warn_once(
                "bf16", "bf16=True (GRPOConfig's default) on a CPU without native bf16 (no AVX-512/AMX): "
                "torch emulates bf16 matrix products, many times slower than float32 (the same for stock "
                "TRL). Set bf16=False in the trainer's config to train in float32 here.")
        model = self.accelerator.unwrap_model(self.model)
        self.lenbalance = LenBalanceEngine(model, config, self.max_completion_length, seed=self.args.seed)
        self.lenbalance_totals = RunTotals()  # summed over the run, for the summary table
        self._lenbalance_logged_totals = RunTotals()  # the totals at the last training log (per-step seconds)
        self.lenbalance_last_lengths: list[tuple[float, int]] = []  # (predicted at t=0, actual) of the last round
        self.lenbalance_resume_from: str | None = None  # the checkpoint `train` resumes; the callback restores from it
        self._lenbalance_started = time.perf_counter()  # when this process began training (`train` sets it again)
        self._lenbalance_loss_phase_setup(config, model)
        self._lenbalance_generation_setup(config)

    @stock_when_reentered
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Stock `train`, remembering which checkpoint it resumes (True: the last one in output_dir)."""
        if resume_from_checkpoint is True:  # none found: stock raises its own error for True
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        self.lenbalance_resume_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        self._lenbalance_started = time.perf_counter()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _lenbalance_resolved(self, config: LenBalanceConfig) -> LenBalanceConfig:
        """`config` with the `auto` settings that this trainer's sampling and device decide (the rest are measured)."""
        sampling = getattr(getattr(self, "generation_config", None), "do_sample", True) is not False
        return config.resolved(sampling and not exact_sampling(self.accelerator.device.type))

    # --- checkpoints ------------------------------------------------------------------------------------------

    def lenbalance_run_state(self) -> dict:
        """What decides the rest of the run besides the engine, JSON-ready: the training-plan and generation-plan
        tuners' measurements and choices, the run totals (the capture budget reads them; wall seconds so far
        included), the totals at the last log and the last round's lengths. The callback saves it with every
        checkpoint."""
        totals = self.lenbalance_totals
        wall = totals.earlier_wall_s + time.perf_counter() - self._lenbalance_started
        return {"autotune": self._lenbalance_loss.tuner.state_dict(),
                "gen_autotune": self._lenbalance_generation_tuner.state_dict(),
                "totals": asdict(replace(totals, earlier_wall_s=wall)),
                "logged_totals": asdict(self._lenbalance_logged_totals),
                "last_lengths": [list(pair) for pair in self.lenbalance_last_lengths]}

    def load_lenbalance_run_state(self, state: dict, where: str) -> None:
        """Go on from `lenbalance_run_state()` as the run that saved it would have (`where`: the file, for the
        warning when a tuner was saved over other candidates and starts over; a checkpoint saved before the
        generation tuner existed leaves it to start over)."""
        self.lenbalance_totals, self._lenbalance_logged_totals = (
            RunTotals(**{f.name: state[key][f.name] for f in fields(RunTotals) if f.name in state[key]})
            for key in ("totals", "logged_totals"))
        self.lenbalance_last_lengths = [(float(p), int(a)) for p, a in state["last_lengths"]]
        for key, tuner, name in (("autotune", self._lenbalance_loss.tuner, "training-plan"),
                                 ("gen_autotune", self._lenbalance_generation_tuner, "generation-plan")):
            try:
                if key in state:
                    tuner.load_state_dict(state[key])
            except ValueError as error:
                self._lenbalance_warn_once(f"resume_{key}",
                                           f"rl-lenbalance: {where}: {error}; the {name} tuner starts over.")

    # --- logging ------------------------------------------------------------------------------------------------

    @stock_when_reentered
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Stock, plus each phase's seconds since the last training log and the count of logged optimizer steps
        whose `grad_norm` was not finite (a divergence alarm)."""
        for key, values in self._metrics["train"].items():  # TRL averages its metric store over a log's steps: a
            if values and key.startswith(LATEST_AT_LOG):  # plan's state is the last pass's (logging_steps > 1)
                del values[:-1]
        if "grad_norm" in logs:
            totals = self.lenbalance_totals
            totals.nonfinite_grad_steps += not math.isfinite(logs["grad_norm"])
            logs["lenbalance/train/nonfinite_grad_steps"] = float(totals.nonfinite_grad_steps)
            self._lenbalance_log(time_metrics(totals, self._lenbalance_logged_totals))
            self._lenbalance_logged_totals = replace(totals)
        super().log(logs, start_time)

    def _lenbalance_log(self, metrics: dict[str, float]) -> None:
        """Append to TRL's own metric store (already reduced over ranks): every `report_to` receives them."""
        for name, value in metrics.items():
            self._metrics["train"][f"lenbalance/{name}"].append(float(value))

    def _lenbalance_warn_once(self, key: str, message: str) -> None:
        if key not in self._lenbalance_warned:
            self._lenbalance_warned.add(key)
            warnings.warn(message)



# what a pass (or a round) logs about the plan it ran (prefixes): each log keeps the latest pass's values, never a
# mean of several
LATEST_AT_LOG = tuple(f"lenbalance/{key}" for key in (
    "autotune/strategy/", "autotune/exploring", "autotune/pass", "autotune/passes_to_measure", "autotune/choice/",
    "autotune/ratio_vs_stock", "gen/plan/", "gen/exploring", "gen/choice/", "gen/ratio_vs_stock"))



class LenBalanceCallback(EngineCallback):
    """The one line a user adds to a stock trainer: `trainer.add_callback(LenBalanceCallback(trainer, config))`.
    It turns the GRPOTrainer/RLOOTrainer into its rl-lenbalance version in place (like TRL's
    `LogCompletionsCallback`, it needs the trainer), keeps the predictor in checkpoints, and shapes the wandb run."""

    def __init__(self, trainer, config: LenBalanceConfig | None = None) -> None:
        super().__init__(mix_in(trainer, config))


class _Wrapped(LenBalanceMixin):
    """The swap-in trainers' constructor: the TRL trainer's own, then rl-lenbalance's setup and callback."""

    def __init__(self, *args, lenbalance_config: LenBalanceConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lenbalance_setup(lenbalance_config)
        self.add_callback(LenBalanceCallback(self))


class LenBalanceGRPOTrainer(_Wrapped, GRPOTrainer):
    """`GRPOTrainer` with rl-lenbalance: pass `lenbalance_config=` (or nothing, for the defaults)."""


class LenBalanceRLOOTrainer(_Wrapped, RLOOTrainer):
    """`RLOOTrainer` with rl-lenbalance: pass `lenbalance_config=` (or nothing, for the defaults)."""


def mix_in(trainer, config: LenBalanceConfig | None = None):
    """Turn an existing GRPOTrainer/RLOOTrainer into its rl-lenbalance version in place (no callback); returns it."""
    if isinstance(trainer, LenBalanceMixin):
        if config is not None and (config := trainer._lenbalance_resolved(config)) != trainer.lenbalance_config:
            running = vars(trainer.lenbalance_config)
            differ = ", ".join(f"{k}={v!r} (running: {running[k]!r})" for k, v in vars(config).items()
                               if v != running[k])
            raise ValueError(
                f"This {type(trainer).__name__} already runs rl-lenbalance; a second LenBalanceCallback/wrap_trainer "
                f"with a different config ({differ}) would be ignored. Pass the config once (lenbalance_config= or the "
                "first LenBalanceCallback)."
            )
        return trainer
    if not hasattr(trainer, "_generate_single_turn") or not hasattr(trainer, "_buffered_inputs"):
        raise TypeError(f"rl-lenbalance supports TRL's GRPOTrainer and RLOOTrainer, not {type(trainer).__name__}.")
    trainer.__class__ = type(f"LenBalance{type(trainer).__name__}", (LenBalanceMixin, type(trainer)), {})
    trainer._lenbalance_setup(config)
    return trainer


def wrap_trainer(trainer, config: LenBalanceConfig | None = None):
    """rl-lenbalance for an existing GRPOTrainer/RLOOTrainer: adds a `LenBalanceCallback`; returns the trainer."""
    trainer.add_callback(LenBalanceCallback(trainer, config))
    return trainer
