"""`LenBalanceConfig`: every rl-lenbalance setting, validated, documented field by field."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

import torch

from .loss import GLOBAL_LOSSES, ROW_MEAN_LOSSES, STRATEGIES
from .loss.phase import LossSettings
from .predictor import POOLING_METHODS
from .schedule import AUTO, OFF, PARTITIONERS, Autotuner

STATIC_TARGETS = ("draw", "group_median")  # what the head learns at t=0 (`LenBalanceConfig.static_target`)
TRL_LOSS_TYPES = ROW_MEAN_LOSSES + GLOBAL_LOSSES + ("bnpo",)  # TRL 1.16's loss_type values (bnpo: per micro-batch)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (oneDNN: AVX-512 or AMX). Elsewhere (e.g. AVX2-only
    CPUs) torch emulates them, many times slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class LenBalanceConfig:
    """Settings of the length predictor and the length-aware scheduler (the `lenbalance:` section of a recipe)."""

    # Predictor
    pooling: str = field(
        default="egtp",
        metadata={"help": f"How the prompt's hidden states are pooled: one of {', '.join(POOLING_METHODS)}."},
    )
    feature_layer: int = field(
        default=-1,
        metadata={"help": "Which hidden states the head reads: -1 = the final hidden state (lm_head's input), "
                          "i >= 0 = decoder layer i."},
    )
    hook_module: str | None = field(
        default=None,
        metadata={"help": "Dotted path of the module whose output is read (e.g. 'model.norm'); overrides "
                          "feature_layer."},
    )
    num_bins: int = field(default=20, metadata={"help": "K, the number of log-spaced length bins of the head."})
    ce_weight: float = field(default=0.95, metadata={"help": "λ in the loss λ·CE + (1-λ)·MSE."})
    static_target: str = field(
        default="draw",
        metadata={"help": "What the head learns at t=0: 'draw' (each completion's own length) or 'group_median' (the "
                          "median length of its prompt's completions in the round: GRPO draws every prompt G times, so "
                          "the round holds a sample of the prompt's length distribution; ProD, 2026)."},
    )
    dropout: float = field(default=0.1, metadata={"help": "Dropout inside the head."})
    context_features: bool = field(
        default=True,
        metadata={"help": "Also feed the head its row's context: the prompt's past lengths, its siblings (the same "
                          "prompt's rows in the generate call that started it, on its rank) that ended by the step, "
                          "and the naive / history / sibling / median estimates, with a learned prior that can copy "
                          "the best estimate. Training pairs see exactly what a live prediction at the same step sees "
                          "(`LenBalanceEngine.head_input`). Lower online error than without "
                          "(docs/benchmarks/predictor_online_cpu.json)."},
    )
    predict_every: int = field(
        default=0,
        metadata={"help": "Also run the head every this many decode steps during generation (PLP), for inspection; "
                          "0: only at step 0, the one prediction the scheduler reads (re-bucketing predicts from the "
                          "probe's stream state itself). Each prediction adds kernels to a decode step. Only "
                          "captured rounds predict: past `max_overhead`, a round whose generation reads no prediction "
                          "runs without hooks and makes none of these predictions."},
    )
    record_every: int = field(
        default=16,
        metadata={"help": "Keep PLP features every this many decode steps (plus steps 0 and 8) as training pairs."},
    )
    samples_per_sequence: int = field(
        default=8, metadata={"help": "At most this many (feature, remaining length) pairs per finished rollout."}
    )
    predictor_lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the head."})
    predictor_steps_per_round: int = field(
        default=50, metadata={"help": "Optimizer steps on the head after each generation round."}
    )
    predictor_batch_size: int = field(default=256, metadata={"help": "Minibatch size of the head's updates."})
    replay_buffer_size: int = field(
        default=20_000, metadata={"help": "Training pairs kept for the head (oldest dropped first)."}
    )
    predictor_path: str | None = field(
        default=None, metadata={"help": "Folder of a saved predictor to start from (None: train from scratch)."}
    )
    # Scheduling
    training_plan: str = field(
        default=AUTO,
        metadata={
            "help": "How each optimizer step's rows become micro-batches: 'auto' (measure every strategy that is exact "
            "under the trainer's settings on the run's own steps, keep the fastest, never one slower than stock's), "
            f"one of {', '.join(STRATEGIES)} (see `rl_lenbalance.loss.STRATEGIES`; one that is not exact under the "
            "trainer's settings falls back to 'stock_trimmed' with a one-time note), or 'off': TRL's own "
            "`_prepare_inputs`, untouched (no loss-phase ledger, timing or tuner; 'stock' differs: stock's "
            "micro-batches, still ledgered and timed)."
        },
    )
    balance_training: bool | None = field(
        default=None,
        metadata={"help": "Removed: merged into `training_plan` ('off' for False; True is the default, 'auto')."},
    )
    autotune_samples: int = field(
        default=Autotuner.samples,
        metadata={"help": "'auto' (training_plan, compaction): timed passes (generation rounds) of each candidate "
                          "before the first choice."}
    )
    autotune_every: int = field(
        default=Autotuner.recheck_every,
        metadata={"help": "'auto' (training_plan, compaction): after the first choice, every this many passes over a "
                          "generation batch (generation rounds) one other candidate runs once, so a drift in lengths "
                          "can change the choice (0: never re-check)."},
    )
    autotune_margin: float = field(
        default=Autotuner.margin,
        metadata={"help": "'auto' (training_plan, compaction): a strategy replaces stock only if it is faster by "
                          "more than this fraction (and by more than the measured noise)."},
    )
    balance_ranks: bool = field(
        default=True,
        metadata={"help": "Move rows between data-parallel ranks so each rank gets an equal share of tokens."},
    )
    partition_method: str = field(
        default="best",
        metadata={"help": "How micro-batches and re-bucketed waves are dealt to ranks: a key of "
                          "`rl_lenbalance.schedule.PARTITIONERS`: Karmarkar–Karp ('kk'), greedy LPT ('lpt'), or the "
                          "better balanced of the two ('best')."},
    )
    attention_alpha: float = field(
        default=0.0, metadata={"help": "Cost of a sequence of L tokens = L + attention_alpha · L² when balancing."}
    )
    generation_wave_size: int | None = field(
        default=None,
        metadata={
            "help": "Generate a rank's batch in waves of this many sequences, longest predicted first "
            "(None: one generate call, as stock TRL)."
        },
    )
    rebucket: bool = field(
        default=False,
        metadata={
            "help": "Early re-bucketing: decode `probe_tokens` tokens for every row, re-predict each running row's "
            "remaining length with PLP, then regroup the running rows into waves by it, moving rows between ranks "
            "when that shortens the slowest rank (the receiver re-prefills prompt + probe)."
        },
    )
    probe_tokens: int = field(
        default=32, metadata={"help": "k, the tokens every row decodes before re-bucketing (the paper's t = 32)."}
    )
    compaction: bool | str = field(
        default=AUTO,
        metadata={
            "help": "Drop finished rows from the batch while generating (plain transformers path). Stock's "
            "completions token for token, greedy or sampled: the sampler draws the random numbers of the whole batch "
            "(`generation.sample_rows`; where the installed torch samples otherwise, compaction under sampling would "
            "draw other tokens, so 'auto' leaves it off there). 'auto': measured on the run's own rounds (like "
            "`training_plan: auto`: the autotune_* settings), kept only while faster than stock's `generate` by more "
            "than `autotune_margin`, re-checked. true / false: always / never."
        },
    )
    max_overhead: float = field(
        default=0.01,
        metadata={
            "help": "Budget of the predictor's cost (capture hooks, prefills, replays, the head's training) as a share "
            "of generation time. Rounds whose generation reads no prediction (no waves or re-bucketing) are "
            "captured only while the run's measured share is within it; the head learns from those rounds. "
            "Rounds that need the capture always run it. 1.0 or more: capture every round."
        },
    )
    fallback_window: int = field(
        default=3,
        metadata={
            "help": "Fall back to stock ordering of waves when the predictor's online MAE is worse than the naive "
            "baseline for this many consecutive rounds."
        },
    )
    log_table_every: int = field(
        default=1,
        metadata={"help": "Log a predicted-vs-actual wandb.Table every this many generation rounds (0: never)."},
    )

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_METHODS:
            raise ValueError(f"lenbalance.pooling={self.pooling!r} is not valid; use one of "
                             f"{', '.join(POOLING_METHODS)}.")
        if self.partition_method not in PARTITIONERS:
            raise ValueError(
                f"lenbalance.partition_method={self.partition_method!r} is not valid; use one of "
                f"{', '.join(PARTITIONERS)}."
            )
        if self.feature_layer < -1:
            raise ValueError(f"lenbalance.feature_layer={self.feature_layer} is not valid: use -1 (the final hidden "
                             "state) or a decoder layer index 0, 1, ... (counted from the first layer).")
        if self.predict_every < 0:
            raise ValueError(f"lenbalance.predict_every must be >= 0 (0: only at step 0), got {self.predict_every}.")
        for name in ("num_bins", "probe_tokens", "record_every", "samples_per_sequence",
                     "predictor_batch_size", "replay_buffer_size", "fallback_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"lenbalance.{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_bins < 2:
            raise ValueError(f"lenbalance.num_bins must be >= 2, got {self.num_bins}.")
        if self.static_target not in STATIC_TARGETS:
            raise ValueError(f"lenbalance.static_target={self.static_target!r} is not valid; use one of "
                             f"{', '.join(STATIC_TARGETS)}.")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"lenbalance.ce_weight (λ) must lie in [0, 1], got {self.ce_weight}.")
        if self.balance_training is not None:
            fix = ("training_plan: off" if self.balance_training is False
                   else "nothing (training_plan: auto, the default)")
            raise ValueError(f"lenbalance.balance_training={self.balance_training} was merged into "
                             f"lenbalance.training_plan: remove it and set {fix}.")
        if self.training_plan not in (AUTO, OFF) and self.training_plan not in STRATEGIES:
            raise ValueError(f"lenbalance.training_plan={self.training_plan!r} is not valid; use 'auto', 'off' or one "
                             f"of {', '.join(STRATEGIES)}.")
        if self.max_overhead < 0:
            raise ValueError("lenbalance.max_overhead must be >= 0 (a share of generation time), got "
                             f"{self.max_overhead}.")
        if self.autotune_samples < 1 or self.autotune_every < 0 or self.autotune_margin < 0:
            raise ValueError("lenbalance.autotune_samples must be >= 1, autotune_every >= 0 and autotune_margin >= 0, "
                             f"got {self.autotune_samples}, {self.autotune_every} and {self.autotune_margin}.")
        if self.compaction not in (True, False, AUTO):
            raise ValueError(f"lenbalance.compaction={self.compaction!r} is not valid; use true, false or 'auto'.")
        if self.generation_wave_size is not None and self.generation_wave_size < 1:
            raise ValueError(f"lenbalance.generation_wave_size must be >= 1 or None, got {self.generation_wave_size}.")

    def resolved(self, compaction_changes_tokens: bool) -> LenBalanceConfig:
        """A copy with 'auto' compaction off where it would draw other tokens than stock (sampling on a device
        where `generation.exact_sampling` fails); elsewhere it stays 'auto', measured in the run."""
        return replace(self, compaction=False if compaction_changes_tokens and self.compaction == AUTO
                       else self.compaction)

    def loss_settings(self) -> LossSettings:
        """What the loss phase (`loss.phase.LossPhase`) reads of these settings."""
        return LossSettings(self.training_plan, self.autotune_samples, self.autotune_margin, self.autotune_every,
                            self.balance_ranks, self.attention_alpha, self.partition_method)

    def check_trainer_args(self, args) -> None:
        """Refuse settings that contradict the trainer's (`args` is a GRPOConfig or RLOOConfig)."""
        generation_batch = args.per_device_train_batch_size * args.steps_per_generation
        if self.generation_wave_size is not None and self.generation_wave_size > generation_batch:
            raise ValueError(
                f"lenbalance.generation_wave_size={self.generation_wave_size} is larger than the per-rank generation "
                f"batch (per_device_train_batch_size={args.per_device_train_batch_size} × "
                f"steps_per_generation={args.steps_per_generation} = {generation_batch}); lower it or set it to None."
            )
        if self.rebucket and self.probe_tokens + 1 >= args.max_completion_length:
            fix = (f"lower lenbalance.probe_tokens to at most {args.max_completion_length - 2}"
                   if args.max_completion_length >= 3 else "raise max_completion_length to at least 3")
            raise ValueError(
                f"lenbalance.probe_tokens={self.probe_tokens} leaves nothing to re-bucket: rows decode "
                f"probe_tokens + 1 tokens before regrouping and max_completion_length={args.max_completion_length}; "
                f"{fix}, or set lenbalance.rebucket=False."
            )
        loss_type = getattr(args, "loss_type", None)  # RLOOConfig has none
        if loss_type is not None and loss_type not in TRL_LOSS_TYPES:
            close = difflib.get_close_matches(loss_type, TRL_LOSS_TYPES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"loss_type={loss_type!r} is not a TRL loss type.{hint} Use one of "
                             f"{', '.join(TRL_LOSS_TYPES)}.")
