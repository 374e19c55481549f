"""A generate loop that drops finished rows from the batch ("compaction").

`model.generate` keeps computing every row until the longest one ends; on CPU a decode step costs roughly in
proportion to the number of rows, so the rows that already emitted eos waste a large share of the rollout time.
`compacted_generate` decodes the same way `generate` does (same position ids, same logits processors in the same
order, the same random draws) but removes finished rows from the KV cache and the batch as it goes. It honours
only the options in `SUPPORTED`; `unsupported_options` tells the caller when to fall back to `generate`.

Sampling stays stock's token for token: torch samples one token per row as argmax(p / q) with q ~ Exp(1) drawn over
the whole (rows, vocab) tensor, so `sample_rows` draws q for every row of the call, finished ones included, and
reads the rows still in the batch. `exact_sampling` checks that the installed torch still samples that way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache

import torch
import transformers
from packaging.version import Version
from transformers import (
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    MinPLogitsWarper,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# the forward's keyword for the KV cache: `cache` from transformers 5.24, `past_key_values` before (deprecated since)
CACHE_KEYWORD = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"
SUPPORTED = frozenset(
    {
        "max_new_tokens",
        "max_length",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
    }
)
# Options that never change which tokens come out here: output formats, bookkeeping, compilation (a DynamicCache
# is never compiled) and beam-search-only settings (num_beams > 1 itself is flagged).
_INERT = frozenset(
    {
        "_from_model_config",
        "transformers_version",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "disable_compile",
        "compile_config",
        "early_stopping",
        "length_penalty",
    }
)
# Values, besides None and transformers' global defaults, with which an option leaves generation unchanged.
_NO_OP_VALUES = {
    "cache_implementation": ("dynamic",),
    "min_new_tokens": (0,),
    "renormalize_logits": (False,),
    "token_healing": (False,),
}


def unsupported_options(generation_config: GenerationConfig) -> list[str]:
    """Names of options set in generation_config that compacted_generate does not implement (empty = safe to use)."""
    defaults = GenerationConfig._get_default_generation_params()  # what `generate` fills unset options with
    return [
        name
        for name, value in generation_config.to_dict().items()
        if name not in SUPPORTED
        and name not in _INERT
        and value is not None
        and value != defaults.get(name)
        and value not in _NO_OP_VALUES.get(name, ())
    ]


def replaced_generate(model: torch.nn.Module) -> str | None:
    """What replaces transformers' own `generate` on `model` (None when nothing does): a `generate` set on the
    instance (a patch, a wrapper) or a class's own override runs code that `compacted_generate` would skip."""
    if "generate" in vars(model):
        return f"{type(model).__name__}.generate is replaced on the model instance"
    if getattr(type(model), "generate", None) is not GenerationMixin.generate:
        return f"{type(model).__name__} defines its own generate"
    return None


def left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of unpadded prompts padded on the left, numbered as `generate`
    numbers them (each row's first real token is position 0)."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask, position_ids


def prompt_then_completion(prompts: list[list[int]], completions: list[list[int]], width: int, pad_token_id: int,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for teacher forcing: each prompt padded on the left (as `left_pad`),
    then its completion padded on the right to `width`, numbered on from the prompt's last position."""
    input_ids, mask, positions = left_pad(prompts, pad_token_id, device)
    generated = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    generated_mask = torch.zeros_like(generated)
    for row, completion in enumerate(completions):
        generated[row, : len(completion)] = torch.tensor(completion, device=device)
        generated_mask[row, : len(completion)] = 1
    return (torch.cat([input_ids, generated], 1), torch.cat([mask, generated_mask], 1),
            torch.cat([positions, positions[:, -1:] + generated_mask.cumsum(1)], 1))


@cache
def _generate_skips_left_pads() -> bool:
    """Whether this transformers' `generate` leaves each row's left padding out of the repetition penalty."""
    return "prompt_ignore_length" in inspect.getsource(GenerationMixin._get_logits_processor)


def _logits_processor(config: GenerationConfig, attention_mask: torch.Tensor) -> LogitsProcessorList:
    """The processors `generate` builds for the SUPPORTED options, in its order (`_get_logits_processor`)."""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        if _generate_skips_left_pads():
            pad_lengths = (attention_mask != 0).int().argmax(dim=1)  # the left pads are not penalised
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty,
                                                               prompt_ignore_length=pad_lengths))
        else:  # older transformers: every token of the row, its left pads too
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p))
    return processors


def sample_rows(probs: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`torch.multinomial(full, 1).squeeze(1)[rows]`, where `full` is a (batch_size, vocab) tensor whose rows `rows`
    are `probs`: the noise torch's sampler draws for the whole batch (the other rows' values never matter), so
    the random stream advances exactly as for the full batch and each row's token is the one it would draw there."""
    noise = torch.empty((batch_size, probs.size(-1)), dtype=probs.dtype, device=probs.device).exponential_(1)
    return (probs / noise[rows]).argmax(-1)


@cache
def exact_sampling(device_type: str = "cpu") -> bool:
    """Whether `sample_rows` draws what `torch.multinomial` draws on this device type (checked once, on a private
    generator): the condition for compaction to keep stock's completions under sampling. Checked on CPU and CUDA
    only; elsewhere it answers False (compaction stays off under sampling)."""
    if device_type not in ("cpu", "cuda"):
        return False
    device = torch.device(device_type)
    probs = torch.softmax(torch.randn(6, 97, generator=torch.Generator().manual_seed(0)), -1).to(device)
    stock = torch.multinomial(probs, 1, generator=torch.Generator(device).manual_seed(1)).squeeze(1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1)
        ours = sample_rows(probs[[1, 4]], torch.tensor([1, 4], device=device), 6)
    return torch.equal(stock[[1, 4]], ours)


@torch.no_grad()
def compacted_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    generation_config: GenerationConfig,
    pad_token_id: int,
    on_compact: Callable[[torch.Tensor], None] | None = None,
    min_finished: int = 1,
    prefixes: list[list[int]] | None = None,
    max_steps: int | None = None,
) -> list[list[int]]:
    """Sample or greedily decode a completion for each prompt (unpadded token ids), dropping finished rows.

    Returns each row's generated ids up to and including its first eos, in prompt order. Once at least
    `min_finished` rows have finished since the last compaction, they leave the KV cache and the batch, and
    `on_compact(keep)` is called before the next forward with the indices, into the rows active until then, of the
    rows that stay, so that hooks holding per-row state can select theirs.

    Early re-bucketing decodes in two calls: a probe with `max_steps` (rows still running come back without eos,
    shorter than max_new_tokens), then a continuation with `prefixes`, the tokens each row already generated (all of
    one length): they are prefilled after the prompt, count against max_new_tokens and lead the returned completion.
    """
    # Unset options resolve exactly as in `generate`: the model's generation config, then transformers' defaults.
    config, _ = model._prepare_generation_config(generation_config)
    if unsupported := unsupported_options(config):
        raise ValueError(f"compacted_generate does not implement {unsupported}; use model.generate")
    if not prompts:
        return []
    prefixes = prefixes or [[] for _ in prompts]
    done_already = {len(prefix) for prefix in prefixes}
    if len(done_already) != 1:
        raise ValueError(f"prefixes must all have one length, got lengths {sorted(done_already)}")
    done_already = done_already.pop()
    max_new_tokens = config.max_new_tokens if config.max_new_tokens is not None else (
        config.max_length - max(len(prompt) for prompt in prompts))
    max_new_tokens -= done_already
    if max_new_tokens < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new_tokens} after {done_already} prefix tokens")
    steps = max_new_tokens if max_steps is None else min(max_steps, max_new_tokens)
    prompts = [prompt + prefix for prompt, prefix in zip(prompts, prefixes, strict=True)]
    width = max(len(prompt) for prompt in prompts)

    device = model.device
    sequences, attention_mask, position_ids = left_pad(prompts, pad_token_id, device)
    eos = config.eos_token_id if config.eos_token_id is not None else []
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else eos, dtype=torch.long, device=device)

    processors = _logits_processor(config, attention_mask)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    batch_size = len(prompts)
    rows = torch.arange(batch_size, device=device)  # the original index of each active row
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # finished since the last compaction
    completions: list[list[int]] = [list(prefix) for prefix in prefixes]
    input_ids = sequences
    for step in range(steps):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KEYWORD: cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits
        scores = processors(sequences, logits[:, -1].float())
        if config.do_sample:
            next_tokens = sample_rows(torch.softmax(scores, dim=-1), rows, batch_size)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        next_tokens = next_tokens.masked_fill(finished, pad_token_id)  # as `generate` pads finished rows
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)

        done = ~finished & (torch.isin(next_tokens, eos_ids) | (step + 1 == max_new_tokens))
        if step + 1 == steps:  # the probe ends: rows still running come back unfinished
            done = ~finished
        for row in done.nonzero().squeeze(1).tolist():
            completions[int(rows[row])] += sequences[row, width:].tolist()
        finished |= done
        if finished.all():
            break
        if int(finished.sum()) >= min_finished:
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            sequences, attention_mask, position_ids = sequences[keep], attention_mask[keep], position_ids[keep]
            rows, finished = rows[keep], finished[keep]
            processors = _logits_processor(config, attention_mask)
            if on_compact is not None:
                on_compact(keep)
        input_ids = sequences[:, -1:]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return completions
