"""TRL adapter, generation: the overrides of GRPOTrainer/RLOOTrainer that run each round through
`rollout.run_rollout` (TRL's own `generate`, or rl-lenbalance's decode loop, under the capture hooks) or
`rollout.run_admitted` (continuous batching, vLLM), then the predictor's online update and the generation ledger."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import gather_object, pad_across_processes
from tqdm.auto import tqdm
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation

from ...config import AUTO, LenBalanceConfig
from ...generation.capture import CaptureResult
from ...generation.decode import compacted_generate, replaced_generate, unsupported_options
from ...generation.engine import private_rng
from ...generation.rollout import Backend, RolloutSettings, run_admitted, run_rollout, uncaptured_ledger
from ...ledger import GENERATION_PLANS, GenerationLedger, gather_ledgers, named, round_metrics, seconds_per_decode_step
from ...schedule import Autotuner
from .stock import stock_when_reentered


class GenerationOverrides:
    """The generation half of `LenBalanceMixin`."""

    _lenbalance_tool_turn = False  # True inside TRL's tool loop (later turns of tools / environments)

    def _lenbalance_generation_setup(self, config: LenBalanceConfig) -> None:
        """The generation tuner: stock's `generate` against compaction for `compaction: auto` (greedy decoding only:
        `LenBalanceConfig.resolved` turns it off under sampling), else the one plan pinned. Without rl-lenbalance's
        decode loop (vLLM, continuous batching, or a generation config it cannot run: a one-time warning when
        compaction was asked for) only stock's plan runs."""
        plans = {AUTO: list(GENERATION_PLANS), True: ["compaction"], False: ["stock"]}[config.compaction]
        if not hasattr(self, "generation_config"):  # vLLM: its own generation
            plans = ["stock"]
        elif config.compaction is True and self._lenbalance_loop_blocked("compaction"):  # warns once
            plans = ["stock"]
        elif unsupported_options(self.generation_config):
            plans = ["stock"]
        self._lenbalance_generation_tuner = Autotuner(plans, "stock", samples=config.autotune_samples,
                                                      margin=config.autotune_margin,
                                                      recheck_every=config.autotune_every)

    @stock_when_reentered
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        """Stock: one `generate` over the rank's rows. Here: the rollout (the same call(s) under capture hooks, maybe
        in waves and re-bucketed), then the predictor's online update; completions in stock's order."""
        stock = self._lenbalance_stock_generation_note(images, multimodal_fields)
        if stock:
            self._lenbalance_warn_once(*stock)
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        engine, device, backend = self.lenbalance, self.accelerator.device, self._lenbalance_backend(args, kwargs)
        learn, settings = self._lenbalance_within_overhead_budget(), None
        if self.use_vllm or self.use_transformers_continuous_batching:  # the backend schedules requests itself
            admission = self._lenbalance_admission(len(prompt_ids), learn)
            completions, logprobs, stats = run_admitted(prompt_ids, backend, engine, admission)
        else:
            settings = self._lenbalance_rollout_settings()
            if not (learn or settings.rebucket or settings.wave_size):  # nothing reads a capture
                return self._lenbalance_uncaptured_round(prompt_ids, backend, settings.compact)
            (completions, stats), logprobs = run_rollout(prompt_ids, backend, engine, settings), None
        metrics, self.lenbalance_last_lengths = (engine.learn_round(stats.waves, stats.lengths, stats.own_ids,
                                                                    self._lenbalance_gather_rows)
                                                 if stats.waves else ({}, []))
        ranks = gather_ledgers(stats.ledger(completions), self.accelerator.gather, device)
        self.lenbalance_totals.add_generation(ranks, metrics.get("predictor/train_s", 0.0))
        plan = self._lenbalance_count_generation_plan(settings.compact, ranks) if settings else {}  # not for vLLM & co.
        self._lenbalance_log(metrics | round_metrics(ranks, metrics) | self._lenbalance_budget_metrics() | plan)
        return (completions, logprobs) if isinstance(self, GRPOTrainer) else completions

    def _lenbalance_within_overhead_budget(self) -> bool:
        """Whether the capture's cost so far (hooks, prefills, replays and the head's training, over every rank) is
        within `lenbalance.max_overhead` of the generation time (the first round is always captured, to measure; a
        budget of 1.0 or more captures every round).
        Every rank gets the same answer (the head's training time differs a little between ranks)."""
        totals, budget = self.lenbalance_totals, self.lenbalance_config.max_overhead
        within = (budget >= 1.0 or self.lenbalance.rounds == 0
                  or totals.predictor_overhead_s <= budget * totals.generate_s)
        return bool(self.accelerator.gather(torch.tensor([float(within)], device=self.accelerator.device)).min())

    def _lenbalance_uncaptured_round(self, prompt_ids, backend: Backend, compact: bool):
        """Generation without hooks (the capture is over its budget and nothing reads it this round): stock's own
        call, or the decode loop that drops finished rows (compaction reads no prediction)."""
        start = time.perf_counter()
        completions = backend.decode(prompt_ids, None, compact=compact)
        ledger = uncaptured_ledger(completions, compact, time.perf_counter() - start)
        ranks = gather_ledgers(ledger, self.accelerator.gather, self.accelerator.device)
        self.lenbalance_totals.add_generation(ranks, 0.0)
        self.lenbalance_totals.uncaptured_rounds += 1
        self._lenbalance_log(round_metrics(ranks, {}) | self._lenbalance_budget_metrics()
                             | self._lenbalance_count_generation_plan(compact, ranks))
        return (completions, None) if isinstance(self, GRPOTrainer) else completions  # GRPO: no logprobs here

    def _lenbalance_count_generation_plan(self, compact: bool, ranks: list[GenerationLedger]) -> dict[str, float]:
        """Let the generation tuner count the round (every rank's ledger; the same numbers on every rank, so the
        same choice) and return what to log: the plan it ran (`gen/plan/<name>`, 0/1 per name), whether
        the tuner was still measuring, and once decided its choice and stock's time over the choice's."""
        tuner, plan = self._lenbalance_generation_tuner, GENERATION_PLANS[int(compact)]
        exploring = not tuner.decided
        per_step = seconds_per_decode_step(ranks)
        changed = tuner.record(plan, per_step)
        ratio = tuner.ratio_vs_stock() if len(tuner.candidates) > 1 else None  # a pinned plan compares nothing
        if changed and self.accelerator.is_main_process:
            speed = f" ({ratio:.2f}× stock's speed per decode step)" if ratio is not None else ""
            tqdm.write(f"rl-lenbalance: generation plan: {tuner.choice}{speed}, "
                       f"{tuner.passes - tuner.warmup} rounds measured.")
        out = named("gen/plan", GENERATION_PLANS, plan) | {"gen/exploring": float(exploring),
                                                           "gen/s_per_step": per_step}
        if tuner.decided:
            out |= named("gen/choice", GENERATION_PLANS, tuner.choice)
        if tuner.decided and ratio is not None:
            out["gen/ratio_vs_stock"] = ratio
        return out

    def _lenbalance_budget_metrics(self) -> dict[str, float]:
        totals = self.lenbalance_totals
        share = totals.predictor_overhead_s / totals.generate_s if totals.generate_s else 0.0
        return {"predictor/captured_rounds": float(self.lenbalance.rounds), "predictor/overhead_frac_run": share,
                "predictor/uncaptured_rounds": float(totals.uncaptured_rounds)}

    def _lenbalance_rollout_settings(self) -> RolloutSettings:
        """This round's rollout as the config asks, less what the generation config or the head's health rule out."""
        config, engine = self.lenbalance_config, self.lenbalance
        return RolloutSettings(
            eos_token_ids=self.eos_token_ids, max_completion_length=self.max_completion_length,
            compact=(self._lenbalance_generation_tuner.next() == "compaction"
                     and not self._lenbalance_loop_blocked("compaction")),
            rebucket=(config.rebucket and engine.healthy and engine.rounds > 0
                      and not self._lenbalance_loop_blocked("rebucket")),
            wave_size=config.generation_wave_size, probe_tokens=config.probe_tokens,
            partition_method=config.partition_method,
        )

    def _lenbalance_admission(self, rows: int, learn: bool = True) -> RolloutSettings:
        """Admission for continuous batching and vLLM. vLLM's server generates a whole group from one request (its
        rows must stay together, and it serves every rank at once: nothing to balance); a tensor-parallel vLLM
        group generates its ranks' rows together, so only rows can be reordered there."""
        config, engine = self.lenbalance_config, self.lenbalance
        server = self.use_vllm and self.vllm_mode == "server"
        group = self.num_generations if server or rows % self.num_generations == 0 else 1
        sampled = not self._lenbalance_order_free()
        if sampled:
            self._lenbalance_warn_once(
                "sampled_admission", "rl-lenbalance keeps stock's request order and ranks under sampling: the engine "
                "draws all requests from one random stream, so reordering them would change the completions. The "
                "head still learns, and the loss phase is balanced.")
        return RolloutSettings(
            eos_token_ids=self.eos_token_ids, max_completion_length=self.max_completion_length,
            partition_method=config.partition_method, group_size=group,
            admit_by_prediction=not sampled and engine.healthy and engine.rounds > 0 and rows % group == 0,
            balance_ranks=(config.balance_ranks and not server and not sampled
                           and getattr(self, "vllm_tensor_parallel_size", 1) == 1),
            learn=learn,
        )

    def _lenbalance_order_free(self) -> bool:
        """Whether the engine draws each request's completion whatever the order and rank it is submitted in: greedy
        decoding, or vLLM requests seeded one by one. A sampling engine draws all requests from one random stream per
        rank (vLLM, continuous batching), so another order or rank would draw other completions than stock's."""
        if self.use_vllm:  # TRL's `VLLMGeneration`: its sampling settings, then the generation kwargs over them
            vllm = getattr(self, "vllm_generation", None)
            kwargs = getattr(vllm, "generation_kwargs", None) or {}
            temperature = kwargs.get("temperature", getattr(vllm, "temperature", self.temperature))
            return temperature == 0 or kwargs.get("seed") is not None
        return getattr(self.generation_config, "do_sample", True) is False

    def _lenbalance_backend(self, stock_args: tuple, stock_kwargs: dict) -> Backend:
        """TRL's generation, bound once: stock's own call when nothing needs rl-lenbalance's decode loop."""

        def decode(prompts: list[list[int]], captured: CaptureResult | None, *, compact: bool,
                   prefixes: list[list[int]] | None = None, max_steps: int | None = None) -> list[list[int]]:
            if not compact and prefixes is None and max_steps is None:
                ids = super(GenerationOverrides, self)._generate_single_turn(prompts, None, {}, *stock_args,
                                                                             **stock_kwargs)
                return ids[0] if isinstance(ids, tuple) else ids  # GRPO adds logprobs (None on this path)
            with self._lenbalance_generation_model() as model:
                return compacted_generate(model, prompts, self.generation_config, self._tokenizer.pad_token_id,
                                          on_compact=captured.compact if captured else None,
                                          min_finished=1 if compact else len(prompts) + 1,
                                          prefixes=prefixes, max_steps=max_steps)

        def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
            with self._lenbalance_generation_model() as model, private_rng(self.args.seed + self.state.global_step):
                model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)

        def submit(prompts: list[list[int]]) -> tuple[list[list[int]], list | None]:
            out = super(GenerationOverrides, self)._generate_single_turn(prompts, None, {}, *stock_args, **stock_kwargs)
            return out if isinstance(out, tuple) else (out, None)  # GRPO: (ids, logprobs); RLOO: ids

        return Backend(decode, forward, gather_object, self.accelerator.process_index, self.accelerator.num_processes,
                       submit)

    @contextmanager
    def _lenbalance_generation_model(self) -> Iterator[torch.nn.Module]:
        """The unwrapped policy exactly as stock's plain-`generate` branch prepares it (gathered ZeRO-3 weights,
        gradient checkpointing off and then back on with the trainer's own kwargs, no grad)."""
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=getattr(self, "generation_kwargs", None),  # vLLM runs: none
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            yield model

    def _lenbalance_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in rank order (ranks with fewer rows are padded with -1), on the CPU."""
        return self.accelerator.gather(pad_across_processes(rows.to(self.accelerator.device), dim=0,
                                                            pad_index=-1)).cpu()

    def _lenbalance_stock_generation_note(self, images, multimodal_fields) -> tuple[str, str] | None:
        """(key, one-time note) when this generation must run as stock TRL, unpredicted; None when it is captured."""
        if images is not None or multimodal_fields:
            return "multimodal", ("rl-lenbalance predicts text-only generation; this generation (with images) ran "
                                  "as stock TRL, unpredicted (training-side balancing still applies).")
        beams = getattr(getattr(self, "generation_config", None), "num_beams", None)  # vLLM: no generation config
        if (beams or 1) > 1:  # the capture streams one row per prompt, not prompts × beams
            return "beams", ("rl-lenbalance does not capture beam search (num_beams > 1); generation runs as stock "
                             "TRL, unpredicted (training-side balancing still applies).")
        if self._lenbalance_tool_turn:  # rows and turn counts differ per rank: no collective may run here
            return "tool_turns", ("rl-lenbalance predicts the first turn only; the turns generated after tool results "
                                  "run as stock TRL, unpredicted (training-side balancing still applies).")
        return None

    @stock_when_reentered
    def _tool_call_loop(self, *args, **kwargs):
        """Stock (GRPO's tools and environments); marks the turns it generates so that they run as stock."""
        self._lenbalance_tool_turn = True
        try:
            return super()._tool_call_loop(*args, **kwargs)
        finally:
            self._lenbalance_tool_turn = False

    def _lenbalance_loop_blocked(self, setting: str) -> bool:
        """True (with a one-time warning) when rl-lenbalance's decode loop (needed by compaction and re-bucketing)
        cannot stand in for the model's `generate`: the generation config asks for something it does not implement,
        or `generate` itself is replaced (checked every round: a script may patch it after the trainer is built)."""
        unsupported = unsupported_options(self.generation_config)
        why = (f"the generation config sets {unsupported}, which rl-lenbalance's decode loop does not implement"
               if unsupported else replaced_generate(self.accelerator.unwrap_model(self.model)))
        if why:
            self._lenbalance_warn_once(
                setting, f"lenbalance.{setting} needs rl-lenbalance's decode loop, but {why}; {setting} "
                "is off (stock's generate runs).")
        return why is not None

    @stock_when_reentered
    def _generate_and_score_completions(self, inputs):
        """Stock, timed: generation, rewards and advantages, as a user's step sees them (in the run totals)."""
        start = time.perf_counter()
        batch = super()._generate_and_score_completions(inputs)
        self.lenbalance_totals.generation_phase_s += time.perf_counter() - start
        return batch

