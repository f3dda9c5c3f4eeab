"""DetectBackend: one interface and identical predictions for .pt, .onnx and .torchscript weights."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from test_export import NAMES, assert_close_predictions, checkpoint_tol, make_checkpoint

import export
from tests.conftest import rounding_tol
from utils.checkpoint import CheckpointError
from utils.device import select_device
from utils.runtime.backend import DetectBackend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint plus its static ONNX (64x96), dynamic ONNX and TorchScript exports."""
    folder = tmp_path_factory.mktemp("backend")
    pt = make_checkpoint(folder / "best.pt")
    onnx_file, ts = export.run(weights=pt, include=["onnx", "torchscript"], imgsz=[64, 96])
    (dyn,) = export.run(weights=pt, include=["onnx"], imgsz=64, dynamic=True, output=folder / "dyn.onnx")
    return {"pt": pt, "onnx": onnx_file, "torchscript": ts, "dynamic": dyn}


def test_all_formats_agree(exported: dict[str, Path]) -> None:
    x = torch.rand(2, 3, 64, 96)
    backends = {k: DetectBackend(exported[k]) for k in ("pt", "onnx", "torchscript")}
    with torch.no_grad():
        outs = {k: b(x) for k, b in backends.items()}
    for k, b in backends.items():
        assert b.names == NAMES and b.stride == 32 and b.format == k
        assert isinstance(outs[k], torch.Tensor) and outs[k].device.type == "cpu" and outs[k].shape == (2, 378, 8)
        assert_close_predictions(outs[k], outs["pt"], rounding_tol(backends["pt"].model))
    assert backends["pt"].pt and backends["onnx"].onnx and backends["torchscript"].jit


def test_static_onnx_shape_handling(exported: dict[str, Path]) -> None:
    b = DetectBackend(exported["onnx"])
    assert not b.dynamic and b.input_shape == (1, 3, 64, 96)
    x = torch.rand(3, 3, 64, 96)
    batched = b(x)  # batch-1 export: run image by image
    singles = torch.cat([b(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles)
    with pytest.raises(ValueError, match="exported for 64x96 images, got 64x64"):
        b(torch.rand(1, 3, 64, 64))
    b.warmup((1, 3, 640, 640))  # the static shape wins; this would otherwise raise


def test_dynamic_onnx_backend(exported: dict[str, Path]) -> None:
    b = DetectBackend(exported["dynamic"])
    assert b.dynamic and b.input_shape is None
    ref = DetectBackend(exported["pt"])
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        assert_close_predictions(b(x), ref(x), checkpoint_tol(exported["pt"]))


def test_static_batch_mismatch_is_clear(exported: dict[str, Path], tmp_path: Path) -> None:
    (path,) = export.run(weights=exported["pt"], include=["onnx"], imgsz=64, batch_size=2, output=tmp_path / "b2.onnx")
    b = DetectBackend(path)
    assert b(torch.rand(2, 3, 64, 64)).shape == (2, 252, 8)
    with pytest.raises(ValueError, match="exported for batch 2, got batch 3"):
        b(torch.rand(3, 3, 64, 64))


def test_names_fall_back_to_data_and_accept_yolov5_dicts(exported: dict[str, Path], tmp_path: Path) -> None:
    proto = onnx.load(str(exported["onnx"]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    assert DetectBackend(bare).names == [] and DetectBackend(bare).stride == 32
    data = tmp_path / "data.yaml"
    data.write_text("names: {0: cat, 1: dog, 2: cow}\n", encoding="utf-8")
    assert DetectBackend(bare, data=data).names == ["cat", "dog", "cow"]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "names", "{0: 'x', 1: 'y', 2: 'z'}"  # how YOLOv5 writes them
    onnx.save(proto, str(bare))
    assert DetectBackend(bare).names == ["x", "y", "z"]


def test_augment_warns_once_for_exported_models(exported: dict[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    b = DetectBackend(exported["onnx"])
    x = torch.rand(1, 3, 64, 96)
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        y1, y2 = b(x, augment=True), b(x, augment=True)
    torch.testing.assert_close(y1, b(x))
    torch.testing.assert_close(y2, y1)
    assert sum("test-time augmentation" in r.getMessage() for r in caplog.records) == 1


def test_pt_augment_runs_tta(exported: dict[str, Path]) -> None:
    b = DetectBackend(exported["pt"])
    with torch.no_grad():
        plain, tta = b(torch.rand(1, 3, 64, 64)), b(torch.rand(1, 3, 64, 64), augment=True)
    assert tta.shape[0] == 1 and tta.shape[2] == 8 and tta.shape[1] > plain.shape[1]


def test_bad_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unsupported weights format '\.pb'.*ONNX \.onnx.*TFLite \.tflite") as e:
        DetectBackend(tmp_path / "model.pb")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="weights file not found") as e:
        DetectBackend(tmp_path / "missing.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        DetectBackend(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.onnx: ONNX Runtime cannot load"):
        DetectBackend(tmp_path / "junk.onnx")


def test_openvino_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ValueError, match="pip install openvino"):
        DetectBackend(tmp_path / "best_openvino_model")


def test_backend_device_argument() -> None:
    """The backend and export take the same device strings as train/val/detect (one parser: select_device)."""
    assert select_device("cpu") == torch.device("cpu") and select_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(ValueError, match="expected 'cpu'"):
        select_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("0")
    else:
        assert select_device("0") == torch.device("cuda", 0)


def test_openvino_released_on_another_thread_leaves_signals_deliverable(tmp_path: Path) -> None:
    """OpenVINO's CPU plugin swaps the compiling thread's alternate signal stack and unmaps its own from whichever thread
    releases it. Loaded through DetectBackend, the thread keeps a stack that stays valid, so a later signal with a
    Python handler (a subprocess's SIGCHLD, which torch's DataLoader handles) is delivered instead of killing the
    process with SIGSEGV (the crash that ended whole test runs). Run in a subprocess, since it is a crash."""
    pytest.importorskip("openvino")
    ckpt = make_checkpoint(tmp_path / "best.pt")
    (xml,) = export.run(weights=ckpt, include=["openvino"], imgsz=64, output=tmp_path / "m_openvino_model")
    script = f"""
import faulthandler, gc, signal, subprocess, threading
from utils.runtime.backend import DetectBackend
faulthandler.enable()  # an alternate signal stack, as pytest has
signal.signal(signal.SIGCHLD, lambda *args: None)
held = [DetectBackend({str(xml)!r})]
release = threading.Thread(target=lambda: (held.clear(), gc.collect()))
release.start()
release.join()
for _ in range(5):
    subprocess.run(["true"], check=True)
print("delivered")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "delivered" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
