"""Nothing lost, nothing silent: resume after a kill, checkpoints written atomically and validated on load, recipe
values type-checked before anything loads, and the messages of first-run mistakes (issue 14; docs/reliability.md)."""

import copy
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import QUICKSTART, assert_same, checkpointing_recipe, cli_env, make_args, make_trainer
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from trl import GRPOTrainer

from rl_lenbalance import LenBalanceCallback, LenBalanceConfig, LenBalanceGRPOTrainer, wrap_trainer
from rl_lenbalance.cli import train as train_module
from rl_lenbalance.cli.main import main as cli_main
from rl_lenbalance.cli.recipe import RecipeError, load_recipe
from rl_lenbalance.cli.train import parse_overrides
from rl_lenbalance.generation.engine import LenBalanceEngine, TrainingPairs
from rl_lenbalance.predictor import CONTEXT_SIZE, HeadConfig, OnlineTrainer, PLPHead, feature_size


@pytest.fixture(autouse=True)
def _wandb_dir(monkeypatch, tmp_path):
    """`train.run` sets WANDB_DIR when it is unset; keep that inside each test."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


# --- recipe values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["lenbalance.rebucket=fals"], r"lenbalance.rebucket='fals' is not valid: expected a boolean"),
        (["lenbalance.balance_training=false"], r"lenbalance.balance_training=False was merged into "
                                                r"lenbalance.training_plan: remove it and set training_plan: off"),
        (["lenbalance.training_plan=of"], r"lenbalance.training_plan='of' is not valid; use 'auto', 'off' or one"),
        (["lenbalance.compaction=1"], r"lenbalance.compaction=1 is not valid: expected a boolean"),
        (["lenbalance.compaction=fals"], r"lenbalance.compaction='fals' is not valid; use true, false or 'auto'"),
        (["max_steps=abc"], r"max_steps='abc' is not valid: expected an integer"),
        (["lenbalance.generation_wave_size=big"], r"generation_wave_size='big' .*expected an integer or null"),
        (["save_strategy=nope"], r"save_strategy='nope' is not valid: expected one of 'no', 'steps'"),
        (["report_to=[wandb, 3]"], r"report_to=\['wandb', 3\] is not valid"),
        (["lenbalanse.compaction=false"], r"Unknown key 'lenbalanse'.*Did you mean 'lenbalance'"),
        (["lenbalance=3"], r"lenbalance section must be a mapping"),
        (["model.dtype=float33"], r"model.dtype: Unknown dtype 'float33'"),
        (["loss_type=bnp"], r"loss_type='bnp' is not a TRL loss type. Did you mean 'bnpo'"),
        (["task.num_prompts=0"], r"task.num_prompts=0 is fewer than one generation batch needs"),
        (["lenbalance.rebucket=true", "max_completion_length=2"], r"raise max_completion_length to at least 3"),
        (["max_completion_length=0"], r"max_completion_length=0 is not valid: use >= 1"),
        (["per_device_train_batch_size=0"], r"per_device_train_batch_size=0 is not valid: use >= 1"),
        (["temperature=0"], r"temperature=0(\.0)? is not valid: use > 0"),
        (["max_steps=0"], r"max_steps=0 is not valid: use >= 1, or -1 to train num_train_epochs epochs"),
        (["lenbalance.feature_layer=-2"], r"lenbalance.feature_layer=-2 is not valid: use -1 .* or a decoder layer"),
    ],
)
def test_bad_recipe_values_are_refused_naming_key_value_and_type(sets, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(QUICKSTART, parse_overrides(sets))


def test_yaml_values_read_as_a_user_means_them(tmp_path):
    recipe = load_recipe(QUICKSTART, parse_overrides(["save_strategy=no", "learning_rate=1e-6",
                                                      "lenbalance.compaction=no", "lenbalance.generation_wave_size=8"]))
    assert recipe.training.save_strategy == "no" and recipe.training.learning_rate == 1e-6
    assert recipe.lenbalance.compaction is False and recipe.lenbalance.generation_wave_size == 8
    path = tmp_path / "r.yaml"
    path.write_text("use_cpu: true\nsave_strategy: no\nlenbalance:\n  rebucket: off\n  training_plan: off\n")
    recipe = load_recipe(path)  # YAML 1.1's off: False for a boolean setting, the word for a string one
    assert recipe.training.save_strategy == "no" and recipe.lenbalance.rebucket is False
    assert recipe.lenbalance.training_plan == "off"


def test_a_missing_or_malformed_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- max_steps: 1\n")
    with pytest.raises(RecipeError, match="must be a mapping of keys to values.*got a list"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("max_steps: [1\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_the_cli_reports_recipe_errors_without_a_traceback_or_loading_anything(capsys, no_model_loading):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", str(QUICKSTART), "--set", "max_steps=abc"])
    assert exit_info.value.code == 2
    assert "rl-lenbalance: error: max_steps='abc' is not valid: expected an integer." in capsys.readouterr().err


def test_a_set_value_that_is_not_yaml_is_a_clear_error():
    with pytest.raises(RecipeError,
                       match=r"--set 'report_to=\[wandb': the value is not valid YAML.*close its brackets"):
        parse_overrides(["report_to=[wandb"])


def _cli_error(capsys, sets: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", str(QUICKSTART), "--set", *sets])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("rl-lenbalance: error:")]
    return line


def test_model_dependent_settings_fail_in_one_line_before_the_weights_load(capsys, tmp_path, no_weights_loading,
                                                                          embedded_dir):
    PLPHead(HeadConfig(576, 32, context_size=CONTEXT_SIZE)).save_pretrained(tmp_path / "checkpoint-3" / "lenbalance")
    out = f"output_dir={tmp_path / 'out'}"
    cases = {
        "lenbalance.feature_layer=99": r"feature_layer=99, but .* has 30 decoder layers: use 0..29, or -1",
        f"lenbalance.predictor_path={tmp_path / 'checkpoint-3'}": r"predictor_path: .*point it at .*checkpoint-3/lenb",
        f"lenbalance.predictor_path={tmp_path / 'checkpoint-3' / 'lenbalance'}":
            r"trained with max_length=32; this run has max_length=\d+. Fix: set max_completion_length to the head's",
        f"model.name_or_path={tmp_path / 'no-such-model'}": r"model.name_or_path=.*no-such-model' cannot be loaded",
    }
    for setting, match in cases.items():
        assert re.search(match, _cli_error(capsys, [out, setting])), setting


def test_a_read_only_output_dir_fails_before_the_model_loads(tmp_path, no_model_loading):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: use a folder of a read-only file system
        read_only = Path("/sys/kernel")
        if not read_only.is_dir():
            pytest.skip("running as root with no read-only folder to try")
    with pytest.raises(RecipeError, match="output_dir=.* is not writable"):
        train_module.run(str(QUICKSTART), {"output_dir": str(read_only)})


def test_resume_from_checkpoint_must_name_a_checkpoint(tmp_path, no_model_loading):
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="resume_from_checkpoint=true, but output_dir=.* holds no checkpoint-N"):
        train_module.run(str(QUICKSTART), {"output_dir": str(out), "resume_from_checkpoint": True})
    with pytest.raises(RecipeError, match="is not a trainer checkpoint"):
        train_module.run(str(QUICKSTART), {"output_dir": str(out), "resume_from_checkpoint": str(tmp_path)})


def test_resume_true_takes_the_last_whole_checkpoint(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-2").mkdir()  # killed while saving
    recipe = load_recipe(QUICKSTART, {"output_dir": str(out), "resume_from_checkpoint": True})
    with pytest.warns(UserWarning, match="checkpoint-2 has no trainer_state.json.*resuming from .*checkpoint-1"):
        assert train_module.resume_checkpoint(recipe) == str(out / "checkpoint-1")


# --- the predictor: health, fallbacks, checkpoints -----------------------------------------------------------------


def random_pairs(width: int, rows: int = 8, samples: int = 8) -> TrainingPairs:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (rows,), generator=generator).float()
    pairs = TrainingPairs.empty(rows, samples, width)
    pairs.z0, pairs.y0 = torch.randn(rows, width, generator=generator), lengths
    pairs.row, pairs.prompt, pairs.length = torch.arange(rows), torch.arange(rows) // 2, lengths.long()
    pairs.z, pairs.y = torch.randn(rows * samples, width, generator=generator), lengths.repeat_interleave(samples)
    pairs.step = torch.zeros(rows * samples, dtype=torch.long)
    return pairs


@pytest.fixture
def engine(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return LenBalanceEngine(model, LenBalanceConfig(predictor_steps_per_round=2, predictor_batch_size=16), 32)


def test_one_nan_event_counts_as_one_fallback(engine):
    pairs = random_pairs(feature_size(engine.head.config.hidden_size))
    with torch.no_grad():
        for p in engine.head.parameters():
            p.fill_(float("nan"))
    with pytest.warns(UserWarning, match="falls back to stock ordering"):
        metrics = engine.learn(pairs, pairs.y0)
    assert engine.fallbacks == 1 and metrics["predictor/fallbacks"] == 1.0  # NaN predictions, then NaN weights: once
    assert engine.head_is_finite()


def test_non_finite_bin_values_are_caught_and_the_head_reinitialised(engine):
    pairs = random_pairs(feature_size(engine.head.config.hidden_size))
    engine.head.bin_values.fill_(float("nan"))  # parameters stay finite: only a check of the buffers sees it
    with pytest.warns(UserWarning, match="predictions are not finite"):
        engine.learn(pairs, pairs.y0)
    assert engine.fallbacks == 1 and torch.isfinite(engine.head.bin_values).all()


def test_the_skipped_updates_warning_names_the_logged_key():
    trainer = OnlineTrainer(PLPHead(HeadConfig(16, 32)))
    with pytest.warns(UserWarning, match="lenbalance/predictor/skipped_updates"):
        trainer._skip("test")


def test_predictor_path_at_a_trainer_checkpoint_says_where_the_predictor_is(tmp_path):
    PLPHead(HeadConfig(16, 32)).save_pretrained(tmp_path / "checkpoint-3" / "lenbalance")
    with pytest.raises(FileNotFoundError, match=r"trainer checkpoint: point it at .*checkpoint-3/lenbalance"):
        PLPHead.from_pretrained(tmp_path / "checkpoint-3")


@pytest.fixture
def lenbalance_trainer(eos_tiny_model_dir, tmp_path):
    return make_trainer(LenBalanceGRPOTrainer, eos_tiny_model_dir, make_args(tmp_path))


def test_a_second_callback_with_another_config_is_refused(lenbalance_trainer):
    with pytest.raises(ValueError, match="already runs rl-lenbalance.*different config"):
        lenbalance_trainer.add_callback(LenBalanceCallback(lenbalance_trainer, LenBalanceConfig(compaction=True)))
    assert wrap_trainer(lenbalance_trainer, LenBalanceConfig()) is lenbalance_trainer  # the same config: fine


def test_checkpoint_folders_are_written_whole_and_checked_when_read(lenbalance_trainer, tmp_path):
    engine = lenbalance_trainer.lenbalance
    pairs = random_pairs(feature_size(engine.head.config.hidden_size))
    engine.learn(pairs, pairs.y0)
    folder = tmp_path / "checkpoint-1" / "lenbalance"
    engine.save(folder)
    engine.save(folder)  # over an existing folder
    assert sorted(p.name for p in folder.parent.iterdir()) == ["lenbalance"]  # no temporary folder left behind

    (folder / "engine_state.pt").unlink()  # as an interrupted save of an older version left it
    with pytest.warns(UserWarning, match="incomplete.*engine_state.pt.*starts fresh"):
        engine.load(folder)

    engine.save(folder)
    weights = load_file(folder / "predictor.safetensors")
    weights["bin_values"][0] = float("nan")
    save_file(weights, folder / "predictor.safetensors")
    with pytest.warns(UserWarning, match="non-finite values.*re-initialising"):
        engine.load(folder)
    assert engine.head_is_finite() and engine.rounds == 1  # the counters and the replay buffer are still restored
    assert engine.trainer.buffer.size == len(pairs.y)


def _truncate(path: Path) -> None:
    """Cut a file to half its size, as a disk or copy fault leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_corrupt_engine_state_resumes_with_the_saved_head_and_the_rest_fresh(lenbalance_trainer, eos_tiny_model_dir,
                                                                                tmp_path):
    engine = lenbalance_trainer.lenbalance
    pairs = random_pairs(feature_size(engine.head.config.hidden_size))
    engine.learn(pairs, pairs.y0)
    checkpoint = tmp_path / "checkpoint-1"
    engine.save(checkpoint / "lenbalance")
    saved = {k: v.clone() for k, v in engine.head.state_dict().items()}
    _truncate(checkpoint / "lenbalance" / "engine_state.pt")
    resumed = make_trainer(LenBalanceGRPOTrainer, eos_tiny_model_dir, lenbalance_trainer.args)
    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, LenBalanceCallback))
    resumed.lenbalance_resume_from = str(checkpoint)
    with pytest.warns(UserWarning, match=r"cannot read engine_state.pt in .*checkpoint-1/lenbalance/engine_state.pt "
                                         r".*replay buffer.* start fresh \(the head keeps its saved weights\)"):
        callback.on_train_begin(resumed.args, SimpleNamespace(global_step=1), None)
    assert_same(resumed.lenbalance.head.state_dict(), saved)  # what survived is kept
    assert resumed.lenbalance.rounds == 0 and resumed.lenbalance.trainer.buffer.size == 0  # the rest starts fresh


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_a_corrupt_head_is_started_fresh_and_the_engine_state_kept(engine, tmp_path, damage):
    pairs = random_pairs(feature_size(engine.head.config.hidden_size))
    engine.learn(pairs, pairs.y0)
    folder = tmp_path / "lenbalance"
    engine.save(folder)
    if damage == "weights":
        _truncate(folder / "predictor.safetensors")
    else:
        (folder / "predictor_config.json").write_text('{"hidden_size": 16,')  # does not parse
    fresh = copy.deepcopy(engine)
    fresh._reinitialise()
    fresh.rounds = 0
    with pytest.warns(UserWarning, match=r"cannot read predictor_config.json / predictor.safetensors .*the head's "
                                         r"weights start fresh"):
        fresh.load(folder)
    assert fresh.rounds == 1 and fresh.trainer.buffer.size == len(pairs.y)  # the readable state is restored
    assert not torch.equal(fresh.head.net[0].weight, engine.head.net[0].weight)  # the head did not survive


def test_resuming_from_a_checkpoint_without_lenbalance_warns(lenbalance_trainer):
    callback = next(c for c in lenbalance_trainer.callback_handler.callbacks if isinstance(c, LenBalanceCallback))
    lenbalance_trainer.lenbalance_resume_from = "/somewhere/checkpoint-4"
    with pytest.warns(UserWarning, match="resuming from /somewhere/checkpoint-4, which holds no lenbalance/ folder"):
        callback.on_train_begin(lenbalance_trainer.args, SimpleNamespace(global_step=4), None)


def test_a_killed_cli_run_resumes_with_its_step_count_and_all_predictor_state(eos_tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    """SIGKILL a CLI run once its first checkpoint is whole, then resume it: the step count goes on from the
    checkpoint, and the head, its optimizer, the replay buffer, the baseline and the health counters come back."""
    out = tmp_path / "out"
    recipe = checkpointing_recipe(
        tmp_path / "recipe.yaml", eos_tiny_model_dir, out, max_completion_length=16, temperature=1.0, top_k=0,
        beta=0.0, logging_steps=1,
        lenbalance={"predictor_steps_per_round": 2, "predictor_batch_size": 16, "max_overhead": 1.0})
    env = cli_env()
    log = tmp_path / "killed_run.log"
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "rl_lenbalance.cli.main", "train", str(recipe)], env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
    saved = out / "checkpoint-1" / "lenbalance"
    deadline = time.monotonic() + 600
    while not saved.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert saved.is_dir(), log.read_text()[-3000:]

    state = torch.load(saved / "engine_state.pt", weights_only=True)
    head = load_file(saved / "predictor.safetensors")
    assert state["rounds"] == 1 and state["baseline"] and len(state["buffer"]["targets"]) > 0
    assert state["optimizer"]["state"]  # the head took optimizer steps

    restored = {}

    def build_and_watch(recipe):
        trainer = build_trainer(recipe)

        class Watch(TrainerCallback):  # runs after the trainer's own LenBalanceCallback
            def on_train_begin(self, args, state, control, **kwargs):
                restored["state"] = copy.deepcopy(trainer.lenbalance.state_dict())  # training goes on in place
                restored["head"] = {k: v.clone() for k, v in trainer.lenbalance.head.state_dict().items()}
                restored["step"] = state.global_step

        trainer.add_callback(Watch())
        return trainer

    build_trainer = train_module.build_trainer
    monkeypatch.setattr(train_module, "build_trainer", build_and_watch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train_module.run(str(recipe), {"max_steps": 2, "resume_from_checkpoint": str(saved.parent)})
    assert not [w for w in caught if "rl-lenbalance" in str(w.message)]  # nothing missing, nothing re-initialised
    assert restored["step"] == 1 and summary["steps"] == 2
    assert_same(state, restored["state"])
    assert_same(head, restored["head"])


def test_a_class_level_wrapper_of_a_stock_method_does_not_recurse_through_the_callback(eos_tiny_model_dir, tmp_path):
    """TRL's own `test_prepare_input_called_with_correct_data` wraps `GRPOTrainer.training_step` with a call back
    into the trainer; with the callback's in-place class swap, `super()` reaches that wrapper, which re-enters the
    override: the stock method must run then (no RecursionError), once per micro-step, with the generation batch."""
    from unittest.mock import patch

    trainer = make_trainer(GRPOTrainer, eos_tiny_model_dir, make_args(tmp_path, max_steps=1))
    trainer.add_callback(LenBalanceCallback(trainer))
    with patch.object(GRPOTrainer, "training_step", wraps=trainer.training_step) as wrapped:
        trainer.train()
    assert wrapped.call_count == trainer.args.gradient_accumulation_steps
    assert all(isinstance(call.args[1], list) for call in wrapped.call_args_list)  # the raw generation batch
    assert trainer.lenbalance_totals.loss_phase_s > 0  # the override ran too (it times the loss phase)


def test_the_cli_prints_warnings_on_a_line_of_their_own(capsys):
    """A warning raised while a progress bar is drawn starts a line of its own, not the end of the bar's line."""
    from tqdm.auto import tqdm

    with train_module.warnings_on_their_own_line(), warnings.catch_warnings():
        warnings.simplefilter("always")
        bar = tqdm(total=4, desc="training", file=sys.stderr)
        bar.update(1)
        warnings.warn("steps_per_generation=3 is not a multiple of gradient_accumulation_steps=2")
        bar.close()
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    shown = [line for line in lines if "steps_per_generation=3" in line]  # the message, and its source line
    assert shown and all("training" not in line and "%|" not in line for line in shown), lines  # no bar beside it
