"""The hooks see exactly what a separate forward pass over the same tokens computes, and nothing leaks."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl_lenbalance.capture import GenerationCapture, record_steps
from rl_lenbalance.config import LenBalanceConfig
from rl_lenbalance.predictor import HeadConfig, PLPHead, StreamingPool, plp_features, pool_tokens, token_entropy

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
    config = LenBalanceConfig(pooling=pooling, record_every=4)
    head = PLPHead(HeadConfig(model.config.hidden_size, max_length=MAX_NEW, pooling=pooling))
    capture = GenerationCapture(model, head, config, max_length=MAX_NEW)
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
    capture = GenerationCapture(model, head, LenBalanceConfig(), max_length=MAX_NEW)
    batch = tokenizer(["Hello there", "What is 2+2?"], return_tensors="pt", padding=True)
    plain = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    _, hooked, _ = _generate(model, tokenizer, capture, ["Hello there", "What is 2+2?"])
    assert torch.equal(plain[:, : hooked.size(1)], hooked[:, : plain.size(1)])
    assert not model.model.norm._forward_hooks and not model.lm_head._forward_hooks


def test_bad_hook_module_and_mismatched_head_are_clear_errors(model_and_tokenizer):
    model, _ = model_and_tokenizer
    head = PLPHead(HeadConfig(model.config.hidden_size, max_length=8))
    with pytest.raises(ValueError, match="lenbalance.hook_module"):
        GenerationCapture(model, head, LenBalanceConfig(hook_module="model.no_such_norm"), max_length=8)
    wrong = PLPHead(HeadConfig(model.config.hidden_size + 8, max_length=8))
    with pytest.raises(ValueError, match=f"hidden size {model.config.hidden_size + 8}.*{model.config.hidden_size}"):
        GenerationCapture(model, wrong, LenBalanceConfig(), max_length=8)
