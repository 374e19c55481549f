"""The faults of issue 32's fault trial: each is one line naming the setting or file and the fix, exit 2 (130 for
Ctrl-C), with nothing lost and nothing left behind (docs/reliability.md)."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import QUICKSTART, checkpointing_recipe, cli_env

from rl_lenbalance.cli import train as train_module
from rl_lenbalance.cli.compare import compare_recipe
from rl_lenbalance.cli.main import main as cli_main
from rl_lenbalance.cli.train import LOCK_NAME, output_dir_lock
from rl_lenbalance.predictor import CONTEXT_SIZE, HeadConfig, PLPHead


@pytest.fixture(autouse=True)
def _wandb_dir(monkeypatch, tmp_path):
    """`train.run` sets WANDB_DIR when it is unset and wandb reports; keep that inside each test."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI in this process; it must exit `code` with one error line and no traceback; that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("rl-lenbalance")]
    return line


# --- Ctrl-C ------------------------------------------------------------------------------------------------------


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_override(eos_tiny_model_dir, tmp_path):
    """SIGINT a CLI run once a checkpoint is whole: one line naming it and `--set resume_from_checkpoint=true`, exit
    130, no traceback, the lock released; and no wandb banner, since the run does not report to wandb."""
    out = tmp_path / "out"
    recipe = checkpointing_recipe(tmp_path / "recipe.yaml", eos_tiny_model_dir, out)
    process = subprocess.Popen([sys.executable, "-m", "rl_lenbalance.cli.main", "train", str(recipe)], env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    deadline = time.monotonic() + 600
    while not (out / "checkpoint-1" / "trainer_state.json").is_file() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    last = train_module._whole_checkpoints(str(out))[-1]  # checkpoint-1, or a later one saved before the signal
    assert output.rstrip().splitlines()[-1] == (f"rl-lenbalance: interrupted; the last checkpoint is {last}. To resume "
                                                "from it, run the same command with --set resume_from_checkpoint=true.")
    assert not (out / LOCK_NAME).exists()
    assert "Running in WANDB offline mode" not in output


def test_ctrl_c_before_any_checkpoint_says_a_new_run_starts_over(tmp_path, monkeypatch, capsys):
    def interrupt(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "build_trainer", interrupt)
    line = _one_line_error(capsys, ["train", str(QUICKSTART), "--set", f"output_dir={tmp_path / 'out'}"], code=130)
    assert line.startswith("rl-lenbalance: interrupted before output_dir=") and "starts over" in line


# --- two runs in one output_dir ----------------------------------------------------------------------------------


def test_a_second_run_in_a_busy_output_dir_stops_at_once_naming_the_first(tmp_path, capsys, monkeypatch,
                                                                          no_model_loading):
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    with output_dir_lock(str(out)):  # the first run, in this process
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        line = _one_line_error(capsys, ["train", str(QUICKSTART), "--set", f"output_dir={out}",
                                        "resume_from_checkpoint=true"])
        assert re.search(rf"output_dir='{re.escape(str(out))}' is in use by another rl-lenbalance run "
                         rf"\(PID {os.getpid()}, .*\); a second run would overwrite its checkpoints", line), line
        assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.name != LOCK_NAME} == before
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"  # still the first run's

        monkeypatch.setenv("RANK", "1")  # another rank of the first run's launch shares its folder
        with pytest.raises(AssertionError, match="model was loaded"):
            train_module.run(str(QUICKSTART), {"output_dir": str(out)})
        monkeypatch.delenv("RANK")
    assert not (out / LOCK_NAME).exists()  # released at exit

    with pytest.raises(AssertionError, match="model was loaded"):  # free again; a run that fails releases it too
        train_module.run(str(QUICKSTART), {"output_dir": str(out)})
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-1"]


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys, no_model_loading):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a PID that no longer runs (and holds no lock)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{ended.pid}\n")
    with pytest.raises(AssertionError, match="model was loaded"):
        train_module.run(str(QUICKSTART), {"output_dir": str(out)})
    assert f"rl-lenbalance: note: {out / LOCK_NAME} was left by PID {ended.pid}, which ended without releasing it " \
           "(killed?); this run takes it over." in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


# --- compare ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "match"), [
    ("--steps", "0", r"argument --steps: 0 is not valid: use 2 or more"),
    ("--steps", "-1", r"argument --steps: -1 is not valid: use 2 or more"),
    ("--turn-timeout", "0", r"argument --turn-timeout: 0 is not valid: use a number of seconds above 0"),
    ("--turn-timeout", "-5", r"argument --turn-timeout: -5 is not valid"),
    ("--turn-timeout", "inf", r"argument --turn-timeout: inf is not valid"),
])
def test_compare_range_checks_its_options_before_anything_loads(capsys, option, value, match):
    assert re.search(match, _one_line_error(capsys, ["compare", str(QUICKSTART), option, value]))


def test_compare_help_states_the_minimum_the_code_accepts(capsys):
    with pytest.raises(SystemExit):
        cli_main(["compare", "--help"])
    assert "(2 or more)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ValueError, match=r"--steps=1 leaves no step after the 1 warm-up step\(s\); use --steps 2 or"):
        compare_recipe(str(QUICKSTART), steps=1)


def test_a_compare_error_is_one_line_and_exit_2_without_an_abort(eos_tiny_model_dir, tmp_path):
    """A turn timeout shorter than a step: the trainer's process is killed inside it and the CLI says one line."""
    cmd = [sys.executable, "-m", "rl_lenbalance.cli.main", "compare", str(QUICKSTART), "--turn-timeout", "0.001",
           "--set", f"model.name_or_path={eos_tiny_model_dir}", f"output_dir={tmp_path}",
           "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "num_generations=4",
           "max_completion_length=8", "task.num_prompts=8"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1].startswith(
        "rl-lenbalance: error: variant 'stock' did not finish step 1 within turn_timeout_s=0.001 s")


# --- recipes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "match"), [
    ("", r"Recipe file '.*r.yaml' is empty \(or holds only comments\)"),
    ("# only a comment\n", r"Recipe file '.*r.yaml' is empty"),
    ("- max_steps: 1\n", r"Recipe file '.*r.yaml' must be a mapping of keys to values .*got a list"),
])
def test_an_empty_or_list_recipe_is_one_line(tmp_path, capsys, no_model_loading, text, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert re.search(match, _one_line_error(capsys, ["train", str(recipe)]))


@pytest.mark.parametrize("value", ["", "''", "' '", "null"])
def test_an_empty_output_dir_is_refused(capsys, no_model_loading, value):
    line = _one_line_error(capsys, ["train", str(QUICKSTART), "--set", f"output_dir={value}"])
    assert line == ("rl-lenbalance: error: output_dir is empty: set it to the folder for this run's checkpoints and "
                    "summary, e.g. --set output_dir=outputs/run1.")


# --- the predictor's files, before any weights load ----------------------------------------------------------------


def test_a_truncated_predictor_safetensors_is_found_in_the_preflight(tmp_path, capsys, embedded_dir,
                                                                     no_weights_loading):
    head = tmp_path / "head"
    PLPHead(HeadConfig(576, 32, context_size=CONTEXT_SIZE)).save_pretrained(head)  # the embedded model's width
    weights = head / "predictor.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _one_line_error(capsys, ["train", str(QUICKSTART), "--set", f"output_dir={tmp_path / 'out'}",
                                    "max_completion_length=32", f"lenbalance.predictor_path={head}"])
    assert re.search(rf"lenbalance.predictor_path: cannot read {re.escape(str(weights))} \(.*incomplete metadata.*\); "
                     r"copy the head again \(a partial copy\?\), or unset lenbalance.predictor_path", line), line


def test_resuming_with_another_max_completion_length_names_the_checkpoints_head(tmp_path, capsys, embedded_dir,
                                                                                  no_weights_loading):
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    saved = out / "checkpoint-1" / "lenbalance"
    PLPHead(HeadConfig(576, 32, context_size=CONTEXT_SIZE)).save_pretrained(saved)
    line = _one_line_error(capsys, ["train", str(QUICKSTART), "--set", f"output_dir={out}",
                                    "resume_from_checkpoint=true", "max_completion_length=16"])
    assert line == (f"rl-lenbalance: error: resume_from_checkpoint: the length head in {saved} was trained with "
                    "max_length=32; this run has max_length=16. Fix: resume with the settings the checkpoint was "
                    "trained with (max_completion_length=32), or start a new run in another output_dir.")
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-1"]  # kept, and the lock released


# --- report --out ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", [False, True])
def test_report_out_at_an_existing_file_is_one_line(tmp_path, capsys, inside):
    taken = tmp_path / "report.html"
    taken.write_text("mine")
    out = taken / "sub" if inside else taken
    line = _one_line_error(capsys, ["report", str(tmp_path), "--out", str(out)])
    assert re.search(rf"--out '{re.escape(str(out))}': '{re.escape(str(taken))}' is a file, and the report is a "
                     r"folder .*pass a folder", line), line
    assert taken.read_text() == "mine"


# --- what a failed pre-flight leaves behind ----------------------------------------------------------------------


def test_a_preflight_error_removes_only_the_folders_the_run_created(tmp_path, capsys, tiny_model_dir):
    new, existing = tmp_path / "a" / "b" / "out", tmp_path / "existing"
    existing.mkdir()
    for out in (new, existing):
        line = _one_line_error(capsys, ["train", str(QUICKSTART), "--set", f"output_dir={out}",
                                        f"model.name_or_path={tiny_model_dir}", "lenbalance.feature_layer=99"])
        assert "feature_layer=99, but" in line
    assert not (tmp_path / "a").exists()  # every folder the run created, and only those
    assert existing.is_dir() and not any(existing.iterdir())


# --- wandb -------------------------------------------------------------------------------------------------------


def test_wandb_offline_mode_is_set_only_when_wandb_reports(tmp_path, monkeypatch, no_model_loading):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(AssertionError, match="model was loaded"):
        train_module.run(str(QUICKSTART), {"output_dir": str(tmp_path / "a"), "report_to": "none"})
    assert "WANDB_MODE" not in os.environ
    with pytest.raises(AssertionError, match="model was loaded"):
        train_module.run(str(QUICKSTART), {"output_dir": str(tmp_path / "b"), "report_to": ["wandb"]})
    assert os.environ["WANDB_MODE"] == "offline"


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_emulates_it_is_named_with_the_fix(tiny_model_dir, tmp_path, monkeypatch, native):
    """GRPOConfig defaults to bf16; on a CPU without native bf16 that is many times slower than float32, for stock
    TRL too. The trainer says so once, naming the setting, and keeps the user's setting (so it still learns what
    stock learns)."""
    import warnings

    from helpers import make_args, make_trainer

    from rl_lenbalance import LenBalanceGRPOTrainer
    from rl_lenbalance.integrations.trl import trainer as adapter

    monkeypatch.setattr(adapter, "cpu_has_fast_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(LenBalanceGRPOTrainer, tiny_model_dir, make_args(tmp_path, bf16=True))
    named = [str(w.message) for w in caught if "bf16=False" in str(w.message)]
    assert trainer.args.bf16 is True
    assert len(named) == (0 if native else 1)
