"""Online vs offline: the head trained as in the GRPO loop (rounds of fresh rollouts, replay buffer, a few AdamW
steps per round, the engine's default settings) against the same head trained offline on the same data."""

from __future__ import annotations

import torch

from ..config import LenBalanceConfig
from ..predictor import HeadConfig, OnlineTrainer, PLPHead
from .dataset import BenchData
from .metrics import mae
from .predictors import PREDICTORS, make_pairs
from .train import FitSettings, score, train_predictor

REPORT_STEPS = (0, 32)


def train_online(data: BenchData, round_prompts: int, seed: int) -> tuple[PLPHead, list[dict]]:
    """Feed the train prompts (seeded order) in rounds of `round_prompts` prompts with all their completions; before
    each round's update, record the head's honest error on that round at t = 0 and t = 32, as the engine does."""
    lb = LenBalanceConfig()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = PLPHead(HeadConfig(int(data.meta["hidden_size"]), data.max_length, lb.num_bins, lb.ce_weight,
                                  lb.dropout, lb.pooling, int(data.meta["feature_layer"]))).eval()
        trainer = OnlineTrainer(head, lb.predictor_lr, lb.replay_buffer_size, lb.predictor_batch_size,
                                lb.predictor_steps_per_round, seed)
        train_prompts = torch.unique(data.sample_prompt[data.rows("train")])
        order = train_prompts[torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(seed))]
        history = []
        for i in range(0, len(order), round_prompts):
            rows = torch.nonzero(torch.isin(data.sample_prompt, order[i : i + round_prompts])).flatten()
            pairs = make_pairs(data, PREDICTORS["plp"].features, rows, data.steps)
            honest = {f"mae@{t}": trainer.mean_abs_error(pairs.at(t).x, pairs.at(t).y)
                      for t in REPORT_STEPS if len(pairs.at(t).y)}
            trainer.observe(pairs.x, pairs.y)
            history.append({"round": len(history), "completions": len(rows), **honest})
    return head, history


def online_vs_offline(data: BenchData, round_prompts: int, settings: FitSettings) -> dict:
    """Test MAE per step of the online head and of the offline PLP head, and the relative gap."""
    spec = PREDICTORS["plp"]
    online_head, history = train_online(data, round_prompts, settings.seed)
    online = score(spec, online_head, data)
    offline = score(spec, train_predictor(spec, data, settings), data)
    test = make_pairs(data, spec.features, data.rows("test"), data.steps)
    return {
        "rounds": len(history),
        "round_prompts": round_prompts,
        "settings": "LenBalanceConfig defaults (lr, buffer, batch, steps per round)",
        "online_mae": {t: online[t]["mae"] for t in online},
        "offline_mae": {t: offline[t]["mae"] for t in offline},
        "gap_pct": {t: 100 * (online[t]["mae"] / offline[t]["mae"] - 1) for t in online if t in offline},
        "online_mae_all_steps": mae(online_head.predict(test.x), test.y),
        "honest_round_mae": history,
    }
