"""The ultralytics-style model object (utils.api.YOLO): the same numbers as detect.py and val.py, every input kind, video
streams held one frame at a time, tracking, training, export, and one-line refusals."""

from __future__ import annotations

import logging
import tracemalloc
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_shapes_yaml
from PIL import Image
from test_export import NAMES, checkpoint_tol, make_checkpoint

import detect
import export
import val
from utils.api import YOLO, Metrics
from utils.data.images import ImageError
from utils.inference.image_results import Results

CONF = 0.005  # the test checkpoint is untrained: its scores sit near 0.01, so a low threshold keeps some boxes
SIZE = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny 3-class checkpoint, its ONNX export, two images and a short video."""
    folder = tmp_path_factory.mktemp("api")
    pt = make_checkpoint(folder / "best.pt")
    (onnx_file,) = export.run(weights=pt, include=["onnx"], imgsz=SIZE, dynamic=True, output=folder / "dyn.onnx")
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    for name, (h, w) in {"wide.png": (96, 160), "tall.png": (128, 80)}.items():
        cv2.imwrite(str(images / name), cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (5, 5), 0))
    return {"pt": pt, "onnx": onnx_file, "images": images, "video": write_video(folder / "clip.mp4", 12)}


def confident_checkpoint(path: Path) -> Path:
    """make_checkpoint's model with objectness and class biases raised by 4, so its scores clear ByteTrack's 0.25
    thresholds (an untrained model's scores sit near 0.01 and would start no track) while still depending on the image."""
    from models.model import DetectionModel
    from utils.checkpoint import load_model, save_checkpoint

    model = load_model(make_checkpoint(path))
    assert isinstance(model, DetectionModel)
    with torch.no_grad():
        for conv in model.head.m:
            conv.bias.view(model.head.na, -1)[:, 4:] += 4.0
    return save_checkpoint(path, model, names=NAMES)


def write_video(path: Path, frames: int, hw: tuple[int, int] = (72, 96)) -> Path:
    """A video of a bright square moving over noise (mp4v), `frames` frames long."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (hw[1], hw[0]))  # type: ignore[attr-defined]
    rng = np.random.default_rng(1)
    base = cv2.GaussianBlur((rng.random((*hw, 3)) * 255).astype(np.uint8), (5, 5), 0)
    for i in range(frames):
        frame = base.copy()
        x = 4 + (i * 3) % (hw[1] - 30)
        cv2.rectangle(frame, (x, 20), (x + 24, 44), (250, 250, 250), -1)
        writer.write(frame)
    writer.release()
    return path


def read_labels(folder: Path) -> dict[str, np.ndarray]:
    """detect.py --save-txt --save-conf rows (class cx cy w h conf) by image stem."""
    return {f.stem: np.loadtxt(f, ndmin=2) for f in sorted(folder.glob("*.txt"))}


def as_label_rows(r: Results) -> np.ndarray:
    """A Results' boxes in detect.py's label layout: class cx cy w h (normalised) conf."""
    b = r.boxes
    assert b is not None
    return np.concatenate([np.asarray(b.cls)[:, None], np.asarray(b.xywhn), np.asarray(b.conf)[:, None]], 1)


def test_predict_equals_detect_py(files: dict[str, Path], tmp_path: Path) -> None:
    """Boxes, classes and scores of model.predict are detect.py's saved labels (to the 6 digits they are written with)."""
    out = detect.run(weights=files["pt"], source=files["images"], imgsz=(SIZE, SIZE), conf_thres=CONF, save_txt=True,
                     save_conf=True, nosave=True, project=tmp_path, name="d", device="cpu")
    labels = read_labels(out / "labels")
    results = YOLO(files["pt"], device="cpu").predict(files["images"], conf=CONF, imgsz=SIZE, verbose=False)
    assert [Path(r.path).name for r in results] == ["tall.png", "wide.png"]
    for r in results:
        rows = as_label_rows(r)
        assert len(rows) > 0
        np.testing.assert_allclose(rows, labels[Path(r.path).stem], rtol=1e-5, atol=1e-6)
        assert r.orig_img.shape == cv2.imread(r.path).shape and r.names == dict(enumerate(NAMES))
        assert set(r.speed) == {"preprocess", "inference", "postprocess"}


def test_call_is_predict_and_onnx_agrees(files: dict[str, Path]) -> None:
    pt = YOLO(files["pt"], device="cpu")
    a = pt(files["images"] / "wide.png", conf=CONF, imgsz=SIZE, verbose=False)[0]
    b = YOLO(files["onnx"], device="cpu").predict(files["images"] / "wide.png", conf=CONF, imgsz=SIZE, verbose=False)[0]
    assert a.boxes is not None and b.boxes is not None and len(a.boxes) > 0
    tol = checkpoint_tol(files["pt"])
    top = min(len(a.boxes), len(b.boxes), 5)  # the highest-scored boxes: far from the threshold in both formats
    torch.testing.assert_close(b.boxes.conf[:top], a.boxes.conf[:top], atol=tol, rtol=0)
    assert (b.boxes.xyxy[:top] - a.boxes.xyxy[:top]).abs().max() <= 1.0  # pixel-rounded boxes: at most one step apart


def test_arrays_pil_and_lists(files: dict[str, Path]) -> None:
    """A BGR numpy array (OpenCV's, as ultralytics) and a PIL image of the file give the file's results."""
    model = YOLO(files["pt"], device="cpu")
    file = files["images"] / "tall.png"
    ref = as_label_rows(model.predict(file, conf=CONF, imgsz=SIZE, verbose=False)[0])
    bgr = cv2.imread(str(file))
    for source in (bgr, Image.open(file), [bgr, str(file)]):
        results = model.predict(source, conf=CONF, imgsz=SIZE, verbose=False)
        for r in results:
            np.testing.assert_array_equal(as_label_rows(r), ref)
    assert len(model.predict([bgr, bgr], conf=CONF, imgsz=SIZE, verbose=False)) == 2


def test_video_stream_is_a_generator_of_frames(files: dict[str, Path]) -> None:
    model = YOLO(files["pt"], device="cpu")
    gen = model.predict(files["video"], stream=True, conf=CONF, imgsz=SIZE, verbose=False)
    assert iter(gen) is gen and not isinstance(gen, list)
    results = list(gen)
    assert len(results) == 12 and all(r.orig_img.shape == (72, 96, 3) for r in results)
    strided = model.predict(files["video"], conf=CONF, imgsz=SIZE, vid_stride=3, verbose=False)
    assert len(strided) == 4
    for a, b in zip(strided, results[::3]):
        np.testing.assert_array_equal(as_label_rows(a), as_label_rows(b))


def test_stream_memory_stays_flat(files: dict[str, Path], tmp_path: Path) -> None:
    """Over a 120-frame video, stream=True keeps no frame once its Results is dropped: at most two Results are alive at a
    time, and traced memory after 120 frames is what it was after 20 (less than 10 frames' worth apart; a source or
    generator that kept each frame would add 100)."""
    video = write_video(tmp_path / "long.mp4", 120)
    model = YOLO(files["pt"], device="cpu")
    alive: weakref.WeakSet[Results] = weakref.WeakSet()
    most, samples = 0, {}
    tracemalloc.start()
    try:
        for i, r in enumerate(model.predict(video, stream=True, conf=CONF, imgsz=SIZE, verbose=False)):
            alive.add(r)
            del r  # the last reference: freed here unless the generator kept one
            most = max(most, len(alive))
            if i in (19, 119):
                samples[i] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    frame_bytes = 72 * 96 * 3
    assert most <= 2
    assert samples[119] - samples[19] < 10 * frame_bytes, samples


def test_folder_with_gif_tiff_and_a_broken_file(files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """predict reads a folder's gif as a video, a multipage TIFF's first page (one warning), and skips a broken file
    (one warning); the hub path skips the gif with one warning instead of failing the whole call."""
    import hubconf

    folder = tmp_path / "mixed"
    folder.mkdir()
    img = cv2.imread(str(files["images"] / "wide.png"))
    cv2.imwrite(str(folder / "a.png"), img)
    frames = [Image.fromarray(img[..., ::-1]), Image.fromarray(img[::-1, :, ::-1].copy())]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    caplog.set_level(logging.WARNING, logger="mobile_yolo")
    results = YOLO(files["pt"], device="cpu").predict(folder, conf=CONF, imgsz=SIZE, verbose=False)
    names = [Path(r.path).name for r in results]
    assert names.count("a.png") == 1 and names.count("pages.tif") == 1 and names.count("anim.gif") >= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("broken.jpg" in w for w in warnings) == 1 and sum("pages.tif" in w and "2 pages" in w for w in warnings) == 1
    caplog.clear()
    hub = hubconf.custom(str(files["pt"]), _verbose=False)
    det = hub(str(folder), size=SIZE)
    assert len(det) == 2  # a.png and the TIFF's first page
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("anim.gif" in w and "skipped" in w for w in warnings) == 1
    with pytest.raises(ImageError, match="a video"):
        hub(str(folder / "anim.gif"), size=SIZE)


def test_track_gives_ids_and_detect_writes_mot_rows(files: dict[str, Path], tmp_path: Path) -> None:
    """track() keeps only tracked detections, each with an id >= 1, and writes the MOT rows detect.py --track writes."""
    weights = confident_checkpoint(tmp_path / "confident.pt")
    model = YOLO(weights, device="cpu")
    results = model.track(files["video"], imgsz=SIZE, verbose=False, project=tmp_path, name="t", save=True)
    assert len(results) == 12
    tracked = [r.boxes for r in results if r.boxes is not None and len(r.boxes)]
    assert len(tracked) >= 10  # a track needs two frames to be confirmed, so the first frame may show none
    for b in tracked:
        assert b.is_track and b.id is not None and (b.id >= 1).all() and len(set(b.id.tolist())) == len(b.id)
    plain = model.predict(files["video"], imgsz=SIZE, verbose=False)
    assert sum(len(b) for b in tracked) <= sum(len(r.boxes) for r in plain if r.boxes is not None)
    rows = np.loadtxt(tmp_path / "t" / "tracks" / "clip.txt", delimiter=",", ndmin=2)
    assert len(rows) == sum(len(b) for b in tracked) and set(rows[:, 1]) == {float(i) for b in tracked for i in b.id.tolist()}
    out = detect.run(weights=weights, source=files["video"], imgsz=(SIZE, SIZE), track=True, project=tmp_path,
                     name="d", device="cpu", nosave=True)
    np.testing.assert_allclose(np.loadtxt(out / "tracks" / "clip.txt", delimiter=",", ndmin=2), rows)
    assert (tmp_path / "t" / "clip.mp4").is_file()


def test_train_val_export_round_trip(tmp_path: Path) -> None:
    """train() returns best.pt and switches to it; val() equals val.py on it; export() gives a file predict() runs."""
    data = tiny_shapes_yaml(tmp_path, n_train=8, n_val=4, seed=0)
    model = YOLO("yolov5n.yaml", device="cpu")
    best = model.train(data=str(data), epochs=1, imgsz=SIZE, batch=4, workers=0, project=str(tmp_path), name="tr",
                       noplots=True)
    assert best.is_file() and model.weights == best
    metrics = model.val(data=str(data), imgsz=SIZE, batch=4, workers=0, project=str(tmp_path), name="v", plots=False)
    assert isinstance(metrics, Metrics)
    row, _, _ = val.run(weights=str(best), data=str(data), imgsz=SIZE, batch_size=4, workers=0, project=str(tmp_path),
                        name="v2", plots=False)
    assert (metrics.box.mp, metrics.box.mr, metrics.box.map50, metrics.box.map) == pytest.approx(row[:4], abs=0)
    onnx_file = model.export(format="onnx", imgsz=SIZE)
    assert onnx_file.suffix == ".onnx" and onnx_file.is_file()
    assert len(YOLO(onnx_file, device="cpu").predict(tmp_path / "shapes" / "images" / "val", imgsz=SIZE, verbose=False)) == 4


def test_config_by_name_info_and_refusals(files: dict[str, Path], tmp_path: Path) -> None:
    model = YOLO("yolov5n", device="cpu")
    assert "parameters" in model.info(imgsz=SIZE) and model.stride == 32
    with pytest.raises(ValueError, match="untrained model"):
        model.val()
    with pytest.raises(ValueError, match="unknown option 'confidence'"):
        YOLO(files["pt"], device="cpu").predict(files["images"], confidence=0.5)
    with pytest.raises(FileNotFoundError, match="weights not found"):
        YOLO(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="conf"):
        YOLO(files["pt"], device="cpu").predict(files["images"], conf=2.0)
    with pytest.raises(ValueError, match="classify/predict.py"):
        YOLO("yolov5n-cls", device="cpu").predict(files["images"], imgsz=SIZE)
    with pytest.raises(ValueError, match="already an export"):
        YOLO(files["onnx"], device="cpu").export(format="onnx")


def test_docs_example_runs_as_written(files: dict[str, Path], tmp_path: Path) -> None:
    """docs/python_api.md's model-object example, run from a folder laid out like the repository after the main command."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from test_python_api import python_api_example

    root = Path(__file__).resolve().parents[1]
    code = python_api_example("from utils.api import YOLO")
    assert 'YOLO("runs/train/demo/weights/best.pt")' in code and len(code.strip().splitlines()) <= 8
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    (tmp_path / "runs/train/demo/weights").mkdir(parents=True)
    weights = confident_checkpoint(tmp_path / "confident.pt")  # scores above the example's default conf 0.25
    shutil.copy(weights, tmp_path / "runs/train/demo/weights/best.pt")
    shutil.copytree(root / "data" / "images", tmp_path / "data" / "images")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's kernels
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = YOLO(weights, device="cpu")(root / "data/images/shapes_street.jpg", imgsz=320, verbose=False)[0]
    got, want = json.loads(out.stdout), json.loads(expected.to_json())  # what the API gives in this process
    assert len(want) > 0 and [(r["name"], r["class"]) for r in got] == [(r["name"], r["class"]) for r in want]
    for g, w in zip(got, want):  # same thread count, so the same kernels; the margins cover float32 and 5-digit rounding
        assert abs(g["confidence"] - w["confidence"]) <= 2e-5
        assert all(abs(g["box"][k] - w["box"][k]) <= 1 for k in w["box"])  # boxes are rounded to whole pixels
