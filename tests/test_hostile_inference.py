"""Hostile and careless input to prediction, round two: degenerate (1-pixel) images through letterbox, detect.py,
segment/predict.py, classify/predict.py, val.py and the Python API; one image failing never ends a run nor loses the
others' results (one warning line each); AutoShape's tensor and `size` checks; truncated videos warned whatever the
container; torch.hub model names that are names, not paths."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import detect
import hubconf
import val
from classify import predict as cls_predict
from models.model import ClassificationModel, DetectionModel
from segment import predict as seg_predict
from tests.conftest import tiny_shapes_yaml
from utils.checkpoint import save_checkpoint
from utils.data.images import ImageError, letterbox
from utils.inference import hub
from utils.inference.autoshape import AutoShape, batch_shape

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c"]
DEGENERATE = {"wide.png": (1, 3000), "ok.png": (64, 80), "tall.png": (3000, 1)}  # (h, w)


def _write_images(folder: Path, shapes: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """Noise images of the given (h, w) sizes under folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (h, w) in shapes.items():
        cv2.imwrite(str(folder / name), (rng.random((h, w, 3)) * 255).astype(np.uint8))
    return folder


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained 3-class detect, segment and classify checkpoints."""
    folder = tmp_path_factory.mktemp("hostile_inference")
    torch.manual_seed(0)
    return {
        "detect": save_checkpoint(folder / "det.pt", DetectionModel("yolov5n.yaml", nc=3), names=NAMES),
        "segment": save_checkpoint(folder / "seg.pt", DetectionModel("yolov5n-seg.yaml", nc=3), names=NAMES),
        "classify": save_checkpoint(folder / "cls.pt", ClassificationModel("yolov5n-cls.yaml", nc=3), names=NAMES),
    }


@pytest.fixture(scope="module")
def model(weights: dict[str, Path]) -> AutoShape:
    m = torch.hub.load(str(ROOT), "custom", path=str(weights["detect"]), source="local", _verbose=False)
    assert isinstance(m, AutoShape)
    m.conf = 0.001
    return m


SCRIPTS: dict[str, Any] = {"detect": detect.run, "segment": seg_predict.run, "classify": cls_predict.run}


# ---- degenerate images ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(1, 3000), (3000, 1), (2, 5000)])
@pytest.mark.parametrize("auto", [True, False])
def test_letterbox_keeps_a_one_pixel_side(hw: tuple[int, int], auto: bool) -> None:
    img = np.full((*hw, 3), 200, np.uint8)
    out, ratio, _ = letterbox(img, 640, auto=auto)
    long_is_w = hw[1] > hw[0]
    assert out.shape[:2] == ((32, 640) if long_is_w else (640, 32)) if auto else (640, 640)
    content = out[:, :, 0] == 200
    lines = content.any(axis=1) if long_is_w else content.any(axis=0)  # rows (wide) or columns (tall) holding the image
    assert lines.sum() == 1 and content.sum() == 640, "the image kept exactly one full line of pixels"
    assert min(ratio) > 0
    assert batch_shape([hw], (640, 640), 32) == ((32, 640) if long_is_w else (640, 32))


@pytest.mark.parametrize("task", ["detect", "segment", "classify"])
def test_predict_scripts_survive_degenerate_images(task: str, weights: dict[str, Path], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A 1x3000 and a 3000x1 image beside a normal one: every image predicted and saved, nothing skipped (classify too:
    its source letterboxes every image before the classifier crops its centre square)."""
    src = _write_images(tmp_path / "images", DEGENERATE)
    out = SCRIPTS[task](weights=str(weights[task]), source=str(src), imgsz=(64, 64), conf_thres=0.001, project=str(tmp_path),
                        name="p", device="cpu", save_txt=True)
    for name, hw in DEGENERATE.items():
        saved = cv2.imread(str(out / name))
        assert saved is not None and saved.shape[:2] == hw, name
    assert len(list((out / "labels").glob("*.txt"))) == 3
    assert _warnings(caplog) == []


# ---- one failing image is skipped, the others are saved -------------------------------------------------------------


def _fail_on(shape: tuple[int, int] | None, real: Any) -> Any:
    """A drawing function that hits a real OpenCV assertion for images of `shape` (None: every image)."""

    def draw(im0: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        if shape is None or im0.shape[:2] == shape:
            cv2.resize(im0, (0, 0))  # OpenCV: (-215:Assertion failed) in function 'resize'
        return real(im0, *args, **kwargs)

    return draw


@pytest.mark.parametrize("task, module, draw", [("detect", "utils.inference.predict", "draw_detections"),
                                                ("classify", "utils.inference.classify", "draw_top")])
def test_one_failing_image_is_one_warning_and_the_rest_are_saved(task: str, module: str, draw: str, weights: dict[str, Path],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    mod = sys.modules[module]
    monkeypatch.setattr(mod, draw, _fail_on((48, 48), getattr(mod, draw)))
    src = _write_images(tmp_path / "images", {"a.png": (64, 80), "b.png": (48, 48), "c.png": (80, 64)})
    out = SCRIPTS[task](weights=str(weights[task]), source=str(src), imgsz=(64, 64), project=str(tmp_path), name="p",
                        device="cpu")
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "c.png"]
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"WARNING: {src / 'b.png'}: ") and "resize" in warning and warning.endswith(", skipped")
    assert "\n" not in warning


def test_every_image_failing_is_one_error_line(weights: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When no image succeeds the cause is likely not the images: the run ends in one 'detect: error:' line."""
    mod = sys.modules["utils.inference.predict"]
    monkeypatch.setattr(mod, "draw_detections", _fail_on(None, mod.draw_detections))
    src = _write_images(tmp_path / "images", {"a.png": (64, 80), "b.png": (48, 48)})
    with pytest.raises(SystemExit) as e:
        detect.main(["--weights", str(weights["detect"]), "--source", str(src), "--imgsz", "64", "--project", str(tmp_path)])
    msg = str(e.value.code)
    assert msg.startswith(f"detect: error: {src}: no image could be processed; {src / 'a.png'}: ") and "\n" not in msg
    assert msg.endswith("(and 1 more failed)")


def test_val_completes_with_degenerate_images_in_the_dataset(weights: dict[str, Path], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Regression guard: the dataset check drops images under 10 px (one warning each); a 10x3000 one is evaluated."""
    data = tiny_shapes_yaml(tmp_path, n_train=1, n_val=2, seed=5)
    images, labels = tmp_path / "shapes/images/val", tmp_path / "shapes/labels/val"
    thin = {"thin1.png": (1, 3000), "thin2.png": (3000, 1), "thin10.png": (10, 3000)}
    _write_images(images, thin)
    for name in thin:
        (labels / name).with_suffix(".txt").write_text("0 0.5 0.5 0.5 0.5\n")
    val.run(weights=str(weights["detect"]), data=str(data), imgsz=64, batch_size=4, workers=0, project=str(tmp_path / "v"),
            device="cpu")
    warned = _warnings(caplog)
    for name, (h, w) in thin.items():
        dropped = [m for m in warned if f"{name}: image ignored, size {w}x{h} is under 10 px" in m]
        assert len(dropped) == (0 if name == "thin10.png" else 1), warned


# ---- the Python API ---------------------------------------------------------------------------------------------------


def test_api_predicts_degenerate_images_in_their_own_pixels(model: AutoShape, tmp_path: Path) -> None:
    src = _write_images(tmp_path / "images", DEGENERATE)
    arrays = [np.full((1, 3000, 3), 90, np.uint8), np.full((3000, 1, 3), 90, np.uint8)]
    from_files = [DEGENERATE[n] for n in sorted(DEGENERATE)]  # a folder's images come sorted by name
    for results, shapes in ((model(arrays, size=64), [(1, 3000), (3000, 1)]), (model(src, size=64), from_files)):
        assert len(results) == len(shapes)
        for det, (h, w) in zip(results.xyxy, shapes):
            assert len(det) and (det[:, [0, 2]] >= 0).all() and (det[:, [0, 2]] <= w).all()
            assert (det[:, [1, 3]] >= 0).all() and (det[:, [1, 3]] <= h).all()
    assert results.files == sorted(DEGENERATE)


def test_api_skips_an_unreadable_image_with_one_warning(model: AutoShape, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _write_images(tmp_path / "images", {"good.png": (64, 80)})
    (src / "broken.jpg").write_bytes(b"\xff\xd8 half a jpeg")
    results = model(src, size=64)
    assert results.files == ["good.png"]
    (warning,) = _warnings(caplog)
    assert warning == f"WARNING: {src / 'broken.jpg'}: cannot decode image (corrupt, truncated or unsupported format), skipped"
    with pytest.raises(ImageError, match=r"broken.jpg: cannot decode image") as e:  # nothing left: the problem, raised
        model([src / "broken.jpg"])
    assert "\n" not in str(e.value)


def test_api_uint8_tensor_is_scaled_to_0_1(model: AutoShape) -> None:
    x = torch.randint(0, 256, (2, 3, 64, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float() / 255), rtol=0, atol=0)
        torch.testing.assert_close(model(x[0]), model(x[:1].float() / 255), rtol=0, atol=0)


@pytest.mark.parametrize("shape, dtype, needle", [
    ((0, 3, 64, 64), torch.float32, "tensor batch is empty"),
    ((1, 3, 1, 1), torch.float32, "multiples of the stride 32, got 1x1"),
    ((1, 4, 64, 64), torch.float32, "takes 3-channel images, the tensor has 4 channels"),
    ((64, 64), torch.float32, "must be (B, 3, H, W) or (3, H, W), got shape (64, 64)"),
    ((1, 1, 3, 64, 64), torch.float32, "got shape (1, 1, 3, 64, 64)"),
    ((1, 3, 64, 64), torch.int64, "float (0-1) or uint8 (0-255), got torch.int64"),
])  # fmt: skip
def test_api_bad_tensors_are_one_value_error(model: AutoShape, shape: tuple[int, ...], dtype: torch.dtype, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        model(torch.zeros(shape, dtype=dtype))
    assert str(e.value).startswith("AutoShape: ") and needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("size", [64.5, 64.0])
def test_api_non_integer_size_names_size(model: AutoShape, size: float) -> None:
    with pytest.raises(ValueError, match=rf"^size must be a positive integer or \(height, width\) in pixels, got {size}$"):
        model(np.zeros((32, 32, 3), np.uint8), size=size)


# ---- videos -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".avi", pytest.param(".mkv", marks=pytest.mark.slow)])  # the same reader path: one container by default
def test_truncated_video_is_warned_and_its_frames_kept(suffix: str, weights: dict[str, Path], tmp_path: Path) -> None:
    """A half-written MJPG video (OpenCV reads its first frames, then reports a normal end): detect.py, in a subprocess
    as the decoder is native code, warns in one line naming the file and keeps the frames it read."""
    path = tmp_path / f"clip{suffix}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))  # type: ignore[attr-defined]
    if not writer.isOpened():
        pytest.skip(f"this OpenCV build cannot write MJPG {suffix}")
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.write((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    writer.release()
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    outputs = {}
    for video in (path, cut):
        r = subprocess.run([sys.executable, str(ROOT / "detect.py"), "--weights", str(weights["detect"]), "--source", str(video),
                            "--imgsz", "64", "--project", str(tmp_path / "runs"), "--name", video.stem, "--device", "cpu"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr[-2000:]
        outputs[video.stem] = r.stdout + r.stderr
    assert "WARNING" not in outputs["clip"] and "(20/20)" in outputs["clip"]
    warned = [ln for ln in outputs["cut"].splitlines() if "WARNING" in ln]
    assert len(warned) == 1 and warned[0].startswith(f"WARNING: {cut}: video ended after "), warned
    n = int(warned[0].split("video ended after ")[1].split()[0])
    assert 0 < n < 20 and warned[0].endswith(" of the 20 frames its header declares (truncated or damaged file?); "
                                             "the frames read were processed")
    assert f"({n}/20)" in outputs["cut"] and (tmp_path / "runs" / "cut" / "cut.mp4").is_file()


# ---- torch.hub model names --------------------------------------------------------------------------------------------


def test_hub_model_name_is_a_name_inside_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "evil.yaml"
    outside.write_text((ROOT / "models" / "yolov5n.yaml").read_text())
    relative = os.path.relpath(outside.with_suffix(""), ROOT / "models")
    for name in (str(outside.with_suffix("")), relative, "yolov5n/../yolov5n", ".yolov5n", "models/yolov5n"):
        with pytest.raises(ValueError, match=r"must be the name of a config in models/") as e:
            hub.load_config(name, pretrained=False, verbose=False)
        assert "\n" not in str(e.value)
        with pytest.raises(SystemExit) as exit_info:
            hubconf._main(["--model", name])
        msg = str(exit_info.value.code)
        assert msg.startswith(f"hubconf: error: model name {name!r}: ") and "\n" not in msg
    capsys.readouterr()
    hubconf._main(["--model", "yolov5n", "--imgsz", "64"])  # a real name still builds
    assert "yolov5n:" in capsys.readouterr().out
