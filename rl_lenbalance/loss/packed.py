"""Padding-free ("packed") per-token log-probs and entropies: a drop-in for TRL 1.16's
`GRPOTrainer/RLOOTrainer._get_per_token_logps_and_entropies` (torch and transformers only, no TRL import).

TRL lays a micro-batch out as `prompt (left-padded) + completion (right-padded)`, the last `logits_to_keep` columns
being the completion, and runs the model over the whole padded rectangle. Here every row's real tokens (the run where
`attention_mask == 1`) are concatenated into ONE row `(1, N)`, with `attention_mask=None`, `use_cache=False` and
`position_ids` = each token's column in the padded input, i.e. exactly the position stock's forward gives it (TRL
passes no position ids, so the model counts columns from 0, padding included). Every row's positions therefore jump
back (never by +1) where the next row starts, and transformers' `masking_utils.find_packed_sequence_indices` reads
those jumps as sequence starts and builds a block-diagonal causal mask. Keeping stock's positions, rather than
restarting at 0, is what makes the result stock's to the last bit: RoPE tables are computed in float32 even for a
float64 model, so restarted positions already move float64 log-probs by ~3e-8, and models with learned absolute
positions (GPT-2's `wpe`) would be plainly wrong (0.86 on the logits); with stock's positions both are exact.

Logits are computed only at the positions that predict a real completion token (`logits_to_keep` given as a 1-D index
tensor to the model's own forward, so DDP/DeepSpeed wrappers and TRL's patched forward keep working), then
log-softmax and entropy run over `token_chunk` rows at a time in a custom autograd function that recomputes each chunk
in backward. With `fused_lm_head=True` the model's TRL fused LM head scores the pack instead (no logits at all, TRL's
own float32-statistics kernel, so numerically stock's).

Measured on CPU (torch 2.13, transformers 5.24, TRL 1.16, tiny random models, tests/test_packing.py): max |packed -
stock| on the logits at real positions (stock = the padded batch with its attention mask), and on the log-probs:

| family      | sdpa, float64 logits | eager, float32 logits | flex_attention, float32 | packs? |
|-------------|----------------------|-----------------------|-------------------------|--------|
| Llama       | 0.0                  | 0.0                   | 1.8e-7 (forward only)   | yes    |
| Qwen2       | 0.0                  | log-probs <= 1e-6     | -                       | yes    |
| Qwen3-MoE   | 0.0                  | log-probs <= 1e-6     | -                       | yes    |
| GPT-2       | 4e-16                | 0.0                   | GPT-2 has no flex       | yes, with stock's positions |
| NemotronH   | 0.56                 | -                     | -                       | no: Mamba2 state (refused) |

Log-probs in float64 (sdpa): the logits path is within 4e-15 (entropies 3e-14, gradients 1e-15 relative) of stock's
math done in float64; `fused_lm_head=True` equals TRL's own `_get_per_token_logps_and_entropies` exactly (0.0, values
and gradients); the two differ by ~1e-6 because TRL's fused kernel keeps float32 statistics even for a float64 model.

- eager in float64: stock itself is NaN for left-padded rows (eager's float32 softmax turns float64's `finfo.min` into
  -inf), while the pack has no padding and is finite; eager's softmax runs in float32 either way.
- flex_attention on CPU: float32/half only, forward only (no backward on CPU, for stock's padded batch neither), and
  each new pack length compiles (~10-30 s on 2 cores).
- flash_attention_2/3/4 (and Hub kernels registered with the flash mask) cannot run here. transformers finds packed
  rows for them from `position_ids == position_ids.min()` (`prepare_fa_kwargs_from_position_ids`), which stock's
  positions do not satisfy, so for these the sequence boundaries are passed explicitly as `cu_seq_lens_q/k` and
  `max_length_q/k`, which `_flash_attention_forward` prefers over the position ids (its "varlen kwargs" case).
  Untested here (no GPU).
- An `attn_implementation` without a mask function in `AttentionMaskInterface` (a custom registered kernel,
  `paged|eager`) gets no mask at all: packed rows attend to each other. `packing_unsupported` refuses it.
- Cost: sdpa/eager/flex on CPU build a dense (N, N) mask and compute attention over the whole pack (N^2 instead of
  the sum of row lengths squared); only varlen/flash kernels skip the masked blocks. The logits path materialises
  (completion tokens x vocab) logits plus their gradient; TRL 1.16's fused head (`fused_lm_head=True`) materialises none
  (but without Triton, e.g. on CPU, it scores every packed position, not only the completion's).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

__all__ = ["packed_logps_and_entropies", "packing_unsupported"]

DENSE_PACK_MAX_TOKENS = 8192  # longest pack run under a dense (N, N) mask (sdpa, eager, flex); longer: padded

# Layer kinds (`config.layer_types` / `layers_block_type`) that keep a recurrent or convolutional state along the
# sequence: transformers hands them no sequence boundaries (the PyTorch paths take no `seq_idx`), so state would run
# from one packed row into the next.
_STATEFUL_LAYER_MARKERS = ("linear", "mamba", "conv", "recurrent", "ssm", "rwkv", "delta", "lightning")
# Model types built from such layers that may not list them in `layer_types`
_STATEFUL_MODEL_MARKERS = ("mamba", "rwkv", "recurrent", "xlstm", "zamba", "jamba", "bamba")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DeepSpeed / accelerate wrappers (each keeps it as `.module`)."""
    from transformers import PreTrainedModel

    seen = set()
    while hasattr(model, "module") and not isinstance(model, PreTrainedModel) and id(model) not in seen:
        seen.add(id(model))
        model = model.module
    return model


def _text_config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _uses_flash_mask(attn_implementation: str | None) -> bool:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    try:
        return ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation] is flash_attention_mask
    except KeyError:
        return False


@dataclass
class _Pack:
    """One packed row and the bookkeeping that maps its scores back to TRL's `(B, logits_to_keep)` layout."""

    input_ids: torch.Tensor  # (1, N) the real tokens of every row that has a completion token, row after row
    position_ids: torch.Tensor  # (1, N) each token's column in the padded input (= stock's position)
    predictors: torch.Tensor  # (K,) indices into the pack of the tokens whose next token is a completion token
    labels: torch.Tensor  # (K,) those completion tokens
    out_mask: torch.Tensor  # (B, logits_to_keep) bool: where the K scores go (row-major, the pack's order)
    row_lengths: torch.Tensor  # (B,) tokens per row in the pack (0 for rows left out), for flash's cu_seqlens


def checked_shapes(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> tuple[int, int, int]:
    """(rows, width, prompt width) of a micro-batch in TRL's layout; ValueError naming what is wrong otherwise."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must be (B, S) alike, got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    rows, width = input_ids.shape
    if not 0 < logits_to_keep < width:
        raise ValueError(f"logits_to_keep={logits_to_keep} must leave at least one prompt column of {width}")
    return rows, width, width - int(logits_to_keep)


def _pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, keep_last: bool) -> _Pack:
    """Pack the real tokens of the rows that have a completion token. Each row's last real token predicts nothing
    and is left out unless `keep_last` (TRL's fused head shifts labels itself, so it needs the token there)."""
    rows, width, prompt_width = checked_shapes(input_ids, attention_mask, logits_to_keep)
    device = input_ids.device
    real = attention_mask.bool()
    has_completion = real[:, prompt_width:].any(1)
    # TRL's rows hold one run of real tokens: left-padded prompt then right-padded completion
    runs = real[:, 0].long() + (real[:, 1:] & ~real[:, :-1]).sum(1)
    broken = (runs > 1) | (has_completion & ~real[:, prompt_width - 1])
    columns = torch.arange(width, device=device).expand(rows, width)
    last = torch.where(real, columns, -1).amax(1)  # each row's last real column
    keep = real & has_completion[:, None]
    if not keep_last:
        keep = keep & (columns != last[:, None])
    flags = torch.stack([broken.any(), keep.any(), real.any()]).tolist()  # one host sync for the checks
    if flags[0]:
        bad = broken.nonzero().flatten().tolist()
        raise ValueError(f"rows {bad} are not TRL's layout (one run of real tokens: a left-padded prompt, ending in "
                         "the last prompt column when the completion is not empty, then a right-padded completion)")
    if not flags[1]:  # no completion token anywhere: one token still runs the model, so the result stays connected
        if not flags[2]:
            raise ValueError("attention_mask has no real token")
        first = torch.where(real, columns, width).amin(1)
        row = int(real.any(1).nonzero()[0])
        keep = torch.zeros_like(real)
        keep[row, first[row]] = True
    nxt = torch.zeros_like(real)
    nxt[:, :-1] = real[:, 1:]
    predictor = keep & nxt & (columns >= prompt_width - 1)  # token c predicts c + 1, a real completion token
    out_mask = predictor[:, prompt_width - 1:width - 1]
    return _Pack(
        input_ids=input_ids[keep][None],
        position_ids=columns[keep][None],
        predictors=predictor[keep].nonzero().flatten(),
        labels=input_ids[:, 1:][predictor[:, :-1]],
        out_mask=out_mask,
        row_lengths=keep.sum(1),
    )


class _ChunkedLogpEntropy(torch.autograd.Function):
    """Log-probability of each label and the entropy of each row of `logits * inv_t`, `chunk` rows at a time, in at
    least float32. Saves only the logits and two per-token vectors; backward recomputes each chunk's softmax."""

    @staticmethod
    def forward(ctx, logits, labels, inv_t, chunk, want_entropy):
        ctx.set_materialize_grads(False)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        count = logits.shape[0]
        logps = logits.new_empty(count, dtype=dtype)
        lse = logits.new_empty(count, dtype=dtype)
        entropy = logits.new_empty(count, dtype=dtype) if want_entropy else None
        for start in range(0, count, chunk):
            end = min(start + chunk, count)
            z = logits[start:end].to(dtype) * inv_t
            norm = torch.logsumexp(z, dim=-1)
            lse[start:end] = norm
            logps[start:end] = z.gather(-1, labels[start:end, None]).squeeze(-1) - norm
            if want_entropy:  # H = log Z - sum_v p_v z_v
                entropy[start:end] = norm - (torch.softmax(z, dim=-1) * z).sum(-1)
        ctx.save_for_backward(logits, labels, lse, entropy if want_entropy else lse)
        ctx.inv_t, ctx.chunk, ctx.dtype = inv_t, chunk, dtype
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None, None
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, logits.shape[0])
            log_p = logits[start:end].to(ctx.dtype) * ctx.inv_t - lse[start:end, None]
            p = log_p.exp()
            g = torch.zeros_like(p)
            if grad_logps is not None:  # d log p_y / dz_v = 1[v = y] - p_v
                gl = grad_logps[start:end, None].to(ctx.dtype)
                g = g - p * gl
                g.scatter_add_(-1, labels[start:end, None], gl)
            if grad_entropy is not None:  # dH / dz_v = -p_v (log p_v + H)
                g = g - grad_entropy[start:end, None].to(ctx.dtype) * p * (log_p + entropy[start:end, None])
            grad[start:end] = (g * ctx.inv_t).to(logits.dtype)
        return grad, None, None, None, None


def packed_logps_and_entropies(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    token_chunk: int = 512,
    fused_lm_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the completion tokens, as TRL's `_get_per_token_logps_and_entropies`
    returns them: `(B, logits_to_keep)`, stock's values at every real completion position, 0 elsewhere, gradients as
    stock's. The rows run as one packed, padding-free sequence (see the module docstring).

    Args:
        model: the policy as the trainer calls it (a DDP/DeepSpeed wrapper is fine: it is called once, through its
            forward). Check `packing_unsupported(model)` first.
        input_ids, attention_mask: `(B, S)` in TRL's layout, left-padded prompt + right-padded completion. Positions
            are the columns of this input: pass stock's columns (do not drop prompt-side padding columns first) to
            get stock's numbers exactly; trimming all-padding columns on the right changes nothing.
        logits_to_keep: the completion width (the last `logits_to_keep` columns).
        temperature: logits are divided by it, as TRL does (ignored with `fused_lm_head`: TRL's patch applies its own).
        compute_entropy: also return the entropy of each position's next-token distribution.
        token_chunk: rows of logits per log-softmax chunk (memory: `token_chunk x vocab` floats at a time).
        fused_lm_head: score through TRL's fused LM head (`model(..., labels=..., fused_lm_head=True)`), which
            GRPOTrainer/RLOOTrainer patch onto the policy: no logits are materialised and the numbers are those of
            TRL's own kernel. On devices without Triton TRL scores every packed position.

    Call it where stock's call runs (inside `accelerator.autocast()` under mixed precision). Returns log-probs in at
    least float32 (float64 for a float64 model) and the entropies or None.
    """
    if token_chunk < 1:
        raise ValueError(f"token_chunk must be >= 1, got {token_chunk}")
    inner = _unwrap(model)
    config = _text_config(inner)
    pack = _pack(input_ids, attention_mask, logits_to_keep, keep_last=fused_lm_head)
    kwargs = {"input_ids": pack.input_ids, "position_ids": pack.position_ids, "attention_mask": None,
              "use_cache": False}
    if _uses_flash_mask(getattr(config, "_attn_implementation", None)):
        # flash kernels would look for sequence starts at position_ids == min: give them the boundaries instead
        lengths = pack.row_lengths[pack.row_lengths > 0]
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        longest = int(lengths.max())
        kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)

    logps, entropy = score_sequence(model, kwargs, pack.predictors, pack.labels, temperature, compute_entropy,
                                    token_chunk, fused_lm_head)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        # masked_scatter keeps the result connected to the model even when no position is real
        return values.new_zeros(pack.out_mask.shape).masked_scatter(pack.out_mask, values)

    return scatter(logps), (scatter(entropy) if entropy is not None else None)


def score_sequence(model: torch.nn.Module, kwargs: dict, predictors: torch.Tensor, labels: torch.Tensor,
                   temperature: float, compute_entropy: bool, token_chunk: int,
                   fused_lm_head: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run `model(**kwargs)` over one sequence `(1, N)` and score position `predictors[k]` against `labels[k]`: the
    log-prob of each label (and the entropy there), through TRL's fused LM head or from logits computed only at the
    predictor positions (log-softmax in chunks of `token_chunk` rows)."""
    if fused_lm_head:
        shifted = torch.full_like(kwargs["input_ids"], -100)
        shifted[0, predictors + 1] = labels  # TRL's head scores hidden j against label j + 1
        outputs = model(**kwargs, labels=shifted, fused_lm_head=True)
        entropy = None
        if compute_entropy:
            if outputs.entropy is None:
                raise ValueError("the model's fused LM head computes no entropy (TRL adds it with outputs=('log_probs',"
                                 " 'entropy') to the policy only); call with fused_lm_head=False")
            entropy = outputs.entropy[0, predictors]
        return outputs.log_probs[0, predictors], entropy
    logits = model(**kwargs, logits_to_keep=predictors).logits
    if logits.shape[:2] != (1, predictors.numel()):
        raise RuntimeError(f"{type(_unwrap(model)).__name__} ignored logits_to_keep (logits {tuple(logits.shape)} for "
                           f"{predictors.numel()} positions); it cannot run padding-free")
    return _ChunkedLogpEntropy.apply(logits[0], labels, 1.0 / temperature, int(token_chunk), compute_entropy)


def packing_unsupported(model: torch.nn.Module, probe: bool = True) -> str | None:
    """None when `packed_logps_and_entropies` gives this model's stock numbers, else a one-line reason for a
    user-facing note.

    Static checks: a decoder-only text model (not encoder-decoder, not multimodal, no prompt-learning PEFT adapter),
    whose attention implementation has a transformers mask function (those build the block-diagonal mask from
    packed position ids), where no layer may carry recurrent/convolutional state along the
    sequence (Mamba, linear attention, short convolutions), and the forward must take `logits_to_keep`. With `probe`
    (default) it then runs two tiny no-grad forwards (2 rows, 11 tokens) in eval mode: the second packed row's
    logits must not change when the first row's tokens do, and must equal the same rows run padded (float32/float64
    models only). Under DDP, ZeRO-3 or FSDP a forward is collective: call it on every rank, or pass `probe=False`.
    """
    inner = _unwrap(model)
    config = _text_config(inner)
    if config is None:
        return f"{type(inner).__name__} has no transformers config, so it cannot be packed"
    name = getattr(config, "model_type", None) or type(inner).__name__
    if getattr(inner.config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; packing covers decoder-only causal LMs"
    if config is not inner.config:
        return f"{getattr(inner.config, 'model_type', name)} is a multimodal model; packing covers text-only causal LMs"
    if getattr(getattr(inner, "active_peft_config", None), "is_prompt_learning", False):
        return "prompt-learning PEFT adapters (prefix/prompt tuning) add virtual tokens that packing does not place"
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    impl = getattr(config, "_attn_implementation", None)
    if impl not in ALL_MASK_ATTENTION_FUNCTIONS:
        return (f"attn_implementation={impl!r} builds no attention mask from packed position ids, so packed rows would "
                "attend to each other: load the model with attn_implementation='sdpa' (or 'flash_attention_2' on a "
                "GPU, or 'eager'), or register a mask function for it in transformers' AttentionMaskInterface")
    kinds = []
    for attr in ("layer_types", "layers_block_type"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)):
            kinds += [str(kind) for kind in value]
    stateful = sorted({kind for kind in kinds if any(marker in kind.lower() for marker in _STATEFUL_LAYER_MARKERS)})
    if stateful or any(marker in str(name).lower() for marker in _STATEFUL_MODEL_MARKERS):
        layers = "/".join(stateful) or "recurrent"
        return (f"{name} has {layers} layers whose recurrent state would run from one packed row into the next "
                "(transformers gives them no sequence boundaries)")
    base = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner  # PEFT
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "logits_to_keep" not in parameters:
        return f"{type(base).__name__}.forward takes no logits_to_keep, which packing uses to score completion tokens"
    return _probe(model, inner) if probe else None


def _probe(model: torch.nn.Module, inner: torch.nn.Module) -> str | None:
    """Run a 2-row pack through `model`; a reason if the rows leak into each other or differ from the padded run."""
    embeddings = inner.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or _text_config(inner).vocab_size
    device = next((p.device for p in inner.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(vocab, (n,), generator=generator) for n in (6, 6, 5))
    width = 6
    # the padded run, TRL-like: rows of 6 and 5 real tokens, the short one right-padded (left padding would make
    # eager attention NaN in float64); the packs keep each token's column as its position
    padded = torch.stack([first, torch.cat([second, second[-1:]])]).to(device)
    mask = torch.tensor([[1] * width, [1] * 5 + [0]], device=device)
    positions = torch.tensor([list(range(6)) + list(range(5))], device=device)
    packs = [torch.cat([row, second])[None].to(device) for row in (first, other)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call = dict(position_ids=positions, attention_mask=None, use_cache=False)
            packed = [model(input_ids=ids, **call).logits[0].float() for ids in packs]
            reference = model(input_ids=padded, attention_mask=mask, use_cache=False).logits.float()
    except Exception as error:  # noqa: BLE001 - any failure means: do not pack
        return f"a packed forward of {type(inner).__name__} failed ({type(error).__name__}: {str(error)[:120]})"
    finally:
        model.train(was_training)
    scale = 1.0 + max(p.abs().max().item() for p in packed)
    leak = (packed[0][width:] - packed[1][width:]).abs().max().item()
    if not leak <= 1e-3 * scale:  # `not <=` also catches NaN
        return (f"packed rows of {type(inner).__name__} see each other (the second row's logits moved by {leak:.3g} "
                "when the first row changed): its attention ignores the packed sequence boundaries")
    if getattr(inner, "dtype", None) in (torch.float32, torch.float64):  # half precision: its noise is too large
        expected = torch.cat([reference[0], reference[1, :5]])
        diff = (packed[0] - expected).abs().max().item()
        if not diff <= 1e-4 * scale:
            return (f"packed logits of {type(inner).__name__} differ from its padded forward by {diff:.3g}: it does "
                    "not take the packed position ids as each token's position")
    return None


def skips_masked_blocks(model: torch.nn.Module) -> bool:
    """Whether the model's attention runs packed rows with variable-length kernels (flash attention), which skip
    the masked blocks; sdpa, eager and flex_attention compute the whole (N, N) pack under a dense mask."""
    config = _text_config(_unwrap(model))
    return config is not None and _uses_flash_mask(getattr(config, "_attn_implementation", None))
