"""OpenMP's wait policy on a busy CPU (utils/openmp.py): chosen before torch loads, only when the CPU is busy at start,
never over the user's own setting."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from utils import openmp

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "val.py", "detect.py", "export.py",
           *(f"{folder}/{name}.py" for folder in ("segment", "classify") for name in ("train", "val", "predict"))]


@pytest.mark.parametrize(("others", "env", "want"), [
    (4, {}, "PASSIVE"),  # 4 other runnable tasks on 2 cores: busy
    (2, {}, "PASSIVE"),
    (1, {}, None),  # a core is free: OpenMP's default (spinning) keeps its speed
    (None, {}, None),  # no /proc/loadavg (not Linux)
    (4, {"OMP_WAIT_POLICY": "ACTIVE"}, None),  # the user's choice wins
    (4, {"GOMP_SPINCOUNT": "1000"}, None),
])  # fmt: skip
def test_passive_only_on_a_busy_cpu_and_never_over_the_user(others: int | None, env: dict[str, str], want: str | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(openmp, "runnable_others", lambda: others)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    environ = dict(env)
    assert openmp.choose_wait_policy(environ) == want
    assert environ == (env if want is None else {**env, "OMP_WAIT_POLICY": want})


def test_run_queue_is_read_from_proc_loadavg_without_counting_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = iter(["0.50 0.40 0.30 5/300 42", "0.50 0.40 0.30 3/300 42", "0.5 0.4 0.3 4/300 42", "1 1 1 9/300 1", "1 1 1 1/300 1"])
    monkeypatch.setattr(openmp.Path, "read_text", lambda self, encoding=None: next(reads))
    monkeypatch.setattr(openmp, "INTERVAL", 0.0)
    assert openmp.runnable_others() == 3  # median of 4, 2, 3, 8, 0
    monkeypatch.setattr(openmp.Path, "read_text", lambda self, encoding=None: "garbage")
    assert openmp.runnable_others() is None


def test_not_set_in_a_process_that_has_torch_already(monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported into a running program (tests, notebooks), it leaves the environment alone: its children inherit nothing."""
    monkeypatch.setattr(openmp, "busy_cpu", lambda: True)
    environ: dict[str, str] = {}
    assert openmp.at_start(environ, {"sys", "torch"}) is None and environ == {}
    assert openmp.at_start(environ, {"sys", "argparse"}) == "PASSIVE" and environ == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_import_it_before_anything_that_loads_torch(script: str) -> None:
    """The first import of the project's packages (and so of torch) in each command-line script is utils.openmp."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    first = next(n for n in imports if (n.names[0].name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
                 in ("utils", "models", "torch", "torchvision"))  # fmt: skip
    assert isinstance(first, ast.Import) and first.names[0].name == "utils.openmp", (script, ast.dump(first))
