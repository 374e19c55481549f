"""The main job end to end on the embedded SmolLM2, its wandb offline run read back, and recipe errors."""

import pytest
from helpers import QUICKSTART

from rl_lenbalance.cli.recipe import RecipeError, load_recipe
from rl_lenbalance.cli.train import build_trainer, parse_overrides
from rl_lenbalance.cli.wandb_offline import find_runs, read_run

OPEN_ENDED = QUICKSTART.parent / "open_ended.yaml"


@pytest.mark.slow
def test_quickstart_runs_on_the_embedded_model_and_logs_to_wandb(quickstart_run):
    out, summary = quickstart_run
    assert summary["steps"] == 1
    assert 0.0 <= summary["loss_pad_frac"] < summary["loss_pad_frac_stock"]
    assert 0.0 <= summary["decode_slot_waste"] <= summary["decode_slot_waste_stock"]
    assert summary["mae_static"] > 0 and summary["predictor_overhead_frac"] > 0
    assert (out / "lenbalance_summary.json").exists()

    (run_dir,) = find_runs(out)
    wandb_run = read_run(run_dir)
    logged = {key for row in wandb_run.history for key in row}
    for key in ("predictor/mae_static", "gen/slot_waste", "gen/slot_waste_stock", "train/pad_frac",
                "train/pad_frac_stock", "predictor/overhead_frac"):
        assert f"train/lenbalance/{key}" in logged, key  # transformers' WandbCallback adds "train/"
    pad = wandb_run.series("train/lenbalance/train/pad_frac")
    assert pad and 0.0 <= pad[-1][1] < 1.0
    assert pad[-1][1] == pytest.approx(summary["loss_pad_frac"], abs=1e-6)  # one step: the same number
    assert any(d.get("glob_name") == "train/lenbalance/*" for d in wandb_run.metric_definitions)
    table = wandb_run.tables["train/lenbalance/lengths"]
    assert len(table) == 16 and all(row["actual_length"] >= 1 for row in table)


def test_unknown_recipe_key_names_the_closest_valid_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lenbalance:\n  generation_wave_sise: 4\n")
    with pytest.raises(ValueError, match="generation_wave_sise.*Did you mean 'generation_wave_size'"):
        load_recipe(recipe)
    recipe.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match="max_step.*Did you mean 'max_steps'"):
        load_recipe(recipe)


def test_task_name_selects_the_task_and_a_typo_names_the_closest(tmp_path):
    assert load_recipe(QUICKSTART).task.name == "arithmetic"
    assert load_recipe(OPEN_ENDED).task.name == "open_ended"
    with pytest.raises(RecipeError, match=r"task.name='open_ended_' is not a built-in task. Did you mean "
                                          r"'open_ended'\? Use one of arithmetic, open_ended."):
        load_recipe(QUICKSTART, parse_overrides(["task.name=open_ended_"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task:\n  name: 3\n")
    with pytest.raises(RecipeError, match="task.name=3 is not valid: expected a string"):
        load_recipe(recipe)


def test_build_trainer_trains_a_step_on_the_open_ended_task(eos_tiny_model_dir, tmp_path):
    recipe = load_recipe(OPEN_ENDED, {
        "output_dir": str(tmp_path), "report_to": "none", "max_steps": 1, "per_device_train_batch_size": 4,
        "num_generations": 2, "gradient_accumulation_steps": 1, "max_completion_length": 8,
        "model": {"name_or_path": str(eos_tiny_model_dir)}, "task": {"num_prompts": 8}})
    trainer = build_trainer(recipe)
    assert set(trainer.train_dataset.column_names) == {"prompt", "style"} and len(trainer.train_dataset) == 8
    assert [f.__name__ for f in trainer.reward_funcs] == ["nonempty_reward", "open_format_reward"]
    trainer.train()
    assert trainer.state.global_step == 1
    (logged,) = [row for row in trainer.state.log_history if "loss" in row]
    assert 0.0 <= logged["rewards/open_format_reward/mean"] <= 0.2  # the style column reached the reward
    assert 0.0 <= logged["rewards/nonempty_reward/mean"] <= 1.0


def test_a_hub_model_without_a_hub_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nmodel:\n  name_or_path: Qwen/Qwen2.5-0.5B-Instruct\n")
    with pytest.raises(RecipeError, match=r"name_or_path='Qwen/Qwen2.5-0.5B-Instruct' cannot be loaded: .*Hub is "
                                          r"unreachable \(HF_HUB_OFFLINE=1 is set\).*Pass a local model folder"):
        build_trainer(load_recipe(recipe))  # before any weights load


def test_overrides_parse_yaml_scalars_and_section_keys():
    assert parse_overrides(["max_steps=3", "output_dir=/tmp/x", "bf16=false", "lenbalance.compaction=true"]) == {
        "max_steps": 3, "output_dir": "/tmp/x", "bf16": False, "lenbalance": {"compaction": True}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["max_steps"])
    recipe = load_recipe(QUICKSTART, parse_overrides(["lenbalance.compaction=false", "model.dtype=bfloat16"]))
    assert recipe.lenbalance.compaction is False and recipe.model.dtype == "bfloat16"
    assert recipe.lenbalance.pooling == "egtp"  # the section's other keys stay as the recipe has them
    with pytest.raises(ValueError, match="compactoin.*Did you mean 'compaction'"):
        load_recipe(QUICKSTART, parse_overrides(["lenbalance.compactoin=false"]))


@pytest.mark.parametrize("recipe", sorted((QUICKSTART.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    """GPU recipes ask for bf16, which TrainingArguments refuses to validate without a GPU unless use_cpu is set."""
    parsed = load_recipe(recipe, {"use_cpu": True})
    assert parsed.training.output_dir.endswith(recipe.stem) or recipe.stem == "quickstart"


@pytest.mark.parametrize("config", sorted((QUICKSTART.parent / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes == 8 and loaded.mixed_precision == "bf16"
    if "zero" in config.stem:
        assert loaded.deepspeed_config["zero_stage"] == int(config.stem[-1])


@pytest.mark.slow
def test_quickstart_under_two_gloo_processes_logs_metrics_reduced_over_ranks(tmp_path, embedded_dir):
    """`torchrun --nproc_per_node 2` (`accelerate launch --cpu` would silently run one process)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rl_lenbalance.cli.train",
           "--config", str(QUICKSTART), "--set", "max_steps=1", "max_completion_length=32",
           "gradient_accumulation_steps=2", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "lenbalance_summary.json").read_text())
    assert summary["steps"] == 1 and summary["loss_pad_frac"] <= summary["loss_pad_frac_stock"]

    (run_dir,) = find_runs(tmp_path)  # one wandb run: only the main process logs
    (row,) = [r for r in read_run(run_dir).history if "train/lenbalance/gen/real_tokens" in r]
    completions = 2 * 4 * 2  # 2 ranks × per_device_train_batch_size 4 × gradient_accumulation_steps 2
    # Reduced over ranks: the token count covers both ranks' completions, as TRL's own (gathered) mean length does.
    assert row["train/lenbalance/gen/real_tokens"] == pytest.approx(completions * row["train/completions/mean_length"])
    assert row["train/lenbalance/train/rank_imbalance_stock"] >= 1.0
    assert len(read_run(run_dir).tables["train/lenbalance/lengths"]) == completions  # both ranks' rows


def test_a_cpu_recipe_uses_bf16_only_where_the_cpu_runs_it_natively(monkeypatch):
    """TRL defaults to bf16 mixed precision; where the CPU emulates bf16 products (AVX2 only) that made the loss
    phase ~13x slower, so a CPU recipe that sets neither bf16 nor fp16 follows the CPU, and an explicit value stays."""
    from rl_lenbalance.cli import recipe

    for native in (True, False):
        monkeypatch.setattr(recipe, "cpu_has_fast_bf16", lambda native=native: native)
        assert recipe.load_recipe(QUICKSTART).training.bf16 is native
    assert recipe.load_recipe(QUICKSTART, {"bf16": True}).training.bf16 is True
    assert recipe.load_recipe(QUICKSTART, {"fp16": False}).training.bf16 is True  # TRL's own default, untouched
