"""Hostile model yamls: bad row numbers and multiples, and declared strides that disagree with the built layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from models.model import DetectionModel
from models.parse import ModelConfigError
from models.registry import add_module, remove_module
from tests.conftest import TUTORIAL_YAML, TinyBackbone

MODELS = Path(__file__).resolve().parents[1] / "models"
P2_ROW = "[-1, 1, Conv, [128, 3, 2]]"  # yolov5n layer 1 (stride 2 -> 4)
DETECT_ROW = "[[17, 20, 23], 1, Detect, [nc, anchors]]"


def _yolov5n() -> str:
    return (MODELS / "yolov5n.yaml").read_text()


def _bad(cfg: dict | str) -> str:
    """Build `cfg`; it must raise ModelConfigError with a one-line message, which is returned."""
    with pytest.raises(ModelConfigError) as info:
        DetectionModel(yaml.safe_load(cfg) if isinstance(cfg, str) else cfg)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("number", ["0", "-1", "'2'", "true", "null", "0.5", ".nan"])
def test_bad_row_number_is_rejected(number: str) -> None:
    text = _yolov5n()
    assert P2_ROW in text
    msg = _bad(text.replace(P2_ROW, P2_ROW.replace(", 1, ", f", {number}, ")))
    assert msg.startswith("layer 1 (Conv): number must be a positive integer, got ")


def test_bad_number_on_upsample_and_backbone_rows(tiny_backbone: type) -> None:
    msg = _bad(_yolov5n().replace("[-1, 1, nn.Upsample, [None, 2, 'nearest']]", "[-1, 0, nn.Upsample, [None, 2, 'nearest']]", 1))
    assert msg.startswith("layer 11 (nn.Upsample): number must be a positive integer, got 0")
    msg = _bad(TUTORIAL_YAML.format(backbone="TinyBackbone").replace("[-1, 1, TinyBackbone", "[-1, -2, TinyBackbone"))
    assert msg.startswith("layer 0 (TinyBackbone): number must be a positive integer, got -2")


BAD_MULTIPLES = [("depth_multiple", 0), ("depth_multiple", -0.33), ("width_multiple", "0.5"), ("width_multiple", True)]


@pytest.mark.parametrize(("key", "value"), BAD_MULTIPLES)
def test_bad_multiples_are_rejected(key: str, value: Any) -> None:
    cfg = yaml.safe_load(_yolov5n())
    cfg[key] = value
    msg = _bad(cfg)
    assert key in msg and "positive number" in msg


def test_zero_upsample_scale_is_a_config_error() -> None:
    msg = _bad(_yolov5n().replace("[-1, 1, nn.Upsample, [None, 2, 'nearest']]", "[-1, 1, nn.Upsample, [None, 0, 'nearest']]", 1))
    assert msg.startswith("layer 11 (nn.Upsample)")


def test_padding_before_detect_changes_the_real_stride() -> None:
    """A ZeroPad2d keeps the declared stride but grows the map: Detect would decode every P3 box one cell off."""
    text = _yolov5n()
    assert DETECT_ROW in text
    cfg = text.replace(DETECT_ROW, "[17, 1, nn.ZeroPad2d, [1]],\n   [[24, 20, 23], 1, Detect, [nc, anchors]]")
    msg = _bad(cfg)
    assert msg.startswith("layer 24 (nn.ZeroPad2d): Detect input 0 is declared at stride 8 but the built layers give stride 6.4")


def test_even_kernel_conv_before_detect_is_caught() -> None:
    """Conv(k=2, s=1) autopads by 1 and grows the map by one pixel while the bookkeeping keeps the stride."""
    cfg = _yolov5n().replace(DETECT_ROW, "[23, 1, Conv, [1024, 2, 1]],\n   [[17, 20, 24], 1, Detect, [nc, anchors]]")
    msg = _bad(cfg)
    assert msg.startswith("layer 24 (Conv): Detect input 2 is declared at stride 32") and "3x3 map" in msg


class LyingBackbone(TinyBackbone):
    """TinyBackbone with an extra stride-2 stem: real strides 8..64 while it still declares 4..32."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        self.pre = nn.Conv2d(in_channels, in_channels, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return super().forward(self.pre(x))


@pytest.fixture
def lying_backbone():
    """Register LyingBackbone for the duration of a test."""
    add_module("LyingBackbone", LyingBackbone, kind="backbone")
    yield LyingBackbone
    remove_module("LyingBackbone")


def test_backbone_declaring_wrong_strides_is_caught(lying_backbone: type) -> None:
    msg = _bad(TUTORIAL_YAML.format(backbone="LyingBackbone"))
    assert msg.startswith("layer 13 (C3): Detect input 0 is declared at stride 8 but the built layers give stride 16")


def test_repeated_conv_that_changes_channels_fails_at_build() -> None:
    """number > 1 repeats a Conv with the same (c1, c2): it cannot run when c1 != c2, so say so at build, not in training."""
    msg = _bad(_yolov5n().replace(P2_ROW, "[-1, 6, Conv, [128, 3, 1]]"))
    assert msg.startswith("layer 1 (Conv): dry run on a")


class ProbeNorm(nn.BatchNorm2d):
    """BatchNorm2d that records the training flag of every forward call."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.calls: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.training)
        return super().forward(x)


@pytest.fixture
def probe_norm():
    """Register ProbeNorm as a yaml 'norm' module for the duration of a test."""
    add_module("ProbeNorm", ProbeNorm, kind="norm")
    yield ProbeNorm
    remove_module("ProbeNorm")


def test_build_runs_one_eval_dry_pass_and_leaves_bn_stats(probe_norm: type) -> None:
    cfg = _yolov5n().replace(DETECT_ROW, "[-1, 1, ProbeNorm, []],\n   [[17, 20, 24], 1, Detect, [nc, anchors]]")
    model = DetectionModel(yaml.safe_load(cfg))
    probe = model.model[24]
    assert isinstance(probe, ProbeNorm) and probe.calls == [False]  # exactly one pass, in eval mode
    assert all(m.training for m in model.modules())  # train mode restored everywhere
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert int(m.num_batches_tracked) == 0
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))


def test_check_strides_keeps_state_dict_and_modes() -> None:
    model = DetectionModel(MODELS / "yolov5n.yaml", nc=3)
    model(torch.rand(2, 3, 64, 96))  # one training-mode pass: non-trivial BN statistics
    model.model[2].eval()  # a mixed train/eval state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    model.check_strides()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes


# ---- Size limits (models/limits.py): refused before any weight is allocated ----

C3_ROW = "[-1, 3, C3, [128]]"  # yolov5n layer 2


def _yolov5n_with(old: str, new: str) -> str:
    text = _yolov5n()
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        (C3_ROW, "[-1, 1000000000, C3, [128]]", "layer 2 (C3): number 1000000000 x depth 0.33 = 330,000,000; the limit is 100"),
        ("depth_multiple: 0.33", "depth_multiple: 1.0e+9", "layer 2 (C3): number 3 x depth 1e+09 = 3,000,000,000; the limit is 100"),
        ("width_multiple: 0.25", "width_multiple: 1.0e+6", "layer 0 (Conv): 64,000,000 output channels (width 1e+06); allowed 1 to 16,384"),
        (P2_ROW, "[-1, 1, Conv, [128, 1000000, 2]]", "parameters exceed the limit of 200,000,000 (raise it with --max-params"),
        (P2_ROW, "[-1, 1, Conv, [128, 3, 1000000000]]", "layer 1 (Conv): total stride 2e+09 exceeds the limit of 1024"),
        ("nc: 80", "nc: 1000000000", "nc (the number of classes) must be an integer from 1 to 100,000, got 1000000000"),
        ("nc: 80", "nc: abc", "nc (the number of classes) must be an integer from 1 to 100,000, got 'abc'"),
        ("nc: 80", "nc: -3", "nc (the number of classes) must be an integer from 1 to 100,000, got -3"),
        ("nc: 80", "nc: 2.5", "nc (the number of classes) must be an integer from 1 to 100,000, got 2.5"),
    ],
    ids=["number", "depth_multiple", "width_multiple", "kernel", "stride", "nc-huge", "nc-text", "nc-negative", "nc-float"],
)
def test_oversized_or_mistyped_numbers_are_refused_before_allocating(old: str, new: str, needle: str) -> None:
    assert needle in _bad(_yolov5n_with(old, new))


def test_kernel_beyond_int64_shapes_is_one_line() -> None:
    msg = _bad(_yolov5n_with(P2_ROW, "[-1, 1, Conv, [128, 100000000000, 2]]"))
    assert msg.startswith("model config: ") or msg.startswith("layer 1 (Conv)")


def test_too_many_rows_are_refused() -> None:
    cfg = yaml.safe_load(_yolov5n())
    cfg["backbone"] = cfg["backbone"] + [[-1, 1, "nn.Identity", []]] * 1000
    assert _bad(cfg).startswith("model config: 1,0")


def test_parameter_limit_is_raisable_by_argument_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelConfigError, match=r"1,872,157 parameters exceed the limit of 1,000,000 \(raise it with"):
        DetectionModel(MODELS / "yolov5n.yaml", max_params=1_000_000)
    monkeypatch.setenv("MOBILE_YOLO_MAX_PARAMS", "1e6")
    with pytest.raises(ModelConfigError, match="exceed the limit of 1,000,000"):
        DetectionModel(MODELS / "yolov5n.yaml")
    assert DetectionModel(MODELS / "yolov5n.yaml", max_params=2_000_000).yaml["nc"] == 80  # the argument wins
    monkeypatch.setenv("MOBILE_YOLO_MAX_ACTIVATIONS", "1000")
    with pytest.raises(ModelConfigError, match=r"activation values per 640x640 image exceed the limit of 1,000 \(raise it with"):
        DetectionModel(MODELS / "yolov5n.yaml", max_params=2_000_000)
    monkeypatch.setenv("MOBILE_YOLO_MAX_PARAMS", "lots")
    with pytest.raises(ValueError, match="environment variable MOBILE_YOLO_MAX_PARAMS must be a positive integer, got 'lots'"):
        DetectionModel(MODELS / "yolov5n.yaml")


@pytest.mark.parametrize("cfg", sorted(p.name for p in MODELS.glob("*.yaml")))
def test_size_estimate_equals_the_built_model(cfg: str) -> None:
    """The meta-device count is the real count for every shipped config (so the limit measures what gets allocated)."""
    from models.limits import ModelLimits
    from models.model import load_model_config
    from models.parse import check_model_size

    params, acts = check_model_size(load_model_config(MODELS / cfg), 3, ModelLimits())
    model = DetectionModel(MODELS / cfg)
    assert params == sum(p.numel() for p in model.parameters())
    assert 1e6 < acts < 1e8  # layer outputs at 640: 1.8M (mobilenetv4_conv_small-cls) to 41M (yolov5x)
