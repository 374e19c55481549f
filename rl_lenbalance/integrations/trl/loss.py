"""TRL adapter, loss phase: the overrides of GRPOTrainer/RLOOTrainer that plan, run and time each pass over a
generation batch. The strategies themselves (plans and forwards) are `rl_lenbalance.loss`, framework-free."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from accelerate.utils import pad_across_processes
from tqdm.auto import tqdm
from trl.trainer.utils import (
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from ...config import AUTO, OFF, LenBalanceConfig
from ...ledger import TrainingLedger, gather_ledgers, named, training_metrics
from ...loss import (
    LAYOUT_KEY,
    ROW_MEAN_LOSSES,
    STRATEGIES,
    Layout,
    PassRows,
    Strategy,
    exact_strategies,
    prompt_groups,
    regrouping_blockers,
    stock_plan,
)
from ...loss.packed import DENSE_PACK_MAX_TOKENS, skips_masked_blocks
from ...schedule import Autotuner, TrainingPlan, fit_columns, optimizer_steps, take_rows, trim_padding
from .stock import stock_when_reentered


@dataclass
class LossPass:
    """A generation batch in the loss phase: its rows, stock's shuffle of them, and the current pass over it (one of
    `num_iterations`), cut into micro-batches by one strategy and timed from its first micro-step to its last."""

    batch: dict | None  # None: TRL's own micro-batches (multimodal rows), not planned nor timed
    shuffle: torch.Tensor | None
    microbatches: list[dict] = field(default_factory=list)  # each carries its `Layout` under `LAYOUT_KEY`
    strategy: str = ""
    stock_tokens: float = 0.0  # every rank's tokens as stock's micro-batches compute them (rows padded to the batch)
    started: float = 0.0
    rows: list[int] = field(default_factory=list)  # a regrouping pass: its rows' ids (rank-major over every rank's)
    # its loss forwards' (logps, entropies), detached, one per micro-batch so far: `_lenbalance_log_as_stock` scores
    # stock's micro-batches with them
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class LossPhaseOverrides:
    """The loss-phase half of `LenBalanceMixin` (set up by `_lenbalance_loss_phase_setup`)."""

    def _lenbalance_loss_phase_setup(self, config: LenBalanceConfig, model: torch.nn.Module) -> None:
        self._lenbalance_left_padding_free = not _absolute_positions(model)  # a row's outputs ignore its left padding
        # the longest sequence one packed forward runs under a dense (N, N) mask (None: the kernel skips masked blocks)
        self._lenbalance_dense_max_tokens = None if skips_masked_blocks(model) else DENSE_PACK_MAX_TOKENS
        if not self._lenbalance_left_padding_free and config.training_plan != OFF:
            self._lenbalance_warn_once(
                "positions", f"{type(model).__name__} adds absolute position embeddings, so a row's left "
                "padding changes its outputs: rl-lenbalance keeps stock's prompt padding and every row on "
                "its rank (micro-batches are still length-sorted and their completions trimmed).")
        # a micro-batch's loss is a mean over its rows (RLOO has no loss_type: its loss is a mean over sequences)
        self._lenbalance_row_mean_loss = (getattr(self, "loss_type", None) in ROW_MEAN_LOSSES
                                          or not hasattr(self, "loss_type"))
        candidates = self._lenbalance_plan_candidates(config, model) if config.training_plan != OFF else ["stock"]
        first = next(name for name in ("sorted", "stock_trimmed", "stock") if name in candidates + ["stock"])
        self._lenbalance_loss_tuner = Autotuner(candidates, first, samples=config.autotune_samples,
                                                margin=config.autotune_margin, recheck_every=config.autotune_every)
        self._lenbalance_pass: LossPass | None = None  # the generation batch being trained, and its current pass
        self._lenbalance_layout: Layout | None = None  # the layout of the micro-batch `compute_loss` is computing
        # set inside `_lenbalance_log_as_stock` only
        self._lenbalance_replay: tuple[torch.Tensor, torch.Tensor] | None = None

    def _lenbalance_plan_candidates(self, config: LenBalanceConfig, model: torch.nn.Module) -> list[str]:
        """The loss-phase strategies the autotuner may use: every exact one that runs on this model for 'auto' (a
        one-time note names those left out), else the one asked for (or an exact stand-in, with a one-time note)."""
        args = self.args
        blockers = regrouping_blockers(
            getattr(self, "loss_type", None), getattr(args, "entropy_coef", 0.0) or 0.0,
            bool(getattr(args, "use_adaptive_entropy", False)), getattr(args, "top_entropy_quantile", 1.0),
            router_aux_loss=bool(getattr(self, "aux_loss_enabled", False)))  # TRL's own switch (MoE models)
        exact = exact_strategies(blockers)
        asked = exact if config.training_plan == AUTO else [config.training_plan]
        why = {name: STRATEGIES[name].unsupported(model) for name in asked if name in exact}
        runs = [name for name in exact if name in why and why[name] is None]
        if config.training_plan == AUTO:
            if blockers:
                self._lenbalance_warn_once(
                    "plan", f"{'; '.join(blockers)}: regrouping rows would change what is learned, so "
                    "rl-lenbalance keeps stock's micro-batches (only all-padding columns are cut).")
            left_out = [f"'{name}' ({reason})" for name, reason in why.items() if reason is not None]
            if left_out:
                self._lenbalance_warn_once(
                    "plan_left_out", f"lenbalance.training_plan='auto' leaves out {'; '.join(left_out)}; it "
                    f"measures {', '.join(runs)}.")
            return runs
        if runs:
            return runs
        if config.training_plan in exact:  # exact here, but this model cannot run its forward
            self._lenbalance_warn_once(
                "plan", f"lenbalance.training_plan={config.training_plan!r}: {why[config.training_plan]}; "
                "using 'sorted' (length-sorted micro-batches, padding trimmed), which is exact.")
            return ["sorted"]
        self._lenbalance_warn_once(
            "plan", f"lenbalance.training_plan={config.training_plan!r} regroups rows, which would "
            f"change what is learned with {'; '.join(blockers)}; using 'stock_trimmed' (stock's "
            "micro-batches, all-padding columns cut), which is exact.")
        return ["stock_trimmed"]

    def _lenbalance_balancing_training(self) -> bool:
        """Whether this training micro-step uses rl-lenbalance's micro-batches (else stock's, as in eval)."""
        if not self.model.training or self.lenbalance_config.training_plan == OFF:
            return False
        spg, ga = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        if spg % ga:
            self._lenbalance_warn_once("steps_per_generation", f"steps_per_generation={spg} is not a multiple of "
                            f"gradient_accumulation_steps={ga}: optimizer steps span two generation batches, so no "
                            "row can be regrouped without changing the update; training runs as stock TRL "
                            "(generation is still captured and predicted).")
        return spg % ga == 0

    @stock_when_reentered
    def _prepare_inputs(self, generation_batch):
        """Stock: shuffle rows randomly, split them into equal chunks, train those num_iterations times. Here: the
        same rows in each optimizer step (stock's shuffle decides them), and each pass over the generation batch cut
        into micro-batches by the strategy the autotuner picks for it, timed at the pass's edges."""
        if not self._lenbalance_balancing_training():
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        if self._step % (spg * self.num_iterations) == 0 or self._lenbalance_pass is None:
            batch = self._generate_and_score_completions(generation_batch)
            if "pixel_values" in batch:  # image rows: TRL's own lines, untimed
                self._lenbalance_warn_once(
                    "multimodal_training", "rl-lenbalance does not plan multimodal micro-batches yet; "
                    "batches with images train as stock TRL.")
                batches = split_tensor_dict(shuffle_sequence_dict(split_pixel_values_by_grid(batch)), spg)
                self._lenbalance_pass = LossPass(None, None, [unsplit_pixel_values_by_grid(b) for b in batches])
                self._buffered_inputs = self._lenbalance_pass.microbatches
            else:
                self._lenbalance_pass = LossPass(batch, torch.randperm(len(batch["advantages"])))  # stock's draw
        loss_pass = self._lenbalance_pass
        if self._step % spg == 0 and loss_pass.batch is not None:
            self._lenbalance_start_pass(loss_pass)
        return loss_pass.microbatches[self._step % spg]  # as stock reads its `_buffered_inputs`

    def _lenbalance_start_pass(self, loss_pass: LossPass) -> None:
        """Cut the generation batch by the autotuner's next strategy (each micro-batch with its layout), count it in
        the ledger, and start the pass's clock."""
        strategy = STRATEGIES[self._lenbalance_loss_tuner.next()]
        batch = loss_pass.batch
        plan = strategy.plan(self._lenbalance_pass_rows(batch, loss_pass.shuffle, strategy))
        trained = self._lenbalance_exchange_rows(batch, plan)
        bounds = [sum(plan.sizes[:i]) for i in range(len(plan.sizes) + 1)]
        microbatches = [take_rows(trained, list(range(a, b))) for a, b in zip(bounds, bounds[1:])]
        if strategy.trims:
            microbatches = [trim_padding(b, self._lenbalance_left_padding_free) for b in microbatches]
        for b in microbatches:
            b[LAYOUT_KEY] = strategy.layout(b, self._lenbalance_dense_max_tokens)
        stock_width = batch["prompt_ids"].size(1) + batch["completion_ids"].size(1)  # stock pads every row to it
        ledger = TrainingLedger(loss_tokens=sum(b[LAYOUT_KEY].tokens for b in microbatches),
                                loss_tokens_stock=len(trained["advantages"]) * stock_width,
                                real_tokens=sum(int(b["prompt_mask"].sum() + b["completion_mask"].sum())
                                                for b in microbatches), rows_moved_in=plan.moved_in)
        ranks = gather_ledgers(ledger, self.accelerator.gather, self.accelerator.device)
        self.lenbalance_totals.add_training(ranks, 1)
        self._lenbalance_log(training_metrics(ranks))
        loss_pass.strategy, loss_pass.microbatches, loss_pass.outputs = strategy.name, microbatches, []
        loss_pass.rows = self._lenbalance_row_ids(plan, len(batch["advantages"])) if strategy.regroups else []
        self._buffered_inputs = microbatches  # where stock keeps its micro-batches (scripts and tests read them)
        loss_pass.stock_tokens = sum(r.loss_tokens_stock for r in ranks)
        loss_pass.started = self._lenbalance_synchronized_clock()

    def _lenbalance_pass_rows(self, batch: dict, shuffle: torch.Tensor, strategy: Strategy) -> PassRows:
        """What `strategy.plan` sees of this generation batch: this rank's rows, or every rank's when the strategy
        may move rows between ranks (only models that ignore left padding may move rows: a move re-pads a prompt)."""
        config, args = self.lenbalance_config, self.args
        steps = optimizer_steps(shuffle.tolist(), args.steps_per_generation, args.gradient_accumulation_steps)
        columns = torch.stack([batch["completion_mask"].sum(1).cpu(), batch["prompt_mask"].sum(1).cpu(),
                               torch.tensor(steps), prompt_groups(batch["prompt_ids"], batch["prompt_mask"], 0).cpu()])
        ranks = self.accelerator.num_processes if strategy.moves_rows and config.balance_ranks else 1
        ranks = ranks if self._lenbalance_left_padding_free else 1
        if ranks > 1:
            columns = self.accelerator.gather(columns.T.to(self.accelerator.device)).T.cpu()
        completion, prompt, steps, groups = columns.tolist()
        return PassRows(completion, prompt, steps, groups, shuffle.tolist(), ranks,
                        self.accelerator.process_index if ranks > 1 else 0, args.steps_per_generation,
                        args.gradient_accumulation_steps, config.attention_alpha, config.partition_method)

    def _lenbalance_exchange_rows(self, batch: dict, plan: TrainingPlan) -> dict:
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

    def _lenbalance_row_ids(self, plan: TrainingPlan, rows: int) -> list[int]:
        """The ids of the rows `plan` gives this rank, numbered rank-major over every rank's `rows` rows."""
        return [row - plan.offset + self.accelerator.process_index * rows for row in plan.rows]

    def _lenbalance_end_pass(self, loss_pass: LossPass) -> None:
        """Stop the pass's clock (the slowest rank's seconds), let the autotuner count it, and log what it chose."""
        seconds = self._lenbalance_synchronized_clock() - loss_pass.started
        seconds = self.accelerator.gather(torch.tensor([seconds], device=self.accelerator.device)).max().item()
        # per 1k tokens of stock's work on this batch: stock's passes measure its rate whatever the batch's padding,
        # and another strategy's its share of stock's time, so passes over different batches compare like with like
        per_ktok = seconds / max(loss_pass.stock_tokens / 1000.0, 1e-9)
        autotune = self._lenbalance_loss_tuner
        exploring = not autotune.decided  # this pass measured (or warmed up) a candidate, before any choice
        changed = autotune.record(loss_pass.strategy, per_ktok)
        ratio = autotune.ratio_vs_stock()
        chosen = named("autotune/choice", STRATEGIES, autotune.choice) if autotune.decided else {}
        self._lenbalance_log({f"autotune/{loss_pass.strategy}_s_per_ktok": per_ktok}
                             | named("autotune/strategy", STRATEGIES, loss_pass.strategy)
                             | {"autotune/exploring": float(exploring), "autotune/pass": float(autotune.passes),
                              "autotune/passes_to_measure": float(autotune.passes_to_measure)} | chosen
                             | ({"autotune/ratio_vs_stock": ratio} if ratio is not None and autotune.decided else {}))
        if changed and self.accelerator.is_main_process:
            faster = f", {ratio:.2f}× faster than stock on this device" if ratio is not None else ""
            tqdm.write(f"rl-lenbalance: training plan: {autotune.choice}{faster}, "
                       f"{autotune.passes - autotune.warmup} passes measured.")

    def _lenbalance_synchronized_clock(self) -> float:
        """The host clock once the device has finished its queued work (the loss phase's edges only)."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter()

    def _lenbalance_log_as_stock(self, loss_pass: LossPass) -> None:
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

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, *args, **kwargs):
        """Stock: the padded micro-batch through the model. In a loss forward (training, with grad) of a micro-batch
        whose layout has its own forward (packed, shared prompts): that forward, the same values. A regrouping pass
        keeps its loss forwards' outputs, which `_lenbalance_log_as_stock` hands back instead of a forward."""
        if self._lenbalance_replay is not None:
            return *self._lenbalance_replay, None
        loss_pass, layout = self._lenbalance_pass, self._lenbalance_layout
        loss_forward = loss_pass is not None and self.model.training and torch.is_grad_enabled()
        if (loss_forward and layout is not None and layout.forward is not None and not args
                and not any(v is not None and v is not False for v in kwargs.values())):
            with self.accelerator.autocast():  # TRL's fused LM head, as stock's call: its numbers, no logits
                logps, entropies = layout.run(model, input_ids, attention_mask, logits_to_keep, self.temperature,
                                              compute_entropy)
            aux = None  # no router aux loss: a regrouping pass never runs with one
        else:  # old / reference log-probs (no grad), images, the router aux loss: stock's
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, *args, **kwargs)
        if loss_forward and loss_pass.rows and entropies is not None:
            loss_pass.outputs.append((logps.detach(), entropies.detach()))
        return logps, entropies, aux

    @stock_when_reentered
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Stock, run with the micro-batch's layout, and a per-row-mean loss weighted by its micro-batch's rows over
        stock's (uneven micro-batches)."""
        self._lenbalance_layout = inputs.get(LAYOUT_KEY)
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._lenbalance_layout = None
        if self._lenbalance_balancing_training() and self._lenbalance_row_mean_loss:
            loss = loss * (len(inputs["advantages"]) / self.args.per_device_train_batch_size)
        return loss

    @stock_when_reentered
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Stock; the seconds it spends outside generation are the loss phase's (in the run totals), a regrouping
        pass logs its metrics as stock would at each optimizer step's end, and the last micro-step of a pass over the
        generation batch stops the pass's clock."""
        totals = self.lenbalance_totals
        start, generated = time.perf_counter(), totals.generation_phase_s
        loss = super().training_step(model, inputs, num_items_in_batch)
        loss_pass = self._lenbalance_pass
        if loss_pass is not None and loss_pass.rows and self._step % self.args.gradient_accumulation_steps == 0:
            # the optimizer step's last micro-step: its logged metrics are complete
            self._lenbalance_log_as_stock(loss_pass)
        totals.loss_phase_s += time.perf_counter() - start - (totals.generation_phase_s - generated)
        if loss_pass is not None and loss_pass.strategy and self._step % self.args.steps_per_generation == 0:
            self._lenbalance_end_pass(loss_pass)
        return loss


def _absolute_positions(model) -> bool:
    """True when the decoder adds learned absolute position embeddings (GPT-2's `wpe`, OPT's): TRL passes no
    position ids, so a row's left padding shifts its positions and changes its outputs."""
    tokens = model.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not tokens for m in model.get_decoder().modules())
