"""Stream hidden states and next-token entropies out of `model.generate` with forward hooks, and run PLP.

Per decoded token the hooks compute its entropy and keep a reference to its hidden state; the pending tokens are
folded into a `StreamingPool` only at the steps that read the pool (predictions, the recorded training pairs,
compaction, the end of the call), so a decode step adds a handful of kernels and no host synchronisation.
Memory stays O(1) per sequence in the generated length (at most `record_every` pending tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..config import LenBalanceConfig
from ..predictor import StreamingPool, plp_features, pool_tokens, token_entropy
from .decode import prompt_then_completion
from .timing import DeviceTimer

ENTROPY_CHUNK_ROWS = 8  # prompt rows per lm_head pass at prefill (bounds the (rows, P, V) logits in memory)


def resolve_module(model: nn.Module, config: LenBalanceConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(module whose output is the final normalised hidden state, feature module, lm_head) of a causal LM, or a clear
    error naming the setting to fix. The decoder's output is lm_head's input in every causal LM (Llama, GPT-2,
    NemotronH, ...): no final-norm discovery. Its full width is needed at prefill, where lm_head sees one position."""
    try:
        norm = model.get_submodule(config.hook_module) if config.hook_module else model.get_decoder()
    except AttributeError as err:
        raise ValueError(
            f"rl-lenbalance could not find lenbalance.hook_module={config.hook_module!r} in {type(model).__name__} "
            f"({err}). Set it to the dotted path of the module that produces the last hidden states (for Llama/Qwen: "
            "'model'), or leave it unset."
        ) from err
    feature = norm
    if config.feature_layer >= 0:
        layers = _decoder_layers(model)
        if layers is None:
            raise ValueError(
                f"lenbalance.feature_layer={config.feature_layer}: rl-lenbalance could not find the decoder layers of "
                f"{type(model).__name__}; set lenbalance.feature_layer=-1 (the final hidden state) or "
                "lenbalance.hook_module to the dotted path of the layer to read."
            )
        if config.feature_layer >= len(layers):
            raise ValueError(
                f"lenbalance.feature_layer={config.feature_layer} but the model has {len(layers)} decoder layers."
            )
        feature = layers[config.feature_layer]
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); rl-lenbalance needs a causal LM.")
    return norm, feature, lm_head


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's blocks (`layers`, GPT-2's `h`, ...): its first ModuleList with one module per hidden layer."""
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    return next((m for m in model.get_decoder().modules() if isinstance(m, nn.ModuleList) and len(m) == count), None)


@contextmanager
def outputs_of(modules: Mapping[str, nn.Module], into: dict | None = None) -> Iterator[dict]:
    """Each module's latest output (a decoder's: its last hidden state) by name, in `into` (or a new dict), while
    inside the block; the hooks are removed on the way out."""
    seen: dict = {} if into is None else into

    def keeper(name: str):
        def hook(_module, _inputs, output):
            seen[name] = output[0] if isinstance(output, (tuple, ModelOutput)) else output

        return hook

    handles = [module.register_forward_hook(keeper(name)) for name, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def record_steps(max_length: int, every: int) -> list[int]:
    """Decode steps whose PLP features become training pairs: 0, 8, then every `every` steps."""
    return sorted({0, 8, *range(every, max_length, every)} & set(range(max_length)))


def prompt_key(prompt: list[int]) -> int:
    """A key of a prompt's tokens, equal in every process (a tuple of ints hashes without randomisation)."""
    return hash(tuple(prompt))


@dataclass
class StreamState:
    """A row's predictor state between generate calls: pooled prompt, pool of its generated tokens, tokens seen.
    Early re-bucketing moves it with the row (to another wave or rank) and resumes from it."""

    prompt: torch.Tensor  # (B, H)
    pool: StreamingPool
    steps: int
    keys: list[int] = field(default_factory=list)  # per row: its prompt's key (`prompt_key`)

    def rows(self, index: list[int]) -> StreamState:
        """These rows only, on the CPU (ready to travel); copies just them."""
        rows = torch.tensor(index, dtype=torch.long)
        return StreamState(self.prompt[rows.to(self.prompt.device)].cpu(), self.pool.take(rows), self.steps,
                           [self.keys[i] for i in index])

    @classmethod
    def cat(cls, states: list[StreamState], device: torch.device | str) -> StreamState:
        """The rows of `states`, in order, on `device`: one wave's state, to resume it."""
        if len({state.steps for state in states}) != 1:
            raise ValueError("rows resumed together must have seen the same number of tokens")
        prompt = torch.cat([state.prompt.to(device) for state in states])
        return cls(prompt, StreamingPool.cat([state.pool for state in states], device), states[0].steps,
                   [key for state in states for key in state.keys])


class Stream:
    """The streams of one generate call between its hooks: each row's pooled prompt, the pool of its generated
    tokens, the original rows still in the batch, and the tokens decoded since the last `fold()`."""

    def __init__(self, prompt: torch.Tensor, pool: StreamingPool, rows: torch.Tensor) -> None:
        self.prompt, self.pool, self.rows = prompt, pool, rows
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def push(self, hidden: torch.Tensor, entropy: torch.Tensor) -> None:
        """Queue one decoded token per row: `hidden` (B, H), `entropy` (B,)."""
        self.pending.append((hidden, entropy))

    def fold(self) -> None:
        """Fold the queued tokens into the pool (one batched update)."""
        if self.pending:
            hidden, entropy = zip(*self.pending)
            self.pool.extend(torch.stack(hidden, 1), torch.stack(entropy, 1))
            self.pending.clear()

    def follow(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (original row indices, a subset of `self.rows` in order): a compacting generate loop
        dropped the others since the last forward."""
        if len(rows) != len(self.rows):
            self.fold()  # queued tokens still hold the dropped rows
            kept = torch.searchsorted(self.rows.to(rows.device), rows)
            self.pool.select(kept)
            self.prompt, self.rows = self.prompt[kept], rows


@dataclass
class CaptureResult:
    """What one generate call left behind (rows in the order given to generate)."""

    prompt_features: torch.Tensor | None = None  # (B, H)
    prediction_steps: list[int] = field(default_factory=list)
    predictions: list[torch.Tensor] = field(default_factory=list)  # per step: (B,) predicted remaining length
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (B, F) float16 PLP features
    steps: int = 0
    timer: DeviceTimer | None = None  # time spent inside the hooks (CUDA events on a GPU)
    rows: torch.Tensor | None = None  # original rows still in the batch (a compacting generate drops finished ones)
    slots: int = 0  # decode slots: rows in the batch, summed over the forwards that each yield one token per row
    forwards: int = 0  # decode steps: forwards of the model (the prefill yields the first token)
    state: StreamState | None = None  # after the call: the state of the rows in `rows`
    prompt_keys: list[int] = field(default_factory=list)  # per row: a key of its prompt's tokens (`prompt_key`)
    probe: tuple[int, torch.Tensor] | None = None  # re-bucketing: (step, (B,) the head's remaining length predicted
    # there, NaN for the rows the probe saw end); the scheduler acts on it or on `LenBalanceEngine.read`'s estimate

    @property
    def seconds(self) -> float:
        """Seconds the hooks added to this call (read once generation is over: on a GPU it waits for it)."""
        return self.timer.seconds if self.timer is not None else 0.0

    def compact(self, keep: torch.Tensor) -> None:
        """Follow a generate loop that kept only rows `keep` (indices into the rows active until now)."""
        self.rows = self.rows[keep.to(self.rows.device)]

    def predicted_total(self, step: int) -> torch.Tensor:
        """Predicted total length (observed + remaining) from the prediction made at `step`."""
        i = self.prediction_steps.index(step)
        return self.predictions[i] + step


class GenerationCapture:
    """Forward hooks on the final norm (and feature layer) and lm_head of a causal LM."""

    def __init__(self, model: nn.Module, predict: Callable[[torch.Tensor], torch.Tensor], config: LenBalanceConfig,
                 max_length: int, inputs: Callable[[torch.Tensor, list[int], int], torch.Tensor] | None = None
                 ) -> None:
        self.norm, self.feature_module, self.lm_head = resolve_module(model, config)
        self.predict, self.config, self.max_length = predict, config, max_length  # predict: head input -> remaining
        self.inputs = inputs or _plp_only  # (PLP features, prompt keys, step) -> the head's input
        self.record_at = set(record_steps(max_length, config.record_every))
        self.device = next(model.parameters()).device

    @contextmanager
    def capture(self, prompts: list[list[int]], resume: StreamState | None = None) -> Iterator[CaptureResult]:
        """Hooks live only inside this block, around exactly one `generate` call over these (unpadded) prompts.

        With `resume`, the call continues rows that already generated `resume.steps + 1` tokens (fed after the
        prompt): the prefill's last position is their next token, so the streams go on from `resume`.
        """
        result = CaptureResult(timer=DeviceTimer(self.device), prompt_keys=[prompt_key(p) for p in prompts])
        seen: dict[str, torch.Tensor] = {}
        stream: Stream | None = None
        if resume is not None:
            stream = Stream(resume.prompt, resume.pool, torch.arange(len(prompts), device=resume.prompt.device))
            result.prompt_features, result.rows, result.steps = resume.prompt, stream.rows, resume.steps

        def on_logits(_module, _inputs, logits):
            nonlocal stream
            result.timer.start()
            with torch.no_grad():
                result.slots += logits.size(0)
                result.forwards += 1
                if stream is None:
                    stream = self._prefill(seen, prompts, result)
                else:
                    stream.follow(result.rows)
                    stream.push(seen["feature"][:, -1], token_entropy(logits[:, -1]))
                    result.steps += 1
                    if self._wanted(result.steps):
                        stream.fold()
                        self._predict_and_record(stream.pool, stream.prompt, result)
            result.timer.stop()

        handle = self.lm_head.register_forward_hook(on_logits)
        try:
            with outputs_of({"norm": self.norm, "feature": self.feature_module}, into=seen):
                yield result
        finally:
            handle.remove()
        if stream is not None:
            stream.follow(result.rows)
            stream.fold()
            keys = [result.prompt_keys[r] for r in result.rows.tolist()]
            result.state = StreamState(stream.prompt, stream.pool, result.steps, keys)

    @torch.no_grad()
    def replay(self, prompts: list[list[int]], completions: list[list[int]],
               forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> CaptureResult:
        """The features the hooks would have recorded, and the step-0 predictions, had the policy generated
        `completions` itself: one teacher-forced `forward(input_ids, attention_mask, position_ids)` per chunk of
        rows over the left-padded prompt followed by the right-padded completion. Generated token j is the input
        at position P + j - 1 of every row, as in the decode step that streamed it. For backends whose own passes
        cannot be hooked (continuous batching, vLLM)."""
        width = max((len(c) for c in completions), default=0)
        recorded: dict[int, list[torch.Tensor]] = {step: [] for step in sorted(self.record_at) if step < width}
        predicted: list[torch.Tensor] = []
        for start in range(0, len(prompts), ENTROPY_CHUNK_ROWS):
            rows = range(start, min(start + ENTROPY_CHUNK_ROWS, len(prompts)))
            input_ids, full_mask, full_positions = prompt_then_completion(
                [prompts[r] for r in rows], [completions[r] for r in rows], width, 0, self.device)
            width_p = input_ids.size(1) - width
            mask = full_mask[:, :width_p]
            with outputs_of({"norm": self.norm, "feature": self.feature_module}) as seen:
                forward(input_ids, full_mask, full_positions)
            hidden, feature = seen["norm"], seen["feature"]
            entropy = self.entropy(hidden)
            prompt = pool_tokens(feature[:, :width_p], entropy[:, :width_p], mask.bool(), self.config.pooling)
            pool, seen_steps = StreamingPool(len(rows), feature.size(-1), device=feature.device), 0
            for step in recorded:
                if step > seen_steps:
                    pool.extend(feature[:, width_p + seen_steps : width_p + step],
                                entropy[:, width_p + seen_steps : width_p + step])
                    seen_steps = step
                z = plp_features(prompt, pool if step else None, step, self.max_length)
                recorded[step].append(z.to(torch.float16))
                if step == 0:
                    predicted.append(self.predict(self.inputs(z, [prompt_key(prompts[r]) for r in rows], 0)))
        result = CaptureResult(recorded={step: torch.cat(z) for step, z in recorded.items()},
                               prompt_keys=[prompt_key(p) for p in prompts])
        if predicted:
            result.prediction_steps, result.predictions = [0], [torch.cat(predicted)]
        return result

    def _prefill(self, seen: Mapping[str, torch.Tensor], prompts: list[list[int]], result: CaptureResult) -> Stream:
        """Pool each distinct prompt once (a GRPO group repeats its prompt G times) and start the streams."""
        hidden, feature = seen.get("norm"), seen.get("feature")
        if feature is None or feature.size(1) < max(map(len, prompts)):
            raise RuntimeError("rl-lenbalance: the prefill's hidden states were not captured (hook_module wrong?).")
        first_row = {tuple(p): row for row, p in reversed(list(enumerate(prompts)))}
        distinct = torch.tensor(list(first_row.values()), device=feature.device)
        position = {key: k for k, key in enumerate(first_row)}
        expand = torch.tensor([position[tuple(p)] for p in prompts], device=feature.device)
        width = feature.size(1)
        lengths = torch.tensor([len(prompts[r]) for r in first_row.values()], device=feature.device)
        mask = torch.arange(width, device=feature.device).unsqueeze(0) >= (width - lengths).unsqueeze(1)
        prompt = pool_tokens(feature[distinct], self.entropy(hidden[distinct]), mask, self.config.pooling)[expand]
        result.prompt_features = prompt
        result.rows = torch.arange(len(prompts), device=feature.device)
        stream = Stream(prompt, StreamingPool(len(prompts), feature.size(-1), device=feature.device), result.rows)
        self._predict_and_record(None, prompt, result)
        return stream

    def entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token entropy (B, T) at every position of final hidden states (B, T, H), through lm_head in chunks
        of `ENTROPY_CHUNK_ROWS` rows (bounds the (rows, T, V) logits in memory)."""
        return torch.cat([token_entropy(F.linear(hidden[i : i + ENTROPY_CHUNK_ROWS], self.lm_head.weight,
                                                 self.lm_head.bias))
                          for i in range(0, len(hidden), ENTROPY_CHUNK_ROWS)])

    def _predicts(self, step: int) -> bool:
        """The head runs at step 0 (what the scheduler reads) and every `predict_every` steps when that is set."""
        return step == 0 or (self.config.predict_every > 0 and step % self.config.predict_every == 0)

    def _wanted(self, step: int) -> bool:
        return self._predicts(step) or step in self.record_at

    def _predict_and_record(self, pool: StreamingPool | None, prompt: torch.Tensor, result: CaptureResult) -> None:
        step = result.steps
        want_prediction = self._predicts(step)
        if not want_prediction and step not in self.record_at:
            return
        z = plp_features(prompt, pool, step, self.max_length)
        batch = len(result.prompt_features)
        if want_prediction:  # rows a compacting loop already dropped (finished) are NaN
            predicted = z.new_full((batch,), float("nan"))
            keys = [result.prompt_keys[r] for r in result.rows.tolist()]  # reads the rows back from the device
            predicted[result.rows] = self.predict(self.inputs(z, keys, step))
            result.prediction_steps.append(step)
            result.predictions.append(predicted)
        if step in self.record_at:
            recorded = z.new_zeros(batch, z.size(1), dtype=torch.float16)
            recorded[result.rows] = z.to(torch.float16)
            result.recorded[step] = recorded


def _plp_only(features: torch.Tensor, _keys: list[int], _step: int) -> torch.Tensor:
    """A head input of the PLP features alone (a head without context)."""
    return features
