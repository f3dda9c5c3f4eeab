"""Inference input and output: videos written at their source's frame rate, image URLs downloaded (from a local server)
and read as images, and --view-img on a machine without a display (one warning, results still saved)."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
from models.model import DetectionModel
from utils.checkpoint import save_checkpoint
from utils.cli import error_boundary
from utils.data import sources
from utils.data.images import ImageError
from utils.data.sources import LoadImages, capture_fps, download_image, fetch_url, is_image_url
from utils.data.streams import LoadStreams
from utils.inference import predict
from utils.inference.predict import DEFAULT_FPS, VideoSink, check_imshow
from utils.inference.predictor import open_source

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c"]
HEADLESS_OPENCV = "GUI:                           NONE" in cv2.getBuildInformation()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _noise(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _write_video(path: Path, fps: float, frames: int = 3) -> Path:
    """A small MJPG video at `fps` (skips the test where this OpenCV build cannot write one)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))  # type: ignore[attr-defined]
    if not writer.isOpened():
        pytest.skip(f"this OpenCV build cannot write MJPG {path.suffix}")
    for i in range(frames):
        writer.write(_noise(seed=i))
    writer.release()
    return path


def _video_info(path: Path) -> tuple[float, int]:
    """(declared fps, frames actually decoded) of a video file."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    fps, n = cap.get(cv2.CAP_PROP_FPS), 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return fps, n


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-class detector checkpoint."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("inference_io") / "det.pt", DetectionModel("yolov5n.yaml", nc=3), names=NAMES)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local test server is reached directly, whatever proxy the environment names."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, no_proxy: None) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder) of an http.server on 127.0.0.1 in a thread, serving a generated image."""
    folder = tmp_path / "www" / "img"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "pic.png"), _noise(96, 128, seed=5))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    finally:
        httpd.shutdown()
        httpd.server_close()


def _closed_port() -> int:
    """A local port nothing listens on: what an offline machine answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- video frame rate -------------------------------------------------------------------------------------------------


def test_videos_are_saved_at_their_source_fps(weights: Path, tmp_path: Path) -> None:
    """A folder with an image, a 10 fps and a 25 fps video: each annotated video keeps its own rate and frames."""
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a_still.png"), _noise())
    _write_video(src / "b_ten.avi", 10)
    _write_video(src / "c_quarter.avi", 25, frames=4)
    out = detect.run(weights=weights, source=src, imgsz=(64, 64), device="cpu", project=tmp_path / "runs", name="exp")
    assert (out / "a_still.png").is_file()
    fps10, n10 = _video_info(out / "b_ten.mp4")
    fps25, n25 = _video_info(out / "c_quarter.mp4")
    assert (round(fps10, 3), n10) == (10.0, 3)
    assert (round(fps25, 3), n25) == (25.0, 4)


def test_loaders_hold_the_fps_of_what_they_read(tmp_path: Path) -> None:
    """LoadImages: None for an image, the video's rate for its frames; LoadStreams: the capture's rate."""
    cv2.imwrite(str(tmp_path / "a.png"), _noise())
    video = _write_video(tmp_path / "b.avi", 10, frames=2)
    loader = LoadImages(str(tmp_path), img_size=64)
    assert loader.fps is None
    seen = [(Path(path).name, loader.fps) for path, *_ in loader]
    assert seen == [("a.png", None), ("b.avi", 10.0), ("b.avi", 10.0)]
    stream = LoadStreams(str(video), img_size=64)
    assert stream.fps == 10.0 and len(list(stream)) == 2


class _FakeCapture:
    def __init__(self, fps: float) -> None:
        self.fps = fps

    def get(self, prop: int) -> float:
        assert prop == cv2.CAP_PROP_FPS
        return self.fps


@pytest.mark.parametrize(("declared", "expected"), [(10.0, 10.0), (29.97, 29.97), (0.0, None), (float("nan"), None),
                                                    (float("inf"), None), (-5.0, None), (90000.0, None)])
def test_capture_fps_is_none_when_nothing_usable_is_declared(declared: float, expected: float | None) -> None:
    assert capture_fps(_FakeCapture(declared)) == expected  # type: ignore[arg-type]


def test_video_sink_uses_default_fps_without_one(tmp_path: Path) -> None:
    """An image sequence or a stream that declares no rate is written at 30 fps (YOLOv5's default)."""
    sink = VideoSink()
    for i in range(2):
        sink.write(tmp_path / "seq", _noise(seed=i), None)
    sink.close()
    assert _video_info(tmp_path / "seq.mp4") == (DEFAULT_FPS, 2)


# ---- image URLs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://example.com/a/bus.jpg", True),
        ("http://example.com/a/BUS.PNG?size=large&x=1", True),
        ("http://example.com/a/b%20c.webp#frag", True),
        ("http://example.com/live.m3u8", False),
        ("http://example.com/clip.mp4", False),
        ("http://example.com/img?name=x.jpg", False),
        ("rtsp://example.com/cam.jpg", False),
        ("data/images/bus.jpg", False),
    ],
)
def test_is_image_url(text: str, expected: bool) -> None:
    assert is_image_url(text) is expected


def test_image_url_is_downloaded_and_read_as_an_image(weights: Path, server: tuple[str, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    base, folder = server
    url = f"{base}/img/pic.png?token=abc"
    caplog.set_level(logging.INFO, logger="mobile_yolo")
    out = detect.run(weights=weights, source=url, imgsz=(64, 64), device="cpu", project=tmp_path / "runs", name="exp")
    saved = cv2.imread(str(out / "pic.png"))
    assert saved is not None and saved.shape == (96, 128, 3)  # the image, not a stream's frame
    assert not list(out.glob("*.mp4")) and not _warnings(caplog)
    assert any(r.getMessage().startswith(f"image 1/1 {url}: ") for r in caplog.records)


def test_url_loader_keeps_its_download_in_a_temporary_folder_while_alive(server: tuple[str, Path]) -> None:
    base, _ = server
    dataset = open_source(f"{base}/img/pic.png", (64, 64), 32, True, 1)
    assert isinstance(dataset, LoadImages)
    (file, url), = dataset.origins.items()
    assert url == f"{base}/img/pic.png" and Path(file).name == "pic.png" and Path(file).is_file()
    assert Path(file).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert [Path(p).name for p, *_ in dataset] == ["pic.png"]
    del dataset
    assert not Path(file).exists()  # the temporary folder went with the loader


def test_image_url_over_the_size_cap_is_refused(server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, folder = server
    size = (folder / "pic.png").stat().st_size
    assert len(fetch_url(f"{base}/img/pic.png", limit=size)) == size
    monkeypatch.setattr(sources, "MAX_DOWNLOAD_BYTES", size - 1)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ImageError, match=rf"^{base}/img/pic.png: image download is over the limit of {size - 1:,} bytes"):
        download_image(f"{base}/img/pic.png", dest)
    assert not list(dest.iterdir())


def test_image_url_offline_is_one_error_line_naming_it(weights: Path, tmp_path: Path, no_proxy: None) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/photos/bus.jpg?x=1"
    with pytest.raises(SystemExit) as e, error_boundary("detect"):
        detect.run(weights=weights, source=url, imgsz=(64, 64), device="cpu", project=tmp_path / "runs", name="exp")
    msg = str(e.value.code)
    assert msg.startswith(f"detect: error: {url}: cannot download image (") and msg.endswith("check the network or pass a local file")
    assert "\n" not in msg and not (tmp_path / "runs").exists()


def test_other_http_urls_are_still_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    class FakeStreams:
        def __init__(self, source: str, **kwargs: object) -> None:
            opened.append(source)

    monkeypatch.setattr("utils.data.streams.LoadStreams", FakeStreams)
    assert isinstance(open_source("http://example.com/live.m3u8", (64, 64), 32, True, 1), FakeStreams)
    assert opened == ["http://example.com/live.m3u8"]


# ---- --view-img without a display ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not (sys.platform.startswith("linux") or HEADLESS_OPENCV), reason="a display may be available here")
def test_view_img_without_display_warns_once_and_saves(weights: Path, tmp_path: Path) -> None:
    """detect.py --view-img on this headless machine (no DISPLAY; headless OpenCV): rc 0, one warning, results saved."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        cv2.imwrite(str(src / f"im{i}.png"), _noise(seed=i))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    r = subprocess.run([sys.executable, str(ROOT / "detect.py"), "--weights", str(weights), "--source", str(src), "--imgsz", "64",
                        "--device", "cpu", "--view-img", "--project", str(tmp_path / "runs"), "--name", "exp"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    log = (r.stdout + r.stderr).splitlines()
    warned = [ln for ln in log if "WARNING" in ln]
    assert len(warned) == 1 and warned[0].startswith("WARNING: --view-img turned off: "), warned
    assert warned[0].endswith("; results are still saved") and ("DISPLAY is not set" in warned[0] or "headless" in warned[0])
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "exp").iterdir()) == ["im0.png", "im1.png"]


@pytest.mark.skipif(not HEADLESS_OPENCV, reason="needs the headless OpenCV build (a GUI build would try to open the display)")
def test_view_img_with_headless_opencv_warns_once_and_saves(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A display is named but OpenCV cannot open windows (cv2.error in imshow): the same one warning, the run goes on."""
    monkeypatch.setenv("DISPLAY", ":0")
    cv2.imwrite(str(tmp_path / "im.png"), _noise())
    out = detect.run(weights=weights, source=tmp_path / "im.png", imgsz=(64, 64), device="cpu", view_img=True,
                     project=tmp_path / "runs", name="exp")
    assert _warnings(caplog) == ["WARNING: --view-img turned off: this OpenCV build cannot open windows (headless); "
                                 "results are still saved"]
    assert (out / "im.png").is_file()


def test_check_imshow_true_when_a_window_opens(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(predict.cv2, "imshow", lambda *a: calls.append("imshow"))
    monkeypatch.setattr(predict.cv2, "waitKey", lambda *a: -1)
    monkeypatch.setattr(predict.cv2, "destroyAllWindows", lambda: calls.append("destroy"))
    assert check_imshow() is True and calls == ["imshow", "destroy"] and not _warnings(caplog)
