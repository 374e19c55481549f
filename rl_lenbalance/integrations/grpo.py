"""TRL adapter: GRPOTrainer and RLOOTrainer (they share the generation and `_prepare_inputs` structure).

Three stock methods change, each in one place:
- `_generate_single_turn`: the same plain-`generate` call(s) under capture hooks, so the predictor sees every
  rollout and trains on it; optionally in waves ordered by predicted length, re-bucketed after a probe (rows may
  move between ranks and come back), or dropping finished rows.
- `_prepare_inputs`: inside each optimizer step (its rows still chosen by stock's shuffle), TRL's equal split
  becomes length-sorted micro-batches (equal or not) dealt to ranks by padded cost, all-pad columns trimmed.
- `compute_loss`: a per-row-mean loss is weighted by its micro-batch's share of rows, so the update is stock's.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import gather_object, pad_across_processes
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOTrainer, RLOOTrainer
from trl.models import unwrap_model_for_generation

from ..config import ROW_MEAN_LOSSES, LenBalanceConfig
from ..capture import CaptureResult, StreamState
from ..engine import LenBalanceEngine, Wave
from ..generation import compacted_generate, unsupported_options
from ..metrics import decode_slots, waste
from ..schedule import plan_microbatches, rebucket, waves_by_length


class LenBalanceMixin:
    """Mixed in front of a TRL trainer class by `LenBalanceGRPOTrainer` or `wrap_trainer`."""

    lenbalance: LenBalanceEngine
    lenbalance_config: LenBalanceConfig

    def _lenbalance_setup(self, config: LenBalanceConfig | None) -> None:
        self.lenbalance_config = config = self._resolved(config or LenBalanceConfig())
        config.check_trainer_args(self.args)
        if config.balance_training and getattr(self, "aux_loss_enabled", False):  # TRL's own switch (MoE models)
            raise ValueError(
                f"router_aux_loss_coef={self.router_aux_loss_coef}: TRL adds each micro-batch's MoE router "
                "load-balancing loss, which depends on which rows share the micro-batch, so regrouping rows would "
                "change what is learned. Set router_aux_loss_coef=0.0 in the trainer config, or set "
                "lenbalance.balance_training=False."
            )
        model = self.accelerator.unwrap_model(self.model)
        self.lenbalance = LenBalanceEngine(model, config, self.max_completion_length, seed=self.args.seed)
        self._lenbalance_warned: set[str] = set()
        self._lenbalance_tool_turn = False  # True inside TRL's tool loop (later turns of tools / environments)
        self._left_padding_free = not _absolute_positions(model)  # a row's outputs ignore its left padding
        if not self._left_padding_free and config.balance_training:
            self._warn_once("positions", f"{type(model).__name__} adds absolute position embeddings, so a row's left "
                            "padding changes its outputs: rl-lenbalance keeps stock's prompt padding and every row on "
                            "its rank (micro-batches are still length-sorted and their completions trimmed).")
        self._nonfinite_grad_steps = 0
        self.lenbalance_resume_from: str | None = None  # the checkpoint `train` resumes; the callback restores from it
        self.lenbalance_totals: dict[str, float] = defaultdict(float)  # summed over the run, for the summary table
        self.lenbalance_last_lengths: list[tuple[float, int]] = []  # (predicted at t=0, actual) of the last round
        # a micro-batch's loss is a mean over its rows (RLOO has no loss_type: its loss is a mean over sequences)
        self._row_mean_loss = getattr(self, "loss_type", None) in ROW_MEAN_LOSSES or not hasattr(self, "loss_type")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Stock `train`, remembering which checkpoint it resumes (True: the last one in output_dir)."""
        if resume_from_checkpoint is True:  # none found: stock raises its own error for True
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        self.lenbalance_resume_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _resolved(self, config: LenBalanceConfig) -> LenBalanceConfig:
        """`config` with its `auto` settings decided for this trainer's device and sampling."""
        sampling = getattr(getattr(self, "generation_config", None), "do_sample", True) is not False
        return config.resolved(self.accelerator.device, sampling)

    # --- generation -------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        """Stock: one `generate` over the rank's rows. Here: the same call(s) under capture hooks, in waves, maybe
        re-bucketed after a probe; the completions come back in stock's order (GRPO's `(ids, logprobs)`, RLOO's ids)."""
        stock = self._stock_generation_note(images, multimodal_fields)
        if stock:
            self._warn_once(*stock)
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        start = time.perf_counter()
        config, engine = self.lenbalance_config, self.lenbalance
        compact = config.compaction and not self._loop_blocked("compaction")
        rebucket = config.rebucket and engine.healthy and engine.rounds > 0 and not self._loop_blocked("rebucket")
        offset = self.accelerator.process_index * len(prompt_ids)  # row ids are unique across ranks
        completions: list[list[int]] = [[] for _ in prompt_ids]
        waves: list[Wave] = []
        running: list[dict] = []
        probe = config.probe_tokens + 1 if rebucket else None  # decode steps before regrouping
        for rows in self._plan_waves(prompt_ids):
            prompts = [prompt_ids[i] for i in rows]
            with engine.capture.capture(prompts) as captured:
                if rebucket or compact:
                    ids = self._decode(prompts, captured, compact, max_steps=probe)
                else:
                    ids = super()._generate_single_turn(prompts, None, {}, *args, **kwargs)
                    ids = ids[0] if isinstance(ids, tuple) else ids  # GRPO adds logprobs (None on this path)
            waves.append(Wave([offset + i for i in rows], captured))
            for row, completion in zip(rows, ids, strict=True):
                completions[row] = completion
            if rebucket:
                running += self._running_rows([offset + i for i in rows], prompts, ids, captured)
        lengths = {offset + row: len(c) for row, c in enumerate(completions)}
        self._rebucket_stats = (0, 0)
        if rebucket:
            for row, completion in self._continue_rebucketed(running, compact, len(prompt_ids), waves).items():
                lengths[row] = len(completion)
                if 0 <= row - offset < len(prompt_ids):
                    completions[row - offset] = completion
        self._after_generation(waves, completions, lengths, time.perf_counter() - start)
        return (completions, None) if isinstance(self, GRPOTrainer) else completions

    def _stock_generation_note(self, images, multimodal_fields) -> tuple[str, str] | None:
        """(key, one-time note) when this generation must run as stock TRL, unpredicted; None when it is captured."""
        if self.use_vllm or self.use_transformers_continuous_batching or images is not None or multimodal_fields:
            return "backend", ("rl-lenbalance captures hidden states only on the plain transformers `generate` path "
                               "(text-only); this generation ran as stock TRL, unpredicted.")
        if (self.generation_config.num_beams or 1) > 1:  # the capture streams one row per prompt, not prompts × beams
            return "beams", ("rl-lenbalance does not capture beam search (num_beams > 1); generation runs as stock "
                             "TRL, unpredicted (training-side balancing still applies).")
        if self._lenbalance_tool_turn:  # rows and turn counts differ per rank: no collective may run here
            return "tool_turns", ("rl-lenbalance predicts the first turn only; the turns generated after tool results "
                                  "run as stock TRL, unpredicted (training-side balancing still applies).")
        return None

    def _tool_call_loop(self, *args, **kwargs):
        """Stock (GRPO's tools and environments); marks the turns it generates so that they run as stock."""
        self._lenbalance_tool_turn = True
        try:
            return super()._tool_call_loop(*args, **kwargs)
        finally:
            self._lenbalance_tool_turn = False

    def _decode(self, prompts: list[list[int]], captured: CaptureResult, compact: bool, **kwargs) -> list[list[int]]:
        """Stock's plain-`generate` branch through rl-lenbalance's loop (`compact`: finished rows leave the batch)."""
        with self._generation_model() as model:
            return compacted_generate(model, prompts, self.generation_config, self._tokenizer.pad_token_id,
                                      on_compact=captured.compact, min_finished=1 if compact else len(prompts) + 1,
                                      **kwargs)

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

    def _running_rows(self, ids: list[int], prompts: list[list[int]], completions: list[list[int]],
                      captured: CaptureResult) -> list[dict]:
        """The rows a probe left running, each with what any wave on any rank needs to continue it."""
        running = [j for j, c in enumerate(completions)
                   if c[-1] not in self.eos_token_ids and len(c) < self.max_completion_length]
        if not running:
            return []
        position = {row: p for p, row in enumerate(captured.rows.tolist())}
        state = captured.state.rows([position[j] for j in running])
        remaining = self.lenbalance.predict_remaining(state)
        if not torch.isfinite(remaining).all():
            self._warn_once("rebucket_nan", "rl-lenbalance: the length head predicted non-finite lengths; those rows "
                            "are re-bucketed as if they had the maximum length left.")
            longest = float(self.max_completion_length)
            remaining = remaining.nan_to_num(longest, posinf=longest)
        return [dict(id=ids[j], prompt=prompts[j], prefix=completions[j], state=state.rows([n]),
                     remaining=float(remaining[n])) for n, j in enumerate(running)]

    def _continue_rebucketed(self, running: list[dict], compact: bool, batch_size: int,
                             waves: list[Wave]) -> dict[int, list[int]]:
        """Regroup every rank's running rows into waves by predicted remaining length, dealt to ranks; decode them to
        the end (appending their waves to `waves`); return every continued row's completion, by row id."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        everyone = gather_object(running) if world > 1 else running
        origin = [row["id"] // batch_size for row in everyone]
        size = self.lenbalance_config.generation_wave_size or batch_size
        plan = rebucket([row["remaining"] for row in everyone], origin, world, size, compact,
                        self.lenbalance_config.partition_method)
        done: dict[int, list[int]] = {}
        for wave in plan[rank]:
            group = [everyone[i] for i in wave]
            prompts = [row["prompt"] for row in group]
            resume = StreamState.cat([row["state"] for row in group], self.accelerator.device)
            with self.lenbalance.capture.capture(prompts, resume=resume) as captured:
                ids = self._decode(prompts, captured, compact, prefixes=[row["prefix"] for row in group])
            waves.append(Wave([row["id"] for row in group], captured))
            done.update({row["id"]: completion for row, completion in zip(group, ids, strict=True)})
        reprefill = sum(len(everyone[i]["prompt"]) + len(everyone[i]["prefix"]) for w in plan[rank] for i in w)
        self._rebucket_stats = (sum(origin[i] != rank for w in plan[rank] for i in w), reprefill)  # rows moved in
        if world == 1:
            return done
        return {row: completion for part in gather_object([done]) for row, completion in part.items()}

    def _loop_blocked(self, setting: str) -> bool:
        """True (with a one-time warning) when the generation config asks for something rl-lenbalance's decode loop
        (needed by compaction and re-bucketing) can't do."""
        unsupported = unsupported_options(self.generation_config)
        if unsupported:
            self._warn_once(setting, f"lenbalance.{setting} is on, but the generation config sets {unsupported}, "
                            f"which rl-lenbalance's decode loop does not implement; {setting} is off.")
        return bool(unsupported)

    def _plan_waves(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Rows of each generate call: all at once (stock), or waves longest-predicted first."""
        size = self.lenbalance_config.generation_wave_size
        rows = list(range(len(prompt_ids)))
        if size is None or size >= len(rows):
            return [rows]
        if not self.lenbalance.healthy or self.lenbalance.rounds == 0:
            return [rows[i : i + size] for i in range(0, len(rows), size)]  # stock order, memory-limited waves
        predicted = self._predict_prompt_lengths(prompt_ids)
        return waves_by_length(predicted, size)

    @torch.no_grad()
    def _predict_prompt_lengths(self, prompt_ids: list[list[int]]) -> list[float]:
        """EGTP prompt-only length of each row, from one prefill over the distinct prompts."""
        start = time.perf_counter()
        distinct = list(dict.fromkeys(tuple(p) for p in prompt_ids))
        width = max(len(p) for p in distinct)
        pad = self._tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in distinct], device=self.accelerator.device)
        attention_mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in distinct]).unsqueeze(1)).long()
        with self._generation_model() as model, self.lenbalance.capture.capture([list(p) for p in distinct]) as captured:
            model(input_ids=input_ids, attention_mask=attention_mask.to(input_ids.device), logits_to_keep=1)
        by_prompt = dict(zip(distinct, captured.predicted_total(0).tolist(), strict=True))
        self.lenbalance_totals["predictor/overhead_s"] += time.perf_counter() - start
        return [by_prompt[tuple(p)] for p in prompt_ids]

    def _after_generation(self, waves: list[Wave], completions: list[list[int]], lengths: dict[int, int],
                          generation_s: float) -> None:
        """Ledger of decode slots and steps, honest online error, then online training of the head on every rank's
        rows. `lengths` gives the final length of every row id in `waves` (re-bucketed rows may be other ranks')."""
        engine, device, world = self.lenbalance, self.accelerator.device, self.accelerator.num_processes
        pairs = engine.training_pairs(waves, lengths)
        gathered = {k: self.accelerator.gather(pad_across_processes(v.to(device), dim=0, pad_index=-1)).cpu()
                    for k, v in pairs.items()}
        local_lengths = [len(c) for c in completions]
        all_lengths = self.accelerator.gather(torch.tensor(local_lengths, device=device)).cpu()
        offset = self.accelerator.process_index * len(completions)
        predicted0 = torch.full((len(completions),), float("nan"))
        for wave in waves:
            if 0 in wave.capture.prediction_steps:  # a probe or plain wave: its rows are this rank's own
                predicted0[[row - offset for row in wave.rows]] = wave.capture.predicted_total(0).float().cpu()
        predicted0 = self.accelerator.gather(predicted0.to(device)).cpu()  # the table covers every rank's rows
        self.lenbalance_last_lengths = list(zip(predicted0.tolist(), all_lengths.tolist(), strict=True))
        metrics = engine.learn(gathered, all_lengths)
        hook_s = sum(w.capture.seconds for w in waves)
        moved, reprefill = self._rebucket_stats
        ledger = torch.tensor([[
            sum(w.capture.slots for w in waves), decode_slots(local_lengths, [list(range(len(completions)))]),
            sum(w.capture.forwards for w in waves), max(local_lengths, default=0),
            sum(local_lengths), generation_s, hook_s, reprefill, moved,
        ]], dtype=torch.float64, device=device)
        per_rank = self.accelerator.gather(ledger).cpu()
        slots, stock_slots, _, _, real, gen_s, hook_s, reprefill, moved = per_rank.sum(0).tolist()
        steps, stock_steps = per_rank[:, 2].max().item(), per_rank[:, 3].max().item()
        metrics |= {
            "gen/decode_slots": slots, "gen/decode_slots_stock": stock_slots, "gen/real_tokens": real,
            "gen/slot_waste": waste(slots, real), "gen/slot_waste_stock": waste(stock_slots, real),
            "gen/decode_steps": steps, "gen/decode_steps_stock": stock_steps,
            "gen/rank_imbalance": _max_over_mean(per_rank[:, 0]),
            "gen/rank_imbalance_stock": _max_over_mean(per_rank[:, 1]),
            "gen/reprefill_tokens": reprefill, "gen/rows_moved_across_ranks": moved,
            "gen/seconds": gen_s / world,
            "predictor/overhead_frac": (hook_s + metrics["predictor/train_s"] * world) / gen_s,
        }
        for key in ("gen/decode_slots", "gen/decode_slots_stock", "gen/decode_steps", "gen/decode_steps_stock",
                    "gen/real_tokens", "gen/reprefill_tokens", "gen/seconds"):
            self.lenbalance_totals[key] += metrics[key]
        self.lenbalance_totals["predictor/overhead_s"] += hook_s / world
        self.lenbalance_totals["predictor/overhead_s"] += metrics["predictor/train_s"]
        self._log_lenbalance(metrics)

    # --- training-side balancing ------------------------------------------------------------------------------

    def _prepare_inputs(self, generation_batch):
        """Stock: shuffle rows randomly, split into equal chunks. Here: the same rows per optimizer step (stock's
        shuffle decides them), cut into length-sorted micro-batches dealt to ranks by padded cost (rows move between
        ranks), all-pad columns trimmed."""
        if not self._balancing_training():
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        if self._step % (spg * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            if "pixel_values" in batch:
                raise ValueError("rl-lenbalance does not balance multimodal batches yet; set "
                                 "lenbalance.balance_training=False.")
            shuffle = torch.randperm(len(batch["advantages"]))  # stock's draw: later sampling stays identical
            batch, sizes = self._exchange_rows(batch, shuffle)
            bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            self._buffered_inputs = [_trim_padding(_take_rows(batch, list(range(a, b))), self._left_padding_free)
                                     for a, b in zip(bounds, bounds[1:])]
            self._ledger_training(batch)
        return self._buffered_inputs[self._step % spg]

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Stock; the seconds it spends outside generation are the loss phase's (`time/loss_phase_s` in the totals)."""
        start, generated = time.perf_counter(), self.lenbalance_totals["time/generation_s"]
        loss = super().training_step(model, inputs, num_items_in_batch)
        spent = time.perf_counter() - start - (self.lenbalance_totals["time/generation_s"] - generated)
        self.lenbalance_totals["time/loss_phase_s"] += spent
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Stock, with a per-row-mean loss weighted by its micro-batch's rows over stock's (uneven micro-batches)."""
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._balancing_training() and self._row_mean_loss:
            loss = loss * (len(inputs["advantages"]) / self._stock_rows_per_microbatch)
        return loss

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

    def _exchange_rows(self, batch: dict, shuffle: torch.Tensor) -> tuple[dict, list[int]]:
        """This rank's rows of the plan in micro-batch order (gathered from every rank when balancing ranks), and
        the rows of each micro-batch. Rows train in the optimizer step stock's `shuffle` puts them in."""
        config, spg = self.lenbalance_config, self.args.steps_per_generation
        ga = self.args.gradient_accumulation_steps
        rows, world, rank = len(batch["advantages"]), self.accelerator.num_processes, self.accelerator.process_index
        self._stock_rows_per_microbatch = rows // spg
        window = torch.empty(rows, dtype=torch.long)
        window[shuffle] = torch.arange(rows) // (rows // spg * ga)  # the optimizer step of each row, as in stock
        columns = torch.stack([batch["completion_mask"].sum(1).cpu(), batch["prompt_mask"].sum(1).cpu(), window])
        ranks = world if config.balance_ranks and self._left_padding_free else 1  # a move re-pads a row's prompt
        if ranks > 1:
            columns = self.accelerator.gather(columns.T.to(self.accelerator.device)).T.cpu()
        completion, prompt, window = columns.tolist()
        offset = rank * rows if ranks > 1 else 0
        mine, sizes, anyone_moves = [], [], False
        for w in range(spg // ga):
            rows_w = [i for i in range(len(window)) if window[i] == w]  # rank-major: rank r's block comes r-th
            plan = plan_microbatches([completion[i] for i in rows_w], ranks, ga, config.attention_alpha,
                                     config.partition_method, [prompt[i] for i in rows_w], config.uneven_microbatches)
            plan = [[[rows_w[i] for i in part] for part in parts] for parts in plan]  # the same on every rank
            anyone_moves |= any(row // rows != r for r, parts in enumerate(plan) for part in parts for row in part)
            mine += [row for part in plan[rank if ranks > 1 else 0] for row in part]
            sizes += [len(part) for part in plan[rank if ranks > 1 else 0]]
        self._rows_moved_in = sum(row // rows != rank for row in mine) if ranks > 1 else 0
        if ranks == 1 or not anyone_moves:
            return _take_rows(batch, [row - offset for row in mine]), sizes
        moved, index = {}, torch.tensor(mine)
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                if value.ndim > 1:
                    value = pad_across_processes(value, dim=1, pad_index=_pad_value(self, key),
                                                 pad_first=key.startswith("prompt"))
                value = self.accelerator.gather(value)[index.to(value.device)]
            moved[key] = value
        return moved, sizes

    def _ledger_training(self, batch: dict) -> None:
        """Loss-forward tokens this rank computes (trimmed micro-batches) vs stock's full-width ones; rank balance."""
        computed = sum(b["prompt_ids"].numel() + b["completion_ids"].numel() for b in self._buffered_inputs)
        stock = len(batch["advantages"]) * sum(self._stock_widths)
        real = float(_real_lengths(batch).sum())
        moved = self._rows_moved_in
        per_rank = self.accelerator.gather(torch.tensor([[computed, stock, real, moved]], dtype=torch.float64,
                                                        device=self.accelerator.device)).cpu()
        computed_all, stock_all, real_all, moved_all = per_rank.sum(0).tolist()
        for key, value in (("train/loss_tokens", computed_all), ("train/loss_tokens_stock", stock_all),
                           ("train/real_tokens", real_all)):
            self.lenbalance_totals[key] += value * self.num_iterations
        self._log_lenbalance({
            "train/pad_frac": waste(computed_all, real_all), "train/pad_frac_stock": waste(stock_all, real_all),
            "train/rank_imbalance": _max_over_mean(per_rank[:, 0]),
            "train/rank_imbalance_stock": _max_over_mean(per_rank[:, 1]),
            "train/slowest_rank_vs_stock": (per_rank[:, 0].max() / per_rank[:, 1].max()).item(),
            "train/rows_moved_across_ranks": moved_all,
        })

    def _generate_and_score_completions(self, inputs):
        """Stock, plus the widths stock TRL would pad every micro-batch of this rank to (for the ledger), and its
        seconds (`time/generation_s`: generation, rewards and advantages, as a user's step sees them)."""
        start = time.perf_counter()
        batch = super()._generate_and_score_completions(inputs)
        self.lenbalance_totals["time/generation_s"] += time.perf_counter() - start
        if self.model.training:
            self._stock_widths = (batch["prompt_ids"].size(1), batch["completion_ids"].size(1))
        return batch

    # --- logging ------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Stock, plus the count of logged optimizer steps whose `grad_norm` was not finite (a divergence alarm)."""
        if "grad_norm" in logs:
            self._nonfinite_grad_steps += not math.isfinite(logs["grad_norm"])
            logs["lenbalance/train/nonfinite_grad_steps"] = float(self._nonfinite_grad_steps)
        super().log(logs, start_time)

    def _log_lenbalance(self, metrics: dict[str, float]) -> None:
        """Append to TRL's own metric store (already reduced over ranks): every `report_to` receives them."""
        for name, value in metrics.items():
            self._metrics["train"][f"lenbalance/{name}"].append(float(value))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._lenbalance_warned:
            self._lenbalance_warned.add(key)
            warnings.warn(message)


def _max_over_mean(values: torch.Tensor) -> float:
    return (values.max() / values.mean()).item() if values.mean() > 0 else 1.0


def _real_lengths(batch: dict) -> torch.Tensor:
    return batch["prompt_mask"].sum(1) + batch["completion_mask"].sum(1)


def _pad_value(trainer, key: str) -> int:
    return trainer.processing_class.pad_token_id if key.endswith("_ids") else 0


def _take_rows(batch: dict, rows: list[int]) -> dict:
    index = torch.tensor(rows)
    return {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in batch.items()}


def _absolute_positions(model) -> bool:
    """True when the decoder adds learned absolute position embeddings (GPT-2's `wpe`, OPT's): TRL passes no
    position ids, so a row's left padding shifts its positions and changes its outputs."""
    tokens = model.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not tokens for m in model.get_decoder().modules())


def _trim_padding(batch: dict, prompt: bool = True) -> dict:
    """Drop prompt columns that are padding in every row (left; only with `prompt`) and completion columns likewise
    (right)."""
    prompt_keep = batch["prompt_mask"].any(0).nonzero()
    completion_keep = batch["completion_mask"].any(0).nonzero()
    p0 = (int(prompt_keep[0]) if len(prompt_keep) else batch["prompt_mask"].size(1)) if prompt else 0
    c1 = int(completion_keep[-1]) + 1 if len(completion_keep) else 1  # >= 1: TRL's `[:, -0:]` would keep everything
    width = batch["completion_ids"].size(1)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 1 and key.startswith("prompt"):
            value = value[:, p0:]
        elif isinstance(value, torch.Tensor) and value.ndim > 1 and value.size(1) == width:
            value = value[:, :c1]
        out[key] = value
    return out


class _Wrapped(LenBalanceMixin):
    """The swap-in trainers' constructor: the TRL trainer's own, then rl-lenbalance's setup and callback."""

    def __init__(self, *args, lenbalance_config: LenBalanceConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lenbalance_setup(lenbalance_config)
        from .callback import LenBalanceCallback  # the callback imports this module

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
