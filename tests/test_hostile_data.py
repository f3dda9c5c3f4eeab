"""Hostile or broken data: unsafe dataset downloads, decompression-bomb images, directory label paths, stale disk caches."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import os
import resource
import stat
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from utils.data import images as images_mod
from utils.data.dataset_config import DatasetError, load_dataset_config
from utils.data.datasets import LoadImagesAndLabels, verify_image
from utils.data.disk_cache import image_key
from utils.data.images import ImageError, load_image
from utils.data.labels import read_label_file
from utils.data.sources import LoadImages

# ---------- helpers ----------


def write_img(path: Path, w: int = 64, h: int = 48, colour: tuple[int, int, int] = (40, 90, 160)) -> Path:
    """Write a small solid-colour image (any cv2 format by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), colour, np.uint8))
    return path


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    """A zip archive in memory; symlinks maps member name -> link target (stored with the S_IFLNK mode)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return buf.getvalue()


def jpg_bytes() -> bytes:
    return cv2.imencode(".jpg", np.full((32, 32, 3), 90, np.uint8))[1].tobytes()


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def files_under(folder: Path) -> set[str]:
    """Relative paths of every file and folder under folder."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def png_bytes(w: int, h: int) -> bytes:
    """A valid 8-bit grayscale PNG of w x h zero pixels, built chunk by chunk (a 20000x20000 one is ~400 KB)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp, row = zlib.compressobj(9), bytes(w + 1)  # filter byte 0 + w zero pixels
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------- 1. dataset downloads stay inside the dataset root ----------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """A local http server on 127.0.0.1 (port 0) serving tmp_path/srv; yields (folder, base URL), shut down afterwards."""
    folder = tmp_path / "srv"
    folder.mkdir()
    jpg = jpg_bytes()
    (folder / "dl.zip").write_bytes(zip_bytes({"dl/images/train/a.jpg": jpg, "dl/labels/train/a.txt": b"0 0.5 0.5 0.5 0.5\n"}))
    (folder / "val.zip").write_bytes(zip_bytes({"val/b.jpg": jpg}))
    (folder / "flat.zip").write_bytes(zip_bytes({"images/train/a.jpg": jpg, "labels/train/a.txt": b"0 0.5 0.5 0.5 0.5\n",
                                                 "README.txt": b"theirs"}))
    (folder / "evil.zip").write_bytes(zip_bytes({"images/train/a.jpg": jpg, "../../evil.txt": b"x"}))
    (folder / "abs.zip").write_bytes(zip_bytes({"images/train/a.jpg": jpg, str(tmp_path / "abs_evil.txt"): b"x"}))
    (folder / "link.zip").write_bytes(zip_bytes({"images/train/a.jpg": jpg}, symlinks={"images/train/b.jpg": "/etc/passwd"}))
    (folder / "notes.txt").write_text("theirs")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def ds_yaml(tmp_path: Path, download, train: str = "images/train") -> Path:
    return write_yaml(tmp_path / "ds.yaml", {"path": str(tmp_path / "ds"), "train": train, "val": train, "names": ["a"],
                                             "download": download})


def refused(f: Path, url: str) -> str:
    """Load f, expecting a one-line DatasetError naming the yaml and the URL; returns the message."""
    with pytest.raises(DatasetError) as e:
        load_dataset_config(f)
    msg = str(e.value)
    assert "\n" not in msg and f.name in msg and url in msg, msg
    return msg


@pytest.mark.parametrize("to", ["../victim", "images/../../victim", "ABS"])
def test_download_to_outside_root_refused(tmp_path, server, to):
    _, base = server
    to = str(tmp_path / "victim") if to == "ABS" else to
    msg = refused(ds_yaml(tmp_path, {"url": f"{base}/flat.zip", "to": to}), f"{base}/flat.zip")
    assert "refused" in msg and "outside" in msg
    assert not (tmp_path / "victim").exists() and not (tmp_path / "ds").exists()


@pytest.mark.parametrize("scheme", ["file", "ftp"])
def test_download_non_http_url_refused(tmp_path, scheme):
    local = tmp_path / "local" / "flat.zip"
    local.parent.mkdir()
    local.write_bytes(zip_bytes({"images/train/a.jpg": jpg_bytes()}))
    url = f"file://{local}" if scheme == "file" else "ftp://127.0.0.1:9/flat.zip"
    msg = refused(ds_yaml(tmp_path, {"url": url, "to": "."}), url)
    assert "only http:// and https://" in msg
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("tail", ["/x/..", "/", "/flat.zip/.."])
def test_download_url_without_plain_file_name_refused(tmp_path, server, tail):
    _, base = server
    (tmp_path / "ds").mkdir()
    url = base + tail
    f = ds_yaml(tmp_path, url)
    before = files_under(tmp_path)
    msg = refused(f, url)
    assert "refused" in msg and "file name" in msg
    assert files_under(tmp_path) == before


def test_download_never_overwrites_existing_files(tmp_path, server):
    _, base = server
    root = tmp_path / "ds"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "README.txt").write_text("mine too")
    msg = refused(ds_yaml(tmp_path, {"url": f"{base}/notes.txt", "to": "."}), f"{base}/notes.txt")
    assert "already exists" in msg and (root / "notes.txt").read_text() == "mine"
    msg = refused(ds_yaml(tmp_path, {"url": f"{base}/flat.zip", "to": "."}), f"{base}/flat.zip")  # member README.txt
    assert "would overwrite" in msg and (root / "README.txt").read_text() == "mine too"
    assert files_under(root) == {"notes.txt", "README.txt"}  # nothing half-extracted, no archive or .part left


@pytest.mark.parametrize("archive,why", [("evil.zip", "unsafe path"), ("abs.zip", "unsafe path"), ("link.zip", "symbolic link")])
def test_rejected_archive_removed(tmp_path, server, archive, why):
    _, base = server
    (tmp_path / "ds").mkdir()
    f = ds_yaml(tmp_path, {"url": f"{base}/{archive}", "to": "."})
    before = files_under(tmp_path)
    msg = refused(f, f"{base}/{archive}")
    assert why in msg
    assert files_under(tmp_path) == before  # no archive, .part file or extracted member left behind
    assert not (tmp_path / "abs_evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_normal_download_unzips_into_root_and_keeps_user_files(tmp_path, server):
    _, base = server
    (tmp_path / "dl.zip").write_text("the user's own file of the same name")  # beside the root, where bare URLs unzip
    f = write_yaml(tmp_path / "dl.yaml", {"path": str(tmp_path / "dl"), "train": "images/train", "val": "images/val",
                                          "names": ["a"], "download": [f"{base}/dl.zip", {"url": f"{base}/val.zip", "to": "images"}]})
    cfg = load_dataset_config(f)
    assert (Path(cfg["train"]) / "a.jpg").is_file() and (Path(cfg["val"]) / "b.jpg").is_file()
    assert (tmp_path / "dl" / "labels" / "train" / "a.txt").read_text() == "0 0.5 0.5 0.5 0.5\n"
    assert (tmp_path / "dl.zip").read_text() == "the user's own file of the same name"
    leftovers = [p for p in (tmp_path / "dl").rglob("*") if p.name.endswith((".part", ".zip"))]
    assert leftovers == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dl", "dl.yaml", "dl.zip", "srv"]


# ---------- 2. one image-size limit for every reader ----------


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png_bytes(20000, 20000))
    return path


def test_huge_declared_png_refused_before_decoding(bomb_png):
    assert getattr(images_mod, "MAX_IMAGE_PIXELS", None) == 89_478_485  # PIL's default, one constant for all readers
    assert bomb_png.stat().st_size < 1_000_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError) as e:
        load_image(bomb_png)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100_000  # KiB: nothing near the 400 MB decode
    msg = str(e.value)
    assert "\n" not in msg and str(bomb_png) in msg and "400,000,000 pixels" in msg and "89,478,485" in msg
    assert verify_image(str(bomb_png)) == (None, msg)  # training/val scanning refuses it with the same line


@pytest.mark.parametrize("suffix", ["png", "jpg", "bmp"])
def test_one_limit_shared_by_load_image_verify_image_and_sources(tmp_path, monkeypatch, caplog, suffix):
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 5000)
    big, small = write_img(tmp_path / "src" / f"big.{suffix}", 100, 100), write_img(tmp_path / "src" / f"small.{suffix}", 50, 50)
    with pytest.raises(ImageError, match="100x100 = 10,000 pixels, over the limit of 5,000"):
        load_image(big)
    assert load_image(small).shape == (50, 50, 3)
    shape, msg = verify_image(str(big))
    assert shape is None and msg.startswith(f"{big}: image is 100x100") and verify_image(str(small)) == ((50, 50), None)
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        src = LoadImages(tmp_path / "src", img_size=64)
        items = list(src)
    assert [Path(p).name for p, *_ in items] == [small.name] and src.skipped == 1
    warned = [r.getMessage() for r in caplog.records if str(big) in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "over the limit" in warned[0]


def test_limit_counts_oversized_images_as_corrupt_in_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 5000)
    write_img(tmp_path / "images" / "big.jpg", 100, 100)
    write_img(tmp_path / "images" / "ok.jpg", 60, 60)
    ds = LoadImagesAndLabels(tmp_path / "images", img_size=64)
    assert [Path(f).name for f in ds.im_files] == ["ok.jpg"] and ds.stats["corrupt"] == 1


# ---------- 3. a label path that is a directory ----------


def test_label_path_that_is_a_directory_is_corrupt(tmp_path, caplog):
    write_img(tmp_path / "images" / "a.jpg")
    write_img(tmp_path / "images" / "b.jpg")
    (tmp_path / "labels" / "a.txt").mkdir(parents=True)
    (tmp_path / "labels" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    lb, msg, status = read_label_file(tmp_path / "labels" / "a.txt")
    assert status == "corrupt" and lb.shape == (0, 5) and str(tmp_path / "labels" / "a.txt") in msg and "directory" in msg
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        ds = LoadImagesAndLabels(tmp_path / "images", img_size=64)
    assert ds.stats["corrupt"] == 1 and ds.stats["background"] == 0 and ds.stats["missing"] == 0
    assert [Path(f).name for f in ds.im_files] == ["b.jpg"]
    warned = [r.getMessage() for r in caplog.records if "a.txt" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]


# ---------- 4. --cache disk ----------


def disk_entries(folder: Path, stem: str) -> list[Path]:
    """The disk cache entries of image <folder>/<stem>.png, wherever under the dataset the cache folder is."""
    return sorted(folder.parent.rglob(f"{image_key(str(folder / f'{stem}.png'))}.*.npy"))


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]


def test_disk_cache_rebuilt_when_image_changes(tmp_path):
    images = tmp_path / "images"
    src = write_img(images / "im0.png", 64, 48, (10, 20, 30))
    write_img(images / "im1.png", 64, 48)
    ds = LoadImagesAndLabels(images, img_size=64, cache="disk", workers=1)
    assert (ds.load_image(0)[0] == (10, 20, 30)).all() and len(disk_entries(images, "im0")) == 1
    st = src.stat()
    write_img(src, 64, 48, (200, 100, 50))  # same name, same size on disk, new pixels
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # a later edit (timestamps can be coarse)
    ds = LoadImagesAndLabels(images, img_size=64, cache="disk", workers=1)
    i = [Path(f).name for f in ds.im_files].index("im0.png")
    assert (ds.load_image(i)[0] == (200, 100, 50)).all()
    entries = disk_entries(images, "im0")
    assert len(entries) == 1 and (np.load(entries[0]) == (200, 100, 50)).all()  # the stale entry was removed
    assert no_temp_files(tmp_path)


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _wrong_dtype(f: Path) -> None:
    np.save(f, np.zeros((48, 64, 3), np.float32), allow_pickle=False)


def _garbage(f: Path) -> None:
    f.write_bytes(b"not a numpy file at all")


@pytest.mark.parametrize("damage", [_truncate, _wrong_dtype, _garbage])
@pytest.mark.parametrize("when", ["between_runs", "during_training"])
def test_broken_disk_cache_entry_rebuilt(tmp_path, caplog, damage, when):
    images = tmp_path / "images"
    write_img(images / "im0.png", 64, 48, (10, 20, 30))
    ds = LoadImagesAndLabels(images, img_size=64, cache="disk", workers=1)
    [entry] = disk_entries(images, "im0")
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        if when == "between_runs":
            ds = LoadImagesAndLabels(images, img_size=64, cache="disk", workers=1)
        img, (h0, w0), _ = ds.load_image(0)
        item = ds[0]
    assert (h0, w0) == (48, 64) and (img == (10, 20, 30)).all() and tuple(item[0].shape) == (3, 64, 64)
    [entry] = disk_entries(images, "im0")
    assert (np.load(entry, allow_pickle=False) == (10, 20, 30)).all()  # rebuilt in place, whole
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and entry.name in warned[0] and "rebuilding" in warned[0] and "\n" not in warned[0]
    assert no_temp_files(tmp_path)


def test_label_cache_never_replaces_a_foreign_file(tmp_path, caplog):
    """A dataset yaml's train list x.txt puts the label cache at x.cache: a user's file there is left alone."""
    write_img(tmp_path / "images" / "a.jpg", 40, 40)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "train.txt").write_text("images/a.jpg\n")
    foreign = tmp_path / "train.cache"
    foreign.write_text("my notes")
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        ds = LoadImagesAndLabels(tmp_path / "train.txt", img_size=64)
    assert len(ds) == 1 and foreign.read_text() == "my notes"
    assert "not a label cache" in caplog.text
    foreign.unlink()
    LoadImagesAndLabels(tmp_path / "train.txt", img_size=64)  # our own cache is written, then reused and replaced freely
    assert json.loads(foreign.read_text())["records"]
    LoadImagesAndLabels(tmp_path / "train.txt", img_size=64)
