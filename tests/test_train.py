"""The main job end to end on the embedded SmolLM2, its wandb offline run read back, and recipe errors."""

from pathlib import Path

import pytest

from rl_lenbalance.recipe import load_recipe
from rl_lenbalance.train import build_trainer, parse_overrides, run
from rl_lenbalance.wandb_offline import find_runs, read_run

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_runs_on_the_embedded_model_and_logs_to_wandb(tmp_path, monkeypatch, embedded_dir):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 8,
                 "num_generations": 4, "gradient_accumulation_steps": 2, "max_completion_length": 48}
    summary = run(str(QUICKSTART), overrides)
    assert summary["steps"] == 1
    assert 0.0 <= summary["loss_pad_frac"] < summary["loss_pad_frac_stock"]
    assert 0.0 <= summary["decode_slot_waste"] <= summary["decode_slot_waste_stock"]
    assert summary["mae_static"] > 0 and summary["predictor_overhead_frac"] > 0
    assert (tmp_path / "run" / "lenbalance_summary.json").exists()

    (run_dir,) = find_runs(tmp_path)
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


def test_a_hub_model_without_a_hub_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nmodel:\n  name_or_path: Qwen/Qwen2.5-0.5B-Instruct\n")
    with pytest.raises(OSError, match="unreachable"):
        build_trainer(load_recipe(recipe))


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["max_steps=3", "output_dir=/tmp/x", "bf16=false"]) == {
        "max_steps": 3, "output_dir": "/tmp/x", "bf16": False}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["max_steps"])
