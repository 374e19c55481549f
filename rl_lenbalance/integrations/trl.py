"""TRL adapter: GRPOTrainer and RLOOTrainer (they share the generation and `_prepare_inputs` structure).

Each override changes one stock method in one place and delegates the work to the framework-free parts:
- `_generate_single_turn`: `rollout.run_rollout` over TRL's own generation (bound once in `_backend`), or
  `rollout.run_admitted` around TRL's continuous batching / vLLM call, then the engine's online update and the
  generation ledger;
- `_prepare_inputs`: inside each optimizer step (its rows still chosen by stock's shuffle), each pass over the
  generation batch is cut into micro-batches by one exact strategy of `schedule.STRATEGIES`, which
  `schedule.Autotuner` picks from the passes' measured seconds;
- `compute_loss`: a per-row-mean loss is weighted by its micro-batch's share of rows, so the update is stock's;
- `training_step`: stock, timed (the last micro-step of a pass stops the pass's clock); a regrouping pass's logged
  per-token metrics are replaced by what stock's micro-batches of the same rows log (`_log_as_stock`);
- `_generate_and_score_completions`, `log`: stock, timed or counted for the summary.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from accelerate.utils import gather_object, pad_across_processes
from tqdm.auto import tqdm
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOTrainer, RLOOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import (shuffle_sequence_dict, split_pixel_values_by_grid, split_tensor_dict,
                              unsplit_pixel_values_by_grid)

from ..capture import CaptureResult
from ..config import AUTO, LenBalanceConfig, cpu_has_fast_bf16
from ..engine import LenBalanceEngine, private_rng
from ..generation import compacted_generate, unsupported_options
from ..packing import DENSE_PACK_MAX_TOKENS, packed_logps_and_entropies, packing_unsupported, skips_masked_blocks
from ..ledger import RunTotals, TrainingLedger, gather_ledgers, round_metrics, time_metrics, training_metrics
from ..rollout import Backend, RolloutSettings, run_admitted, run_rollout, uncaptured_ledger
from ..schedule import (ROW_MEAN_LOSSES, STRATEGIES, Autotuner, Strategy, TrainingPlan, exact_strategies,
                        fit_columns, optimizer_steps, plan_training, regrouping_blockers, stock_plan, take_rows,
                        trim_padding)
from .callback import EngineCallback


@dataclass
class LossPass:
    """A generation batch in the loss phase: its rows, stock's shuffle of them, and the current pass over it (one of
    `num_iterations`), cut into micro-batches by one strategy and timed from its first micro-step to its last."""

    batch: dict | None  # None: TRL's own micro-batches (multimodal rows), not planned nor timed
    shuffle: torch.Tensor | None
    microbatches: list[dict] = field(default_factory=list)
    strategy: str = ""
    stock_tokens: float = 0.0  # every rank's tokens as stock's micro-batches compute them (rows padded to the batch)
    packed: list[bool] = field(default_factory=list)  # per micro-batch: runs as one padding-free sequence
    started: float = 0.0
    rows: list[int] = field(default_factory=list)  # a regrouping pass: its rows' ids (rank-major over every rank's)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # its loss forwards' (logps,
    # entropies), detached, one per micro-batch so far: `_log_as_stock` scores stock's micro-batches with them


def _stock_when_reentered(method):
    """Run the stock method when the override is re-entered on the same trainer. A script may wrap the stock method
    at class level with a call back into the trainer (`patch.object(GRPOTrainer, "training_step",
    wraps=trainer.training_step)`, as TRL's own tests do); `super()` then reaches the wrapper, which calls this
    override again, and would recurse forever."""
    name = method.__name__

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        active = self.__dict__.setdefault("_lenbalance_active", set())
        if name in active:
            return type(self)._lenbalance_stock[name](self, *args, **kwargs)
        active.add(name)
        try:
            return method(self, *args, **kwargs)
        finally:
            active.discard(name)

    return guarded


class LenBalanceMixin:
    """Mixed in front of a TRL trainer class by `LenBalanceGRPOTrainer` or `wrap_trainer`."""

    lenbalance: LenBalanceEngine
    lenbalance_config: LenBalanceConfig
    _lenbalance_stock: dict  # the TRL trainer's own methods that the mixin overrides, as they were at class creation

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        stock = cls.__mro__[cls.__mro__.index(LenBalanceMixin) + 1:]
        overridden = [name for name, value in vars(LenBalanceMixin).items() if hasattr(value, "__wrapped__")]
        cls._lenbalance_stock = {name: getattr(base, name) for base in reversed(stock) for name in overridden
                                 if name in vars(base)}

    def _lenbalance_setup(self, config: LenBalanceConfig | None) -> None:
        self.lenbalance_config = config = self._resolved(config or LenBalanceConfig())
        config.check_trainer_args(self.args)
        self._lenbalance_warned: set[str] = set()
        if self.args.bf16 and self.accelerator.device.type == "cpu" and not cpu_has_fast_bf16():
            self._warn_once("bf16", "bf16=True (GRPOConfig's default) on a CPU without native bf16 (no AVX-512/AMX): "
                            "torch emulates bf16 matrix products, many times slower than float32 (the same for stock "
                            "TRL). Set bf16=False in the trainer's config to train in float32 here.")
        model = self.accelerator.unwrap_model(self.model)
        self.lenbalance = LenBalanceEngine(model, config, self.max_completion_length, seed=self.args.seed)
        candidates = self._plan_candidates(config)
        first = next(name for name in ("sorted", "stock_trimmed", "stock") if name in candidates + ["stock"])
        self._autotune = Autotuner(candidates, first, samples=config.autotune_samples, margin=config.autotune_margin,
                                   recheck_every=config.autotune_every)
        self._lenbalance_pass: LossPass | None = None  # the generation batch being trained, and its current pass
        self._lenbalance_replay: tuple[torch.Tensor, torch.Tensor] | None = None  # set inside `_log_as_stock` only
        self.lenbalance_totals = RunTotals()  # summed over the run, for the summary table
        self._lenbalance_logged_totals = RunTotals()  # the totals at the last training log (per-step seconds)
        self.lenbalance_last_lengths: list[tuple[float, int]] = []  # (predicted at t=0, actual) of the last round
        self.lenbalance_resume_from: str | None = None  # the checkpoint `train` resumes; the callback restores from it
        self._lenbalance_started = time.perf_counter()  # when this process began training (`train` sets it again)
        self._lenbalance_tool_turn = False  # True inside TRL's tool loop (later turns of tools / environments)
        self._left_padding_free = not _absolute_positions(model)  # a row's outputs ignore its left padding
        self._varlen_attention = skips_masked_blocks(model)  # packs of any length (else under a dense mask)
        if not self._left_padding_free and config.balance_training:
            self._warn_once("positions", f"{type(model).__name__} adds absolute position embeddings, so a row's left "
                            "padding changes its outputs: rl-lenbalance keeps stock's prompt padding and every row on "
                            "its rank (micro-batches are still length-sorted and their completions trimmed).")
        # a micro-batch's loss is a mean over its rows (RLOO has no loss_type: its loss is a mean over sequences)
        self._row_mean_loss = getattr(self, "loss_type", None) in ROW_MEAN_LOSSES or not hasattr(self, "loss_type")

    def _plan_candidates(self, config: LenBalanceConfig) -> list[str]:
        """The loss-phase strategies the autotuner may use: every exact one for 'auto', else the one asked for (or
        'stock_trimmed' with a one-time note when it would change what is learned here)."""
        args = self.args
        blockers = regrouping_blockers(
            getattr(self, "loss_type", None), getattr(args, "entropy_coef", 0.0) or 0.0,
            bool(getattr(args, "use_adaptive_entropy", False)), getattr(args, "top_entropy_quantile", 1.0),
            router_aux_loss=bool(getattr(self, "aux_loss_enabled", False)))  # TRL's own switch (MoE models)
        exact = exact_strategies(blockers)
        if "packed" in exact and config.training_plan in (AUTO, "packed"):
            model = self.accelerator.unwrap_model(self.model)
            why = packing_unsupported(model)
            if why is not None:
                exact.remove("packed")
            if why is not None and config.training_plan == "packed":
                self._warn_once("plan", f"lenbalance.training_plan='packed': {why}; using 'sorted' (length-sorted "
                                "micro-batches, padding trimmed), which is exact.")
                return ["sorted"]
        if config.training_plan == AUTO:
            if blockers:
                self._warn_once("plan", f"{'; '.join(blockers)}: regrouping rows would change what is learned, so "
                                "rl-lenbalance keeps stock's micro-batches (only all-padding columns are cut).")
            return exact
        if config.training_plan not in exact:
            self._warn_once("plan", f"lenbalance.training_plan={config.training_plan!r} regroups rows, which would "
                            f"change what is learned with {'; '.join(blockers)}; using 'stock_trimmed' (stock's "
                            "micro-batches, all-padding columns cut), which is exact.")
            return ["stock_trimmed"]
        return [config.training_plan]

    @_stock_when_reentered
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Stock `train`, remembering which checkpoint it resumes (True: the last one in output_dir)."""
        if resume_from_checkpoint is True:  # none found: stock raises its own error for True
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        self.lenbalance_resume_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        self._lenbalance_started = time.perf_counter()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _resolved(self, config: LenBalanceConfig) -> LenBalanceConfig:
        """`config` with its `auto` settings decided for this trainer's device and sampling."""
        sampling = getattr(getattr(self, "generation_config", None), "do_sample", True) is not False
        return config.resolved(self.accelerator.device, sampling)

    # --- checkpoints ------------------------------------------------------------------------------------------

    def lenbalance_run_state(self) -> dict:
        """What decides the rest of the run besides the engine, JSON-ready: the training-plan tuner's measurements
        and choice, the run totals (the capture budget reads them; wall seconds so far included), the totals at the
        last log and the last round's lengths. The callback saves it with every checkpoint."""
        totals = self.lenbalance_totals
        wall = totals.earlier_wall_s + time.perf_counter() - self._lenbalance_started
        return {"autotune": self._autotune.state_dict(), "totals": asdict(replace(totals, earlier_wall_s=wall)),
                "logged_totals": asdict(self._lenbalance_logged_totals),
                "last_lengths": [list(pair) for pair in self.lenbalance_last_lengths]}

    def load_lenbalance_run_state(self, state: dict, where: str) -> None:
        """Go on from `lenbalance_run_state()` as the run that saved it would have (`where`: the file, for the
        warning when the tuner was saved over other candidates and starts over)."""
        self.lenbalance_totals, self._lenbalance_logged_totals = (
            RunTotals(**{f.name: state[key][f.name] for f in fields(RunTotals) if f.name in state[key]})
            for key in ("totals", "logged_totals"))
        self.lenbalance_last_lengths = [(float(p), int(a)) for p, a in state["last_lengths"]]
        try:
            self._autotune.load_state_dict(state["autotune"])
        except ValueError as error:
            self._warn_once("resume_plan", f"rl-lenbalance: {where}: {error}; the training-plan tuner starts over.")

    # --- generation -------------------------------------------------------------------------------------------

    @_stock_when_reentered
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        """Stock: one `generate` over the rank's rows. Here: the rollout (the same call(s) under capture hooks, maybe
        in waves and re-bucketed), then the predictor's online update; completions in stock's order."""
        stock = self._stock_generation_note(images, multimodal_fields)
        if stock:
            self._warn_once(*stock)
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        engine, device, backend = self.lenbalance, self.accelerator.device, self._backend(args, kwargs)
        learn = self._within_overhead_budget()
        if self.use_vllm or self.use_transformers_continuous_batching:  # the backend schedules requests itself
            admission = self._admission(len(prompt_ids), learn)
            completions, logprobs, stats = run_admitted(prompt_ids, backend, engine, admission)
        else:
            settings = self._rollout_settings()
            if not (learn or settings.rebucket or settings.wave_size):  # nothing reads a capture
                return self._uncaptured_round(prompt_ids, backend, settings.compact)
            (completions, stats), logprobs = run_rollout(prompt_ids, backend, engine, settings), None
        metrics, self.lenbalance_last_lengths = engine.learn_round(stats.waves, stats.lengths, stats.own_ids,
                                                                   self._gather_rows) if stats.waves else ({}, [])
        ranks = gather_ledgers(stats.ledger(completions), self.accelerator.gather, device)
        self.lenbalance_totals.add_generation(ranks, metrics.get("predictor/train_s", 0.0))
        self._log_lenbalance(metrics | round_metrics(ranks, metrics) | self._budget_metrics())
        return (completions, logprobs) if isinstance(self, GRPOTrainer) else completions

    def _within_overhead_budget(self) -> bool:
        """Whether the capture's cost so far (hooks, prefills, replays and the head's training, over every rank) is
        within `lenbalance.max_overhead` of the generation time (the first round is always captured, to measure; a
        budget of 1.0 or more captures every round).
        Every rank gets the same answer (the head's training time differs a little between ranks)."""
        totals, budget = self.lenbalance_totals, self.lenbalance_config.max_overhead
        within = budget >= 1.0 or self.lenbalance.rounds == 0 or totals.predictor_overhead_s <= budget * totals.generate_s
        return bool(self.accelerator.gather(torch.tensor([float(within)], device=self.accelerator.device)).min())

    def _uncaptured_round(self, prompt_ids, backend: Backend, compact: bool):
        """Generation without hooks (the capture is over its budget and nothing reads it this round): stock's own
        call, or the decode loop that drops finished rows (compaction reads no prediction)."""
        start = time.perf_counter()
        completions = backend.decode(prompt_ids, None, compact=compact)
        ledger = uncaptured_ledger(completions, compact, time.perf_counter() - start)
        ranks = gather_ledgers(ledger, self.accelerator.gather, self.accelerator.device)
        self.lenbalance_totals.add_generation(ranks, 0.0)
        self.lenbalance_totals.uncaptured_rounds += 1
        self._log_lenbalance(round_metrics(ranks, {}) | self._budget_metrics())
        return (completions, None) if isinstance(self, GRPOTrainer) else completions  # GRPO: no logprobs here

    def _budget_metrics(self) -> dict[str, float]:
        totals = self.lenbalance_totals
        share = totals.predictor_overhead_s / totals.generate_s if totals.generate_s else 0.0
        return {"predictor/captured_rounds": float(self.lenbalance.rounds), "predictor/overhead_frac_run": share,
                "predictor/uncaptured_rounds": float(totals.uncaptured_rounds)}

    def _rollout_settings(self) -> RolloutSettings:
        """This round's rollout as the config asks, less what the generation config or the head's health rule out."""
        config, engine = self.lenbalance_config, self.lenbalance
        return RolloutSettings(
            eos_token_ids=self.eos_token_ids, max_completion_length=self.max_completion_length,
            compact=config.compaction and not self._loop_blocked("compaction"),
            rebucket=config.rebucket and engine.healthy and engine.rounds > 0 and not self._loop_blocked("rebucket"),
            wave_size=config.generation_wave_size, probe_tokens=config.probe_tokens,
            partition_method=config.partition_method,
        )

    def _admission(self, rows: int, learn: bool = True) -> RolloutSettings:
        """Admission for continuous batching and vLLM. vLLM's server generates a whole group from one request (its
        rows must stay together, and it serves every rank at once: nothing to balance); a tensor-parallel vLLM
        group generates its ranks' rows together, so only rows can be reordered there."""
        config, engine = self.lenbalance_config, self.lenbalance
        server = self.use_vllm and self.vllm_mode == "server"
        group = self.num_generations if server or rows % self.num_generations == 0 else 1
        return RolloutSettings(
            eos_token_ids=self.eos_token_ids, max_completion_length=self.max_completion_length,
            partition_method=config.partition_method, group_size=group,
            admit_by_prediction=engine.healthy and engine.rounds > 0 and rows % group == 0,
            balance_ranks=config.balance_ranks and not server and getattr(self, "vllm_tensor_parallel_size", 1) == 1,
            learn=learn,
        )

    def _backend(self, stock_args: tuple, stock_kwargs: dict) -> Backend:
        """TRL's generation, bound once: stock's own call when nothing needs rl-lenbalance's decode loop."""

        def decode(prompts: list[list[int]], captured: CaptureResult | None, *, compact: bool,
                   prefixes: list[list[int]] | None = None, max_steps: int | None = None) -> list[list[int]]:
            if not compact and prefixes is None and max_steps is None:
                ids = super(LenBalanceMixin, self)._generate_single_turn(prompts, None, {}, *stock_args, **stock_kwargs)
                return ids[0] if isinstance(ids, tuple) else ids  # GRPO adds logprobs (None on this path)
            with self._generation_model() as model:
                return compacted_generate(model, prompts, self.generation_config, self._tokenizer.pad_token_id,
                                          on_compact=captured.compact if captured else None,
                                          min_finished=1 if compact else len(prompts) + 1,
                                          prefixes=prefixes, max_steps=max_steps)

        def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
            with self._generation_model() as model, private_rng(self.args.seed + self.state.global_step):
                model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)

        def submit(prompts: list[list[int]]) -> tuple[list[list[int]], list | None]:
            out = super(LenBalanceMixin, self)._generate_single_turn(prompts, None, {}, *stock_args, **stock_kwargs)
            return out if isinstance(out, tuple) else (out, None)  # GRPO: (ids, logprobs); RLOO: ids

        return Backend(decode, forward, gather_object, self.accelerator.process_index, self.accelerator.num_processes,
                       submit)

    @contextmanager
    def _generation_model(self) -> Iterator[torch.nn.Module]:
        """The unwrapped policy exactly as stock's plain-`generate` branch prepares it (gathered ZeRO-3 weights,
        gradient checkpointing off and then back on with the trainer's own kwargs, no grad)."""
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            yield model

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in rank order (ranks with fewer rows are padded with -1), on the CPU."""
        return self.accelerator.gather(pad_across_processes(rows.to(self.accelerator.device), dim=0, pad_index=-1)).cpu()

    def _stock_generation_note(self, images, multimodal_fields) -> tuple[str, str] | None:
        """(key, one-time note) when this generation must run as stock TRL, unpredicted; None when it is captured."""
        if images is not None or multimodal_fields:
            return "multimodal", ("rl-lenbalance predicts text-only generation; this generation (with images) ran "
                                  "as stock TRL, unpredicted (training-side balancing still applies).")
        if (self.generation_config.num_beams or 1) > 1:  # the capture streams one row per prompt, not prompts × beams
            return "beams", ("rl-lenbalance does not capture beam search (num_beams > 1); generation runs as stock "
                             "TRL, unpredicted (training-side balancing still applies).")
        if self._lenbalance_tool_turn:  # rows and turn counts differ per rank: no collective may run here
            return "tool_turns", ("rl-lenbalance predicts the first turn only; the turns generated after tool results "
                                  "run as stock TRL, unpredicted (training-side balancing still applies).")
        return None

    @_stock_when_reentered
    def _tool_call_loop(self, *args, **kwargs):
        """Stock (GRPO's tools and environments); marks the turns it generates so that they run as stock."""
        self._lenbalance_tool_turn = True
        try:
            return super()._tool_call_loop(*args, **kwargs)
        finally:
            self._lenbalance_tool_turn = False

    def _loop_blocked(self, setting: str) -> bool:
        """True (with a one-time warning) when the generation config asks for something rl-lenbalance's decode loop
        (needed by compaction and re-bucketing) can't do."""
        unsupported = unsupported_options(self.generation_config)
        if unsupported:
            self._warn_once(setting, f"lenbalance.{setting} is on, but the generation config sets {unsupported}, "
                            f"which rl-lenbalance's decode loop does not implement; {setting} is off.")
        return bool(unsupported)

    # --- training-side balancing ------------------------------------------------------------------------------

    @_stock_when_reentered
    def _prepare_inputs(self, generation_batch):
        """Stock: shuffle rows randomly, split them into equal chunks, train those num_iterations times. Here: the
        same rows in each optimizer step (stock's shuffle decides them), and each pass over the generation batch cut
        into micro-batches by the strategy the autotuner picks for it, timed at the pass's edges."""
        if not self._balancing_training():
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        if self._step % (spg * self.num_iterations) == 0 or self._lenbalance_pass is None:
            batch = self._generate_and_score_completions(generation_batch)
            if "pixel_values" in batch:  # image rows: TRL's own lines, untimed
                self._warn_once("multimodal_training", "rl-lenbalance does not plan multimodal micro-batches yet; "
                                "batches with images train as stock TRL.")
                batches = split_tensor_dict(shuffle_sequence_dict(split_pixel_values_by_grid(batch)), spg)
                self._lenbalance_pass = LossPass(None, None, [unsplit_pixel_values_by_grid(b) for b in batches])
                self._buffered_inputs = self._lenbalance_pass.microbatches
            else:
                self._lenbalance_pass = LossPass(batch, torch.randperm(len(batch["advantages"])))  # stock's draw
        loss_pass = self._lenbalance_pass
        if self._step % spg == 0 and loss_pass.batch is not None:
            self._start_pass(loss_pass)
        return loss_pass.microbatches[self._step % spg]

    def _start_pass(self, loss_pass: LossPass) -> None:
        """Cut the generation batch by the autotuner's next strategy, count it, and start the pass's clock."""
        strategy = STRATEGIES[self._autotune.next()]
        trained, plan = self._plan(loss_pass.batch, loss_pass.shuffle, strategy)
        bounds = [sum(plan.sizes[:i]) for i in range(len(plan.sizes) + 1)]
        microbatches = [take_rows(trained, list(range(a, b))) for a, b in zip(bounds, bounds[1:])]
        if strategy.trims:
            microbatches = [trim_padding(b, self._left_padding_free) for b in microbatches]
        batch = loss_pass.batch
        stock_width = batch["prompt_ids"].size(1) + batch["completion_ids"].size(1)  # stock pads every row to it
        real = torch.stack([b["prompt_mask"].sum() + b["completion_mask"].sum() for b in microbatches]).tolist()
        # under a dense (N, N) mask a long pack runs padded instead (the same rows: exact); varlen kernels pack all
        packed = [strategy.packs and (self._varlen_attention or r <= DENSE_PACK_MAX_TOKENS) for r in real]
        ledger = TrainingLedger(  # a packed micro-batch computes its real tokens only
            loss_tokens=sum(r if p else b["prompt_ids"].numel() + b["completion_ids"].numel()
                            for r, p, b in zip(real, packed, microbatches)),
            loss_tokens_stock=len(trained["advantages"]) * stock_width,
            real_tokens=sum(real), rows_moved_in=plan.moved_in,
        )
        ranks = gather_ledgers(ledger, self.accelerator.gather, self.accelerator.device)
        self.lenbalance_totals.add_training(ranks, 1)
        self._log_lenbalance(training_metrics(ranks))
        loss_pass.strategy, loss_pass.microbatches, loss_pass.packed = strategy.name, microbatches, packed
        loss_pass.rows = self._row_ids(plan, len(batch["advantages"])) if strategy.regroups else []
        loss_pass.outputs = []
        self._buffered_inputs = microbatches  # where stock keeps its micro-batches (scripts and tests read them)
        loss_pass.stock_tokens = sum(r.loss_tokens_stock for r in ranks)
        loss_pass.started = self._synchronized_clock()

    def _end_pass(self, loss_pass: LossPass) -> None:
        """Stop the pass's clock (the slowest rank's seconds), let the autotuner count it, and log what it chose."""
        seconds = self._synchronized_clock() - loss_pass.started
        seconds = self.accelerator.gather(torch.tensor([seconds], device=self.accelerator.device)).max().item()
        # per 1k tokens of stock's work on this batch: stock's passes measure its rate whatever the batch's padding,
        # and another strategy's its share of stock's time, so passes over different batches compare like with like
        per_ktok = seconds / max(loss_pass.stock_tokens / 1000.0, 1e-9)
        autotune = self._autotune
        exploring = not autotune.decided  # this pass measured (or warmed up) a candidate, before any choice
        changed = autotune.record(loss_pass.strategy, per_ktok)
        ratio = autotune.ratio_vs_stock()
        names = list(STRATEGIES)
        chosen = {"autotune/choice": float(names.index(autotune.choice))} if autotune.decided else {}
        self._log_lenbalance({f"autotune/{loss_pass.strategy}_s_per_ktok": per_ktok,
                              "autotune/strategy": float(names.index(loss_pass.strategy)),
                              "autotune/exploring": float(exploring), "autotune/pass": float(autotune.passes),
                              "autotune/passes_to_measure": float(autotune.passes_to_measure)} | chosen
                             | ({"autotune/ratio_vs_stock": ratio} if ratio is not None and autotune.decided else {}))
        if changed and self.accelerator.is_main_process:
            faster = f", {ratio:.2f}× faster than stock on this device" if ratio is not None else ""
            tqdm.write(f"rl-lenbalance: training plan: {autotune.choice}{faster}, "
                       f"{autotune.passes - autotune.warmup} passes measured.")

    def _synchronized_clock(self) -> float:
        """The host clock once the device has finished its queued work (the loss phase's edges only)."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter()

    def _plan(self, batch: dict, shuffle: torch.Tensor, strategy: Strategy) -> tuple[dict, TrainingPlan]:
        """This rank's rows in `strategy`'s micro-batch order, and the plan that ordered them."""
        if not strategy.regroups:
            plan = stock_plan(shuffle.tolist(), self.args.steps_per_generation)
            return take_rows(batch, plan.rows), plan
        plan = self._training_plan(batch, shuffle, strategy.uneven)
        return self._exchange_rows(batch, plan), plan

    def _training_plan(self, batch: dict, shuffle: torch.Tensor, uneven: bool) -> TrainingPlan:
        """`schedule.plan_training` over this rank's rows, or every rank's when rows may move between ranks."""
        config, args = self.lenbalance_config, self.args
        steps = optimizer_steps(shuffle.tolist(), args.steps_per_generation, args.gradient_accumulation_steps)
        columns = torch.stack([batch["completion_mask"].sum(1).cpu(), batch["prompt_mask"].sum(1).cpu(),
                               torch.tensor(steps)])
        ranks = self.accelerator.num_processes if config.balance_ranks and self._left_padding_free else 1
        if ranks > 1:  # a move re-pads a row's prompt: only models that ignore left padding may move rows
            columns = self.accelerator.gather(columns.T.to(self.accelerator.device)).T.cpu()
        completion, prompt, steps = columns.tolist()
        return plan_training(completion, prompt, steps, ranks, self.accelerator.process_index if ranks > 1 else 0,
                             args.gradient_accumulation_steps, config.attention_alpha, config.partition_method, uneven)

    def _exchange_rows(self, batch: dict, plan: TrainingPlan) -> dict:
        """The rows `plan` gives this rank, in its order: taken from this rank's batch, or gathered from every
        rank's (re-padded to the widest rank) when some row changes rank."""
        if not plan.exchange:
            return take_rows(batch, [row - plan.offset for row in plan.rows])
        moved, index = {}, torch.tensor(plan.rows)
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                if value.ndim > 1:
                    pad = self.processing_class.pad_token_id if key.endswith("_ids") else 0
                    value = pad_across_processes(value, dim=1, pad_index=pad, pad_first=key.startswith("prompt"))
                value = self.accelerator.gather(value)[index.to(value.device)]
            moved[key] = value
        return moved

    def _row_ids(self, plan: TrainingPlan, rows: int) -> list[int]:
        """The ids of the rows `plan` gives this rank, numbered rank-major over every rank's `rows` rows."""
        return [row - plan.offset + self.accelerator.process_index * rows for row in plan.rows]

    def _log_as_stock(self, loss_pass: LossPass) -> None:
        """TRL logs its per-token metrics (entropy, clip ratios, KL, ...) per micro-batch and averages them over
        micro-batches, so a regrouping pass would log other numbers than stock for the same rows and update. At the
        end of each optimizer step of such a pass, the values it logged are replaced by stock's: TRL's own
        `_compute_loss` on stock's micro-batches of the step (`stock_plan`), each row scored by the per-token outputs
        the pass computed for it (no forward, no backward; rows trained on another rank are gathered back)."""
        spg, ga = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        end = (self._step - 1) % spg + 1  # the micro-batches of this pass trained so far; the step's are the last ga
        batch, device = loss_pass.batch, self.accelerator.device
        rows, width = len(batch["advantages"]), batch["completion_ids"].size(1)
        outputs = loss_pass.outputs[end - ga:end]
        first = sum(len(logps) for logps, _ in loss_pass.outputs[:end - ga])
        ids = torch.tensor(loss_pass.rows[first:first + sum(len(logps) for logps, _ in outputs)], device=device)
        widest = max(logps.size(1) for logps, _ in outputs)  # a row from a wider rank may be wider than `width`
        scored = [torch.cat([fit_columns(out[i], widest) for out in outputs]) for i in (0, 1)]  # logps, entropies
        if self.accelerator.num_processes > 1:  # rows may have trained on another rank
            ids = self.accelerator.gather(pad_across_processes(ids, dim=0, pad_index=-1))
            scored = [self.accelerator.gather(pad_across_processes(pad_across_processes(t, dim=1), dim=0))
                      for t in scored]
        where = {row: i for i, row in enumerate(ids.tolist())}
        stock = stock_plan(loss_pass.shuffle.tolist(), spg).rows
        size, offset = rows // spg, self.accelerator.process_index * rows
        logged, self._metrics["train"] = self._metrics["train"], defaultdict(list)
        try:
            with torch.no_grad():
                for k in range(end - ga, end):
                    mine = stock[k * size:(k + 1) * size]
                    index = torch.tensor([where[row + offset] for row in mine], device=device)
                    self._lenbalance_replay = tuple(fit_columns(t[index], width) for t in scored)
                    self._compute_loss(self.model, take_rows(batch, mine))
        finally:
            self._lenbalance_replay = None
            replayed, self._metrics["train"] = self._metrics["train"], logged
        for key, values in replayed.items():  # each was logged once per micro-batch, by the pass as by the replay
            logged[key][-len(values):] = values

    def _balancing_training(self) -> bool:
        """Whether this training micro-step uses rl-lenbalance's micro-batches (else stock's, as in eval)."""
        if not self.model.training or not self.lenbalance_config.balance_training:
            return False
        spg, ga = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        if spg % ga:
            self._warn_once("steps_per_generation", f"steps_per_generation={spg} is not a multiple of "
                            f"gradient_accumulation_steps={ga}: optimizer steps span two generation batches, so no "
                            "row can be regrouped without changing the update; training runs as stock TRL "
                            "(generation is still captured and predicted).")
        return spg % ga == 0

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, *args, **kwargs):
        """Stock: the padded micro-batch through the model. In a `packed` pass's loss forward (training, with
        grad): its rows as one padding-free sequence (`packing.packed_logps_and_entropies`), the same values. A
        regrouping pass keeps its loss forwards' outputs, which `_log_as_stock` hands back instead of a forward."""
        if self._lenbalance_replay is not None:
            return *self._lenbalance_replay, None
        loss_pass = self._lenbalance_pass
        loss_forward = loss_pass is not None and self.model.training and torch.is_grad_enabled()
        packs = (loss_forward and loss_pass.packed
                 and loss_pass.packed[self._step % self.args.steps_per_generation]  # the micro-batch being trained
                 and not args and not any(v is not None and v is not False for v in kwargs.values()))
        if packs:
            with self.accelerator.autocast():  # TRL's fused LM head, as stock's call: its numbers, no logits
                logps, entropies = packed_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              self.temperature, compute_entropy, fused_lm_head=True)
            aux = None  # no router aux loss: a packing pass never runs with one
        else:  # old / reference log-probs (no grad), images, the router aux loss, a long dense pack: stock's
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, *args, **kwargs)
        if loss_forward and loss_pass.rows and entropies is not None:
            loss_pass.outputs.append((logps.detach(), entropies.detach()))
        return logps, entropies, aux

    @_stock_when_reentered
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Stock, with a per-row-mean loss weighted by its micro-batch's rows over stock's (uneven micro-batches)."""
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._balancing_training() and self._row_mean_loss:
            loss = loss * (len(inputs["advantages"]) / self.args.per_device_train_batch_size)
        return loss

    @_stock_when_reentered
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Stock; the seconds it spends outside generation are the loss phase's (in the run totals), a regrouping
        pass logs its metrics as stock would at each optimizer step's end, and the last micro-step of a pass over the
        generation batch stops the pass's clock."""
        totals = self.lenbalance_totals
        start, generated = time.perf_counter(), totals.generation_phase_s
        loss = super().training_step(model, inputs, num_items_in_batch)
        loss_pass = self._lenbalance_pass
        if loss_pass is not None and loss_pass.rows and self._step % self.args.gradient_accumulation_steps == 0:
            self._log_as_stock(loss_pass)  # the optimizer step's last micro-step: its logged metrics are complete
        totals.loss_phase_s += time.perf_counter() - start - (totals.generation_phase_s - generated)
        if loss_pass is not None and loss_pass.strategy and self._step % self.args.steps_per_generation == 0:
            self._end_pass(loss_pass)
        return loss

    @_stock_when_reentered
    def _generate_and_score_completions(self, inputs):
        """Stock, timed: generation, rewards and advantages, as a user's step sees them (in the run totals)."""
        start = time.perf_counter()
        batch = super()._generate_and_score_completions(inputs)
        self.lenbalance_totals.generation_phase_s += time.perf_counter() - start
        return batch

    # --- logging ------------------------------------------------------------------------------------------------

    @_stock_when_reentered
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Stock, plus each phase's seconds since the last training log and the count of logged optimizer steps
        whose `grad_norm` was not finite (a divergence alarm)."""
        for key in LATEST_AT_LOG:  # TRL averages its metric store over a log's steps: a plan index must not be
            values = self._metrics["train"].get(f"lenbalance/{key}")  # averaged (logging_steps > 1); keep the last
            if values:
                del values[:-1]
        if "grad_norm" in logs:
            totals = self.lenbalance_totals
            totals.nonfinite_grad_steps += not math.isfinite(logs["grad_norm"])
            logs["lenbalance/train/nonfinite_grad_steps"] = float(totals.nonfinite_grad_steps)
            self._log_lenbalance(time_metrics(totals, self._lenbalance_logged_totals))
            self._lenbalance_logged_totals = replace(totals)
        super().log(logs, start_time)

    def _log_lenbalance(self, metrics: dict[str, float]) -> None:
        """Append to TRL's own metric store (already reduced over ranks): every `report_to` receives them."""
        for name, value in metrics.items():
            self._metrics["train"][f"lenbalance/{name}"].append(float(value))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._lenbalance_warned:
            self._lenbalance_warned.add(key)
            warnings.warn(message)


# what a pass logs about the plan it ran: each log keeps the latest pass's value, never a mean of several
LATEST_AT_LOG = ("autotune/strategy", "autotune/exploring", "autotune/pass", "autotune/passes_to_measure",
                 "autotune/choice", "autotune/ratio_vs_stock")


def _absolute_positions(model) -> bool:
    """True when the decoder adds learned absolute position embeddings (GPT-2's `wpe`, OPT's): TRL passes no
    position ids, so a row's left padding shifts its positions and changes its outputs."""
    tokens = model.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not tokens for m in model.get_decoder().modules())


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
        if config is not None and (config := trainer._resolved(config)) != trainer.lenbalance_config:
            running = vars(trainer.lenbalance_config)
            differ = ", ".join(f"{k}={v!r} (running: {running[k]!r})" for k, v in vars(config).items() if v != running[k])
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
