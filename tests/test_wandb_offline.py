"""Round-trip a real wandb offline run through rl_lenbalance.cli.wandb_offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import wandb

from rl_lenbalance.cli.wandb_offline import find_runs, iter_records, read_run

PAD_FRACS = [0.5, 0.25, 0.125]
BLOB = "x" * 70_000  # larger than two 32 KiB blocks: exercises FIRST/MIDDLE/LAST chunks


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One offline run shared by the module (wandb init costs a few seconds)."""
    root = tmp_path_factory.mktemp("wandb_offline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        run = wandb.init(
            mode="offline", dir=root, project="t", config={"lr": 0.001, "model": {"name": "m", "layers": 2}}
        )
        run.config.update({"blob": BLOB})
        wandb.define_metric("train/global_step")
        wandb.define_metric("lenbalance/*", step_metric="train/global_step")
        for i, pad_frac in enumerate(PAD_FRACS):
            run.log({"train/global_step": 10 * (i + 1), "lenbalance/pad_frac": pad_frac, "eval": {"acc": i}})
        run.log({"lenbalance/samples": wandb.Table(columns=["prompt", "len"], data=[["a", 3], ["b", 7]])})
        run.summary["best_pad_frac"] = 0.125
        run.finish()
        wandb.teardown()  # waits for wandb's service to flush and exit: once, the last history row was read missing
    return root


@pytest.fixture(scope="module")
def run_dir(run_root: Path) -> Path:
    (found,) = find_runs(run_root)
    return found


def test_history_rows_and_series(run_dir: Path) -> None:
    run = read_run(run_dir)
    assert [row["_step"] for row in run.history] == [0, 1, 2, 3]
    assert run.series("lenbalance/pad_frac") == [(0, 0.5), (1, 0.25), (2, 0.125)]
    assert run.series("train/global_step") == [(0, 10.0), (1, 20.0), (2, 30.0), (3, 30.0)]
    assert [row["eval"] for row in run.history[:3]] == [{"acc": 0}, {"acc": 1}, {"acc": 2}]
    assert run.series("missing") == []


def test_summary_and_config(run_dir: Path) -> None:
    run = read_run(run_dir)
    assert run.summary["best_pad_frac"] == 0.125
    assert run.summary["lenbalance/pad_frac"] == 0.125
    assert run.summary["_step"] == 3
    assert "_wandb" not in run.summary
    assert run.config == {"lr": 0.001, "model": {"name": "m", "layers": 2}, "blob": BLOB}


def test_tables_keyed_by_logged_name(run_dir: Path) -> None:
    run = read_run(run_dir)
    assert run.tables == {"lenbalance/samples": [{"prompt": "a", "len": 3}, {"prompt": "b", "len": 7}]}


def test_metric_definitions(run_dir: Path) -> None:
    definitions = read_run(run_dir).metric_definitions
    assert {"name": "train/global_step", "options": {"defined": True}} in definitions
    (glob,) = [d for d in definitions if d.get("glob_name") == "lenbalance/*"]
    assert glob["step_metric"] == "train/global_step"


def test_checksum_mismatch_detected_unless_disabled(run_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run_dir, tmp_path / run_dir.name))
    (wandb_file,) = copy.glob("*.wandb")
    data = bytearray(wandb_file.read_bytes())
    data[data.index(b"xxxx")] = ord("y")
    wandb_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_run(copy)
    assert read_run(copy, verify_crc=False).config["blob"] == "y" + BLOB[1:]


def test_truncated_file_keeps_complete_records(run_dir: Path, tmp_path: Path) -> None:
    (wandb_file,) = run_dir.glob("*.wandb")
    truncated = tmp_path / "run-cut.wandb"
    truncated.write_bytes(wandb_file.read_bytes()[:-3])
    full = list(iter_records(wandb_file))
    assert list(iter_records(truncated)) == full[:-1]


def test_bad_header_rejected(tmp_path: Path) -> None:
    (tmp_path / "run-x.wandb").write_bytes(b"LEVELDB" + bytes(100))
    with pytest.raises(ValueError, match="header"):
        read_run(tmp_path)


def test_missing_wandb_file_names_folder(tmp_path: Path) -> None:
    empty = tmp_path / "offline-run-20240101_000000-abc"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="offline-run-20240101_000000-abc"):
        read_run(empty)


def test_find_runs_oldest_first(tmp_path: Path) -> None:
    new, old = tmp_path / "a" / "offline-run-new", tmp_path / "b" / "c" / "offline-run-old"
    for folder, mtime in ((new, 2_000_000), (old, 1_000_000)):
        folder.mkdir(parents=True)
        os.utime(folder, (mtime, mtime))
    (tmp_path / "offline-run-file").write_text("not a folder")
    assert find_runs(tmp_path) == [old, new]
