"""YOLOv5's classification task end to end on a tiny generated set: classify/train.py's outputs, classify/val.py,
classify/predict.py's top-5 files, export to ONNX / TorchScript / INT8 ONNX run through the runtime, torch.hub, the
classifier as a detector's backbone checkpoint, and the detection scripts refusing a classifier in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from classify import predict as cls_predict
from classify import train as cls_train
from classify import val as cls_val
from tests.conftest import rel_err, rounding_tol
from utils.checkpoint import load_model, read_checkpoint
from utils.engine.trainer import TrainError
from utils.runtime.backend import DetectBackend
from utils.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return get_task("classify").sample_data(tmp_path_factory.mktemp("cls"), n_train=4, n_val=2, seed=11)


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("runs")
    return cls_train.run(model="models/mobilenetv4_conv_small-cls.yaml", data=str(data), epochs=1, imgsz=IMGSZ, batch_size=4,
                         workers=0, project=str(project), name="exp", device="cpu")


def test_training_writes_yolov5_classify_outputs(trained: Path) -> None:
    run = trained.parent.parent
    header = [c.strip() for c in (run / "results.csv").read_text().splitlines()[0].split(",")]
    assert header == ["epoch", "train/loss", "metrics/accuracy_top1", "metrics/accuracy_top5", "val/loss", "x/lr0", "x/lr1", "x/lr2"]
    ckpt = read_checkpoint(trained)
    assert ckpt["opt"]["task"] == "classify" and ckpt["opt"]["imgsz"] == IMGSZ and ckpt["opt"]["hyp"].endswith("hyp.cls.yaml")
    assert ckpt["names"] == ["circle", "rectangle", "triangle"]
    assert (run / "train_batch0.jpg").is_file() and (run / "val_batch0_pred.jpg").is_file() and (run / "results.png").is_file()


def test_val_scores_top1_and_top5(trained: Path, data: Path, tmp_path: Path) -> None:
    row, per_class, _ = cls_val.run(weights=str(trained), data=str(data), imgsz=IMGSZ, batch_size=4, workers=0,
                                    project=str(tmp_path), device="cpu")
    top1, top5, loss = row
    assert min(abs(top1 - i / 6) for i in range(7)) < 1e-6 and top5 == 1.0 and loss == 0.0  # 6 images; no loss outside training
    assert per_class.shape == (3,)


def test_predict_writes_annotated_images_and_top5_lines(trained: Path, tmp_path: Path) -> None:
    out = cls_predict.run(weights=[str(trained)], source=str(ROOT / "data" / "images"), imgsz=[IMGSZ], save_txt=True,
                          project=str(tmp_path), name="p", device="cpu")
    labels = sorted((out / "labels").glob("*.txt"))
    assert len(labels) == 2 and len(list(out.glob("*.jpg"))) == 2
    for f in labels:
        rows = [ln.split(" ", 1) for ln in f.read_text().splitlines()]
        probs = [float(p) for p, _ in rows]
        assert [n for _, n in rows] and set(n for _, n in rows) == {"circle", "rectangle", "triangle"}
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) <= 0.015  # three values rounded to 0.01


def test_exported_files_match_the_pt_and_int8_quantises(trained: Path, data: Path) -> None:
    from utils.export.exporter import export_model
    from utils.export.quantize import optimized_graph

    onnx, ts = export_model(weights=str(trained), include=("onnx", "torchscript"), imgsz=(IMGSZ, IMGSZ), device="cpu")
    (int8,) = export_model(weights=str(trained), include=("onnx",), imgsz=(IMGSZ, IMGSZ), device="cpu", int8=True,
                           data=str(data / "train"))
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    pt = DetectBackend(trained)
    ref, tol = pt(x), rounding_tol(pt.model)  # float32 runtimes differ from the fused .pt in op order only
    assert ref.shape == (1, 3) and abs(float(ref.sum()) - 1) < 1e-5
    for f in (onnx, ts):
        backend = DetectBackend(f)
        assert backend.task == "classify" and rel_err(backend(x), ref) <= tol
    ops = {n.op_type for n in optimized_graph(int8).graph.node}
    q = DetectBackend(int8)(x)
    assert "QLinearConv" in ops and q.shape == (1, 3) and abs(float(q.sum()) - 1) < 1e-4


def test_hub_returns_the_classifier_itself(trained: Path, caplog: pytest.LogCaptureFixture) -> None:
    import hubconf

    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        model = hubconf.custom(path=str(trained), _verbose=False, device="cpu")
    assert "not AutoShape compatible" in caplog.text and "classify/predict.py" in caplog.text
    with torch.no_grad():
        probs = model.eval()(torch.rand(2, 3, IMGSZ, IMGSZ))
    assert probs.shape == (2, 3)


def test_a_classifier_is_a_detector_backbone_checkpoint(trained: Path) -> None:
    from models.model import DetectionModel
    from models.pretrained import load_backbone_weights

    detector = DetectionModel(ROOT / "models" / "yolov5_mobilenetv4_anchor_free.yaml", nc=3)  # conv_small at layer 0
    report = load_backbone_weights(detector, trained)
    own = load_model(trained).model[0].state_dict()  # the classifier's EMA weights, backbone layer
    got = detector.model[0].state_dict()
    assert report.loaded == len(own) and not report.missing
    assert all(torch.equal(got[k], v) for k, v in own.items())


def test_detection_scripts_refuse_a_classifier_naming_its_script(trained: Path, tmp_path: Path) -> None:
    import train
    from utils.inference.predict import run as detect_run

    with pytest.raises(ValueError, match="classify/predict.py"):
        detect_run(weights=str(trained), source=str(ROOT / "data" / "images"), project=str(tmp_path), imgsz=(IMGSZ, IMGSZ))
    with pytest.raises(TrainError, match="classify/train.py"):
        train.run(cfg="models/mobileone_s0-cls.yaml", epochs=1, imgsz=IMGSZ, workers=0, project=str(tmp_path), device="cpu")
    assert not list(tmp_path.iterdir())  # refused before any run folder was made
