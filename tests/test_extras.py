"""Training needs none of the optional dependencies; a command that needs one names the install that adds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rl_lenbalance.extras import EXTRAS, MissingExtraError, require

TESTS = Path(__file__).resolve().parent
HIDDEN = ("matplotlib", "rich", "gguf")  # what the [demo] and [report] extras add, but wandb (TRL's own report_to)

SCRIPT = """
import sys
for name in {hidden!r}:
    sys.modules[name] = None  # as if not installed: `import name` raises ImportError
from pathlib import Path
from trl import GRPOTrainer
from rl_lenbalance import LenBalanceCallback, LenBalanceConfig
sys.path.insert(0, {tests!r})
from helpers import make_args, make_trainer
trainer = make_trainer(GRPOTrainer, {model!r}, make_args(Path({tmp!r}), max_steps=1))
trainer.add_callback(LenBalanceCallback(trainer, LenBalanceConfig()))
trainer.train()
logged = {{key for row in trainer.state.log_history for key in row}}
print("TRAINED", trainer.state.global_step, any(key.startswith("lenbalance/") for key in logged), flush=True)
assert not any(name in sys.modules and sys.modules[name] is not None for name in {hidden!r})
from rl_lenbalance.cli.main import main
main(["report", {tmp!r}])
"""


def test_the_callback_trains_without_the_extras_and_a_command_names_the_missing_one(tiny_model_dir, tmp_path):
    script = SCRIPT.format(hidden=HIDDEN, tests=str(TESTS), model=str(tiny_model_dir), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert "TRAINED 1 True" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ('rl-lenbalance: error: rl-lenbalance report needs matplotlib, which is not installed: '
                    'pip install "rl-lenbalance[report]"')


def test_require_names_the_extra_of_every_optional_package(monkeypatch):
    assert require("rich", "x").__name__ == "rich"  # installed here: the module itself
    for package, extra in EXTRAS.items():
        monkeypatch.setitem(sys.modules, package, None)
        with pytest.raises(MissingExtraError, match=rf'^Converting needs {package}, which is not installed: pip '
                                                    rf'install "rl-lenbalance\[{extra}\]"$'):
            require(package, "Converting")
