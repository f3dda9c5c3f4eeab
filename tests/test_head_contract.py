"""The head contract: Head base class, head registry, split_output layouts and DetectionModel's head accessors."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

from models.heads.anchor_free import AnchorFreeDetect
from models.heads.base import Head, HeadPolicy, head_class, head_policy, known_heads, register_head
from models.heads.detect import Detect
from models.model import DetectionModel
from models.parse import ModelConfigError
from tests.conftest import EPS32

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_registry_lookups() -> None:
    assert head_class("anchor_based") is Detect and head_class("anchor_free") is AnchorFreeDetect
    assert {"anchor_based", "anchor_free"} <= set(known_heads())
    assert list(known_heads()) == sorted(known_heads())


def test_unknown_kind_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown head kind 'yolo_world'") as info:
        head_class("yolo_world")
    assert "anchor_based" in str(info.value) and "anchor_free" in str(info.value)


def test_register_head_rejects_bad_classes() -> None:
    class NoKind(Head):
        pass

    class Impostor(Head):
        kind: ClassVar[str] = "anchor_free"
        policy: ClassVar[HeadPolicy] = AnchorFreeDetect.policy

    class NoPolicy(Head):
        kind: ClassVar[str] = "no_policy"

    class InheritedPolicy(AnchorFreeDetect):
        kind: ClassVar[str] = "inherited_policy"

    with pytest.raises(ValueError, match="non-empty kind"):
        register_head(NoKind)
    with pytest.raises(ValueError, match="non-empty kind"):
        register_head(torch.nn.Conv2d)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="already registered to AnchorFreeDetect"):
        register_head(Impostor)
    assert register_head(AnchorFreeDetect) is AnchorFreeDetect  # re-registering the same class is harmless
    for cls in (NoPolicy, InheritedPolicy):  # no head trains or exports by another head's recipe by accident
        with pytest.raises(ValueError, match="must declare its own `policy`"):
            register_head(cls)
    assert "no_policy" not in known_heads() and "inherited_policy" not in known_heads()


def test_class_attributes() -> None:
    assert Detect.export_layout == "(batch, anchors, 5 + nc)"
    assert AnchorFreeDetect.export_layout == "(batch, 4 + nc, anchors)"
    with pytest.raises(NotImplementedError):
        Head.split_output(torch.zeros(1, 6, 2))


def test_split_output_anchor_based_by_hand() -> None:
    # one box: xywh (10, 20, 4, 6), objectness 0.5, classes (0.2, 0.8), one extra column 7
    pred = torch.tensor([[[10.0, 20.0, 4.0, 6.0, 0.5, 0.2, 0.8, 7.0]]])
    boxes, scores, extras = head_class("anchor_based").split_output(pred, nm=1)
    assert boxes.tolist() == [[[8.0, 17.0, 12.0, 23.0]]]
    assert torch.equal(scores, torch.tensor([[[0.1, 0.4]]]))  # halving is exact in float32
    assert extras.tolist() == [[[7.0]]]
    _, _, none = Detect.split_output(pred[..., :7])
    assert none.shape == (1, 1, 0)


def test_split_output_anchor_free_by_hand() -> None:
    # two boxes in (batch, 4 + nc, N): xywh (10, 20, 4, 6) and (1, 1, 2, 2), classes (0.2, 0.8) and (0.9, 0.1)
    pred = torch.tensor([[[10.0, 1.0], [20.0, 1.0], [4.0, 2.0], [6.0, 2.0], [0.2, 0.9], [0.8, 0.1]]])
    boxes, scores, extras = head_class("anchor_free").split_output(pred)
    assert boxes.tolist() == [[[8.0, 17.0, 12.0, 23.0], [0.0, 0.0, 2.0, 2.0]]]
    assert torch.equal(scores, torch.tensor([[[0.2, 0.8], [0.9, 0.1]]]))
    assert extras.shape == (1, 2, 0)


@pytest.mark.parametrize("kind, shape", [("anchor_based", (1, 10, 6)), ("anchor_free", (1, 5, 10)), ("anchor_free", (6, 10))])
def test_split_output_rejects_narrow_tensors(kind: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="split_output"):
        head_class(kind).split_output(torch.zeros(shape), nm=2)


@pytest.mark.parametrize("cfg, kind", [("yolov5n.yaml", "anchor_based"), ("yolov8n.yaml", "anchor_free")])
def test_model_head_accessors_and_split(cfg: str, kind: str) -> None:
    model = DetectionModel(MODELS / cfg, nc=3).eval()
    assert model.head is model.detect is model.model[-1] and isinstance(model.head, Head)
    assert model.head_kind == kind and model.head.nc == 3 and model.head.nl == 3
    assert model.head.stride.dtype == torch.float32 and model.head.stride.tolist() == [8.0, 16.0, 32.0]
    with torch.no_grad():
        pred = model(torch.rand(2, 3, 64, 96))[0]
    boxes, scores, extras = head_class(model.head_kind).split_output(pred)
    n = 8 * 12 + 4 * 6 + 2 * 3
    assert boxes.shape == (2, n * (3 if kind == "anchor_based" else 1), 4) and scores.shape[-1] == 3 and extras.shape[-1] == 0
    xywh = pred[..., :4] if kind == "anchor_based" else pred[:, :4].transpose(1, 2)
    tol = 4 * EPS32 * xywh.abs().max().item()  # x +- w/2 rounds once or twice
    assert torch.allclose((boxes[..., :2] + boxes[..., 2:]) / 2, xywh[..., :2], rtol=0, atol=tol)
    assert torch.allclose(boxes[..., 2:] - boxes[..., :2], xywh[..., 2:], rtol=0, atol=tol)
    assert scores.min() >= 0 and scores.max() <= 1


def test_detect_keeps_its_state_dict_keys() -> None:
    keys = set(DetectionModel(MODELS / "yolov5n.yaml").detect.state_dict())
    assert keys == {"anchors"} | {f"m.{i}.{p}" for i in range(3) for p in ("weight", "bias")}


def test_last_layer_must_be_a_head() -> None:
    cfg = yaml.safe_load((MODELS / "yolov8n.yaml").read_text())
    cfg["head"][-1] = [21, 1, "Conv", [64, 1, 1]]
    with pytest.raises(ModelConfigError, match="last layer must be a detection head"):
        DetectionModel(cfg)


@pytest.mark.parametrize("kind", known_heads())
def test_int8_policy_lists_formats_the_head_exports_to_and_says_why_not_others(kind: str) -> None:
    from utils.export.exporter import INT8_FORMATS

    policy = head_policy(kind)
    if policy.int8_formats is not None:
        assert set(policy.int8_formats) <= set(INT8_FORMATS) & set(policy.export_formats or INT8_FORMATS)
        assert policy.int8_reason, f"{kind}: a head that refuses --int8 for a format says why in one line"
