"""Segmentation end to end on a tiny generated shapes-seg dataset: segment/train.py -> segment/val.py ->
segment/predict.py, and the exported ONNX / TorchScript / OpenVINO models against the .pt through the one backend."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import rounding_tol
from utils.data.shapes_dataset import SHAPE_NAMES, generate_shapes
from utils.engine.trainer import TrainError
from utils.export.exporter import ExportError, export_model
from utils.runtime.backend import DetectBackend

CFG = "models/yolov5n-seg.yaml"
KW = dict(imgsz=64, batch_size=8, workers=0, device="cpu", noplots=True)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16 + 8 image shapes dataset with polygon labels and its yaml."""
    root = tmp_path_factory.mktemp("seg")
    generate_shapes(root / "ds", n_train=16, n_val=8, seed=3, polygons=True)
    cfg = {"path": str(root / "ds"), "train": "images/train", "val": "images/val", "names": dict(enumerate(SHAPE_NAMES))}
    (root / "seg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "seg.yaml"


@pytest.fixture(scope="module")
def trained(seg_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of one epoch of segment/train.py."""
    from segment import train as seg_train

    project = tmp_path_factory.mktemp("runs")
    return seg_train.run(cfg=CFG, data=str(seg_data), epochs=1, project=str(project), **KW)


def test_training_writes_yolov5_seg_results(trained: Path) -> None:
    header = (trained.parents[1] / "results.csv").read_text().splitlines()[0]
    columns = [c.strip() for c in header.split(",")]
    assert columns[:5] == ["epoch", "train/box_loss", "train/seg_loss", "train/obj_loss", "train/cls_loss"]
    assert "metrics/mAP_0.5:0.95(M)" in columns and "val/seg_loss" in columns
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["opt"]["task"] == "segment"


def test_scripts_refuse_the_other_task(seg_data: Path, tmp_path: Path) -> None:
    import train
    from segment import train as seg_train

    with pytest.raises(TrainError, match="segment/train.py"):
        train.run(cfg=CFG, data=str(seg_data), epochs=1, project=str(tmp_path), **KW)
    with pytest.raises(TrainError, match="train.py"):
        seg_train.run(cfg="models/yolov5n.yaml", data=str(seg_data), epochs=1, project=str(tmp_path), **KW)
    with pytest.raises(TrainError, match="--evolve is not supported for segmentation"):
        seg_train.run(cfg=CFG, data=str(seg_data), epochs=1, project=str(tmp_path), evolve=2, **KW)


def test_val_returns_box_and_mask_metrics(trained: Path, seg_data: Path, tmp_path: Path) -> None:
    from segment import val as seg_val

    row, maps, speed = seg_val.run(weights=str(trained), data=str(seg_data), imgsz=64, batch_size=4, workers=0, device="cpu",
                                   project=str(tmp_path), save_json=True)
    assert len(row) == 12 and all(0.0 <= v <= 1.0 for v in row[:8])
    assert len(maps) == len(SHAPE_NAMES) and len(speed) == 3
    records = __import__("json").loads(next(tmp_path.rglob("*_predictions.json")).read_text())
    assert records and all("segmentation" in r and "counts" in r["segmentation"] for r in records)


def test_predict_draws_masks_and_saves_polygons(trained: Path, seg_data: Path, tmp_path: Path) -> None:
    from segment import predict as seg_predict

    source = Path(yaml.safe_load(seg_data.read_text())["path"]) / "images" / "val"
    for retina in (False, True):
        out = seg_predict.run(weights=str(trained), source=str(source), imgsz=(64, 64), conf_thres=0.001, save_txt=True,
                              project=str(tmp_path), name=f"retina{retina}", retina_masks=retina, device="cpu")
        assert len(list(out.glob("*.jpg"))) == 8
        rows = [ln.split() for f in (out / "labels").glob("*.txt") for ln in f.read_text().splitlines()]
        assert rows, "a trained model at conf 0.001 finds something"
        assert all(len(r) >= 7 and len(r) % 2 == 1 for r in rows)  # class + >= 3 normalised points
        assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[1:])


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    scale = max(float(b.abs().max()), 1e-6)
    err = float((a.float() - b.float()).abs().max()) / scale
    assert err < tol, f"relative error {err:.3g} (tolerance {tol:.3g})"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "openvino"])
def test_export_has_two_outputs_matching_pytorch(trained: Path, fmt: str) -> None:
    if fmt == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install -r requirements-export.txt)")
    (path,) = export_model(weights=trained, include=[fmt], imgsz=[64, 96])
    reference = DetectBackend(trained)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        det, protos = reference(x)
        got_det, got_protos = DetectBackend(path)(x)
    assert got_det.shape == det.shape and got_protos.shape == protos.shape == (1, 32, 16, 24)
    tol = rounding_tol(reference.model)
    _close(got_det[..., :4], det[..., :4], tol)  # boxes
    _close(got_det[..., 4:], det[..., 4:], tol)  # scores and mask coefficients
    _close(got_protos, protos, tol)


def test_int8_export_runs_through_segment_val(trained: Path, seg_data: Path, tmp_path: Path) -> None:
    """export.py --int8 --data calibrates on the dataset's images: best_int8.onnx (and OpenVINO from it) give both outputs
    in float32 with the .pt's shapes, the body runs quantised, and segment/val.py validates the file like the .pt."""
    from segment import val as seg_val
    from utils.export.quantize import optimized_graph

    fmts = ["onnx"] + (["openvino"] if importlib.util.find_spec("openvino") is not None else [])
    weights = tmp_path / "best.pt"
    weights.write_bytes(trained.read_bytes())
    paths = export_model(weights=weights, include=fmts, imgsz=[64, 64], int8=True, data=seg_data)
    assert [p.name for p in paths] == ["best_int8.onnx", "best_int8_openvino_model"][: len(fmts)]
    assert {n.op_type for n in optimized_graph(paths[0]).graph.node} >= {"QLinearConv", "Conv"}  # int8 body, float tail
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        det, protos = DetectBackend(weights)(x)
    for path in paths:
        with torch.no_grad():
            got_det, got_protos = DetectBackend(path)(x)
        assert got_det.shape == det.shape and got_protos.shape == protos.shape and got_det.dtype == got_protos.dtype == torch.float32
        row, _, _ = seg_val.run(weights=str(path), data=str(seg_data), imgsz=64, batch_size=1, workers=0, device="cpu",
                                project=str(tmp_path / "val"))
        assert len(row) == 12 and all(0.0 <= v <= 1.0 for v in row[:8])


def test_export_refuses_what_segmentation_cannot_do(trained: Path) -> None:
    with pytest.raises(ExportError, match="--nms is not available for coreml with segmentation models"):
        export_model(weights=trained, include=["onnx", "coreml"], imgsz=[64, 64], nms=True)
    with pytest.raises(ExportError, match="--nms is not available for ncnn"):
        export_model(weights=trained, include=["ncnn"], imgsz=[64, 64], nms=True)


def test_hub_returns_segmentation_models_without_autoshape(caplog: pytest.LogCaptureFixture) -> None:
    import hubconf
    from utils.inference.autoshape import AutoShape

    entry = getattr(hubconf, "yolov5n-seg")
    model = entry(pretrained=False, _verbose=False)  # YOLOv5's hub: a warning and the model itself
    assert not isinstance(model, AutoShape) and model.task == "segment" and "segment/predict.py" in caplog.text
    assert entry(pretrained=False, autoshape=False, _verbose=False).task == "segment"
    with pytest.raises(ValueError, match="segment/predict.py"):
        AutoShape(DetectBackend(model))
