"""Backends that schedule requests themselves: vLLM (a stand-in with TRL's interface: vLLM cannot be installed here)
and transformers continuous batching (real, on CPU). Requests are submitted longest-predicted first, completions come
back to their rows, the head learns from replayed features, and what is learned is stock's."""

from __future__ import annotations

import pytest
import torch
from helpers import make_args, make_trainer
from stand_ins import StandInVLLM, with_stand_in
from trl import GRPOTrainer

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer
from rl_lenbalance.schedule import admission_order, balance_rows


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_vllm_requests_go_longest_predicted_first_and_the_update_is_stocks(eos_tiny_model_dir, tmp_path, mode):
    args = make_args(tmp_path, max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                     learning_rate=1e-2, optim="sgd", max_grad_norm=0.0, bf16=False)

    def build(cls, **kwargs):
        torch.manual_seed(0)
        trainer = make_trainer(cls, eos_tiny_model_dir, args, **kwargs)
        trainer.model.double()  # float64: regrouped sums agree to ~1e-12, so any misplaced completion would show
        return with_stand_in(trainer, mode)

    initial = build(GRPOTrainer).model
    stock = build(GRPOTrainer)
    stock.train()
    # the plain head: trained on one round of 2-3 prompts, the context head's prior puts every row's median in the naive
    # estimate's bin (one prediction for all: stock's order), and this test is about the order following predictions
    ours = build(LenBalanceGRPOTrainer, lenbalance_config=LenBalanceConfig(training_plan="sorted", max_overhead=1.0,
                                                                           context_features=False))
    ours.train()

    submitted = list(zip(stock.vllm_generation.submitted, ours.vllm_generation.submitted, strict=True))
    assert all(sorted(mine) == sorted(theirs) for theirs, mine in submitted)  # the same requests
    assert submitted[0][0] == submitted[0][1]  # round 1: the head has seen nothing, stock's order
    assert any(theirs != mine for theirs, mine in submitted[1:])  # then longest predicted first
    if mode == "server":  # each group's rows stay together: the server makes a group from one request
        for _, mine in submitted:
            assert all(len(set(mine[g : g + args.num_generations])) == 1 for g in range(0, len(mine), 4))
    moved = max((p - ours.model.get_parameter(n)).abs().max().item() for n, p in initial.named_parameters())
    assert moved > 1e-3  # training moved the weights
    for name, value in stock.model.named_parameters():  # completions came back to their rows: the same update
        rel = ((ours.model.get_parameter(name) - value).norm() / value.norm()).item()
        assert rel < 1e-8, (name, rel)  # float64 regrouped sums: ~1e-10 relative per tensor
    logged = [row for row in ours.state.log_history if "lenbalance/predictor/mae_static" in row]
    assert len(logged) == 3 and ours.lenbalance.trainer.buffer.size > 0  # replayed features trained the head
    assert all(row["lenbalance/gen/real_tokens"] > 0 for row in logged)


def test_a_round_through_a_scheduling_backend_submits_longest_predicted_first(eos_tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_lenbalance.generation.engine import LenBalanceEngine
    from rl_lenbalance.generation.rollout import Backend, RolloutSettings, _predict_prompt_lengths, run_admitted

    model = AutoModelForCausalLM.from_pretrained(eos_tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(eos_tiny_model_dir)
    prompts = [tokenizer(t)["input_ids"] for t in ["Hi", "Tell me a story", "2+2?", "Why?"] for _ in range(2)]
    stand_in = StandInVLLM("colocate", tokenizer.eos_token_id)

    def forward(input_ids, attention_mask, position_ids):
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)

    def submit(batch):
        return stand_in.generate(batch, None, 1, None)[1], None

    backend = Backend(decode=None, forward=forward, gather=lambda items: items, submit=submit)
    # the default head (context features on, their prior silent until trained): its first predictions already differ
    # between prompts, so the admission order has something to show
    engine = LenBalanceEngine(model, LenBalanceConfig(), max_length=32)
    with torch.no_grad():
        predicted = _predict_prompt_lengths(prompts, backend, engine)
    settings = RolloutSettings([tokenizer.eos_token_id], 32, admit_by_prediction=True)
    completions, logprobs, stats = run_admitted(prompts, backend, engine, settings)
    order = admission_order(predicted)
    assert stand_in.submitted[0] == [tuple(prompts[i]) for i in order] and order != sorted(order)
    replay = StandInVLLM("colocate", tokenizer.eos_token_id).generate([prompts[i] for i in order], None, 1, None)[1]
    assert [completions[i] for i in order] == replay  # each completion came back to the row that asked for it
    assert logprobs is None and stats.lengths == {i: len(c) for i, c in enumerate(completions)}
    assert sorted(stats.waves[0].capture.recorded) == [0, 8, 16, 24][: len(stats.waves[0].capture.recorded)]


def test_admission_orders_blocks_and_balances_equal_shares():
    assert admission_order([3, 9, 9, 1]) == [1, 2, 0, 3]
    assert admission_order([3, 3, 9, 9, 1, 1], group_size=2) == [2, 3, 0, 1, 4, 5]
    with pytest.raises(ValueError, match="whole blocks"):
        admission_order([1, 2, 3], group_size=2)
    predicted = [90, 80, 70, 60, 1, 2, 3, 4]  # rank 0 holds every long row
    plan = balance_rows(predicted, num_ranks=2)
    assert sorted(len(rows) for rows in plan) == [4, 4] and sorted(sum(plan, [])) == list(range(8))
    assert max(sum(predicted[i] for i in rows) for rows in plan) < 300  # in place: 300 on rank 0
    assert balance_rows(predicted, num_ranks=2, group_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # groups stay whole
    assert balance_rows([5, 5, 5, 5], num_ranks=2) == [[0, 1], [2, 3]]  # nothing to gain: nothing moves


def test_continuous_batching_is_predicted_and_greedy_completions_are_stocks(eos_tiny_model_dir, tmp_path):
    args = make_args(tmp_path, max_steps=2, use_transformers_continuous_batching=True,
                     generation_kwargs={"do_sample": False}, bf16=False, max_completion_length=16,
                     per_device_train_batch_size=4, gradient_accumulation_steps=1, num_generations=4)
    generated = {}
    for cls in (GRPOTrainer, LenBalanceGRPOTrainer):
        extra = {"lenbalance_config": LenBalanceConfig(max_overhead=1.0)} if cls is LenBalanceGRPOTrainer else {}
        trainer = make_trainer(cls, eos_tiny_model_dir, args, **extra)
        original = trainer._generate_and_score_completions
        rounds = []

        def record(inputs, original=original, rounds=rounds):
            batch = original(inputs)
            rounds.append(batch["completion_ids"].tolist())
            return batch

        trainer._generate_and_score_completions = record
        trainer.train()
        generated[cls] = rounds
    assert generated[GRPOTrainer] == generated[LenBalanceGRPOTrainer]
    logged = [row for row in trainer.state.log_history if "lenbalance/predictor/mae_static" in row]
    assert logged and trainer.lenbalance.rounds == 2 and trainer.lenbalance.trainer.buffer.size > 0
