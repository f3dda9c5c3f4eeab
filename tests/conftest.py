"""Shared fixtures: a tiny list-returning backbone registered only for the tests, realistic BN states and tolerances."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from models.backbone import Backbone
from models.registry import add_module, remove_module

TUTORIAL_YAML = """
nc: 80
depth_multiple: 0.33
width_multiple: 0.50
anchors:
  - [10,13, 16,30, 33,23]
  - [30,61, 62,45, 59,119]
  - [116,90, 156,198, 373,326]
backbone:
  [[-1, 1, {backbone}, []],   # fills indices 0-4
   [-1, 1, SPPF, [1024, 5]]]            # 5
head:
  [[-1, 1, Conv, [512, 1, 1]],
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],
   [[-1, 3], 1, Concat, [1]],            # stride-16 backbone map
   [-1, 3, C3, [512, False]],            # 9
   [-1, 1, Conv, [256, 1, 1]],
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],
   [[-1, 2], 1, Concat, [1]],            # stride-8 backbone map
   [-1, 3, C3, [256, False]],            # 13 (P3/8)
   [-1, 1, Conv, [256, 3, 2]],
   [[-1, 10], 1, Concat, [1]],
   [-1, 3, C3, [512, False]],            # 16 (P4/16)
   [-1, 1, Conv, [512, 3, 2]],
   [[-1, 5], 1, Concat, [1]],
   [-1, 3, C3, [1024, False]],           # 19 (P5/32)
   [[13, 16, 19], 1, Detect, [nc, anchors]]]
"""


class TinyBackbone(Backbone):
    """Four strided convs giving stride 4, 8, 16, 32 maps with distinct channel counts."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.out_channels = (8, 16, 24, 32)
        self.strides = (4, 8, 16, 32)
        chans = (in_channels, *self.out_channels)
        self.stem = nn.Conv2d(in_channels, in_channels, 3, 2, 1)
        self.stages = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1) for i in range(4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


@pytest.fixture
def tiny_backbone():
    """Register TinyBackbone as 'TinyBackbone' for the duration of a test."""
    add_module("TinyBackbone", TinyBackbone, kind="backbone")
    yield TinyBackbone
    remove_module("TinyBackbone")


def assert_declared_shapes(model: nn.Module, sizes: list[tuple[int, int]]) -> None:
    """Each feature map's channels and stride equal the backbone's statically declared out_channels/strides."""
    with torch.no_grad():
        for h, w in sizes:
            feats = model(torch.randn(1, 3, h, w))
            got = [(f.shape[1], h // f.shape[2], w // f.shape[3]) for f in feats]
            assert got == [(c, s, s) for c, s in zip(model.out_channels, model.strides)], (h, w)


# ---------------------------------------------------------------------------------------------------------------
# Numerics: every numeric comparison in the suite runs on realistic model states with a tolerance derived from the
# floating-point precision, so that pass/fail does not depend on the thread count (float summation order).
# ---------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EPS32, EPS16 = torch.finfo(torch.float32).eps, torch.finfo(torch.float16).eps  # 1.19e-7, 9.77e-4: one unit in the last place at 1
ROUNDING_K = 16.0  # safety factor of rounding_tol, see there


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same global torch RNG state, whatever ran before it and however it is selected."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ct() -> Any:
    """coremltools for the Core ML tests, or a skip naming the pip command (it is in requirements-mobile.txt only)."""
    from utils.export.coreml import import_coremltools
    from utils.export.formats import ExportError

    try:
        return import_coremltools()
    except ExportError as e:
        pytest.skip(str(e))


def random_images(shape: tuple[int, ...], seed: int = 0, normalise: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform-noise images in [0, 1], ImageNet-normalised when `normalise` (the channel averages for C != 3).

    Backbones (timm style) see normalised images; YOLO detectors see the raw [0, 1] values.
    """
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    if normalise:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if shape[1] == 3 else ((0.449,), (0.226,))
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x.to(dtype)


@torch.no_grad()
def calibrate_bn(
    model: nn.Module, shape: tuple[int, ...] = (4, 3, 64, 64), steps: int = 3, seed: int = 0, normalise: bool = True, affine: bool = True
) -> nn.Module:
    """Give every BatchNorm of `model` realistic running statistics; returns `model` in eval mode.

    With `affine`, BN weights and biases are first drawn from U(0.5, 1.5) and N(0, 0.2), so a fold that drops them shows,
    and layer-scale gammas (parameters named `gamma`) from U(0.25, 0.75): at their 1e-5 init, blocks without a residual
    shrink the signal to ~1e-5, below BN's eps, which leaves it to cancellation (float32 errors of ~1e3 eps).
    The running statistics are then re-estimated as a cumulative average (momentum=None) over `steps` forward passes of
    `random_images(shape)` with only the BN layers in train mode (DropPath/Dropout stay off, so this is deterministic).
    Each BN thus normalises what it really sees and activations stay O(1) at any depth, unlike random running statistics,
    which compound layer by layer to ~1e5, where float32 summation order (thread count) decides the result.
    Calibrate at the size the test runs at (a much smaller size leaves deep stages padding-dominated statistics), with
    a batch giving >= ~32 values per channel at stride 32, B*(H/32)*(W/32) >= 32: batch statistics of a handful of values
    leave near-zero variances that blow eval-mode activations up to ~1e5 again (e.g. B=2 at 64x64).
    """
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    if affine:
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "gamma":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.25)
    for bn in bns:
        if affine and bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    dtype = next(model.parameters()).dtype
    for i in range(steps):
        model(random_images(shape, seed=seed + 1 + i, normalise=normalise, dtype=dtype))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return model.eval()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref|: the error relative to the output's scale."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def query_set_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """RT-DETR (1, Q, 4 + nc) rows as a set (queries tied in score may swap places): the worst distance to the nearest row,
    boxes relative to the largest coordinate, scores absolute."""
    got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = torch.ones(ref.shape[-1], dtype=torch.float64)
    scale[:4] = ref[..., :4].abs().max()
    a, b = got[0] / scale, ref[0] / scale
    dist = (a[:, None, :] - b[None, :, :]).abs().amax(-1)
    return float(max(dist.amin(1).max(), dist.amin(0).max()))


def final_rows_error(got: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Worst difference between two (B, K, 6) ranked final-row outputs [x1, y1, x2, y2, score, class] (end-to-end heads),
    boxes relative to the largest coordinate and scores absolute, matching each row to the nearest row of the same class.

    Rounding may reorder rows of near-equal score and swap which pair takes the last place, so order is ignored and rows
    scored within `tol` of the last kept score are not required to have a partner; every other row must.
    """
    got, ref = got.detach(), ref.detach()
    scale = float(ref[..., :4].double().abs().max().clamp(min=1e-12))
    worst = 0.0
    for a, b in ((got, ref), (ref, got)):
        for rows, other in zip(a.double(), b.double()):
            cut = float(min(rows[:, 4].min(), other[:, 4].min())) + tol
            for row in rows[rows[:, 4] > cut]:
                same = other[other[:, 5] == row[5]]
                if not len(same):
                    return float("inf")
                d = torch.maximum((same[:, :4] - row[:4]).abs().amax(1) / scale, (same[:, 4] - row[4]).abs())
                worst = max(worst, float(d.min()))
    return worst


def rounding_tol(model: nn.Module, dtype: torch.dtype = torch.float32, k: float = ROUNDING_K) -> float:
    """Relative tolerance (of the output scale, see rel_err) for two evaluations of `model` that differ only in rounding.

    Derivation: a length-n dot product computed in precision eps has a relative error of ~eps*sqrt(n) (rounding errors
    add like a random walk; the worst case is eps*n); with BN-calibrated states each layer has a gain of ~1, so the errors
    of L layers in a chain add up to ~eps*sqrt(n)*L of the output scale. n is the largest fan-in and L the number of
    conv/linear layers of `model` (at least the longest path; pass the fused model, one conv per re-parameterised unit).
    k = 16 covers the constant in "~" and the cancellation where a folded BN subtracts a large running mean: measured
    errors reach at most 1.4 eps*sqrt(n)*L (MobileOne-S0, the worst conditioned) and mostly stay below 0.1 of it, so
    k = 16 keeps a > 10x margin at 1 and 2 threads. A real fusion or mapping error (a dropped bias, a BN eps mix-up, a
    wrong key) is orders of magnitude larger, in float64 by far.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    fan_in = max(m.weight[0].numel() for m in layers)
    return k * torch.finfo(dtype).eps * math.sqrt(fan_in) * len(layers)


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker, torch (and the subprocesses a test starts) use this worker's share of the cores: the
    workers together use each core once, instead of each spinning a thread per core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(autouse=True, scope="session")
def _experiment_loggers_off() -> Iterator[None]:
    """Training in tests runs without the installed experiment loggers (their start-up costs seconds per run), module-
    scoped training fixtures included; the loggers' own tests (tests/test_loggers.py) switch them on. Subprocesses
    inherit the setting."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILE_YOLO_LOGGERS_OFF", "all")
        yield


@pytest.fixture(autouse=True)
def _torch_threads_unchanged() -> Iterator[None]:
    """A test that leaves torch's thread count changed fails: every test after it would run at that count (one leak once
    made most of the suite single-threaded and several times slower)."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test changed torch's thread count from {before} to {after} and did not restore it")


@pytest.fixture(autouse=True)
def _log_records_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripts' set_logging() stops 'mobile_yolo' propagating; let caplog see its records in every test."""
    import logging

    monkeypatch.setattr(logging.getLogger("mobile_yolo"), "propagate", True)


def tiny_shapes_yaml(root: Path, n_train: int, n_val: int, seed: int, polygons: bool = False) -> Path:
    """A small generated shapes dataset under root and its dataset yaml (no generator key: it exists already);
    `polygons` gives segmentation labels."""
    from utils.data.shapes_dataset import generate_shapes

    generate_shapes(root / "shapes", n_train=n_train, n_val=n_val, seed=seed, polygons=polygons)
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "data/shapes.yaml").read_text())
    cfg.update(path=str(root / "shapes"))
    cfg.pop("generator", None)
    (root / "shapes.yaml").write_text(yaml.safe_dump(cfg))
    return root / "shapes.yaml"


def one_line_exit(excinfo: pytest.ExceptionInfo, prog: str, *needles: str) -> str:
    """The SystemExit message of a script: one line, starting 'prog: error:', containing every needle."""
    msg = str(excinfo.value.code)
    assert msg.startswith(f"{prog}: error: ") and "\n" not in msg and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg
