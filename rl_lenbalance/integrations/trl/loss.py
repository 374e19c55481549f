"""TRL adapter, loss phase: the overrides of GRPOTrainer/RLOOTrainer that hand each pass over a generation batch to
`loss.phase.LossPhase` (framework-free: strategies, tuner, micro-batches, ledger, clock) and its micro-batches to
TRL."""

from __future__ import annotations

from collections import defaultdict

import torch
from accelerate.utils import pad_across_processes
from tqdm.auto import tqdm
from trl.trainer.utils import (
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from ...config import LenBalanceConfig
from ...loss import LAYOUT_KEY, ROW_MEAN_LOSSES, Layout, regrouping_blockers, stock_plan
from ...loss.phase import LossPass, LossPhase
from ...schedule import TrainingPlan, fit_columns, take_rows
from .stock import stock_when_reentered


class LossPhaseOverrides:
    """The loss-phase half of `LenBalanceMixin` (set up by `_lenbalance_loss_phase_setup`)."""

    def _lenbalance_loss_phase_setup(self, config: LenBalanceConfig, model: torch.nn.Module) -> None:
        args = self.args
        blockers = regrouping_blockers(
            getattr(self, "loss_type", None), getattr(args, "entropy_coef", 0.0) or 0.0,
            bool(getattr(args, "use_adaptive_entropy", False)), getattr(args, "top_entropy_quantile", 1.0),
            router_aux_loss=bool(getattr(self, "aux_loss_enabled", False)))  # TRL's own switch (MoE models)
        self._lenbalance_loss = LossPhase(config.loss_settings(), model, blockers, self._lenbalance_warn_once)
        # a micro-batch's loss is a mean over its rows (RLOO has no loss_type: its loss is a mean over sequences)
        self._lenbalance_row_mean_loss = (getattr(self, "loss_type", None) in ROW_MEAN_LOSSES
                                          or not hasattr(self, "loss_type"))
        self._lenbalance_layout: Layout | None = None  # the layout of the micro-batch `compute_loss` is computing
        # set inside `_lenbalance_log_as_stock` only
        self._lenbalance_replay: tuple[torch.Tensor, torch.Tensor] | None = None

    def _lenbalance_balancing_training(self) -> bool:
        """Whether this training micro-step uses rl-lenbalance's micro-batches (else stock's, as in eval)."""
        return self.model.training and self._lenbalance_loss.plans(self.args.steps_per_generation,
                                                                    self.args.gradient_accumulation_steps)

    @stock_when_reentered
    def _prepare_inputs(self, generation_batch):
        """Stock: shuffle rows randomly, split them into equal chunks, train those num_iterations times. Here: the
        same rows in each optimizer step (stock's shuffle decides them), and each pass over the generation batch cut
        into micro-batches by the strategy the autotuner picks for it, timed at the pass's edges."""
        if not self._lenbalance_balancing_training():
            return super()._prepare_inputs(generation_batch)
        spg, phase = self.args.steps_per_generation, self._lenbalance_loss
        if self._step % (spg * self.num_iterations) == 0 or phase.current is None:
            batch = self._generate_and_score_completions(generation_batch)
            if "pixel_values" in batch:  # image rows: TRL's own lines, untimed
                self._lenbalance_warn_once(
                    "multimodal_training", "rl-lenbalance does not plan multimodal micro-batches yet; "
                    "batches with images train as stock TRL.")
                batches = split_tensor_dict(shuffle_sequence_dict(split_pixel_values_by_grid(batch)), spg)
                own = phase.begin(None, [unsplit_pixel_values_by_grid(b) for b in batches])
                self._buffered_inputs = own.microbatches
            else:
                phase.begin(batch)  # draws stock's shuffle
        loss_pass = phase.current
        if self._step % spg == 0 and loss_pass.batch is not None:
            self._lenbalance_log(phase.start_pass(self.accelerator, self._lenbalance_exchange_rows,
                                                  self.lenbalance_totals, spg, self.args.gradient_accumulation_steps))
            self._buffered_inputs = loss_pass.microbatches  # where stock keeps its micro-batches (scripts read them)
        return loss_pass.microbatches[self._step % spg]  # as stock reads its `_buffered_inputs`

    def _lenbalance_exchange_rows(self, batch: dict, plan: TrainingPlan) -> dict:
        """The rows `plan` gives this rank, in its order, gathered from every rank's batch (re-padded to the widest
        rank): some row changes rank."""
        moved, index = {}, torch.tensor(plan.rows)
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                if value.ndim > 1:
                    pad = self.processing_class.pad_token_id if key.endswith("_ids") else 0
                    value = pad_across_processes(value, dim=1, pad_index=pad, pad_first=key.startswith("prompt"))
                value = self.accelerator.gather(value)[index.to(value.device)]
            moved[key] = value
        return moved

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
        loss_pass, layout = self._lenbalance_loss.current, self._lenbalance_layout
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
        totals, phase, device = self.lenbalance_totals, self._lenbalance_loss, self.accelerator.device
        start, generated = phase.clock(device), totals.generation_phase_s
        loss = super().training_step(model, inputs, num_items_in_batch)
        loss_pass = phase.current
        if loss_pass is not None and loss_pass.rows and self._step % self.args.gradient_accumulation_steps == 0:
            # the optimizer step's last micro-step: its logged metrics are complete
            self._lenbalance_log_as_stock(loss_pass)
        totals.loss_phase_s += phase.clock(device) - start - (totals.generation_phase_s - generated)
        if loss_pass is not None and loss_pass.strategy and self._step % self.args.steps_per_generation == 0:
            metrics, changed = phase.end_pass(self.accelerator)
            self._lenbalance_log(metrics)
            if changed and self.accelerator.is_main_process:
                tqdm.write(changed)
        return loss
