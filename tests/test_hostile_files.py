"""Hostile and careless files, round two (issue 26): byte-order marks, bow-tie polygons, result names with dots, disk
cache entries beside a user's images, a RAM cache that cannot fit, symbolic link loops, and printed commands whose
paths need quoting. Each case checks the one shared mechanism behind it; new names are imported inside the tests, so
each test fails on its own on the code before the change."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import train
import val
from utils.data.dataset_config import DatasetError, load_dataset_config
from utils.data.datasets import LoadImagesAndLabels
from utils.data.labels import read_label_file, read_segment_label_file

BOM = b"\xef\xbb\xbf"
BOWTIE = "0.1 0.1 0.9 0.6 0.9 0.1 0.1 0.6"  # crosses itself at (0.5, 0.35): two lobes, 0.2 of the image in all
TINY_CFG = "models/yolov5n.yaml"


def write_img(path: Path, w: int = 64, h: int = 48, colour: tuple[int, int, int] = (90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), colour, np.uint8))
    return path


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def symlink_loop(folder: Path) -> Path:
    """folder/a -> folder/b -> folder/a."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    return folder / "a"


# ---------- 1. UTF-8 byte-order marks ----------


def test_label_files_with_a_bom_are_read(tmp_path: Path) -> None:
    det, seg = tmp_path / "det.txt", tmp_path / "seg.txt"
    det.write_bytes(BOM + b"1 0.5 0.5 0.2 0.4\r\n0 0.25 0.25 0.1 0.1\r\n")
    seg.write_bytes(BOM + b"2 0.1 0.1 0.5 0.1 0.5 0.5\n")
    lb, note, status = read_label_file(det, nc=3)
    assert status == "ok" and note is None
    np.testing.assert_allclose(lb, [[1, 0.5, 0.5, 0.2, 0.4], [0, 0.25, 0.25, 0.1, 0.1]], atol=1e-7)
    lb, segments, note, status = read_segment_label_file(seg, nc=3)
    assert status == "ok" and note is None and lb[:, 0].tolist() == [2.0] and len(segments) == 1
    np.testing.assert_allclose(segments[0], [[0.1, 0.1], [0.5, 0.1], [0.5, 0.5]], atol=1e-7)


def test_image_list_with_a_bom_keeps_its_first_image(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_img(tmp_path / "images" / f"{name}.png")
        (tmp_path / "labels").mkdir(exist_ok=True)
        (tmp_path / "labels" / f"{name}.txt").write_bytes(BOM + b"0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "train.txt").write_bytes(BOM + b"images/a.png\nimages/b.png\n")
    ds = LoadImagesAndLabels(tmp_path / "train.txt", img_size=64)
    assert sorted(Path(f).name for f in ds.im_files) == ["a.png", "b.png"]
    assert ds.stats["corrupt"] == 0 and ds.stats["ok"] == 2 and all(len(lb) == 1 for lb in ds.labels)


# ---------- 2. self-intersecting polygons ----------


def test_bowtie_polygon_keeps_its_real_area(tmp_path: Path) -> None:
    from utils.data.polygons import even_odd_area, polygons_to_masks

    f = tmp_path / "bowtie.txt"
    f.write_text(f"0 {BOWTIE}\n1 0.1 0.1 0.2 0.2 0.3 0.3\n")  # the second row is collinear: still zero-area (guard)
    lb, segments, note, status = read_segment_label_file(f)
    assert lb[:, 0].tolist() == [0.0] and len(segments) == 1 and status == "repaired"
    assert note is not None and "dropped 1 zero-area polygons" in note
    xy = segments[0].astype(np.float64)
    assert even_odd_area(xy) == pytest.approx(0.2, abs=1e-6)  # float32 corners
    mask = polygons_to_masks([xy * 200], (200, 200))[0]
    assert abs(mask.mean() - 0.2) < 0.02  # what the model is trained on covers the same fifth of the image


# ---------- 3. benchmarks --out with dots, never replacing a result ----------


def test_benchmark_results_keep_dotted_names_and_never_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import benchmarks

    rows = [{"model": "m", "ms": 1.5}]
    benchmarks.write_tables(rows, tmp_path / "exp.v1", ["v1 table"])
    benchmarks.write_tables(rows, tmp_path / "exp.v2", ["v2 table"])
    assert (tmp_path / "exp.v1.md").read_text() == "v1 table\n" and (tmp_path / "exp.v2.md").read_text() == "v2 table\n"
    assert (tmp_path / "exp.v1.csv").read_text() == "model,ms\nm,1.5\n"
    assert not (tmp_path / "exp.md").exists() and not (tmp_path / "exp.csv").exists()
    mine = tmp_path / "notes.md"
    mine.write_text("my notes")
    capsys.readouterr()
    benchmarks.write_tables(rows, tmp_path / "notes", ["new table"])  # notes.md is not this call's: a new name
    assert mine.read_text() == "my notes" and not (tmp_path / "notes.csv").exists()
    assert (tmp_path / "notes-2.md").read_text() == "new table\n" and (tmp_path / "notes-2.csv").is_file()
    out = capsys.readouterr().out
    assert "notes.md" in out and "notes-2.md" in out
    benchmarks.write_tables(rows, tmp_path / "exp.v1", ["again"])
    assert (tmp_path / "exp.v1.md").read_text() == "v1 table\n" and (tmp_path / "exp.v1-2.md").read_text() == "again\n"


# ---------- 4. --cache disk never writes beside a user's images ----------


def test_disk_cache_stays_inside_the_dataset(tmp_path: Path) -> None:
    outside, root = tmp_path / "my_photos", tmp_path / "dataset"
    src = [write_img(outside / "images" / f"p{i}.png", colour=(10 * i, 20, 30)) for i in range(2)]
    (outside / "labels").mkdir()
    for p in src:
        (outside / "labels" / f"{p.stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    root.mkdir()
    (root / "train.txt").write_text("".join(f"{p}\n" for p in src))
    before = sorted(outside.rglob("*"))
    ds = LoadImagesAndLabels(root / "train.txt", img_size=64, cache="disk", workers=1)
    entries = sorted(root.rglob("*.npy"))
    assert sorted(outside.rglob("*")) == before and len(entries) == 2  # nothing new beside the user's images
    i = [Path(f).name for f in ds.im_files].index("p1.png")
    assert (ds.load_image(i)[0] == (10, 20, 30)).all()
    st = src[1].stat()
    write_img(src[1], colour=(200, 100, 50))
    os.utime(src[1], ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    ds = LoadImagesAndLabels(root / "train.txt", img_size=64, cache="disk", workers=1)
    assert (ds.load_image(i)[0] == (200, 100, 50)).all()
    assert len(sorted(root.rglob("*.npy"))) == 2 and not list(outside.rglob("*.npy"))  # the stale entry was replaced


# ---------- 5. --cache ram checked against the memory available ----------


def test_ram_cache_skipped_when_it_would_not_fit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        write_img(tmp_path / "images" / f"im{i}.png", 64, 48)
    need = 3 * 64 * 48 * 3  # three images at img_size 64: 64 x 48 x 3 bytes each
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        ds = LoadImagesAndLabels(tmp_path / "images", img_size=64, cache="ram", workers=1, ram_available=int(need * 1.1) - 1)
    assert ds.cache is None and all(im is None for im in ds.ims) and ds[0][0].shape == (3, 64, 64)
    [warned] = warnings_of(caplog)
    assert "--cache ram" in warned and "not caching" in warned and "\n" not in warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        ds = LoadImagesAndLabels(tmp_path / "images", img_size=64, cache="ram", workers=1, ram_available=int(need * 1.1) + 1)
    assert ds.cache == "ram" and all(im is not None for im in ds.ims) and not warnings_of(caplog)


def test_available_ram_reads_meminfo_and_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.data.datasets import available_ram

    monkeypatch.setitem(sys.modules, "psutil", None)  # as if psutil were not installed
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000000 kB\nMemFree:  100 kB\nMemAvailable:  2000 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    assert available_ram(meminfo, cgroup=[(limit, usage)]) == 2000 * 1024  # no cgroup files: the machine's figure
    limit.write_text("max\n")
    usage.write_text("5\n")
    assert available_ram(meminfo, cgroup=[(limit, usage)]) == 2000 * 1024  # a cgroup without a limit
    limit.write_text("1000005\n")
    assert available_ram(meminfo, cgroup=[(limit, usage)]) == 1000000  # the container's headroom is smaller
    assert available_ram(tmp_path / "missing", cgroup=[]) is None


# ---------- 6. symbolic link loops ----------


def loop_yaml(tmp_path: Path, **keys: str) -> Path:
    cfg = {"path": str(tmp_path / "data"), "train": "images", "val": "images", "names": ["a"], **keys}
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "loop.yaml"


@pytest.mark.parametrize("key", ["path", "train"])
def test_dataset_yaml_symlink_loop_is_one_line(tmp_path: Path, key: str) -> None:
    loop = symlink_loop(tmp_path / "links")
    data = loop_yaml(tmp_path, **({"path": str(loop)} if key == "path" else {"train": f"{loop.name}/images"}))
    if key == "train":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "a").symlink_to(tmp_path / "data" / "b")
        (tmp_path / "data" / "b").symlink_to(tmp_path / "data" / "a")
    with pytest.raises(DatasetError) as e:
        load_dataset_config(data, autodownload=False)
    msg = str(e.value)
    assert str(data) in msg and f"'{key}'" in msg and "symbolic link loop" in msg and "\n" not in msg


def test_classify_yaml_symlink_loop_is_one_line(tmp_path: Path) -> None:
    from utils.data.classify_dataset import load_classify_data

    data = loop_yaml(tmp_path, path=str(symlink_loop(tmp_path / "links")), train="train", val="val")
    with pytest.raises(DatasetError) as e:
        load_classify_data(data, autodownload=False)
    assert str(data) in str(e.value) and "symbolic link loop" in str(e.value)


def test_train_and_val_report_a_symlink_loop_in_one_line(tmp_path: Path) -> None:
    from models.model import DetectionModel
    from utils.checkpoint import save_checkpoint

    loop = symlink_loop(tmp_path / "links")
    data = loop_yaml(tmp_path, path=str(loop))
    weights = save_checkpoint(tmp_path / "w.pt", DetectionModel(TINY_CFG, nc=1))
    runs = [(train.cli, "train", ["--cfg", TINY_CFG, "--epochs", "1", "--device", "cpu", "--project", str(tmp_path / "t")]),
            (val.main, "val", ["--weights", str(weights), "--device", "cpu", "--project", str(tmp_path / "v")])]
    for entry, prog, argv in runs:
        with pytest.raises(SystemExit) as e:
            entry(["--data", str(data), *argv])
        msg = str(e.value.code)
        assert msg.startswith(f"{prog}: error: {data}: 'path' {loop}: symbolic link loop") and "\n" not in msg, msg
    assert not (tmp_path / "t").exists() and not (tmp_path / "v").exists()


def test_image_list_entry_in_a_symlink_loop_is_a_corrupt_image(tmp_path: Path) -> None:
    write_img(tmp_path / "images" / "ok.png")
    symlink_loop(tmp_path / "images" / "loop")
    (tmp_path / "train.txt").write_text("images/ok.png\nimages/loop/a/x.png\n")
    ds = LoadImagesAndLabels(tmp_path / "train.txt", img_size=64)
    assert [Path(f).name for f in ds.im_files] == ["ok.png"] and ds.stats["corrupt"] == 1


# ---------- 7. printed commands quote their paths ----------

ODD = "my runs/it's\nhere"  # a space, a quote and a newline


def test_export_summary_commands_paste_as_the_same_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from utils.export import exporter

    weights = tmp_path / ODD / "best.onnx"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"x")
    exporter._summary([weights], [0.1], (320, 256), "detect.py", "val.py")
    text = capsys.readouterr().out
    predict = shlex.split(text.split("Predict:", 1)[1].split("Validate:", 1)[0])
    validate = shlex.split(text.split("Validate:", 1)[1])
    assert predict == ["python", "detect.py", "--weights", str(weights), "--imgsz", "320", "256"]
    assert validate == ["python", "val.py", "--weights", str(weights), "--imgsz", "320"]


def test_tensorboard_and_resume_hints_quote_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.engine.options import _recorded_run_dir
    from utils.engine.trainer import TrainError
    from utils.loggers.tensorboard_logger import TensorBoardLogger

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda log_dir: types.SimpleNamespace(log_dir=log_dir)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log_dir = tmp_path / ODD / "tb"
    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        TensorBoardLogger(log_dir)
    line = next(r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage())
    assert shlex.split(line.split("view with", 1)[1]) == ["tensorboard", "--logdir", str(log_dir.parent)]
    ckpt = tmp_path / ODD / "last.pt"
    with pytest.raises(TrainError) as e:
        _recorded_run_dir(ckpt, {"save_dir": str(tmp_path / "gone")})
    hint = str(e.value).split("start a new run with", 1)[1].rsplit("instead", 1)[0]
    assert shlex.split(hint) == ["--weights", str(ckpt)]
