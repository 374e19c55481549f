"""The shared-prompt loss forward (`rl_lenbalance.loss.shared_prompt`) gives stock's per-token log-probs, entropies
and gradients with each group's prompt run once, and its planner places every row once under a token budget.

"Stock" is the padded micro-batch through the model, as TRL runs it: `model(input_ids, attention_mask)`, then the
log-softmax of the temperature-scaled logits of the last `logits_to_keep + 1 .. 1` columns (TRL's math in the
model's dtype); for the fused head, the real `GRPOTrainer._get_per_token_logps_and_entropies`."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import gap, grad_gap
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from rl_lenbalance.cli.recipe import CHECKPOINTING
from rl_lenbalance.loss import shared_prompt
from rl_lenbalance.loss.packed import packed_logps_and_entropies
from rl_lenbalance.loss.shared_prompt import (
    plan_shared_prompt,
    prompt_groups,
    shared_prompt_logps_and_entropies,
    shared_prompt_unsupported,
)

pytestmark = pytest.mark.compat  # also on transformers 5.17 (`make test-compat`)

TEMPERATURE = 0.7
PROMPT, COMPLETION = 8, 7  # the micro-batch's prompt and completion widths
# rows as (group, prompt length, completion length), groups interleaved: prompts of 3 lengths (two left-padded), a
# one-token prompt, a group of one row, and an empty completion
ROWS = [(0, 8, 7), (1, 5, 3), (0, 8, 2), (2, 1, 4), (1, 5, 7), (3, 6, 5), (1, 5, 0), (0, 8, 6), (2, 1, 1)]


def make_batch(vocab: int, pad: int, rows=ROWS, seed: int = 1):
    """TRL's layout for `rows`; rows of one group share their prompt tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompts = {g: torch.randint(10, vocab, (length,), generator=generator) for g, length, _ in rows}
    input_ids = torch.randint(10, vocab, (len(rows), PROMPT + COMPLETION), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for i, (group, prompt, completion) in enumerate(rows):
        input_ids[i, PROMPT - prompt:PROMPT] = prompts[group]
        attention_mask[i, PROMPT - prompt:PROMPT + completion] = 1
    return input_ids.masked_fill(attention_mask == 0, pad), attention_mask


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    def load(dtype=torch.float64, attn="sdpa"):
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation=attn).eval()

    return load


def stock(model, input_ids, attention_mask, temperature=TEMPERATURE):
    """The padded forward and TRL's log-softmax of the completion's logits, in the model's dtype."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -COMPLETION - 1:-1]
    log_p = (logits / temperature).log_softmax(-1)
    mask = attention_mask[:, -COMPLETION:]
    logps = log_p.gather(-1, input_ids[:, -COMPLETION:, None]).squeeze(-1)
    return logps * mask, -(log_p.exp() * log_p).sum(-1) * mask


def loss_of(logps, entropy, attention_mask):
    mask = attention_mask[:, -COMPLETION:]
    return (logps * mask).sum() + 0.3 * (entropy * mask).sum()


def grads(model, loss, retain=False):
    params = [p for p in model.parameters() if p.requires_grad]
    found = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain)
    return [torch.zeros_like(p) if g is None else g.double() for p, g in zip(params, found)]


def shared(model, input_ids, attention_mask, **kwargs):
    return shared_prompt_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE,
                                             compute_entropy=True, **kwargs)


@pytest.fixture
def float64_norm(monkeypatch):
    """Llama's RMSNorm in the model's dtype. transformers computes it in float32 even for a float64 model, so the
    gradient reaching a shared prompt token is rounded to float32 once for the sum of its G uses, where stock rounds
    each copy's share (~1e-7 relative, the only float64 difference; `test_float64_gradients_are_exact`)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


@pytest.mark.parametrize("dtype,attn,tolerance,grad_tolerance", [
    (torch.float64, "sdpa", 1e-12, 1e-6), (torch.float32, "sdpa", 5e-5, 1e-5), (torch.float32, "eager", 5e-5, 1e-5)])
def test_values_and_gradients_are_stocks(llama, dtype, attn, tolerance, grad_tolerance):
    model = llama(dtype, attn)
    assert shared_prompt_unsupported(model) is None
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    mask = attention_mask[:, -COMPLETION:].bool()
    reference = stock(model, input_ids, attention_mask)
    ours = shared(model, input_ids, attention_mask, token_chunk=3)
    given_groups = shared(model, input_ids, attention_mask, groups=torch.tensor([g for g, _, _ in ROWS]))
    assert ours[0].dtype == dtype and ours[0].shape == (len(ROWS), COMPLETION)
    for values in ours:
        assert torch.isfinite(values).all() and (values[~mask] == 0).all()
    assert (ours[0][mask] < 0).all() and (ours[1][mask] > 0).all()
    for mine, again, theirs in zip(ours, given_groups, reference):
        assert gap(mine, theirs) < tolerance
        assert gap(again, mine) == 0.0
    expected = grads(model, loss_of(*reference, attention_mask))
    assert grad_gap(grads(model, loss_of(*ours, attention_mask)), expected) < grad_tolerance


def test_float64_gradients_are_exact(llama, float64_norm):
    """With the norm in float64 too, the shared prompt's gradient is the sum of stock's copies to rounding."""
    model = llama()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    expected = grads(model, loss_of(*stock(model, input_ids, attention_mask), attention_mask))
    assert grad_gap(grads(model, loss_of(*shared(model, input_ids, attention_mask), attention_mask)), expected) < 1e-12


def test_the_model_sees_each_prompt_once(llama):
    """The forward that ran: one sequence holding each group's prompt once plus one token per row, and logits only
    where a completion token is predicted."""
    model = llama()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    seen = []
    hooks = [model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape[:2]))),
             model.get_output_embeddings().register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape[:2])))]
    try:
        shared(model, input_ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    prompts = {g: p for g, p, c in ROWS if c}  # a row with no completion token is left out
    rows = [c for _, _, c in ROWS if c]
    expected_tokens = sum(p - 1 for p in prompts.values()) + len(rows) + sum(c - 1 for c in rows)
    assert seen == [(1, expected_tokens), (1, sum(rows))]
    assert expected_tokens < sum(p + c - 1 for _, p, c in ROWS if c)  # fewer than packed's


def test_a_group_split_across_microbatches_sums_to_stocks_gradient(llama, float64_norm):
    """Each part of a split group shares its own copy of the prompt; the parts' gradients add up to stock's."""
    model = llama()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    reference = stock(model, input_ids, attention_mask)
    expected = grads(model, loss_of(*reference, attention_mask))
    parts = [[0, 1, 3, 4], [2, 5, 6, 7, 8]]  # groups 0, 1 and 2 in both parts
    total = 0.0
    for rows in parts:
        ours = shared(model, input_ids[rows], attention_mask[rows])
        for mine, theirs in zip(ours, reference):
            assert gap(mine, theirs[rows]) < 1e-12
        total = total + loss_of(*ours, attention_mask[rows])
    assert grad_gap(grads(model, total), expected) < 1e-12


def test_one_row_per_group_is_packed(llama):
    model = llama()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    ours = shared(model, input_ids, attention_mask, groups=torch.arange(len(ROWS)))
    packed = packed_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, temperature=TEMPERATURE,
                                        compute_entropy=True)
    for mine, theirs in zip(ours, packed):
        assert gap(mine, theirs) < 1e-12


def test_fused_lm_head_is_trls_own(llama, tiny_model_dir, tmp_path):
    """Through TRL's fused LM head, the values and gradients of the real trainer's method. The head keeps float32
    statistics in a float64 model, and its gradients then differ by ~2e-7 relative (values to 1e-10)."""
    model = llama()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True,
                      max_completion_length=COMPLETION, report_to="none", temperature=TEMPERATURE, bf16=False,
                      **{CHECKPOINTING: False})
    trainer = GRPOTrainer(model=model, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), args=args,
                          reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          train_dataset=Dataset.from_list([{"prompt": "Hi"}] * 8))
    model = trainer.model.eval()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    theirs = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, COMPLETION,
                                                        compute_entropy=True)[:2]
    ours = shared_prompt_logps_and_entropies(model, input_ids, attention_mask, COMPLETION, compute_entropy=True,
                                             fused_lm_head=True)
    for mine, reference in zip(ours, theirs):
        assert gap(mine, reference) < 1e-10
    expected = grads(model, loss_of(*theirs, attention_mask))
    assert grad_gap(grads(model, loss_of(*ours, attention_mask)), expected) < 1e-6


def test_the_comparison_fails_when_branches_see_each_other(llama, monkeypatch):
    model = llama()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    reference = stock(model, input_ids, attention_mask)[0]
    original = shared_prompt._tree

    def leaky(*args, **kwargs):
        tree = original(*args, **kwargs)
        tree.allowed = torch.ones_like(tree.allowed).tril()
        return tree

    monkeypatch.setattr(shared_prompt, "_tree", leaky)
    assert gap(shared(model, input_ids, attention_mask)[0], reference) > 1e-3


def test_bad_input_is_refused(llama):
    model = llama()
    input_ids, attention_mask = make_batch(model.config.vocab_size, model.config.pad_token_id)
    with pytest.raises(ValueError, match="different prompts"):
        shared(model, input_ids, attention_mask, groups=torch.zeros(len(ROWS), dtype=torch.long))
    broken = attention_mask.clone()
    broken[0, PROMPT + 1] = 0  # a hole in a completion
    with pytest.raises(ValueError, match="TRL's layout"):
        shared(model, input_ids, broken)
    assert "dense 4D mask" in shared_prompt_unsupported(llama(torch.float32, "flex_attention"), probe=False)


def test_prompt_groups_follow_the_prompts(llama):
    input_ids, attention_mask = make_batch(1000, 0)
    assert prompt_groups(input_ids, attention_mask, COMPLETION).tolist() == [g for g, _, _ in ROWS]


def plan_cost(rows, groups, prompts, completions):
    return sum({groups[r]: prompts[r] for r in rows}.values()) + sum(completions[r] for r in rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.lists(st.integers(0, 80), min_size=1, max_size=9)),
                min_size=1, max_size=8),
       st.integers(20, 400), st.integers(1, 6), st.randoms(use_true_random=False))
def test_the_planner_places_every_row_once_within_the_budget(spec, budget, minimum, random):
    rows = [(g, prompt, c) for g, (prompt, completions) in enumerate(spec) for c in completions]
    random.shuffle(rows)
    groups, prompts, completions = ([row[k] for row in rows] for k in range(3))
    plan = plan_shared_prompt(groups, prompts, completions, budget, minimum)
    assert sorted(r for part in plan for r in part) == list(range(len(rows)))
    assert all(plan) and len(plan) >= min(minimum, len(rows))
    for part in plan:
        cost = plan_cost(part, groups, prompts, completions)
        assert cost <= budget or (len(part) == 1 and cost > budget)
    if all(plan_cost([r for r in range(len(rows)) if groups[r] == g], groups, prompts, completions) <= budget
           for g in set(groups)) and minimum == 1:  # every group fits: none is split
        assert all(len({tuple(p) for p in plan if any(groups[r] == g for r in p)}) == 1 for g in set(groups))


def test_the_planner_keeps_groups_whole_and_splits_the_ones_too_large():
    groups = [0] * 4 + [1] * 4 + [2] * 4
    prompts = [50] * 4 + [30] * 4 + [200] * 4
    completions = [10, 20, 30, 40, 5, 5, 5, 5, 100, 100, 100, 100]
    plan = plan_shared_prompt(groups, prompts, completions, token_budget=520)
    parts = [sum(1 for part in plan if any(groups[r] == g for r in part)) for g in range(3)]
    assert parts == [1, 1, 2]  # groups 0 and 1 (150 and 50 tokens) whole, group 2 (600) in two parts
    assert max(plan_cost(p, groups, prompts, completions) for p in plan) <= 520
    with pytest.raises(ValueError, match="share a group but not a prompt length"):
        plan_shared_prompt([0, 0], [3, 4], [1, 1], 10)


def test_the_training_plan_keeps_each_step_and_each_group_together():
    """Two optimizer steps (stock's shuffle decides each row's), two micro-batches each: every row trains in its own
    step, each micro-batch holds whole groups where they fit, and the step's micro-batches share its tokens."""
    from rl_lenbalance.loss import STRATEGIES, PassRows

    groups = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    steps = [0, 1] * 8  # each group half in each step
    rows = PassRows(completion_lengths=[10 * (i % 4 + 1) for i in range(16)], prompt_lengths=[20] * 16, steps=steps,
                    groups=groups, shuffle=list(range(16)), num_ranks=1, rank=0, steps_per_generation=4,
                    microbatches_per_step=2)
    plan = STRATEGIES["shared_prompt"].plan(rows)
    assert sorted(plan.rows) == list(range(16)) and not plan.exchange and len(plan.sizes) == 4
    bounds = [sum(plan.sizes[:i]) for i in range(5)]
    parts = [plan.rows[a:b] for a, b in zip(bounds, bounds[1:])]
    assert [{steps[r] for r in part} for part in parts] == [{0}, {0}, {1}, {1}]
    for part in parts:  # a group's rows of one step are never split over its two micro-batches
        for g in {groups[r] for r in part}:
            assert {r for r in part if groups[r] == g} == {r for r in range(16) if groups[r] == g and
                                                           steps[r] == steps[part[0]]}
