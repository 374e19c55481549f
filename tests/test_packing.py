"""The padding-free loss forward (`rl_lenbalance.loss.packed`) gives TRL's own per-token log-probs, entropies and
gradients on every family it accepts, refuses the ones it cannot pack with a reason, and each comparison is shown to
be able to fail (continuous or restarted position ids, an attention without packed masks, a Mamba hybrid).

"Stock" is the real `GRPOTrainer`/`RLOOTrainer._get_per_token_logps_and_entropies` on the padded batch. TRL 1.16 scores
through its fused LM head, whose statistics are float32 even for a float64 model (~1e-6 off the float64 values), so:
`fused_lm_head=True` is compared with stock to 1e-10 (it is bit for bit), and the logits path with stock's math done in
float64 on the same padded batch (log-softmax of the temperature-scaled logits) to 1e-10, and with stock to 1e-5.
`bf16=False` matters: GRPOConfig's default bf16=True runs TRL's head under CPU autocast, in bfloat16."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import enable_checkpointing, gap, grad_gap
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from rl_lenbalance.cli.recipe import CHECKPOINTING
from rl_lenbalance.loss import packed as packing
from rl_lenbalance.loss.packed import packed_logps_and_entropies, packing_unsupported

pytestmark = pytest.mark.compat  # also on transformers 5.17 (`make test-compat`)

TEMPERATURE = 0.7
PROMPT, COMPLETION = 7, 9
# (prompt tokens, completion tokens) per row: a full row, padding on both sides, an empty completion, a one-token
# prompt, and an unpadded prompt with a one-token completion
ROWS = [(7, 9), (3, 4), (5, 0), (1, 6), (7, 1)]


def make_batch(vocab: int, pad: int, rows=ROWS, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, vocab, (len(rows), PROMPT + COMPLETION), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for i, (prompt, completion) in enumerate(rows):
        attention_mask[i, PROMPT - prompt:PROMPT + completion] = 1
    return input_ids.masked_fill(attention_mask == 0, pad), attention_mask


def load(model_dir, dtype=torch.float64, attn="sdpa"):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn,
                                                experts_implementation="eager")  # grouped_mm has no float64


def make_trainer(model, model_dir, tmp_path, cls=GRPOTrainer):
    """A real trainer: it patches TRL's fused LM head onto `model`; its method is the stock reference."""
    config_cls = GRPOConfig if cls is GRPOTrainer else RLOOConfig
    args = config_cls(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=COMPLETION, use_cpu=True, report_to="none", beta=0.0,
                      temperature=TEMPERATURE, bf16=False, **{CHECKPOINTING: False})
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    return cls(model=model, processing_class=tokenizer, reward_funcs=lambda completions, **_: [0.0] * len(completions),
               args=args, train_dataset=Dataset.from_list([{"prompt": "Hi"}] * 8))


def float64_reference(model, input_ids, attention_mask, temperature=TEMPERATURE):
    """Stock's math in float64: the padded forward, logits / T, log-softmax, the label's value and the entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -COMPLETION - 1:-1].double()
    log_p = (logits * (1.0 / temperature)).log_softmax(-1)
    mask = attention_mask[:, -COMPLETION:]
    logps = log_p.gather(-1, input_ids[:, -COMPLETION:, None]).squeeze(-1)
    return logps * mask, -(log_p.exp() * log_p).sum(-1) * mask


def grads(model, logps, entropy, attention_mask):
    """Gradients of a loss that uses both outputs, as TRL's masked losses do; unused parameters count as zero."""
    mask = attention_mask[:, -COMPLETION:]
    params = [p for p in model.parameters() if p.requires_grad]
    loss = (logps * mask).sum() + 0.3 * (entropy * mask).sum()
    found = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g.double() for p, g in zip(params, found)]


CASES = [("llama", GRPOTrainer, False), ("qwen2", GRPOTrainer, False), ("qwen3_moe", GRPOTrainer, False),
         ("gpt2", GRPOTrainer, False), ("llama", RLOOTrainer, False), ("llama", GRPOTrainer, True)]


@pytest.mark.parametrize("family,trainer_cls,checkpointing", CASES,
                         ids=[f"{f}-{c.__name__}{'-checkpointing' if g else ''}" for f, c, g in CASES])
def test_packed_values_and_gradients_are_stocks(family_model_dir, tmp_path, family, trainer_cls, checkpointing):
    model_dir = family_model_dir(family)
    model = load(model_dir)
    trainer = make_trainer(model, model_dir, tmp_path, trainer_cls)
    model = trainer.model
    if checkpointing:  # TRL's default; the model must still see use_cache=False and the packed positions
        enable_checkpointing(model)
        model.train()
    else:
        model.eval()
    assert packing_unsupported(model) is None
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    mask = attention_mask[:, -COMPLETION:].bool()

    stock = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, COMPLETION,
                                                       compute_entropy=True)[:2]
    exact = float64_reference(model, input_ids, attention_mask)
    ours = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE,
                                      compute_entropy=True, token_chunk=3)
    fused = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, compute_entropy=True,
                                       fused_lm_head=True)

    assert ours[0].dtype == torch.float64 and ours[0].shape == (len(ROWS), COMPLETION)
    for values in (*ours, *fused):
        assert torch.isfinite(values).all()
        assert (values[~mask] == 0).all()  # padded positions and the empty completion's row
    assert (ours[0][mask] < 0).all() and (ours[1][mask] > 0).all()
    for mine, reference in zip(ours, exact):
        assert gap(mine, reference) < 1e-10
    for mine, reference in zip(fused, stock):  # the same TRL kernel over the packed hidden states
        assert gap(mine, reference) < 1e-10
    for mine, reference in zip(ours, stock):  # TRL's float32 statistics are the only difference
        assert gap(mine, reference) < 1e-5

    stock_grads = grads(model, *stock, attention_mask)
    assert grad_gap(grads(model, *ours, attention_mask), grads(model, *exact, attention_mask)) < 1e-10
    assert grad_gap(grads(model, *fused, attention_mask), stock_grads) < 1e-10
    assert grad_gap(grads(model, *ours, attention_mask), stock_grads) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe", "gpt2"])
def test_eager_attention_packs_too(family_model_dir, tmp_path, family):
    """eager in float32 (in float64, stock's eager is NaN on left-padded rows: its float32 softmax turns float64's
    mask value into -inf; the pack has no padding)."""
    model_dir = family_model_dir(family)
    trainer = make_trainer(load(model_dir, torch.float32, "eager"), model_dir, tmp_path)
    model = trainer.model.eval()
    assert packing_unsupported(model) is None
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    stock = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, COMPLETION,
                                                       compute_entropy=True)[:2]
    ours = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE,
                                      compute_entropy=True)
    fused = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, compute_entropy=True,
                                       fused_lm_head=True)
    for mine, reference in (*zip(ours, stock), *zip(fused, stock)):
        assert gap(mine, reference) < 1e-5
    assert grad_gap(grads(model, *ours, attention_mask), grads(model, *stock, attention_mask)) < 1e-5

    # float64 eager: the pack is finite and within eager's float32 softmax of sdpa's float64 stock
    model64 = load(model_dir, torch.float64, "eager").eval()
    ours64 = packed_logps_and_entropies(model64, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE,
                                        compute_entropy=True)
    model64.set_attn_implementation("sdpa")
    for mine, reference in zip(ours64, float64_reference(model64, input_ids, attention_mask)):
        assert gap(mine, reference) < 1e-6


@pytest.mark.slow
def test_flex_attention_packs_on_cpu(family_model_dir, tmp_path, monkeypatch):
    """flex_attention builds a block mask from the packed positions. On CPU it runs float32/half only, compiles each
    new length, and has no backward (stock's padded forward neither): no-grad passes only, such as old log-probs."""
    model_dir = family_model_dir("llama")
    trainer = make_trainer(load(model_dir, torch.float32, "flex_attention"), model_dir, tmp_path)
    model = trainer.model.eval()
    assert packing_unsupported(model, probe=False) is None
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    with torch.no_grad():
        stock = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, COMPLETION)[0]
        ours = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE)[0]
    assert gap(ours, stock) < 1e-5
    with monkeypatch.context() as patch:  # and the comparison can fail
        patch.setattr(packing, "_pack", repack("continuous"))
        with torch.no_grad():
            assert gap(packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION,
                                                  temperature=TEMPERATURE)[0], stock) > 1e-3


def test_logits_are_computed_only_for_real_completion_tokens(family_model_dir):
    model = load(family_model_dir("llama")).eval()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    try:
        packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, compute_entropy=True)
        model(input_ids=input_ids, attention_mask=attention_mask)  # stock's padded forward, for contrast
    finally:
        handle.remove()
    real = int(attention_mask[:, -COMPLETION:].sum())
    assert real == sum(c for _, c in ROWS)
    assert shapes == [(1, real, model.config.vocab_size), (len(ROWS), PROMPT + COMPLETION, model.config.vocab_size)]


def repack(positions: str):
    """A `_pack` whose position ids are replaced: "continuous" (0..N-1: one sequence, no block mask) or "restart"
    (0 at every row's first real token: the usual padding-free layout)."""
    original = packing._pack

    def wrapped(input_ids, attention_mask, logits_to_keep, keep_last):
        pack = original(input_ids, attention_mask, logits_to_keep, keep_last)
        if positions == "continuous":
            pack.position_ids = torch.arange(pack.input_ids.shape[1])[None]
        else:
            rows = input_ids.shape[0]
            keep_mask = attention_mask.bool() & attention_mask[:, -logits_to_keep:].bool().any(1, keepdim=True)
            keep_mask[torch.arange(rows), torch.where(keep_mask, torch.arange(input_ids.shape[1]), -1).amax(1)] = False
            pack.position_ids = (keep_mask.cumsum(1) - 1)[keep_mask][None]
        return pack

    return wrapped


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_comparison_fails_without_packed_boundaries_or_stock_positions(family_model_dir, monkeypatch, family):
    """Why the pack looks as it does: with continuous positions the rows attend to each other; with positions that
    restart at 0, RoPE (computed in float32) moves float64 values by ~1e-8 and GPT-2's learned positions break."""
    model = load(family_model_dir(family)).eval()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    exact = float64_reference(model, input_ids, attention_mask)[0]

    def run():
        return packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE)[0]

    assert gap(run(), exact) < 1e-10
    with monkeypatch.context() as patch:
        patch.setattr(packing, "_pack", repack("continuous"))
        assert gap(run(), exact) > 1e-3
    with monkeypatch.context() as patch:
        patch.setattr(packing, "_pack", repack("restart"))
        restarted = gap(run(), exact)
    if family == "gpt2":
        assert restarted > 1e-3
    else:
        assert 1e-10 < restarted < 1e-5


def test_a_mamba_hybrid_is_refused_and_would_be_wrong(family_model_dir):
    model = load(family_model_dir("nemotron_h")).eval()
    reason = packing_unsupported(model)
    assert reason is not None and "linear_attention" in reason and "\n" not in reason
    assert "see each other" in packing._probe(model, model)  # the probe alone finds it too
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    packed = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE)[0]
    assert gap(packed, float64_reference(model, input_ids, attention_mask)[0]) > 1e-3


def test_an_attention_without_packed_masks_is_refused_and_would_be_wrong(family_model_dir, monkeypatch):
    """A kernel registered in AttentionInterface without a mask function gets no mask at all from transformers."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, "my_kernel", sdpa_attention_forward)
    model = load(family_model_dir("llama"), attn="my_kernel").eval()
    reason = packing_unsupported(model)
    assert reason is not None and "attn_implementation='my_kernel'" in reason and "'sdpa'" in reason
    assert "see each other" in packing._probe(model, model)
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    packed = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE)[0]
    model.set_attn_implementation("sdpa")
    assert gap(packed, float64_reference(model, input_ids, attention_mask)[0]) > 1e-3
    assert packing_unsupported(model) is None


def test_a_forward_without_logits_to_keep_is_refused(family_model_dir):
    model = load(family_model_dir("llama"))

    class Plain(torch.nn.Module):
        config = model.config

        def forward(self, input_ids, attention_mask=None):
            return model(input_ids=input_ids, attention_mask=attention_mask)

    assert "logits_to_keep" in packing_unsupported(Plain())


def test_all_completions_empty_gives_zeros_still_connected(family_model_dir):
    model = load(family_model_dir("llama")).eval()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id,
                                           rows=[(3, 0), (7, 0)])
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    logps, entropy = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, compute_entropy=True)
    handle.remove()
    assert calls == [(1, 1)]  # one token keeps every rank's forward/backward in step under DDP
    assert (logps == 0).all() and (entropy == 0).all() and logps.requires_grad
    (logps.sum() + entropy.sum()).backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_layouts_that_are_not_trls_are_refused(family_model_dir):
    model = load(family_model_dir("llama"))
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    holed = attention_mask.clone()
    holed[0, 3] = 0  # a hole inside the prompt
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        packed_logps_and_entropies(model, input_ids, holed, COMPLETION)
    right_padded_prompt = attention_mask.clone()
    right_padded_prompt[1] = 0
    right_padded_prompt[1, :3] = 1
    right_padded_prompt[1, PROMPT:PROMPT + 2] = 1
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        packed_logps_and_entropies(model, input_ids, right_padded_prompt, COMPLETION)
    with pytest.raises(ValueError, match="logits_to_keep"):
        packed_logps_and_entropies(model, input_ids, attention_mask, PROMPT + COMPLETION)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_chunked_log_softmax_matches_autograd(chunk, with_entropy):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 11, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(11, (7,), generator=generator)
    inv_t = 1 / 0.7

    def chunked(x):
        logps, entropy = packing._ChunkedLogpEntropy.apply(x, labels, inv_t, chunk, with_entropy)
        return (logps, entropy) if with_entropy else (logps,)

    torch.autograd.gradcheck(chunked, (logits,))

    def autograd_reference(x):
        log_p = (x * inv_t).log_softmax(-1)
        outputs = (log_p.gather(-1, labels[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1))
        return outputs if with_entropy else outputs[:1]

    for got, want in zip(chunked(logits), autograd_reference(logits)):
        assert gap(got, want) < 1e-12
    weights = torch.randn(7, dtype=torch.float64, generator=generator)

    def gradient(fn):
        logits.grad = None
        sum((weights * output).sum() for output in fn(logits)).backward()
        return logits.grad.clone()

    assert gap(gradient(chunked), gradient(autograd_reference)) < 1e-12
    # in a half-precision model the statistics still run in float32, as TRL's kernel does
    logps, _ = packing._ChunkedLogpEntropy.apply(logits.detach().bfloat16(), labels, inv_t, chunk, False)
    assert logps.dtype == torch.float32
