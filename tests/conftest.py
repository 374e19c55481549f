"""Shared fixtures. The environment defaults are set at import time, before transformers / huggingface_hub load."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded SmolLM2-135M-Instruct's safetensors cache (converted once, ~30 s; then instant)."""
    from rl_lenbalance.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir):
    """A tiny random Llama with the embedded model's tokenizer and chat template (fast CPU tests)."""
    from rl_lenbalance.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), tokenizer_from=embedded_dir)


@pytest.fixture(scope="session")
def eos_tiny_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a non-zero end-of-sequence embedding, so sampled completions end at varied lengths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("eos_tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    eos = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.8
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.eos_token_id] = eos
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, embedded_dir):
    """The quickstart recipe, one short step, logged to wandb offline, once per session: `(output_dir, summary)`."""
    from pathlib import Path

    import wandb

    from rl_lenbalance.train import run

    out = tmp_path_factory.mktemp("quickstart")
    wandb.teardown()  # an earlier wandb.init in this process would pin its WANDB_DIR
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(out))
        summary = run(str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml"),
                      {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 8,
                       "num_generations": 4, "gradient_accumulation_steps": 2, "max_completion_length": 48})
    wandb.teardown()
    return out, summary
