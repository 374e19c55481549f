"""Stock TRL features keep working with rl-lenbalance on: each runs with the swap-in trainer, and where the update
matters it equals stock GRPOTrainer's (same seed, float64 tiny models). Rows of docs/compatibility.md cite these."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import assert_same_update, train, varied_reward
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def test_tool_calling_turns_after_the_first_run_as_stock_and_the_update_is_stocks(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """TRL's tool loop calls `_generate_single_turn(..., num_generations=1, has_tool_images=...)` by keyword. A random
    model emits no tool call, so every first-turn completion is parsed as a call to `add`; the tool result and a
    second turn follow, exactly as in TRL's loop."""
    import trl.trainer.grpo_trainer as grpo_module
    from trl.chat_template_utils import qwen3_chat_template

    parse = grpo_module.parse_response

    def first_turns_call_add(tokenizer, ids, prefix=None, tools=None):
        if "<|im_start|>tool" in tokenizer.decode(prefix):
            return parse(tokenizer, ids, prefix=prefix, tools=tools)
        return {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}

    monkeypatch.setattr(grpo_module, "parse_response", first_turns_call_add)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    tokenizer.chat_template = qwen3_chat_template  # a template TRL knows how to parse tool calls of
    run = dict(tokenizer=tokenizer, trainer_kwargs={"tools": [add]}, max_completion_length=48,
               max_tool_calling_iterations=1, generation_kwargs={"max_new_tokens": 8}, max_steps=1,
               per_device_train_batch_size=2, num_generations=2)  # few rows: the tool prompts are long
    stock = train(GRPOTrainer, tiny_model_dir, tmp_path, **run)
    with pytest.warns(UserWarning, match="turns generated after tool results run as stock"):
        ours = train(LenBalanceGRPOTrainer, tiny_model_dir, tmp_path, **run)
    assert ours.state.log_history[0]["tools/call_frequency"] == 1.0
    assert ours.lenbalance.rounds == 1  # the first turn was captured and trained the predictor
    assert_same_update(stock, ours)


def test_beam_search_generates_as_stock_and_the_update_is_stocks(tiny_model_dir, tmp_path):
    run = dict(generation_kwargs={"num_beams": 2}, max_steps=1)
    stock = train(GRPOTrainer, tiny_model_dir, tmp_path, **run)
    with pytest.warns(UserWarning, match="beam search"):
        ours = train(LenBalanceGRPOTrainer, tiny_model_dir, tmp_path, **run)
    assert ours.lenbalance.rounds == 0  # unpredicted
    assert "lenbalance/train/pad_frac" in ours.state.log_history[0]  # training-side balancing still ran
    assert_same_update(stock, ours)


def test_mask_truncated_completions_with_every_completion_truncated_matches_stock(tiny_model_dir, tmp_path):
    """A random tiny model never emits eos in 8 tokens: every completion is truncated, so every mask is empty."""
    run = dict(mask_truncated_completions=True, max_completion_length=8, max_steps=1)
    stock = train(GRPOTrainer, tiny_model_dir, tmp_path, **run)
    ours = train(LenBalanceGRPOTrainer, tiny_model_dir, tmp_path, **run)
    assert ours.state.log_history[0]["completions/clipped_ratio"] == 1.0
    assert [r.get("loss") for r in stock.state.log_history] == [r.get("loss") for r in ours.state.log_history]
    for (name, p), q in zip(stock.model.named_parameters(), ours.model.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe", "gpt2", "nemotron_h"])
def test_capture_reads_lm_heads_input_on_every_family(family_model_dir, family):
    """The captured final hidden state is what lm_head reads (GPT-2's `ln_f`, NemotronH's `norm_f`: no `.norm`), and
    an intermediate `feature_layer` is found in every family's blocks."""
    from rl_lenbalance.generation.capture import GenerationCapture
    from rl_lenbalance.predictor import HeadConfig, PLPHead

    model = AutoModelForCausalLM.from_pretrained(family_model_dir(family), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(family_model_dir(family), padding_side="left")
    batch = tokenizer(["Write a story about a cat", "Write a story about a dog"], return_tensors="pt")
    prompts = batch["input_ids"].tolist()  # unpadded: a padded row's prefill differs from a plain forward (Mamba)
    with torch.no_grad():
        expected = model(**batch).logits[:, -1]  # the logits of each prompt's last token
    for feature_layer in (-1, 1):
        config = LenBalanceConfig(pooling="last", feature_layer=feature_layer)
        head = PLPHead(HeadConfig(model.config.get_text_config().hidden_size, max_length=4, pooling="last"))
        capture = GenerationCapture(model, head.predict, config, max_length=4)
        with capture.capture(prompts) as result:
            model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert result.steps == 3 and result.prediction_steps[0] == 0  # streamed to the end, predicted at step 0
        if feature_layer == -1:  # pooling "last": the prompt feature is the last prompt token's hidden state
            torch.testing.assert_close(capture.lm_head(result.prompt_features), expected, rtol=1e-4, atol=1e-4)
        assert not any(m._forward_hooks for m in model.modules())


def test_a_model_whose_decoder_layers_cannot_be_found_names_feature_layer(family_model_dir):
    from rl_lenbalance.generation.capture import GenerationCapture
    from rl_lenbalance.predictor import HeadConfig, PLPHead

    model = AutoModelForCausalLM.from_pretrained(family_model_dir("gpt2"), dtype=torch.float32)
    model.config.n_layer = 3  # no block list of that length
    head = PLPHead(HeadConfig(64, max_length=4))
    with pytest.raises(ValueError, match="lenbalance.feature_layer=1: .*decoder layers of GPT2LMHeadModel"):
        GenerationCapture(model, head.predict, LenBalanceConfig(feature_layer=1), max_length=4)


@pytest.mark.parametrize("family", ["gpt2", "nemotron_h"])
def test_grpo_trains_balanced_on_gpt2_and_nemotron_h_and_the_update_is_stocks(family_model_dir, tmp_path, family):
    """GPT-2's absolute positions make a row's outputs depend on its left padding (TRL passes no position ids): its
    prompt padding stays stock's. GPT-2's dropout is off: rows regrouped draw other dropout masks (equal in
    distribution, not bit for bit). NemotronH: Mamba2, MoE (eager experts: the grouped matmul has no float64)."""
    run = dict(max_steps=1, disable_dropout=True,
               model_kwargs={"experts_implementation": "eager"} if family == "nemotron_h" else None)
    stock = train(GRPOTrainer, family_model_dir(family), tmp_path, **run)
    ours = train(LenBalanceGRPOTrainer, family_model_dir(family), tmp_path, **run)
    assert ours.lenbalance.rounds == 1
    assert ours._lenbalance_loss.left_padding_free == (family != "gpt2")
    assert_same_update(stock, ours, tol=1e-8 if family == "gpt2" else 1e-6)  # NemotronH casts logits to float32


def test_steps_per_generation_not_a_multiple_of_grad_acc_trains_as_stock(tiny_model_dir, tmp_path):
    """steps_per_generation=3, gradient_accumulation_steps=2: the second optimizer step takes one micro-batch of each
    generation batch; nothing can be regrouped, so training is stock's (a one-time warning says why)."""
    run = dict(steps_per_generation=3, max_steps=2, per_device_train_batch_size=2, num_generations=2)
    stock = train(GRPOTrainer, tiny_model_dir, tmp_path, **run)
    with pytest.warns(UserWarning, match="steps_per_generation=3 is not a multiple of gradient_accumulation_steps=2"):
        ours = train(LenBalanceGRPOTrainer, tiny_model_dir, tmp_path, **run)
    assert ours.lenbalance.rounds == 2  # generation was still captured
    assert_same_update(stock, ours, tol=1e-15)  # the same computation: bit for bit


@pytest.mark.parametrize("loss_type", ["vespo", "cispo", "sapo", "luspo"])  # dapo, grpo, dr_grpo: distributed test
def test_exact_losses_match_stock_on_and_off_policy(eos_tiny_model_dir, tmp_path, loss_type):
    """vespo and cispo normalise by the global `num_items_in_batch`, like dapo (vespo's sequence weights are per row);
    sapo and luspo average per row, reweighted in unequal micro-batches. Two optimizer steps on one generation batch
    (num_iterations=2): the second is off-policy, so importance ratios and clipping matter."""
    run = dict(loss_type=loss_type, num_iterations=2, max_steps=2, max_completion_length=24)
    stock = train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    logged = next(r for r in ours.state.log_history if "lenbalance/train/pad_frac" in r)
    assert logged["lenbalance/train/pad_frac"] < logged["lenbalance/train/pad_frac_stock"]  # rows were regrouped
    assert_same_update(stock, ours)


def test_moe_router_aux_loss_trains_stock_micro_batches_and_is_exact(family_model_dir, tmp_path):
    """Qwen3-MoE declares router_aux_loss_coef=0.001, so TRL adds each micro-batch's load-balancing loss: regrouping
    rows would change it, so rl-lenbalance keeps stock's micro-batches (padding columns cut) with a note, where it
    once refused. With router_aux_loss_coef=0 rows are regrouped. Both updates are stock's."""
    model_dir, run = family_model_dir("qwen3_moe"), dict(max_steps=1, model_kwargs={"experts_implementation": "eager"})
    with pytest.warns(UserWarning, match=r"router_aux_loss_coef != 0.*keeps stock's micro-batches"):
        ours = train(LenBalanceGRPOTrainer, model_dir, tmp_path, **run)
    assert ours._lenbalance_loss.tuner.candidates == ["stock", "stock_trimmed"]
    assert_same_update(train(GRPOTrainer, model_dir, tmp_path, **run), ours)
    stock = train(GRPOTrainer, model_dir, tmp_path, router_aux_loss_coef=0.0, **run)
    ours = train(LenBalanceGRPOTrainer, model_dir, tmp_path, router_aux_loss_coef=0.0, **run)
    assert "sorted" in ours._lenbalance_loss.tuner.candidates
    assert_same_update(stock, ours)


def test_vllm_and_continuous_batching_are_admitted_and_images_generate_as_stock_with_a_note(tiny_model_dir, tmp_path,
                                                                                            monkeypatch):
    """vLLM and continuous batching reach stock's `_generate_single_turn` with every argument (through
    `run_admitted`, which learns from the completions); multimodal generations run as stock with one note."""
    calls = []

    def stock(self, *args, **kwargs):
        calls.append((args, kwargs))
        return [[7, 8, self.eos_token_ids[0]] for _ in args[0]], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", stock)
    trainer = LenBalanceGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=varied_reward,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left"),
        args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=8),
        train_dataset=Dataset.from_list([{"prompt": "Hi"}] * 4), lenbalance_config=LenBalanceConfig(max_overhead=1.0))
    for attribute in ("use_vllm", "use_transformers_continuous_batching"):
        setattr(trainer, attribute, True)
        ids, logprobs = trainer._generate_single_turn([[1, 2]], None, {}, 4, has_tool_images=False)
        assert calls[-1] == (([[1, 2]], None, {}, 4), {"has_tool_images": False})
        assert ids == [[7, 8, trainer.eos_token_ids[0]]] and logprobs is None
        setattr(trainer, attribute, False)
    assert trainer.lenbalance.rounds == 2  # each round's completions reached the predictor
    with pytest.warns(UserWarning, match="ran as stock TRL") as record:
        for _ in range(2):
            trainer._generate_single_turn([[1, 2]], [["x"]], {}, 4, has_tool_images=False)
            assert calls[-1] == (([[1, 2]], [["x"]], {}, 4), {"has_tool_images": False})
    assert sum("rl-lenbalance" in str(w.message) for w in record) == 1  # once per run
    assert len(calls) == 4 and trainer.lenbalance.rounds == 2
