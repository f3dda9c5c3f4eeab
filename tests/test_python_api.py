"""Python API: torch.hub entries (hubconf.py), AutoShape's input kinds and attributes, and the Detections results object."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from test_export import NAMES, assert_close_predictions, checkpoint_tol, make_checkpoint

import detect
import export
from models.model import DetectionModel
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.cli import OptionError
from utils.data.images import ImageError
from utils.inference.autoshape import AutoShape, batch_shape
from utils.inference.inputs import load_inputs
from utils.inference.results import XYWH_COLUMNS, XYXY_COLUMNS, Detections

ROOT = Path(__file__).resolve().parents[1]
CONF = 0.005  # the test checkpoint is untrained: its scores sit near 0.01, so a low threshold keeps some boxes


def hub_load(model: str, **kwargs: object) -> torch.nn.Module:
    """torch.hub.load from this repository on disk, as users call it."""
    return torch.hub.load(str(ROOT), model, source="local", **kwargs)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny 3-class checkpoint, its dynamic ONNX export, and two photos-like test images on disk."""
    folder = tmp_path_factory.mktemp("api")
    pt = make_checkpoint(folder / "best.pt")
    (onnx_file,) = export.run(weights=pt, include=["onnx"], imgsz=64, dynamic=True, output=folder / "dyn.onnx")
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    for name, (h, w) in {"wide.png": (96, 160), "tall.png": (128, 80)}.items():
        img = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (5, 5), 0)
        cv2.imwrite(str(images / name), img)
    return {"pt": pt, "onnx": onnx_file, "images": images}


@pytest.fixture(scope="module")
def model(weights: dict[str, Path]) -> AutoShape:
    m = hub_load("custom", path=str(weights["pt"]), _verbose=False)
    assert isinstance(m, AutoShape)
    return m


@pytest.fixture(autouse=True)
def _default_attributes(model: AutoShape) -> Iterator[None]:
    """Every test starts from the low test threshold and leaves the shared model's attributes as it found them."""
    model.conf, model.classes, model.max_det, model.channel_order = CONF, None, 1000, "bgr"
    yield
    model.conf, model.classes, model.max_det, model.channel_order = CONF, None, 1000, "bgr"


def assert_same_detections(a: Detections, b: Detections, tol: float = 0.0) -> None:
    """Same classes; boxes within `tol` of the largest coordinate and scores within `tol` (tol 0: identical)."""
    assert len(a) == len(b)
    for pa, pb in zip(a.xyxy, b.xyxy):
        assert pa.shape == pb.shape and len(pa) > 0
        torch.testing.assert_close(pa[:, 5], pb[:, 5], atol=0, rtol=0)
        torch.testing.assert_close(pa[:, :4], pb[:, :4], atol=tol * float(pb[:, :4].abs().max()), rtol=0)
        torch.testing.assert_close(pa[:, 4], pb[:, 4], atol=tol, rtol=0)


# --- torch.hub -------------------------------------------------------------------------------------------------------


def test_hub_entries_are_custom_plus_every_shipped_config() -> None:
    out = subprocess.run([sys.executable, "hubconf.py", "--list"], cwd=ROOT, capture_output=True, text=True, check=True)
    configs = sorted(p.stem for p in (ROOT / "models").glob("*.yaml"))
    assert out.stdout.split() == sorted(["custom", *configs])


def test_custom_pt_matches_detect_py(model: AutoShape, weights: dict[str, Path], tmp_path: Path) -> None:
    """The same image through torch.hub and through detect.py gives the same boxes, scores and classes."""
    image = weights["images"] / "wide.png"
    results = model(str(image), size=160)
    assert results.s == (1, 3, 96, 160) and results.files == ["wide.png"] and results.names == NAMES
    run = detect.run(weights=weights["pt"], source=image, imgsz=(160, 160), conf_thres=CONF, save_txt=True, save_conf=True,
                     nosave=True, project=tmp_path, name="d")
    rows = np.loadtxt(run / "labels" / "wide.txt", ndmin=2)
    ours = results.xywhn[0].numpy()
    order = np.lexsort((ours[:, 0], -ours[:, 4]))  # detect.py writes the same rows in NMS order; sort both the same way
    theirs = rows[np.lexsort((rows[:, 1], -rows[:, 5]))]
    ours = ours[order]
    assert len(ours) == len(theirs) > 0
    np.testing.assert_array_equal(ours[:, 5], theirs[:, 0])  # classes
    np.testing.assert_allclose(ours[:, 4], theirs[:, 5], rtol=1e-5)  # confidences (%g prints 6 digits)
    np.testing.assert_allclose(ours[:, :4], theirs[:, 1:5], atol=0.5 / 96 + 1e-6)  # detect.py rounds boxes to whole pixels


def test_custom_onnx_agrees_with_pt(model: AutoShape, weights: dict[str, Path]) -> None:
    onnx_model = hub_load("custom", path=str(weights["onnx"]), _verbose=False)
    assert isinstance(onnx_model, AutoShape) and not onnx_model.pt and onnx_model.names == NAMES
    onnx_model.conf = CONF
    x = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        assert_close_predictions(onnx_model(x), model(x), checkpoint_tol(weights["pt"]))
    files = sorted(weights["images"].iterdir())
    assert_same_detections(onnx_model(files, size=160), model(files, size=160), checkpoint_tol(weights["pt"]))


def test_custom_without_autoshape(weights: dict[str, Path]) -> None:
    raw = hub_load("custom", path=str(weights["pt"]), autoshape=False, _verbose=False)
    assert isinstance(raw, DetectionModel) and raw.names == NAMES
    backend = hub_load("custom", path=str(weights["onnx"]), autoshape=False, _verbose=False)
    assert backend.onnx and backend.names == NAMES


def test_config_entries_build_and_load_local_weights(weights: dict[str, Path], tmp_path: Path) -> None:
    untrained = hub_load("yolov5n", pretrained=False, classes=3, autoshape=False, _verbose=False)
    assert isinstance(untrained, DetectionModel) and untrained.yaml["nc"] == 3
    trained = hub_load("yolov5n", path=str(weights["pt"]), autoshape=False, _verbose=False)
    reference = torch.load(weights["pt"], weights_only=True)["model"]
    assert trained.names == NAMES
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    wrapped = hub_load("yolov5n", path=str(weights["pt"]), _verbose=False)
    assert isinstance(wrapped, AutoShape) and wrapped.names == NAMES
    with pytest.raises(ValueError, match="no pretrained detector weights are bundled") as e:
        hub_load("yolov5s", _verbose=False)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="do not fit the model being built") as e2:
        hub_load("yolov5s", path=str(weights["pt"]), _verbose=False)
    assert "\n" not in str(e2.value)


def test_hubconf_summary_command() -> None:
    out = subprocess.run([sys.executable, "hubconf.py", "--model", "yolov5n", "--imgsz", "320"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "yolov5n: 1,872,157 parameters" in out and "GFLOPs at 320x320" in out  # YOLOv5n's published count at nc=80
    assert "strides: 8, 16, 32" in out and "classes: 80" in out and "head: anchor_based" in out
    bad = subprocess.run([sys.executable, "hubconf.py", "--model", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "no such model config" in bad.stderr


def test_foreign_utils_package_is_refused_in_one_line(tmp_path: Path, weights: dict[str, Path]) -> None:
    """A user's own 'utils' package imported first cannot be mixed with ours: one clear line instead of a confusing import error."""
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "__init__.py").write_text("")
    code = (f"import utils, torch\ntorch.hub.load({str(ROOT)!r}, 'custom', path={str(weights['pt'])!r}, source='local')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "another package named 'utils' is already imported" in out.stderr


# --- inputs ----------------------------------------------------------------------------------------------------------


def test_every_input_kind_gives_the_same_detections(model: AutoShape, weights: dict[str, Path]) -> None:
    path = weights["images"] / "wide.png"
    bgr = cv2.imread(str(path))
    reference = model(bgr, size=160)
    for same in (str(path), path, Image.open(path), [bgr], str(weights["images"] / "wi*.png")):
        assert_same_detections(model(same, size=160), reference)
    model.channel_order = "rgb"
    assert_same_detections(model(np.ascontiguousarray(bgr[..., ::-1]), size=160), reference)
    assert_same_detections(model(np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1)), size=160), reference)  # CHW
    assert_same_detections(model(bgr[..., ::-1].astype(np.float32) / 255, size=160), reference)  # floats in [0, 1]


def test_folder_and_mixed_list(model: AutoShape, weights: dict[str, Path]) -> None:
    folder = model(weights["images"], size=160)
    assert folder.files == ["tall.png", "wide.png"] and folder.s == (2, 3, 160, 160)  # tall: 160 high, wide: 160 wide
    gray = np.full((40, 50), 128, np.uint8)
    mixed = model([weights["images"], gray, Image.fromarray(gray), weights["images"] / "tall.png"], size=160)
    assert mixed.files == ["tall.png", "wide.png", "image1.jpg", "image2.jpg", "tall_2.png"]
    assert [im.shape for im in mixed.ims] == [(128, 80, 3), (96, 160, 3), (40, 50, 3), (40, 50, 3), (128, 80, 3)]
    # both batches letterbox to 160x160: identical input; the batch size may change the conv kernels' summation order
    # (thread count, oneDNN's choice), so the boxes agree to float32 rounding, not bit for bit
    assert_same_detections(mixed[1], folder[1], checkpoint_tol(weights["pt"]))


def test_pil_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    (item,) = load_inputs(Image.open(tmp_path / "rot.jpg"))
    assert item.image.shape == (40, 20, 3) and item.name == "rot.jpg"
    assert item.image[5, 10, 2] > 200 and item.image[35, 10, 2] < 60  # red (BGR channel 2) on top after rotation


def test_tensor_input_returns_raw_output_and_traces(model: AutoShape) -> None:
    x = torch.rand(2, 3, 64, 96)
    raw = model(x)
    assert isinstance(raw, torch.Tensor) and raw.shape == (2, 378, 8)
    with torch.no_grad():
        torch.testing.assert_close(raw.detach(), model.model(x), rtol=0, atol=0)
        traced = torch.jit.trace(model, [x])
        torch.testing.assert_close(traced(x), raw.detach(), rtol=0, atol=0)
    assert model(x[0]).shape == (1, 378, 8)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_url_input_downloads_and_fails_offline_in_one_line(model: AutoShape, weights: dict[str, Path]) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(weights["images"])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        results = model(f"{base}/wide.png", size=160)
        assert results.files == ["wide.png"]
        assert_same_detections(results, model(weights["images"] / "wide.png", size=160))
        with pytest.raises(ImageError, match=r"missing.png: cannot download image \(HTTP 404"):
            model(f"{base}/missing.png")
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nothing listens on: what an offline machine answers
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match="cannot download image .*check the network") as e:
        model(f"http://127.0.0.1:{port}/bus.jpg")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (42, TypeError, "cannot read int as an image"),
        ("does/not/exist.jpg", FileNotFoundError, "does/not/exist.jpg: source does not exist"),
        (np.zeros((8, 8, 7)), ImageError, "got shape"),
        (np.array([["a"]]), ImageError, "must hold numbers"),
        ([], ImageError, "no images given"),
    ],
)
def test_bad_inputs_are_one_line(model: AutoShape, bad: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as e:
        model(bad)
    assert "\n" not in str(e.value)


def test_videos_are_left_to_detect_py(model: AutoShape, tmp_path: Path) -> None:
    """A video named directly is refused; one in a folder is skipped (here the folder then holds no image)."""
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(ImageError, match="a video; the hub model reads images"):
        model(tmp_path / "clip.mp4")
    with pytest.raises(ImageError, match="no images found"):
        model(tmp_path)


# --- attributes --------------------------------------------------------------------------------------------------------


def test_filtering_attributes(model: AutoShape, weights: dict[str, Path]) -> None:
    image = weights["images"] / "wide.png"
    everything = model(image, size=160).xyxy[0]
    assert len(everything) > 3 and len(set(everything[:, 5].tolist())) > 1
    model.conf = float(everything[:, 4].median())
    assert (model(image, size=160).xyxy[0][:, 4] > model.conf).all()
    model.conf, model.classes = CONF, [1]
    only = model(image, size=160).xyxy[0]
    assert len(only) and (only[:, 5] == 1).all()
    torch.testing.assert_close(only, everything[everything[:, 5] == 1])
    model.classes, model.max_det = None, 2
    torch.testing.assert_close(model(image, size=160).xyxy[0], everything[:2])
    model.conf = 1.5
    with pytest.raises(OptionError, match="conf must be a number between 0 and 1"):
        model(image)


def test_static_onnx_runs_at_its_exported_shape(weights: dict[str, Path], tmp_path: Path) -> None:
    (static,) = export.run(weights=weights["pt"], include=["onnx"], imgsz=[64, 96], output=tmp_path / "static.onnx")
    m = hub_load("custom", path=str(static), _verbose=False)
    m.conf = CONF
    results = m(sorted(weights["images"].iterdir()), size=640)
    assert results.s == (2, 3, 64, 96)
    for p, im in zip(results.xyxy, results.ims):
        assert len(p) and (p[:, [0, 2]] <= im.shape[1]).all() and (p[:, [1, 3]] <= im.shape[0]).all() and (p[:, :4] >= 0).all()


def test_batch_shape_rule() -> None:
    assert batch_shape([(720, 1280)], (640, 640), 32) == (384, 640)  # YOLOv5's hub shape for zidane.jpg at 640
    assert batch_shape([(1080, 810), (720, 1280)], (640, 640), 32) == (640, 640)
    assert batch_shape([(100, 100)], (320, 320), 32) == (320, 320)  # small images are scaled up, as in YOLOv5


# --- Detections ----------------------------------------------------------------------------------------------------


@pytest.fixture
def made() -> Detections:
    """Two hand-made images: one with two boxes, one with none."""
    ims = [np.full((100, 200, 3), 60, np.uint8), np.full((50, 40, 3), 60, np.uint8)]
    pred = [torch.tensor([[10.0, 20.0, 50.0, 80.0, 0.9, 2.0], [100.0, 0.0, 200.0, 100.0, 0.5, 0.0]]), torch.zeros((0, 6))]
    return Detections(ims, pred, ["one.jpg", "two.png"], ["circle", "rectangle", "triangle"], (1.0, 2.0, 3.0), (2, 3, 128, 224))


def test_box_layouts(made: Detections) -> None:
    torch.testing.assert_close(made.xywh[0][0], torch.tensor([30.0, 50.0, 40.0, 60.0, 0.9, 2.0]))
    torch.testing.assert_close(made.xyxyn[0][1], torch.tensor([0.5, 0.0, 1.0, 1.0, 0.5, 0.0]))
    torch.testing.assert_close(made.xywhn[0][0], torch.tensor([0.15, 0.5, 0.2, 0.6, 0.9, 2.0]))
    assert made.xyxy[1].shape == made.xywhn[1].shape == (0, 6)


def test_print_len_iteration(made: Detections, capsys: pytest.CaptureFixture[str]) -> None:
    made.print()
    assert capsys.readouterr().out.splitlines() == [
        "image 1/2: 100x200 1 circle, 1 triangle",
        "image 2/2: 50x40 (no detections)",
        "Speed: 1.0ms pre-process, 2.0ms inference, 3.0ms NMS per image at shape (2, 3, 128, 224)",
    ]
    assert len(made) == 2 and [d.files for d in made] == [["one.jpg"], ["two.png"]] == [d.files for d in made.tolist()]
    assert made[-1].files == ["two.png"] and str(made[0]).startswith("image 1/1: 100x200")
    assert made.speed == {"preprocess": 1.0, "inference": 2.0, "postprocess": 3.0}
    with pytest.raises(IndexError):
        made[2]


def test_render_save_show(made: Detections, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.plots import draw_detections

    rendered = made.render()
    np.testing.assert_array_equal(rendered[0], draw_detections(made.ims[0], made.pred[0], made.names))
    assert (rendered[0] != made.ims[0]).any() and (rendered[1] == made.ims[1]).all() and (made.ims[0] == 60).all()
    folder = made.save(save_dir=tmp_path / "exp")
    again = made.save(save_dir=tmp_path / "exp")
    assert folder == tmp_path / "exp" and again == tmp_path / "exp2"
    assert sorted(p.name for p in folder.iterdir()) == ["one.jpg", "two.png"]
    np.testing.assert_array_equal(cv2.imread(str(folder / "two.png")), made.ims[1])
    shown: list[tuple[tuple[int, int], str]] = []
    monkeypatch.setattr(Image.Image, "show", lambda self, title=None: shown.append((self.size, title)))
    made.show()
    assert shown == [((200, 100), "one.jpg"), ((40, 50), "two.png")]


def test_crop(made: Detections, tmp_path: Path) -> None:
    crops = made.crop(save=True, save_dir=tmp_path / "exp")
    assert [(c["label"], c["file"], c["im"].shape) for c in crops] == [("triangle 0.90", "one.jpg", (60, 40, 3)),
                                                                        ("circle 0.50", "one.jpg", (100, 100, 3))]
    torch.testing.assert_close(crops[0]["box"], torch.tensor([10.0, 20.0, 50.0, 80.0]))
    assert int(crops[1]["cls"]) == 0 and float(crops[1]["conf"]) == 0.5
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jpg"))
    assert written == ["exp/crops/circle/one_1.jpg", "exp/crops/triangle/one_0.jpg"]
    assert len(made.crop(save=False)) == 2 and not (tmp_path / "exp2").exists()


def test_pandas(made: Detections) -> None:
    frames = made.pandas()
    df = frames.xyxy[0]
    assert list(df.columns) == list(XYXY_COLUMNS) and list(frames.xywhn[0].columns) == list(XYWH_COLUMNS)
    assert df.to_dict("records")[0] == {"xmin": 10.0, "ymin": 20.0, "xmax": 50.0, "ymax": 80.0, "confidence": pytest.approx(0.9),
                                        "class": 2, "name": "triangle"}
    assert frames.xywh[0]["width"].tolist() == [40.0, 100.0] and len(frames.xyxyn[1]) == 0


def test_detections_from_a_real_call_cover_all_methods(model: AutoShape, weights: dict[str, Path], tmp_path: Path) -> None:
    results = model(sorted(weights["images"].iterdir()), size=160)
    assert len(results) == 2 and all(len(p) for p in results.pred) and all(t >= 0 for t in results.t)
    assert [len(df) for df in results.pandas().xyxy] == [len(p) for p in results.xyxy]
    folder = results.save(save_dir=tmp_path / "exp")
    assert sorted(p.name for p in folder.glob("*.png")) == ["tall.png", "wide.png"]
    crops = results.crop(save=True, save_dir=tmp_path / "crops")
    assert len(crops) == len(list((tmp_path / "crops" / "crops").rglob("*.jpg"))) > 0


def test_detections_checks_lengths() -> None:
    with pytest.raises(ValueError, match="must match"):
        Detections([np.zeros((2, 2, 3), np.uint8)], [], ["a.jpg"], [])


def test_save_checkpoint_round_trip_through_hub(tmp_path: Path) -> None:
    """A model trained from a shipped config and saved as train.py saves it loads through that config's entry."""
    model = DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=2)
    path = save_checkpoint(tmp_path / "last.pt", model, names=["x", "y"])
    loaded = hub_load("yolov5n", path=str(path), autoshape=False, _verbose=False)
    assert loaded.names == ["x", "y"] and loaded.yaml["nc"] == 2


def python_api_example(needle: str) -> str:
    """The python code block of docs/python_api.md (the Python API page the README links to) that contains `needle`."""
    blocks = [b.split("```", 1)[0] for b in (ROOT / "docs" / "python_api.md").read_text(encoding="utf-8").split("```python\n")[1:]]
    return next(b for b in blocks if needle in b)


def test_readme_example_runs_as_written(tmp_path: Path, weights: dict[str, Path]) -> None:
    """The example, run from a folder laid out like the repository after the main command (its '.' is this repo)."""
    call = 'torch.hub.load(".", "custom", path="runs/train/demo/weights/best.pt", source="local")'
    code = python_api_example(call)
    assert call in code and len(code.strip().splitlines()) <= 13
    (tmp_path / "example.py").write_text(code.replace('torch.hub.load(".",', f"torch.hub.load({str(ROOT)!r},"), encoding="utf-8")
    (tmp_path / "runs/train/demo/weights").mkdir(parents=True)
    shutil.copy(weights["pt"], tmp_path / "runs/train/demo/weights/best.pt")
    shutil.copytree(ROOT / "data" / "images", tmp_path / "data" / "images")
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "image 1/3: 720x1280" in out.stdout and "image 2/3: 1080x810" in out.stdout and "xmin" in out.stdout
    saved = sorted(p.name for p in (tmp_path / "runs" / "detect" / "exp").iterdir())
    assert saved == ["image1.jpg", "shapes_street.jpg", "shapes_street_2.jpg"]


def test_detect_py_defaults_to_the_sample_images() -> None:
    assert Path(detect.default_source()) == ROOT / "data" / "images"
