"""compacted_generate decodes what `model.generate` decodes, while finished rows really leave the batch."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rl_lenbalance.generation.decode import compacted_generate, exact_sampling, sample_rows, unsupported_options

pytestmark = pytest.mark.compat  # also on transformers 5.17 (`make test-compat`)

QUESTIONS = [
    "What is 7 times 8? Answer with the number only.",
    "Write a haiku about the sea.",
    "Say hi.",
    "List three primary colors, comma separated.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning' into French.",
]
TRL_LIKE = dict(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=32, pad_token_id=2, bos_token_id=1,
                eos_token_id=[2], min_p=None, repetition_penalty=1.0, cache_implementation=None, disable_compile=True)


def _load(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def _chat_prompts(tokenizer, questions=QUESTIONS) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        for q in questions
    ]


def _reference(model, prompts, config, pad_token_id) -> list[list[int]]:
    """`model.generate` on the left-padded batch, each row cut after its first eos as TRL does."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    eos = set(config.eos_token_id)
    completions = []
    for row in out[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in eos]
        completions.append(row[: ends[0] + 1] if ends else row)
    return completions


@pytest.fixture(scope="module")
def tiny(eos_tiny_model_dir):
    """The tiny model with a random eos embedding (conftest), so sampled rows end at varied lengths."""
    model, tokenizer = _load(eos_tiny_model_dir)
    questions = QUESTIONS + ["Hi", "Tell me a long story about a dragon and a knight.", "ok", "Why?"]
    return model, tokenizer, _chat_prompts(tokenizer, questions)


def test_greedy_equals_generate_on_the_embedded_model(embedded_dir):
    model, tokenizer = _load(embedded_dir)
    prompts = _chat_prompts(tokenizer)
    config = GenerationConfig(do_sample=False, max_new_tokens=48, pad_token_id=2, bos_token_id=1, eos_token_id=[2])
    ours = compacted_generate(model, prompts, config, pad_token_id=tokenizer.pad_token_id)
    assert len({len(c) for c in ours}) >= 3, "rows of one length would not exercise compaction"
    assert ours == _reference(model, prompts, config, tokenizer.pad_token_id)


@pytest.mark.parametrize("min_finished", [1, 3])
def test_finished_rows_leave_the_batch(tiny, min_finished):
    model, tokenizer, prompts = tiny
    active = list(range(len(prompts)))  # original row of each active row, as the on_compact calls imply
    decode_rows: list[list[int]] = []  # the active rows seen by each decode forward
    compactions: list[torch.Tensor] = []

    def on_compact(keep: torch.Tensor) -> None:
        compactions.append(keep)
        active[:] = [active[i] for i in keep.tolist()]

    def count_rows(module, args, output):
        assert output.shape[0] == len(active)
        if output.shape[1] == 1:  # a decode step; the prefill sees the whole prompt
            decode_rows.append(list(active))

    hook = model.model.norm.register_forward_hook(count_rows)
    try:
        torch.manual_seed(1)
        completions = compacted_generate(model, prompts, GenerationConfig(**TRL_LIKE, top_k=0), pad_token_id=2,
                                         on_compact=on_compact, min_finished=min_finished)
    finally:
        hook.remove()

    lengths = [len(c) for c in completions]
    assert len(set(lengths)) >= 3 and min(lengths) < TRL_LIKE["max_new_tokens"]
    assert len(decode_rows) == max(lengths) - 1  # no forward after the last token
    for step, rows in enumerate(decode_rows, start=1):  # the forward that yields token step + 1
        unfinished = [r for r in range(len(prompts)) if lengths[r] > step]
        assert set(unfinished) <= set(rows) and rows == sorted(rows)
        finished_in_batch = len(rows) - len(unfinished)
        assert finished_in_batch < min_finished  # compaction ran as soon as min_finished rows were done
    assert len(decode_rows[-1]) < len(prompts)
    assert all(keep.dtype == torch.long and torch.all(keep[1:] > keep[:-1]) for keep in compactions)
    if min_finished == 1:
        assert sum(map(len, decode_rows)) == sum(lengths) - len(prompts)  # each decode slot makes a kept token


@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=0),
        dict(top_k=None),  # transformers fills in its default top_k=50
        dict(top_k=20, top_p=0.9, temperature=0.7, min_p=0.05, repetition_penalty=1.3),
    ],
)
@pytest.mark.parametrize("compact", [True, False])
def test_sampling_draws_what_generate_draws(tiny, options, compact):
    """Token for token, with finished rows leaving the batch or not, and the random stream left where stock's is."""
    model, tokenizer, prompts = tiny
    config = GenerationConfig(**{**TRL_LIKE, **options})
    torch.manual_seed(2)
    ours = compacted_generate(model, prompts, config, pad_token_id=2, min_finished=1 if compact else len(prompts) + 1)
    after_ours = torch.rand(3)
    torch.manual_seed(2)
    assert ours == _reference(model, prompts, config, tokenizer.pad_token_id)
    assert torch.equal(after_ours, torch.rand(3))
    assert len({len(c) for c in ours}) >= 3, "rows of one length would not exercise compaction"


def test_sample_rows_is_torch_multinomial_on_the_full_batch():
    assert exact_sampling("cpu")
    probs = torch.softmax(3 * torch.randn(9, 50), -1)
    torch.manual_seed(4)
    full = torch.multinomial(probs, 1).squeeze(1)
    rows = torch.tensor([0, 2, 3, 8])
    torch.manual_seed(4)
    assert torch.equal(sample_rows(probs[rows], rows, 9), full[rows])
    torch.manual_seed(4)  # a sampler that draws noise for the kept rows only takes other tokens
    wrong = sample_rows(probs[rows], torch.arange(4), 4)
    assert not torch.equal(wrong, full[rows])


def test_sampled_completions_are_well_formed_and_top_k_1_is_greedy(tiny):
    model, tokenizer, prompts = tiny
    max_new = TRL_LIKE["max_new_tokens"]
    torch.manual_seed(3)
    sampled = compacted_generate(model, prompts, GenerationConfig(**TRL_LIKE, top_k=0), pad_token_id=2)
    for completion in sampled:
        assert 2 not in completion[:-1]
        assert completion[-1] == 2 or len(completion) == max_new

    top1 = compacted_generate(model, prompts, GenerationConfig(**TRL_LIKE, top_k=1), pad_token_id=2)
    greedy = compacted_generate(model, prompts, GenerationConfig(**{**TRL_LIKE, "do_sample": False}), pad_token_id=2)
    assert top1 == greedy


def test_trl_like_configs_are_supported():
    assert unsupported_options(GenerationConfig(**TRL_LIKE, top_k=0)) == []
    assert unsupported_options(GenerationConfig(**TRL_LIKE, top_k=None)) == []
    assert unsupported_options(GenerationConfig(max_new_tokens=8, cache_implementation="dynamic", num_beams=1)) == []


@pytest.mark.parametrize(
    "option",
    [
        dict(min_new_tokens=5),
        dict(num_beams=2),
        dict(no_repeat_ngram_size=3),
        dict(suppress_tokens=[5]),
        dict(bad_words_ids=[[5]]),
        dict(typical_p=0.9),
        dict(forced_eos_token_id=2),
        dict(stop_strings=["\n"]),
        dict(use_cache=False),
        dict(cache_implementation="static"),
    ],
)
def test_other_options_are_flagged(option):
    assert unsupported_options(GenerationConfig(**{**TRL_LIKE, **option})) == list(option)


def test_unsupported_options_are_refused(tiny):
    model, _, prompts = tiny
    with pytest.raises(ValueError, match="min_new_tokens"):
        compacted_generate(model, prompts, GenerationConfig(max_new_tokens=4, min_new_tokens=2), pad_token_id=2)


@pytest.mark.parametrize("compact", [True, False])
def test_a_probe_then_a_regrouped_continuation_decodes_what_one_call_decodes(embedded_dir, compact):
    """Early re-bucketing's two calls: rows still running after the probe are continued in another order, from
    their prompt + probe tokens, and end exactly as one greedy call ends them (the real model: varied lengths)."""
    model, tokenizer = _load(embedded_dir)
    prompts = _chat_prompts(tokenizer)
    config = GenerationConfig(do_sample=False, max_new_tokens=48, pad_token_id=2, bos_token_id=1, eos_token_id=[2])
    min_finished = 1 if compact else len(prompts) + 1
    expected = compacted_generate(model, prompts, config, pad_token_id=2)
    probe = compacted_generate(model, prompts, config, pad_token_id=2, max_steps=22, min_finished=min_finished)
    running = [i for i, c in enumerate(probe) if c[-1] != 2]
    assert 0 < len(running) < len(prompts) and all(len(probe[i]) == 22 for i in running)
    assert all(probe[i] == expected[i] for i in range(len(prompts)) if i not in running)
    order = running[::-1]  # a different batch composition and order
    continued = compacted_generate(model, [prompts[i] for i in order], config, pad_token_id=2,
                                   prefixes=[probe[i] for i in order], min_finished=min_finished)
    assert continued == [expected[i] for i in order]


def test_prefixes_of_different_lengths_are_refused(tiny):
    model, _, prompts = tiny
    with pytest.raises(ValueError, match="one length"):
        compacted_generate(model, prompts[:2], GenerationConfig(max_new_tokens=8), pad_token_id=2,
                           prefixes=[[5], [5, 6]])
