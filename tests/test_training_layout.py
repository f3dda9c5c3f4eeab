"""The Trainer's memory layout (utils/engine/memory_format.py): channels-last, except the convs oneDNN cannot train in it;
every conv geometry of every shipped model and registered backbone computes correct results in it on this CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models.registry import registered
from tests.conftest import rel_err, rounding_tol
from utils.engine.memory_format import needs_contiguous, to_training_layout

ROOT = Path(__file__).resolve().parents[1]


def test_strided_pointwise_convs_see_contiguous_inputs_and_the_rest_goes_channels_last() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 1, 2), nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 32, 1, 1), nn.Conv2d(32, 32, 1, (1, 2)))
    assert [needs_contiguous(m) for m in model] == [True, False, False, True]
    reference = nn.Sequential(*[nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) for m in model])
    reference.load_state_dict(model.state_dict())
    to_training_layout(model)
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last) and not model[1].weight.is_contiguous()
    seen: list[bool] = []
    for i in (0, 3):
        model[i].register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = model(x)
    assert seen == [True, True]  # the strided 1x1 convs saw their inputs contiguous
    # the layout moves memory, never values: the plain model agrees within float32 rounding
    assert rel_err(y, reference.double()(x.double())) < rounding_tol(model)


def _check_layout(names: list[str]) -> None:
    """Output and gradients of each distinct conv of the named models in the layout the Trainer gives it, against the
    contiguous layout within the float32 rounding bound (tests/layout_worker.py derives it); in a subprocess, since a
    faulty kernel may crash the process."""
    proc = subprocess.run([sys.executable, "-m", "tests.layout_worker", "64", *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
    checked = [int(ln.split()[1]) for ln in proc.stdout.splitlines() if ln.startswith("CHECKED")]
    assert checked and checked[0] >= len(names) and not failed, "\n".join(failed)


def test_every_registered_backbone_is_correct_in_the_training_layout() -> None:
    _check_layout([spec.name for spec in registered("backbone")])  # the detectors' necks and heads: test_train_every_backbone


@pytest.mark.slow
def test_every_shipped_model_is_correct_in_the_training_layout() -> None:
    _check_layout([str(p.relative_to(ROOT)) for p in sorted((ROOT / "models").glob("*.yaml"))])
