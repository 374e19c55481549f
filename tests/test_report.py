"""`rl-lenbalance report`: panels + self-contained HTML from a wandb offline run."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from helpers import QUICKSTART

from rl_lenbalance.cli.report import (
    HTML_NAME,
    PNG_NAME,
    build_report,
    load_length_tables,
    locate_run,
    logged_summary,
    loss_tokens_saved,
    main,
    render_figure,
)
from rl_lenbalance.cli.wandb_offline import find_runs, read_run
from rl_lenbalance.ledger import summary_rows

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
    """An offline run with padding, seconds and predictor metrics for two steps, its plans logged as indices (as the
    adapter logs them) and chosen at step 2, the predictor captured at step 1 only (with its lengths table), but no
    rank metrics."""
    import wandb

    root = tmp_path_factory.mktemp("partial_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        run = wandb.init(mode="offline", dir=root, project="t", config={"num_iterations": 1, "run_name": "partial"})
        run.define_metric("train/global_step")
        run.define_metric(f"{P}*", step_metric="train/global_step")
        table = wandb.Table(columns=["predicted_length", "actual_length", "round"], data=[[20.0, 30, 1], [25.0, 12, 1]])
        run.log({f"{P}lengths": table, "train/global_step": 1})
        for step in (1, 2):
            captured = {f"{P}predictor/mae_static": 10.0, f"{P}predictor/mae_naive_static": 12.0,
                        f"{P}predictor/mae_history_plp32": 7.0, f"{P}predictor/kendall_plp32": 0.3,
                        f"{P}predictor/live_mae_static": 10.5, f"{P}predictor/live_mae_naive_static": 12.0,
                        f"{P}predictor/live_mae_plp32": 6.0, f"{P}predictor/live_kendall_plp32": 0.45,
                        f"{P}predictor/used_static": 1.0, f"{P}predictor/used_plp32": 0.0,
                        f"{P}predictor/fallbacks": 0, f"{P}predictor/skipped_updates": 0} if step == 1 else {}
            run.log({"train/global_step": step, "train/num_tokens": 900 * step,  # 900 real tokens per step
                     f"{P}train/pad_frac": 0.1, f"{P}train/pad_frac_stock": 0.25,  # 1000 vs 1200 computed
                     f"{P}gen/decode_slots": 500, f"{P}gen/decode_slots_stock": 600, f"{P}gen/real_tokens": 400,
                     f"{P}gen/slot_waste": 0.2, f"{P}gen/slot_waste_stock": 1 / 3,
                     f"{P}predictor/captured_rounds": 1, f"{P}predictor/uncaptured_rounds": step - 1,
                     f"{P}predictor/overhead_frac": 0.04 if step == 1 else 0.0,
                     f"{P}predictor/overhead_frac_run": 0.04 / step,
                     f"{P}time/generation_s": 3.0, f"{P}time/loss_phase_s": 1.0 * step, "train/step_time": 4.0,
                     # plans by index into LEGACY_STRATEGIES, as a run logged before plans were logged by name
                     f"{P}autotune/strategy": 2 if step == 1 else 0, f"{P}autotune/exploring": 1,
                     f"{P}autotune/pass": step, f"{P}autotune/passes_to_measure": 2, **captured}
                    | ({f"{P}autotune/choice": 2, f"{P}autotune/ratio_vs_stock": 1.25} if step == 2 else {}))
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
    assert rows["steps"] == ("2", "")
    assert rows["whole step (wall time / steps)"] == ("5.00 s/step (10.0 s)", "")
    assert rows["generation phase (rollouts, rewards), this rank"] == ("3.00 s/step (6.0 s)", "")
    assert rows["loss phase (forward, backward), this rank"] == ("1.50 s/step (3.0 s)", "")


def test_a_report_rebuilt_from_logged_metrics_names_plans_and_the_predictors_round(partial_run):
    rows = {label: (now, stock)
            for label, now, stock in summary_rows(logged_summary(read_run(locate_run(partial_run))))}
    assert rows["training plan"] == ("sorted (1.25× stock)", "")  # logged as index 2 into LEGACY_STRATEGIES
    assert rows["plan of each step"] == ("1 sorted, 2 stock", "")
    assert rows["predictor MAE at t=0, round 1 of 1 captured (step 1, before online training)"] == (
        "10.0 tok", "naive 12.0 tok")
    assert rows["rounds the predictor captured"] == ("1 in 2 steps", "")
    assert "lenbalance.max_overhead" in rows["why capture stopped"][0]
    assert not any("plan #" in value for row in rows.values() for value in row)


def _panel(figure, letter: str):
    (ax,) = [ax for ax in figure.axes if ax.get_title(loc="left").startswith(f"({letter})")]
    return ax


def _legend(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_missing_metrics_become_no_data_panels(partial_run, tmp_path):
    run = read_run(locate_run(partial_run))
    figure = render_figure(run, {}, "t")
    no_data = [ax.get_title(loc="left") for ax in figure.axes
               if any(t.get_text().startswith("no data") for t in ax.texts)]
    assert any(title.startswith("(e) rank imbalance") for title in no_data)
    assert any(title.startswith("(h) predicted") for title in no_data)
    assert not any(title[:3] in ("(a)", "(b)", "(c)") for title in no_data)  # seconds and padding
    assert _legend(_panel(figure, "a")) == ["generation phase (6.0 s in all)", "loss phase (3.0 s in all)",
                                            "this run's whole step: TRL's step_time (no device sync)"]
    whole = [line for line in _panel(figure, "a").lines if line.get_label().startswith("this run's whole step")]
    assert whole[0].get_color() != "tab:gray"  # the grey of "stock TRL" in every other panel
    assert _legend(_panel(figure, "g")) == ["PLP (live), t=0", "PLP (live), t=32, the probe", "naive (live), t=0",
                                            "PLP (replay), t=0"]  # the live predictions lead, the replay labelled
    note = _panel(figure, "g").get_legend().get_title().get_text()  # inside the panel, not over its edge
    assert "1 round captured, 1 not (max_overhead)" in note and "remaining: 0.45 (mean)" in note
    assert "Kendall tau (live, t=32)" in note and note.endswith("last round acted on: naive at t=0, head at t=32")
    paths = build_report(partial_run, tmp_path)
    page = paths.html.read_text()
    assert paths.png.stat().st_size > 10_000 and "<td>20.0%</td><td>33.3%</td>" in page  # decode slots wasted
    assert "training plan: sorted (1.25× stock)" in page and "1.50 s/step (3.0 s)" in page


def test_panels_mark_exploration_uncaptured_rounds_and_the_tables_round(partial_run):
    run = read_run(locate_run(partial_run))
    figure = render_figure(run, load_length_tables(run), "t")
    for letter in ("b", "d"):
        assert "tuner measuring plans" in _legend(_panel(figure, letter)), letter
    assert [t.get_text() for t in _panel(figure, "b").get_xticklabels()] == ["1\nsorted", "2\nstock"]  # by name
    overhead = _panel(figure, "f")
    assert "round not captured (no hooks)" in _legend(overhead)
    captured = [line for line in overhead.lines if line.get_label().startswith("captured round")]
    assert list(captured[0].get_xdata()) == [1.0]  # step 2 ran without capture: not drawn as a zero cost
    scatter = _panel(figure, "h")
    assert "round 1 (step 1)" in scatter.get_title(loc="left")
    assert all(handle.get_alpha() in (None, 1.0) for handle in scatter.get_legend().legend_handles)
    for letter in ("g", "i"):  # one point each: whole steps on the axis
        ax = _panel(figure, letter)
        ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), (letter, ticks)
    health = _panel(figure, "i").lines
    assert len({line.get_marker() for line in health}) == 2  # equal counts: neither marker hides the other


def test_the_html_page_is_readable_at_phone_width_and_the_png_is_sharp(partial_run, tmp_path):
    from PIL import Image

    paths = build_report(partial_run, tmp_path)
    page = paths.html.read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert re.search(r"img \{[^}]*max-width: 100%", page) and '<div class="table">' in page
    assert re.search(r"\.table \{[^}]*overflow-x: auto", page)
    assert page.count("<tr>") == len(summary_rows(logged_summary(read_run(locate_run(partial_run))))) + 1
    assert min(Image.open(paths.png).info["dpi"]) >= 149


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
    from rl_lenbalance.cli.train import run

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
    def strict(constant: str):
        raise ValueError(f"lenbalance_summary.json holds {constant}, which is not JSON")

    summary = json.loads((trained_run / "lenbalance_summary.json").read_text(), parse_constant=strict)
    for label, value in (("loss-forward tokens that are padding", summary["loss_pad_frac"]),
                         ("stock", summary["loss_pad_frac_stock"])):
        assert f"{value:.1%}" in page, label
    assert "decode slots wasted on padding" in page and "predictor MAE at t=0" in page
    assert "whole step (wall time / steps)" in page and "loss phase (forward, backward)" in page
    plan = re.escape(summary["plan_by_step"]["1"])  # one step: the tuner is still measuring
    assert re.search(r"<td>training plan</td><td[^>]*>measuring: pass 1 of \d+, no choice yet</td>", page)
    assert re.search(rf"<td>plan of each step</td><td[^>]*>1 {plan}</td>", page)
    assert summary["autotune_state"] == "measuring" and "plan #" not in page

    run = read_run(paths.run_dir)
    stored = {key.removeprefix("lenbalance/"): value for key, value in run.summary.items()
              if key.startswith("lenbalance/")}  # the wandb run summary, as written at the end of training
    assert stored == {key: value for key, value in summary.items() if value is not None}
    tables = load_length_tables(run)
    rows = run.config["per_device_train_batch_size"] * run.config["steps_per_generation"]  # one process
    assert list(tables) == [1] and len(tables[1]) == rows  # one step; every row was predicted at t=0
    figure = render_figure(run, tables, "t")
    no_data = [ax.get_title(loc="left") for ax in figure.axes
               if any(t.get_text().startswith("no data") for t in ax.texts)]
    assert no_data == []


@pytest.mark.slow
def test_report_accepts_the_wandb_file_and_defaults_out_next_to_it(trained_run):
    (folder,) = find_runs(trained_run)
    (wandb_file,) = folder.glob("*.wandb")
    paths = main([str(wandb_file)])
    assert paths.html == folder / "report" / HTML_NAME and paths.png.is_file()


@pytest.mark.slow
def test_a_run_whose_capture_stopped_says_so_and_logs_no_stale_table(eos_tiny_model_dir, tmp_path, monkeypatch):
    """Past the overhead budget, rounds run without capture: the lengths table of round 1 is logged once (not again
    under later steps), and the summary and report rebuilt from the logged metrics say why, name each step's plan
    and keep the run's summary in the wandb run."""
    import wandb
    from helpers import train

    from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer

    wandb.teardown()
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = LenBalanceConfig(predictor_steps_per_round=2, max_overhead=1e-9)
    trainer = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config, max_steps=3,
                    max_completion_length=24, report_to="wandb")
    wandb.finish()
    wandb.teardown()
    assert trainer.lenbalance.rounds == 1

    run = read_run(locate_run(tmp_path))
    assert list(load_length_tables(run)) == [1]  # round 1's table, at step 1 only
    assert {row["round"] for row in run.tables[f"{P}lengths"]} == {1}
    rows = {label: now for label, now, _ in summary_rows(logged_summary(run))}
    assert rows["rounds the predictor captured"] == "1 in 3 steps"
    assert "lenbalance.max_overhead" in rows["why capture stopped"]
    assert any(label.startswith("predictor MAE at t=0, round 1 of 1 captured (step 1") for label in rows)
    names = rows["plan of each step"]
    assert re.fullmatch(r"(\d+(-\d+)? [a-z_]+(, )?)+", names) and names.startswith("1 ")
    assert rows["training plan"].startswith("measuring: pass 3 of ")
    assert run.summary["lenbalance/captured_rounds"] == 1 and run.summary["lenbalance/steps"] == 3
    assert run.summary["lenbalance/plan_by_step"].keys() == {"1", "2", "3"}

    page = build_report(tmp_path, tmp_path / "report").html.read_text()
    assert "why capture stopped" in page and "plan of each step" in page and "plan #" not in page
