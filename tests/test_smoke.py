"""End-to-end smoke path on a tiny generated dataset: train 1 epoch at 64 px, val, detect, export, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_shapes_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24+8 image shapes dataset and its yaml."""
    return tiny_shapes_yaml(tmp_path_factory.mktemp("shapes"), n_train=24, n_val=8, seed=1)


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a 1-epoch, 64 px training run of the default config."""
    import train

    project = tmp_path_factory.mktemp("runs")
    best = train.run(cfg="models/yolov5n_mobilenetv4_conv_small.yaml", data=str(tiny_data), epochs=1, imgsz=64, batch_size=8,
                     workers=0, project=str(project), name="smoke", noautoanchor=False, device="cpu")
    return best


def test_train_outputs(trained: Path) -> None:
    run_dir = trained.parent.parent
    outputs = ("weights/last.pt", "weights/best.pt", "opt.yaml", "hyp.yaml", "results.csv", "results.png", "labels.jpg", "train_batch0.jpg")
    for name in outputs:
        assert (run_dir / name).exists(), name
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert {"model", "cfg", "names", "epoch", "best_fitness", "opt", "date"} <= set(ckpt)
    assert not {"ema", "optimizer"} & set(ckpt)  # final weights: the EMA's as `model` (tests/test_console_checkpoints.py)
    header = (run_dir / "results.csv").read_text().splitlines()[0]
    assert "metrics/mAP_0.5:0.95" in header and "x/lr2" in header


def test_val_detect_export_on_trained(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    import detect
    import export
    import val

    results, maps, speed = val.run(data=str(tiny_data), weights=str(trained), imgsz=64, batch_size=4, workers=0,
                                   project=str(tmp_path), name="val", save_json=True, save_txt=True, device="cpu")
    assert len(results) == 7 and all(0.0 <= r <= 1.0 for r in results[:4]) and len(speed) == 3
    val_images = yaml.safe_load(tiny_data.read_text())
    source = Path(val_images["path"]) / val_images["val"]
    out = detect.run(weights=str(trained), source=str(source), imgsz=(64, 64), conf_thres=0.001, project=str(tmp_path),
                     name="det", save_txt=True, save_csv=True, save_format=1, device="cpu")
    assert len(list(out.glob("*.jpg"))) == 8
    n_boxes = sum(len(f.read_text().splitlines()) for f in (out / "labels").glob("*.txt"))
    assert len((out / "predictions.csv").read_text().splitlines()) == n_boxes + 1  # header + one row per box
    files = export.run(weights=str(trained), include=["onnx"], imgsz=[64, 64], dynamic=True)  # dynamic: same rect batches as .pt
    onnx_file = Path(files[0])
    assert onnx_file.suffix == ".onnx" and onnx_file.exists()
    onnx_results, _, _ = val.run(data=str(tiny_data), weights=str(onnx_file), imgsz=64, batch_size=4, workers=0,
                                 project=str(tmp_path), name="val_onnx", device="cpu", plots=False)
    assert abs(onnx_results[3] - results[3]) < 1e-3


def test_resume_continues(tiny_data: Path, tmp_path: Path) -> None:
    import train
    from utils.engine.callbacks import Callbacks

    def killed(path: Path, **_: object) -> None:
        if path.name == "last.pt":
            raise KeyboardInterrupt  # Ctrl-C once the first epoch's last.pt is written

    callbacks = Callbacks()
    callbacks.register("on_model_save", killed)
    with pytest.raises(KeyboardInterrupt):
        train.run(callbacks, cfg="models/yolov5n.yaml", data=str(tiny_data), epochs=2, imgsz=64, batch_size=8, workers=0,
                  project=str(tmp_path), name="r", noval=True, noplots=True, device="cpu")
    last = tmp_path / "r" / "weights" / "last.pt"
    train.run(resume=str(last))
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 1
    rows = (last.parent.parent / "results.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [0, 1]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    for args in (["train.py", "--cfg", "missing.yaml", "--epochs", "1"], ["val.py", "--weights", str(tmp_path / "none.pt")],
                 ["detect.py", "--weights", str(tmp_path / "none.pt")], ["train.py", "--data", str(tmp_path / "no.yaml")]):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        err = proc.stderr.strip().splitlines()
        assert err and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "error" in err[-1]


def test_model_info_cli() -> None:
    """The README's `python -m models.info` prints the summary line (running a models module as __main__ must work)."""
    proc = subprocess.run([sys.executable, "-m", "models.info", "--cfg", "models/yolov5n.yaml"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "yolov5n summary: " in proc.stdout + proc.stderr and "1,872,157 parameters" in proc.stdout + proc.stderr



def test_anchor_free_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    """The anchor-free head through the same scripts: train, val, detect, export (ONNX, TorchScript, INT8), val on exports."""
    import json

    import onnx

    import detect
    import export
    import train
    import val
    from utils.export.quantize import quantize_onnx

    best = train.run(cfg="models/yolov8n.yaml", data=str(tiny_data), epochs=1, imgsz=64, batch_size=8, workers=0,
                     project=str(tmp_path), name="af", noplots=True, device="cpu")
    header = (best.parent.parent / "results.csv").read_text().splitlines()[0]
    assert "train/dfl_loss" in header and "obj_loss" not in header
    kw = dict(data=str(tiny_data), imgsz=64, batch_size=4, workers=0, project=str(tmp_path), device="cpu", plots=False)
    results, _, _ = val.run(weights=str(best), name="val", **kw)
    assert len(results) == 7 and all(0.0 <= r <= 1.0 for r in results[:4])
    cfg = yaml.safe_load(tiny_data.read_text())
    out = detect.run(weights=str(best), source=str(Path(cfg["path"]) / cfg["val"]), imgsz=(64, 64), conf_thres=0.001,
                     project=str(tmp_path), name="det", device="cpu")
    assert len(list(out.glob("*.jpg"))) == 8
    files = export.run(weights=str(best), include=["onnx", "torchscript"], imgsz=[64, 64], dynamic=True)
    props = {p.key: p.value for p in onnx.load(str(files[0])).metadata_props}
    names = cfg["names"]
    assert props["head"] == "anchor_free" and json.loads(props["names"]) == (list(names.values()) if isinstance(names, dict) else names)
    for f in files:
        exported, _, _ = val.run(weights=str(f), name=f"val_{Path(f).suffix[1:]}", **kw)
        assert abs(exported[3] - results[3]) < 1e-3, f
    images = sorted((Path(cfg["path"]) / cfg["val"]).glob("*.jpg"))
    int8 = quantize_onnx(Path(files[0]), tmp_path / "int8.onnx", images, 64, n_calib=8)
    int8_results, _, _ = val.run(weights=str(int8), name="val_int8", **kw)
    assert all(0.0 <= r <= 1.0 for r in int8_results[:4])
