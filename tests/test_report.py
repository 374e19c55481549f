"""`rl-lenbalance report`: panels + self-contained HTML from a wandb offline run."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from rl_lenbalance.ledger import summary_rows
from rl_lenbalance.report import (HTML_NAME, PNG_NAME, build_report, load_length_tables, locate_run, logged_summary,
                                  loss_tokens_saved, main, render_figure)
from rl_lenbalance.wandb_offline import find_runs, read_run

from helpers import QUICKSTART

P = "train/lenbalance/"


def _image(png: Path):
    from matplotlib.image import imread

    return imread(png)


def _embedded_png(page: str) -> bytes:
    match = re.search(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match, "no inline PNG in the HTML"
    return base64.b64decode(match.group(1))


# --- fast: a hand-written offline run (a few seconds of wandb init) -----------------------------------------------


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory) -> Path:
    """An offline run with padding, seconds and MAE metrics for two steps and an autotuned plan, but no lengths table
    and no rank metrics."""
    import wandb

    root = tmp_path_factory.mktemp("partial_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        run = wandb.init(mode="offline", dir=root, project="t", config={"num_iterations": 1, "run_name": "partial"})
        run.define_metric("train/global_step")
        run.define_metric(f"{P}*", step_metric="train/global_step")
        for step in (1, 2):
            run.log({"train/global_step": step, "train/num_tokens": 900 * step,  # 900 real tokens per step
                     f"{P}train/pad_frac": 0.1, f"{P}train/pad_frac_stock": 0.25,  # 1000 vs 1200 computed
                     f"{P}gen/decode_slots": 500, f"{P}gen/decode_slots_stock": 600, f"{P}gen/real_tokens": 400,
                     f"{P}gen/slot_waste": 0.2, f"{P}gen/slot_waste_stock": 1 / 3,
                     f"{P}predictor/mae_static": 10.0 / step, f"{P}predictor/fallbacks": 0,
                     f"{P}predictor/mae_history_plp32": 7.0, f"{P}predictor/kendall_plp32": 0.1 + 0.2 * step,
                     f"{P}time/generation_s": 3.0, f"{P}time/loss_phase_s": 1.0 * step, "train/step_time": 4.0,
                     f"{P}autotune/choice": "sorted", f"{P}autotune/ratio_vs_stock": 1.25})
        run.summary["train_runtime"] = 10.0  # as transformers' WandbCallback stores it at the end
        run.finish()
        wandb.teardown()  # wandb keeps its first settings (WANDB_DIR included) per process until teardown
    return root


def test_padded_tokens_saved_is_stock_minus_computed(partial_run):
    run = read_run(locate_run(partial_run))
    steps, saved = loss_tokens_saved(run)
    assert steps == [1.0, 2.0]
    assert saved == pytest.approx([200.0, 200.0])
    rows = {label: (now, stock) for label, now, stock in summary_rows(logged_summary(run))}  # no summary file
    assert rows["decode slots wasted on padding"] == ("20.0%", "33.3%")
    assert rows["loss-forward tokens that are padding"] == ("10.0%", "25.0%")
    assert rows["predictor MAE, prompt only (t=0), last round"] == ("5.0 tok", "")
    assert rows["steps"] == ("2", "")
    assert rows["whole step (wall time / steps)"] == ("5.00 s/step (10.0 s)", "")
    assert rows["generation phase (rollouts, rewards), this rank"] == ("3.00 s/step (6.0 s)", "")
    assert rows["loss phase (forward, backward), this rank"] == ("1.50 s/step (3.0 s)", "")
    assert rows["training plan"] == ("sorted (1.25× stock)", "")


def test_missing_metrics_become_no_data_panels(partial_run, tmp_path):
    run = read_run(locate_run(partial_run))
    assert load_length_tables(run) == {}
    figure = render_figure(run, {}, "t")
    no_data = [ax.get_title(loc="left") for ax in figure.axes if any(t.get_text().startswith("no data") for t in ax.texts)]
    assert any(title.startswith("(e) rank imbalance") for title in no_data)
    assert any(title.startswith("(h) predicted") for title in no_data)
    assert not any(title[:3] in ("(a)", "(b)", "(c)") for title in no_data)  # seconds and padding
    (seconds,) = [ax for ax in figure.axes if ax.get_title(loc="left").startswith("(a) seconds")]
    labels = [text.get_text() for text in seconds.get_legend().get_texts()]
    assert labels == ["generation phase (6.0 s in all)", "loss phase (3.0 s in all)",
                      "whole step: TRL's step_time (no device sync)"]
    (mae,) = [ax for ax in figure.axes if ax.get_title(loc="left").startswith("(g) predictor online MAE")]
    assert [text.get_text() for text in mae.get_legend().get_texts()] == ["PLP, prompt only (t=0)",
                                                                          "per-prompt history (t=32)"]
    assert [text.get_text() for text in mae.texts][0].endswith("remaining: 0.40 (mean)")  # Kendall tau of steps 1-2
    paths = build_report(partial_run, tmp_path)
    page = paths.html.read_text()
    assert paths.png.stat().st_size > 10_000 and "<td>20.0%</td><td>33.3%</td>" in page  # decode slots wasted
    assert "training plan: sorted (1.25× stock)" in page and "1.50 s/step (3.0 s)" in page


def test_every_way_of_naming_the_run_finds_the_same_folder(partial_run):
    (folder,) = find_runs(partial_run)
    (wandb_file,) = folder.glob("*.wandb")
    assert locate_run(partial_run) == locate_run(folder) == locate_run(wandb_file) == folder


def test_a_path_without_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"No wandb offline run found in .*offline-run-\*/run-\*\.wandb"):
        build_report(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate_run(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a wandb run file"):
        locate_run(tmp_path / "notes.txt")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "No wandb offline run found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()


# --- slow: a real one-step run of the main job on the embedded SmolLM2 ---------------------------------------------


@pytest.fixture(scope="module")
def trained_run(request, tmp_path_factory) -> Path:
    """The output_dir of a one-step quickstart logged to wandb offline: conftest's session-wide `quickstart_run`
    (shared with test_train) when it exists, else a tiny run of this module's own."""
    try:
        shared = request.getfixturevalue("quickstart_run")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        return Path(shared[0] if isinstance(shared, tuple) else shared)
    from rl_lenbalance.train import run

    request.getfixturevalue("embedded_dir")
    out = tmp_path_factory.mktemp("report_run")
    import wandb

    wandb.teardown()  # an earlier wandb.init in this process would otherwise pin WANDB_DIR to its value then
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(out))
        run(str(QUICKSTART), {"output_dir": str(out), "max_steps": 1, "max_completion_length": 16,
                              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                              "num_generations": 4})
    wandb.teardown()
    return out


@pytest.mark.slow
def test_report_of_a_real_run(trained_run, tmp_path):
    import json

    paths = main([str(trained_run), "--out", str(tmp_path)])
    assert (paths.png, paths.html) == (tmp_path / PNG_NAME, tmp_path / HTML_NAME)
    image = _image(paths.png)
    assert image.shape[0] >= 400 and image.shape[1] >= 800
    assert image[..., :3].var() > 0.001  # not a blank canvas

    page = paths.html.read_text()
    assert _embedded_png(page) == paths.png.read_bytes()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    summary = json.loads((trained_run / "lenbalance_summary.json").read_text())
    for label, value in (("loss-forward tokens that are padding", summary["loss_pad_frac"]),
                         ("stock", summary["loss_pad_frac_stock"])):
        assert f"{value:.1%}" in page, label
    assert "decode slots wasted on padding" in page and "predictor MAE, prompt only (t=0)" in page
    assert "whole step (wall time / steps)" in page and "loss phase (forward, backward)" in page
    assert "training plan" not in page  # nothing autotuned: no plan

    run = read_run(paths.run_dir)
    tables = load_length_tables(run)
    rows = run.config["per_device_train_batch_size"] * run.config["steps_per_generation"]  # one process
    assert list(tables) == [1] and len(tables[1]) == rows  # one step; every row was predicted at t=0
    figure = render_figure(run, tables, "t")
    no_data = [ax.get_title(loc="left") for ax in figure.axes if any(t.get_text().startswith("no data") for t in ax.texts)]
    assert no_data == []


@pytest.mark.slow
def test_report_accepts_the_wandb_file_and_defaults_out_next_to_it(trained_run):
    (folder,) = find_runs(trained_run)
    (wandb_file,) = folder.glob("*.wandb")
    paths = main([str(wandb_file)])
    assert paths.html == folder / "report" / HTML_NAME and paths.png.is_file()
