"""Real training steps for every registered backbone family under every registered head, through the task's training
entry point (the Trainer's own memory layout, optimizer, loss, validation and checkpoint), then an ONNX export of the
checkpoint run through the runtime, in subprocesses: a crash in a kernel (as MobileOne's channels-last backward once
did) fails tests instead of ending the test run.

The models are the tutorials' layout: a shipped config of each head kind whose layer 0 is a registered backbone, with
that row swapped for a backbone of the family; each trains on its task's sample dataset (Task.sample_data). So a new
backbone, head or task is covered without editing this file. The default suite trains each head on a different variant
of each family (the smallest first); `-m slow` trains every variant under every head.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import models  # noqa: F401  (registers the built-in modules)
from models.heads.base import head_policy, known_heads
from models.parse import row_spec
from models.registry import get_module, registered
from utils.tasks import get_task, known_tasks

ROOT = Path(__file__).resolve().parents[1]


def _cfg(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def head_templates() -> dict[str, Path]:
    """Per head kind, the first shipped config (by name) whose layer 0 is a registered backbone."""
    backbones = {spec.name for spec in registered("backbone")}
    found: dict[str, Path] = {}
    for path in sorted((ROOT / "models").glob("*.yaml")):
        cfg = _cfg(path)
        if cfg["backbone"][0][2] in backbones:
            found.setdefault(row_spec(cfg["head"][-1][2], cfg.get("anchors") is not None).cls.kind, path)
    return found


def _params(name: str) -> int:
    """Parameter count of a registered backbone, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return sum(p.numel() for p in get_module(name).cls().parameters())


def backbone_families() -> dict[str, list[str]]:
    """Registered backbones by family, smallest first: one whose class derives from another registered one is its variant."""
    specs = registered("backbone")
    by_class = {spec.cls: spec.name for spec in specs}
    families: dict[str, list[str]] = {}
    for spec in specs:
        base = next((by_class[c] for c in spec.cls.__mro__[1:] if c in by_class), None)
        families.setdefault(base or spec.name, [])
        if base is not None:
            families[base].append(spec.name)
    return {family: sorted(variants or [family], key=_params) for family, variants in families.items()}


TEMPLATES, FAMILIES = head_templates(), backbone_families()
HEADS = sorted(TEMPLATES)


def test_the_matrix_covers_both_families_every_head_and_every_task() -> None:
    assert {"MobileNetV4", "MobileOne"} <= set(FAMILIES) and len(FAMILIES["MobileOne"]) == 5
    assert sorted(known_heads()) == HEADS, "a registered head without a shipped config on a registered backbone is untested"
    assert {head_policy(h).task for h in HEADS} == set(known_tasks())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per task, its sample dataset at the smallest size: two images (per class, for classification) to train on and two
    to validate."""
    root = tmp_path_factory.mktemp("one_batch")
    return {name: get_task(name).sample_data(root / name, n_train=2, n_val=2, seed=5) for name in known_tasks()}


def _job(variant: str, head: str, datasets: dict[str, Path], out: Path) -> str:
    """TASK=DATA=CFG for tests/train_worker.py: the head's template with `variant` at layer 0."""
    task = head_policy(head).task
    cfg = _cfg(TEMPLATES[head])
    cfg["backbone"][0] = [-1, 1, variant, []]
    path = out / f"{variant}_{head}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"{task}={datasets[task]}={path}"


def train_jobs(jobs: list[str], out: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """Run tests/train_worker.py on the jobs: ({config stem: its RESULT record}, a crash report or "")."""
    proc = subprocess.run([sys.executable, "-m", "tests.train_worker", str(out / "runs"), *jobs], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.splitlines()
    results = {Path(r["cfg"]).stem: r for r in (json.loads(ln.split(" ", 1)[1]) for ln in lines if ln.startswith("RESULT "))}
    started = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("training ")]
    crash = f"exit {proc.returncode} while training {started[-1:]}: {proc.stderr[-3000:]}" if proc.returncode else ""
    return results, crash


def assert_trained(results: dict[str, dict[str, Any]], crash: str, name: str) -> None:
    """The step ran; its loss and every gradient and weight are finite; backbone and neck/head both got gradient;
    the epoch ended in a checkpoint that validates, exports to ONNX and runs there like the .pt; every conv geometry
    computed correct results in the training layout."""
    assert name in results, crash or f"no result for {name}"
    r = results[name]
    assert r["losses"] and all(map(math.isfinite, r["losses"])), (name, r["losses"])
    for part, rec in r["parts"].items():
        assert rec["finite"], (name, part, "non-finite gradient or weight")
        assert rec["grad_norm"] > 0, (name, part, "no gradient reached it")
    assert r["checkpoint"], (name, "no checkpoint written")
    assert r["metrics"] and all(map(math.isfinite, r["metrics"])), (name, "validation", r["metrics"])
    onnx = r["onnx"]
    assert onnx["shapes_match"] and onnx["max_err"] <= onnx["tol"], (name, "ONNX run differs from the .pt", onnx)
    assert r["layout"]["checked"] > 0 and not r["layout"]["failed"], (name, r["layout"]["failed"])


class FamilyRuns:
    """Per family, on first use, one subprocess that trains each head on its own variant: the i-th head the i-th smallest."""

    def __init__(self, datasets: dict[str, Path], tmp: pytest.TempPathFactory) -> None:
        self.datasets, self.tmp = datasets, tmp
        self.done: dict[str, tuple[dict[str, dict[str, Any]], str]] = {}

    @staticmethod
    def variant(family: str, head: str) -> str:
        variants = FAMILIES[family]
        return variants[HEADS.index(head) % len(variants)]

    def __call__(self, family: str) -> tuple[dict[str, dict[str, Any]], str]:
        if family not in self.done:
            out = self.tmp.mktemp(family)
            self.done[family] = train_jobs([_job(self.variant(family, h), h, self.datasets, out) for h in HEADS], out)
        return self.done[family]


@pytest.fixture(scope="module")
def family_runs(datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> FamilyRuns:
    return FamilyRuns(datasets, tmp_path_factory)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_training_step_per_family_and_head(family: str, head: str, family_runs: FamilyRuns) -> None:
    results, crash = family_runs(family)
    assert_trained(results, crash, f"{family_runs.variant(family, head)}_{head}")


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_training_step_of_every_variant(family: str, head: str, datasets: dict[str, Path], tmp_path: Path) -> None:
    results, crash = train_jobs([_job(v, head, datasets, tmp_path) for v in FAMILIES[family]], tmp_path)
    for variant in FAMILIES[family]:
        assert_trained(results, crash, f"{variant}_{head}")
