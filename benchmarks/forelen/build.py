"""Generate each scenario with the policy model and keep what every predictor needs (float16, per sequence)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from rl_lenbalance.builtin.models import load_model
from rl_lenbalance.config import LenBalanceConfig
from rl_lenbalance.generation.capture import GenerationCapture, outputs_of, resolve_module
from rl_lenbalance.generation.decode import left_pad
from rl_lenbalance.predictor import POOLING_METHODS, HeadConfig, PLPHead, pool_tokens, token_entropy

from .config import BuildConfig
from .dataset import SPLITS, STEPS, BenchData, model_id, scenario_dir
from .prompts import chat, scenario_prompts
from .proxy import ProxyEncoder

SAMPLING = {  # chat-style sampling for single answers; pure temperature-1 sampling for RL rollouts
    "long": dict(temperature=0.7, top_p=0.9, top_k=0),
    "reasoning": dict(temperature=0.7, top_p=0.9, top_k=0),
    "rl": dict(temperature=1.0, top_p=1.0, top_k=0),
}
PROMPT_CHUNK = 8  # prompts per forward pass when pooling prompt features


def split_prompts(count: int, fractions: tuple[float, float, float], seed: int) -> torch.Tensor:
    """(count,) int8 split index per prompt: a seeded permutation cut by `fractions`, each split non-empty."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fractions[1] * count))
    n_test = max(1, round(fractions[2] * count))
    split = torch.zeros(count, dtype=torch.int8)
    split[order[count - n_val - n_test : count - n_test]] = SPLITS.index("val")
    split[order[count - n_test :]] = SPLITS.index("test")
    return split


def right_pad(ids: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([x[:width] + [-1] * (width - len(x[:width])) for x in ids], dtype=torch.int32)


@torch.no_grad()
def prompt_features(model, prompt_ids: list[list[int]], pad: int, feature: nn.Module, trail: nn.Module
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, len(POOLING_METHODS), H) prompt features under every pooling, and (P, H) TRAIL prompt means."""
    pooled, trail_mean = [], []
    for i in range(0, len(prompt_ids), PROMPT_CHUNK):
        input_ids, mask, positions = left_pad(prompt_ids[i : i + PROMPT_CHUNK], pad)
        with outputs_of({"feature": feature, "trail": trail}) as seen:
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        entropy, mask = token_entropy(logits), mask.bool()
        pooled.append(torch.stack([pool_tokens(seen["feature"], entropy, mask, m) for m in POOLING_METHODS], 1))
        trail_mean.append(pool_tokens(seen["trail"], entropy, mask, "mean"))
    return torch.cat(pooled).half(), torch.cat(trail_mean).half()


def completion_length(tokens: list[int], eos: set[int], cap: int) -> int:
    """Generated tokens up to and including the first eos; `cap` when it never came."""
    for i, token in enumerate(tokens):
        if token in eos:
            return i + 1
    return cap


@torch.no_grad()
def generate_batch(model, tokenizer, capture: GenerationCapture, trail: nn.Module, ids: list[list[int]],
                   max_new_tokens: int, sampling: dict) -> dict:
    """One generate call: lengths, completion ids, PLP features z_t and TRAIL states at STEPS, and timings."""
    input_ids, mask, _ = left_pad(ids, tokenizer.pad_token_id)
    calls = {"n": 0}
    trail_at = torch.zeros(len(ids), len(STEPS), model.config.hidden_size)

    def trail_hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if calls["n"] in STEPS[1:]:  # call k > 0 reads generated token k
            trail_at[:, STEPS.index(calls["n"])] = hidden[:, -1].float()
        calls["n"] += 1

    handle = trail.register_forward_hook(trail_hook)
    start = time.perf_counter()
    try:
        with capture.capture(ids) as result:
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=True, pad_token_id=tokenizer.pad_token_id, **sampling)
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    configured = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    generated = out[:, input_ids.size(1):].tolist()
    lengths = [completion_length(row, eos, max_new_tokens) for row in generated]
    width = result.prompt_features.size(1) * 3 + 2
    plp = torch.zeros(len(ids), len(STEPS), width, dtype=torch.float16)
    for j, step in enumerate(STEPS):
        if step in result.recorded:
            plp[:, j] = result.recorded[step]
    return {"lengths": lengths, "completions": [row[:n] for row, n in zip(generated, lengths)], "plp": plp,
            "trail": trail_at.half(), "seconds": seconds, "hook_seconds": result.seconds, "steps": result.steps}


def build_scenario(model, tokenizer, encoder: ProxyEncoder, scenario: str, config: BuildConfig, trail_layer: int,
                   log=print) -> BenchData:
    """Prompts -> split -> prompt features -> sampled completions with their captured features."""
    torch.manual_seed(config.seed)
    prompts = scenario_prompts(scenario, config.prompts[scenario], config.seed)
    texts = [tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    lb_config = LenBalanceConfig(feature_layer=config.feature_layer, record_every=8, predict_every=1)
    _, feature, _ = resolve_module(model, lb_config)
    trail = model.get_decoder().layers[trail_layer]
    pooled, trail_prompt = prompt_features(model, prompt_ids, tokenizer.pad_token_id, feature, trail)
    proxy = encoder.encode(prompts).half()
    k = config.samples_per_prompt if scenario == "rl" else 1
    rows = [p for p in range(len(prompts)) for _ in range(k)]
    hidden = model.config.hidden_size
    # The head only makes the in-loop cost real (it runs every step, as in training); its predictions are unused.
    head = PLPHead(HeadConfig(hidden, config.max_new_tokens, feature_layer=config.feature_layer)).eval()
    capture = GenerationCapture(model, head.predict, lb_config, config.max_new_tokens)
    batches = []
    for i in range(0, len(rows), config.batch_size):
        batch = rows[i : i + config.batch_size]
        batches.append(generate_batch(model, tokenizer, capture, trail, [prompt_ids[p] for p in batch],
                                      config.max_new_tokens, SAMPLING[scenario]))
        done = batches[-1]
        log(f"[bench build] {scenario}: {i + len(batch)}/{len(rows)} sequences, {done['seconds']:.0f} s for "
            f"{done['steps']} steps ({done['seconds'] / max(done['steps'], 1):.2f} s/step)")
    sample_prompt = torch.tensor(rows)
    trail_all = torch.cat([b["trail"] for b in batches])
    trail_all[:, 0] = trail_prompt[sample_prompt]
    meta = {
        "model": model_id(config.model), "feature_layer": config.feature_layer, "hidden_size": hidden,
        "trail_layer": trail_layer, "num_layers": model.config.num_hidden_layers, "dtype": config.dtype,
        "scenario": scenario, "samples_per_prompt": k, "sampling": SAMPLING[scenario],
        "max_new_tokens": config.max_new_tokens, "seed": config.seed, "split": list(config.split),
        "proxy_encoder": encoder.name, "proxy_seconds_per_prompt": encoder.seconds_per_text,
        "batch_size": config.batch_size, "torch_threads": torch.get_num_threads(),
        "timing": {key: sum(b[key] for b in batches) for key in ("seconds", "hook_seconds", "steps")},
    }
    return BenchData(
        meta=meta, prompts=prompts, prompt_split=split_prompts(len(prompts), config.split, config.seed),
        prompt_ids=right_pad(prompt_ids, max(map(len, prompt_ids))), pooled=pooled, proxy=proxy,
        sample_prompt=sample_prompt, lengths=torch.tensor([n for b in batches for n in b["lengths"]]),
        completion_ids=right_pad([c for b in batches for c in b["completions"]], config.max_new_tokens),
        plp=torch.cat([b["plp"] for b in batches]), trail=trail_all,
    )


def build(config: BuildConfig, out_dir: str | Path, log=None) -> dict[str, Path]:
    """Build every configured scenario into `out_dir/<scenario>/`; returns their folders."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    model.eval()
    layers = model.config.num_hidden_layers
    trail_layer = config.trail_layer if config.trail_layer is not None else round(layers * 11 / 32)
    if not 0 <= trail_layer < layers:
        raise ValueError(f"trail_layer={trail_layer} but the model has {layers} decoder layers.")
    encoder = ProxyEncoder(config.proxy_encoder)
    written = {}
    for scenario in config.scenarios:
        data = build_scenario(model, tokenizer, encoder, scenario, config, trail_layer, log)
        written[scenario] = data.save(scenario_dir(out_dir, scenario))
        log(f"[bench build] {scenario}: {len(data.lengths)} sequences -> {written[scenario]}")
    return written
