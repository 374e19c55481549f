"""Shared fixtures. The environment defaults are set at import time, before transformers / huggingface_hub load."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # glibc's own trim threshold, named so that `build_trainer` leaves the allocator as glibc's (`cli.allocator`):
    # one pytest process builds many trainers, and memory kept for reuse would add up over the suite
    "MALLOC_TRIM_THRESHOLD_": "131072",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded SmolLM2-135M-Instruct's safetensors cache (converted once, ~30 s; then instant)."""
    from rl_lenbalance.builtin.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir):
    """A tiny random Llama with the embedded model's tokenizer and chat template (fast CPU tests)."""
    from rl_lenbalance.builtin.models import build_tiny_model

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

    from rl_lenbalance.cli.train import run

    out = tmp_path_factory.mktemp("quickstart")
    wandb.teardown()  # an earlier wandb.init in this process would pin its WANDB_DIR
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(out))
        summary = run(str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml"),
                      {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 8,
                       "num_generations": 4, "gradient_accumulation_steps": 2, "max_completion_length": 48})
    wandb.teardown()
    return out, summary


TINY_FAMILIES = ("llama", "qwen2", "qwen3_moe", "gpt2", "nemotron_h")


@pytest.fixture(scope="session")
def family_model_dir(tiny_model_dir, tmp_path_factory):
    """`family_model_dir(name)`: a tiny random model of a family TRL's own tests cover (one of TINY_FAMILIES), with the
    tiny model's tokenizer; built once per session."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2Config,
        LlamaConfig,
        NemotronHConfig,
        Qwen2Config,
        Qwen3MoeConfig,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=2048, tie_word_embeddings=True, **ids)
    configs = {
        "llama": lambda: LlamaConfig(num_hidden_layers=2, **common),
        "qwen2": lambda: Qwen2Config(num_hidden_layers=2, **common),
        "qwen3_moe": lambda: Qwen3MoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, head_dim=16,
                                            **common),
        "gpt2": lambda: GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=2048, **ids),
        "nemotron_h": lambda: NemotronHConfig(  # Mamba2, MoE, attention and MLP blocks; final norm `norm_f`
            layers_block_type=["linear_attention", "moe", "full_attention", "mlp"], head_dim=16, mamba_num_heads=8,
            mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16, n_routed_experts=4,
            moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, num_experts_per_tok=2, **common),
    }
    built: dict = {}

    def build(family: str):
        if family not in built:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(configs[family]())
            built[family] = out = tmp_path_factory.mktemp(family)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        return built[family]

    return build


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the run gets as far as loading the model (`train.build_trainer`)."""
    from rl_lenbalance.cli import train

    def refuse(recipe):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(train, "build_trainer", refuse)


@pytest.fixture
def no_weights_loading(monkeypatch):
    """Fail the test if the run gets as far as loading the model's weights (reading its config is allowed)."""
    from rl_lenbalance.builtin import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the error was found")

    monkeypatch.setattr(models, "load_model", refuse)
