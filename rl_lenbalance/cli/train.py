"""The main job: GRPO with rl-lenbalance from a recipe YAML, then a summary of what it saved.

    rl-lenbalance train recipes/quickstart.yaml
    accelerate launch --multi_gpu --num_processes 2 -m rl_lenbalance.train --config recipes/quickstart.yaml
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .. import ledger
from . import allocator, console
from .recipe import Recipe, RecipeError, load_recipe, parse_yaml, preflight

if TYPE_CHECKING:
    from rich.console import Console


def build_trainer(recipe: Recipe, trainer_class: type | None = None):
    """Model, task and trainer as the recipe says (`recipe.preflight` first: settings that need only the model's
    config fail before its weights load): `LenBalanceGRPOTrainer` by default; `trainer_class` may be any
    GRPOTrainer subclass (stock TRL's for a comparison), which gets `lenbalance_config` only if it takes one."""
    import torch

    from ..builtin.models import load_model
    from ..builtin.tasks import TASKS
    from ..integrations import LenBalanceGRPOTrainer, LenBalanceMixin, vllm_cpu

    preflight(recipe)
    if recipe.training.use_cpu or not torch.cuda.is_available():
        allocator.keep_freed_memory()  # before the model's weights: the first large allocation
    if getattr(recipe.training, "use_vllm", False) and vllm_cpu.cpu_build():
        vllm_cpu.keep_weights_loadable()  # before TRL's engine loads the model
    trainer_class = trainer_class or LenBalanceGRPOTrainer
    model, tokenizer = load_model(recipe.model.name_or_path, dtype=recipe.model.dtype)
    make_dataset, reward_funcs = TASKS[recipe.task.name]
    dataset = make_dataset(recipe.task.num_prompts, recipe.task.seed)
    extra = {"lenbalance_config": recipe.lenbalance} if issubclass(trainer_class, LenBalanceMixin) else {}
    return trainer_class(model=model, processing_class=tokenizer, reward_funcs=reward_funcs, args=recipe.training,
                         train_dataset=dataset, **extra)


def summarize(trainer, wall_s: float) -> dict[str, Any]:
    """The run's summary (`ledger.summary`): seconds per phase, padding computed vs stock TRL, predictor error against
    the naive baseline."""
    logged = [row for row in trainer.state.log_history if any(k.startswith("lenbalance/") for k in row)]
    return ledger.summary(trainer.lenbalance_totals, logged, trainer.state.global_step, wall_s,
                          trainer.lenbalance.fallbacks)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The summary as a table (`ledger.summary_rows`), on `console` (default: the terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rl-lenbalance: what this run saved", caption=ledger.SECONDS_NOTE, caption_justify="left")
    for column, justify in (("metric", "left"), ("rl-lenbalance", "right"), ("stock TRL (same batch)", "right")):
        table.add_column(column, justify=justify)
    for row in ledger.summary_rows(summary):
        table.add_row(*row)
    (console or Console()).print(table)


def run(recipe_path: str, overrides: dict | None = None) -> dict[str, Any]:
    """Train as the recipe says, holding output_dir (`claim_output_dir`); print and return the summary (also written
    to output_dir/lenbalance_summary.json). Ctrl-C raises `Interrupted`, whose message says how to resume."""
    recipe = load_recipe(recipe_path, overrides)
    _wandb_offline_by_default(recipe.training)
    try:
        with claim_output_dir(recipe.training.output_dir):
            return _train(recipe)
    except KeyboardInterrupt:
        _close_progress_bars()
        raise Interrupted(_interrupted_message(recipe.training.output_dir)) from None


def _train(recipe: Recipe) -> dict[str, Any]:
    """`run`'s training and summary, in the output_dir it holds."""
    checkpoint = resume_checkpoint(recipe)
    recipe = replace(recipe, resume_from_checkpoint=checkpoint)  # the folder itself, for `preflight` to check
    with warnings_on_their_own_line(), console.trl_deprecations_silenced():
        trainer = build_trainer(recipe)
        console.use_step_lines(trainer)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=checkpoint)
    summary = summarize(trainer, time.perf_counter() - start)
    _finish_wandb(summary if trainer.accelerator.is_main_process else None)
    if trainer.accelerator.is_main_process:
        print_summary(summary)
        Path(recipe.training.output_dir, "lenbalance_summary.json").write_text(ledger.summary_json(summary))
    return summary


@contextmanager
def warnings_on_their_own_line() -> Iterator[None]:
    """Print warnings through tqdm, which clears the progress bar first: a warning gets a line of its own instead
    of landing at the end of the bar's line, where it is easy to miss."""
    from tqdm.auto import tqdm

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        tqdm.write(text.rstrip("\n"), file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _wandb_offline_by_default(training) -> None:
    """When the run reports to wandb: log offline unless WANDB_MODE says otherwise, into output_dir unless WANDB_DIR
    says otherwise. Not otherwise: transformers prints "Running in WANDB offline mode" whenever WANDB_MODE=offline."""
    if "wandb" in training.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", training.output_dir)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `run`; the message names the last checkpoint and the override that resumes it."""


def _close_progress_bars() -> None:
    """Close the progress bars an interrupted run left open now: each would print itself again at exit, after the
    message that says how to resume."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm keeps no public list of its open bars
        bar.close()


def _interrupted_message(output_dir: str) -> str:
    """What an interrupted run says: the checkpoint to resume and the override that does it, or that none was saved."""
    whole = _whole_checkpoints(output_dir)
    if whole:
        return (f"interrupted; the last checkpoint is {whole[-1]}. To resume from it, run the same command with "
                "--set resume_from_checkpoint=true.")
    return (f"interrupted before output_dir={output_dir!r} held a checkpoint (save_strategy and save_steps set when "
            "one is saved); running again starts over.")


LOCK_NAME = ".lenbalance.lock"


@contextmanager
def claim_output_dir(output_dir: str) -> Iterator[None]:
    """Create `output_dir` (checked writable now, so a read-only folder fails before the model loads) and hold its
    lock (`output_dir_lock`) while the run writes there. If the run fails, the folders this created are removed
    while still empty: a pre-flight error leaves nothing behind."""
    path = Path(output_dir).absolute()
    created = list(itertools.takewhile(lambda folder: not folder.exists(), (path, *path.parents)))  # deepest first
    try:
        _check_writable(output_dir)
        with output_dir_lock(output_dir):
            yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # it holds something (or is gone): keep it and its parents
                break
        raise


@contextmanager
def output_dir_lock(output_dir: str) -> Iterator[None]:
    """Hold `output_dir/.lenbalance.lock` (an `flock`, with this process's PID in the file) while a run writes
    there: a second run into the same folder stops at once with a RecipeError naming the first one's PID, instead
    of overwriting its checkpoints. The kernel drops the lock when its process ends, however it ends; a file left
    by a killed run is taken over with a note. Only a launch's main process (RANK 0) locks: every rank of one
    `accelerate launch` shares its output_dir."""
    if not _launch_main_process():
        yield
        return
    path = Path(output_dir, LOCK_NAME)
    fd = _lock(path, output_dir)
    if fd is None:
        yield
        return
    try:
        left = os.read(fd, 64).decode(errors="replace").strip()
        if left:
            print(f"rl-lenbalance: note: {path} was left by PID {left}, which ended without releasing it (killed?); "
                  "this run takes it over.", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _launch_main_process() -> bool:
    """Whether this is the main process of its launch, known before any trainer exists: the global rank that
    torchrun / accelerate (RANK), MPI (OMPI_COMM_WORLD_RANK, PMI_RANK) or Slurm (SLURM_PROCID) set, or no launcher."""
    ranks = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
    return next((os.environ[name] for name in ranks if name in os.environ), "0") == "0"


def _lock(path: Path, output_dir: str) -> int | None:
    """A descriptor of `path` (created if missing) holding its exclusive flock; RecipeError naming the holder's PID
    when another process holds it; None, with a warning, on a file system without flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RecipeError(f"output_dir={output_dir!r} is in use by another rl-lenbalance run (PID {holder}, "
                              f"which holds {path}); a second run would overwrite its checkpoints. Wait for it to "
                              "end, or set another output_dir.") from None
        except OSError as error:
            os.close(fd)
            path.unlink(missing_ok=True)
            warnings.warn(f"rl-lenbalance: cannot lock {path} ({error.strerror or error}): nothing stops a second run "
                          "from writing into this output_dir meanwhile.")
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as it ended, after we opened it: lock the new one


def _check_writable(output_dir: str) -> None:
    """Create `output_dir` and write a file into it now, so a read-only folder fails before the model loads."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise RecipeError(f"output_dir={output_dir!r} is not writable ({error.strerror or error}); point output_dir "
                          "at a folder you can write to.") from error


def resume_checkpoint(recipe: Recipe) -> str | None:
    """The checkpoint folder `resume_from_checkpoint` names (true: the last whole checkpoint-N in output_dir),
    checked to be one, or None when the run starts from scratch."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import sort_checkpoints

    resume, output_dir = recipe.resume_from_checkpoint, recipe.training.output_dir
    if resume is None or resume is False:
        return None
    if resume is True:
        checkpoints = sort_checkpoints(output_dir)  # oldest first
        whole = _whole_checkpoints(output_dir)
        if not whole:
            raise RecipeError(f"resume_from_checkpoint=true, but output_dir={output_dir!r} holds no checkpoint-N "
                              "folder to resume; drop resume_from_checkpoint to start from scratch.")
        if whole[-1] != checkpoints[-1]:
            warnings.warn(f"rl-lenbalance: {checkpoints[-1]} has no {TRAINER_STATE_NAME} (a save was interrupted); "
                          f"resuming from {whole[-1]}.")
        return whole[-1]
    if not Path(resume, TRAINER_STATE_NAME).is_file():
        raise RecipeError(f"resume_from_checkpoint={resume!r} is not a trainer checkpoint (no {TRAINER_STATE_NAME} "
                          "in it); pass a checkpoint-N folder, or true for the last one in output_dir.")
    return resume


def _whole_checkpoints(output_dir: str) -> list[str]:
    """The checkpoint-N folders in `output_dir` that hold trainer_state.json (the trainer writes it last), oldest
    first."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import sort_checkpoints

    return [c for c in sort_checkpoints(output_dir) if Path(c, TRAINER_STATE_NAME).is_file()]


def _finish_wandb(summary: dict[str, Any] | None) -> None:
    """Store `summary` in the wandb run summary (the callback stored it with TRL's `train_runtime`; this has the
    wall time of `lenbalance_summary.json`) and close the run the trainer's WandbCallback opened (it leaves it open),
    so its files are complete."""
    wandb = sys.modules.get("wandb")  # imported only when the run reports to wandb
    if wandb is not None and wandb.run is not None:
        if summary is not None:
            wandb.run.summary.update(ledger.wandb_summary(summary))
        wandb.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="A recipe YAML (see recipes/).")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Override recipe keys, e.g. --set max_steps=2 lenbalance.compaction=false.")
    args = parser.parse_args(argv)
    run_command(parser, args.config, args.set)


def run_command(parser: argparse.ArgumentParser, recipe_path: str, sets: list[str]) -> None:
    """`run` from a command line: a recipe error is one line and exit 2; Ctrl-C one line (from the main process)
    naming the checkpoint to resume, and exit 130."""
    try:
        run(recipe_path, parse_overrides(sets))
    except RecipeError as error:  # a recipe or --set value that cannot be used: the message says what to change
        parser.exit(2, f"rl-lenbalance: error: {error}\n")
    except KeyboardInterrupt as error:
        parser.exit(130, f"rl-lenbalance: {error or 'interrupted.'}\n" if _launch_main_process() else None)


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings to a dict, values parsed as YAML scalars; `section.key=value` sets a key of a section."""
    overrides: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"Override {item!r} is not KEY=VALUE (or SECTION.KEY=VALUE, e.g. model.dtype=bfloat16).")
        *sections, name = key.split(".")
        target = overrides
        for section in sections:
            target = target.setdefault(section, {})
        try:
            target[name] = parse_yaml(value)
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({error.problem or error}); quote it or "
                              "close its brackets, e.g. report_to=[wandb] or run_name='a: b'.") from error
    return overrides


if __name__ == "__main__":
    main()
