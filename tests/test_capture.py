"""The hooks see exactly what a separate forward pass over the same tokens computes, and nothing leaks."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl_lenbalance.config import LenBalanceConfig
from rl_lenbalance.generation.capture import GenerationCapture, record_steps
from rl_lenbalance.predictor import HeadConfig, PLPHead, StreamingPool, plp_features, pool_tokens, token_entropy

pytestmark = pytest.mark.compat  # also on transformers 5.17 (`make test-compat`)

MAX_NEW = 12


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def _generate(model, tokenizer, capture, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    with capture.capture(prompts) as result:
        out = model.generate(**batch, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return batch, out, result


@pytest.mark.parametrize("pooling", ["egtp", "mean"])
def test_hooked_features_equal_a_separate_forward_pass(model_and_tokenizer, pooling):
    model, tokenizer = model_and_tokenizer
    config = LenBalanceConfig(pooling=pooling, record_every=4, predict_every=1)
    head = PLPHead(HeadConfig(model.config.hidden_size, max_length=MAX_NEW, pooling=pooling))
    capture = GenerationCapture(model, head.predict, config, max_length=MAX_NEW)
    texts = ["Hi", "Write a long story about a cat please", "Hi"]  # a repeated prompt, as in a GRPO group
    batch, out, result = _generate(model, tokenizer, capture, texts)
    assert result.steps == MAX_NEW - 1  # generate does not run the forward of its last token
    assert result.prediction_steps == list(range(MAX_NEW))

    mask = torch.cat([batch["attention_mask"], torch.ones(3, MAX_NEW, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(out, attention_mask=mask, output_hidden_states=True)
    hidden, entropy = full.hidden_states[-1], token_entropy(full.logits)
    width = batch["input_ids"].size(1)
    prompt = pool_tokens(hidden[:, :width], entropy[:, :width], batch["attention_mask"].bool(), pooling)
    torch.testing.assert_close(result.prompt_features, prompt, rtol=1e-4, atol=1e-4)

    for step in record_steps(MAX_NEW, 4):
        if step == 0:
            generated = None
        else:  # generated token j sits at position width + j - 1
            generated = StreamingPool(3, model.config.hidden_size)
            for j in range(1, step + 1):
                generated.update(hidden[:, width + j - 1], entropy[:, width + j - 1])
        expected = plp_features(prompt, generated, step, MAX_NEW)
        torch.testing.assert_close(result.recorded[step].float(), expected, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(result.predictions[step], head.predict(expected), rtol=1e-3, atol=1e-2)


def test_hooks_are_removed_and_generation_is_unchanged(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    head = PLPHead(HeadConfig(model.config.hidden_size, max_length=MAX_NEW))
    capture = GenerationCapture(model, head.predict, LenBalanceConfig(), max_length=MAX_NEW)
    batch = tokenizer(["Hello there", "What is 2+2?"], return_tensors="pt", padding=True)
    plain = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    _, hooked, _ = _generate(model, tokenizer, capture, ["Hello there", "What is 2+2?"])
    assert torch.equal(plain[:, : hooked.size(1)], hooked[:, : plain.size(1)])
    assert not model.model.norm._forward_hooks and not model.lm_head._forward_hooks


def test_a_bad_hook_module_is_a_clear_error(model_and_tokenizer):
    model, _ = model_and_tokenizer
    head = PLPHead(HeadConfig(model.config.hidden_size, max_length=8))
    with pytest.raises(ValueError, match="lenbalance.hook_module"):
        GenerationCapture(model, head.predict, LenBalanceConfig(hook_module="model.no_such_norm"), max_length=8)


def test_a_resumed_capture_continues_the_streams_of_an_uninterrupted_one(model_and_tokenizer):
    """Re-bucketing splits a row over two generate calls; the second resumes from the first's StreamState (fed
    prompt + probe tokens), and records the PLP features an uninterrupted call records."""
    from transformers import GenerationConfig

    from rl_lenbalance.generation.capture import StreamState
    from rl_lenbalance.generation.decode import compacted_generate

    model, tokenizer = model_and_tokenizer
    max_new, probe = 24, 9
    config = LenBalanceConfig(record_every=4, predict_every=1)
    head = PLPHead(HeadConfig(model.config.hidden_size, max_length=max_new))
    capture = GenerationCapture(model, head.predict, config, max_length=max_new)
    prompts = [tokenizer(t)["input_ids"] for t in ["Hi", "Write a long story about a cat please", "Tell me"]]
    generation = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=[10**6])  # no eos: all run
    with capture.capture(prompts) as whole:
        full = compacted_generate(model, prompts, generation, pad_token_id=0)
    with capture.capture(prompts) as first:
        prefix = compacted_generate(model, prompts, generation, pad_token_id=0, max_steps=probe + 1)
    order = [2, 0]  # regrouped: one row left, the others reordered
    resume = StreamState.cat([first.state.rows([i]) for i in order], "cpu")
    assert resume.steps == probe
    with capture.capture([prompts[i] for i in order], resume=resume) as second:
        rest = compacted_generate(model, [prompts[i] for i in order], generation, pad_token_id=0,
                                  prefixes=[prefix[i] for i in order])
    assert rest == [full[i] for i in order]
    assert first.forwards == probe + 1 and second.forwards == max_new - probe - 1
    assert first.slots == 3 * (probe + 1) and second.slots == 2 * (max_new - probe - 1)
    assert set(first.recorded) == {s for s in whole.recorded if s <= probe}
    assert set(second.recorded) == {s for s in whole.recorded if s > probe}
    for step, features in second.recorded.items():
        torch.testing.assert_close(features.float(), whole.recorded[step][order].float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(second.predictions[-1], whole.predictions[-1][order], rtol=1e-3, atol=1e-2)


def test_default_capture_predicts_at_step_0_only_and_folds_tokens_exactly(eos_tiny_model_dir):
    """Pending tokens are folded into the pool in batches: the recorded features (with rows leaving a compacting
    loop on the way) equal those of a capture that folds every step, and the head runs only where it is read."""
    from transformers import GenerationConfig

    from rl_lenbalance.generation.decode import compacted_generate

    tokenizer = AutoTokenizer.from_pretrained(eos_tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(eos_tiny_model_dir, dtype=torch.float32).eval()
    max_new = 40
    head = PLPHead(HeadConfig(model.config.hidden_size, max_length=max_new))
    prompts = [tokenizer(t)["input_ids"] for t in ["Hi", "Write a long story about a cat please", "Tell me"]]
    generation = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=max_new)
    results = {}
    for every in (0, 1):
        capture = GenerationCapture(model, head.predict, LenBalanceConfig(record_every=4, predict_every=every), max_new)
        torch.manual_seed(3)
        with capture.capture(prompts * 3) as results[every]:
            ids = compacted_generate(model, prompts * 3, generation, pad_token_id=0, on_compact=results[every].compact)
    lazy, eager = results[0], results[1]
    assert lazy.prediction_steps == [0] and len(eager.prediction_steps) == eager.steps + 1
    assert len(set(map(len, ids))) > 1  # rows finished at different steps, so the loop compacted
    assert set(lazy.recorded) == set(eager.recorded)
    for step in lazy.recorded:
        torch.testing.assert_close(lazy.recorded[step], eager.recorded[step], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lazy.state.pool.value(), eager.state.pool.value())
    assert lazy.seconds > 0


def test_streaming_pool_extend_equals_token_by_token_updates():
    torch.manual_seed(0)
    hidden, entropy = torch.randn(3, 7, 5), torch.rand(3, 7) * 4
    one, many = StreamingPool(3, 5), StreamingPool(3, 5)
    for t in range(7):
        one.update(hidden[:, t], entropy[:, t])
    many.extend(hidden[:, :4], entropy[:, :4])
    many.extend(hidden[:, 4:], entropy[:, 4:])
    torch.testing.assert_close(many.value(), one.value())
    torch.testing.assert_close(many.value(), pool_tokens(hidden, entropy, torch.ones(3, 7), "egtp"))
    assert torch.equal(many.last, hidden[:, -1])


def test_a_row_split_over_two_waves_yields_the_training_pairs_of_one(model_and_tokenizer):
    """The probe wave and the continuation wave (maybe on another rank) each keep the draws they hold."""
    from rl_lenbalance.generation.capture import CaptureResult
    from rl_lenbalance.generation.engine import LenBalanceEngine, Wave
    from rl_lenbalance.predictor import feature_size

    model, _ = model_and_tokenizer
    engine = LenBalanceEngine(model, LenBalanceConfig(record_every=16, samples_per_sequence=3), max_length=64)
    width = feature_size(model.config.hidden_size)
    features = {step: torch.full((2, width), float(step), dtype=torch.float16) for step in (0, 8, 16, 32, 48)}
    lengths = {5: 60, 9: 20}  # row 9 ends at 20 tokens: its steps 32 and 48 hold nothing

    def pairs(waves):
        out = engine.training_pairs(waves, lengths)
        valid = out.y >= 0
        assert out.z[valid, 0].tolist() == out.step[valid].tolist()  # each sample names the step it was taken at
        return sorted(zip(out.z[valid, 0].tolist(), out.y[valid].tolist())), out

    whole, _ = pairs([Wave([5, 9], CaptureResult(recorded=features, prompt_keys=[7, 8]))])
    probe = {s: f for s, f in features.items() if s <= 16}
    rest = {s: f[:1] for s, f in features.items() if s > 16}
    split, out = pairs([Wave([5, 9], CaptureResult(recorded=probe, prompt_keys=[7, 8])),
                        Wave([5], CaptureResult(recorded=rest, prompt_keys=[7]))])
    assert split == whole and len(whole) == 3 + 3
    assert all(y in (60 - step, 20 - step) and y > 0 for step, y in whole)  # z encodes the step it was taken at
    assert out.y0.tolist() == [60, 20, -1] and out.y32.tolist() == [-1, -1, 28]
    assert out.row.tolist() == [5, 9, 5] and out.prompt.tolist() == [7, 8, 7] and out.length.tolist() == [60, 20, 60]


@pytest.mark.parametrize("feature_layer", [-1, 1])
def test_replayed_features_equal_what_the_generation_hooks_record(eos_tiny_model_dir, feature_layer):
    """Backends whose passes cannot be hooked (continuous batching, vLLM) learn from one teacher-forced forward."""
    from transformers import GenerationConfig

    from rl_lenbalance.generation.decode import compacted_generate

    model = AutoModelForCausalLM.from_pretrained(eos_tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(eos_tiny_model_dir)
    config = LenBalanceConfig(record_every=4, feature_layer=feature_layer, pooling="egtp")
    head = PLPHead(HeadConfig(model.config.hidden_size, max_length=24, feature_layer=feature_layer))
    capture = GenerationCapture(model, head.predict, config, max_length=24)
    prompts = [tokenizer(t)["input_ids"] for t in ["Hi", "Tell me a long story please", "2+2?", "Why not?"]]
    generation = GenerationConfig(max_new_tokens=24, do_sample=True, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with capture.capture(prompts) as hooked:
        completions = compacted_generate(model, prompts, generation, tokenizer.pad_token_id,
                                         min_finished=len(prompts) + 1)
    assert len({len(c) for c in completions}) > 1  # rows of different lengths: padding is in play

    def forward(input_ids, attention_mask, position_ids):
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)

    replayed = capture.replay(prompts, completions, forward)
    torch.testing.assert_close(replayed.predictions[0], hooked.predictions[0], rtol=1e-3, atol=1e-2)
    compared = 0
    for step, z in replayed.recorded.items():
        rows = [r for r, c in enumerate(completions) if step < len(c)]  # a training pair exists only there
        torch.testing.assert_close(z[rows].float(), hooked.recorded[step][rows].float(), rtol=2e-3, atol=2e-3)
        compared += len(rows)
    assert compared > len(prompts)  # several steps of several rows
