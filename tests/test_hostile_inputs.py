"""Hostile and careless input to the scripts: every write stays where it belongs, no user data is lost, and every bad
value ends in one 'script: error: ...' line. Data-layer cases live in test_hostile_data.py, model yaml cases in
test_hostile_models.py."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import yaml

import detect
import export
import train
import val
from models.model import DetectionModel
from tests.conftest import one_line_exit, tiny_shapes_yaml
from utils.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from utils.cli import OptionError, check_img_size, check_int
from utils.engine.callbacks import Callbacks
from utils.engine.results import COLUMNS, append_results, truncate_results
from utils.engine.trainer import build_model
from utils.export.formats import ExportError, atomic_path, export_metadata
from utils.files import safe_component

ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = "models/yolov5n.yaml"


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16+4 image shapes dataset and its yaml."""
    return tiny_shapes_yaml(tmp_path_factory.mktemp("hostile_shapes"), n_train=16, n_val=4, seed=3)


def _killed_after_first_epoch(path: Path, **_: Any) -> None:
    """An on_model_save callback: Ctrl-C once epoch 0's last.pt and best.pt are written."""
    if path.name == "best.pt":
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run at --img 50 (not a stride multiple) killed after its first epoch: full last.pt and best.pt of epoch 0
    (a finished run's are final weights, which cannot resume)."""
    project = tmp_path_factory.mktemp("hostile_runs")
    callbacks = Callbacks()
    callbacks.register("on_model_save", _killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.run(callbacks, cfg=TINY_CFG, data=str(tiny_data), epochs=2, imgsz=50, batch_size=8, workers=0, project=str(project),
                  name="r", noval=True, noplots=True, noautoanchor=True, device="cpu")
    return project / "r"


@pytest.fixture
def run_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the run whose last.pt records the copy as its run folder."""
    dst = tmp_path / "runs" / "r"
    shutil.copytree(run_dir, dst)
    last = dst / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["opt"]["save_dir"] = str(dst)
    torch.save(ckpt, last)
    return dst


# ---- writes that escape where they belong -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs_escape", "..", "a/../../b", "con"])
def test_safe_component_is_one_harmless_component(name: str) -> None:
    out = safe_component(name)
    assert out and "/" not in out and "\\" not in out and out not in (".", "..") and not out.startswith(".")
    assert (Path("/base") / out).parent == Path("/base")


def test_detect_crops_with_hostile_class_names_stay_in_run_folder(tmp_path: Path) -> None:
    model = DetectionModel(TINY_CFG, nc=3)
    model.names = ["../../../escaped", str(tmp_path / "abs_target"), ".."]
    weights = save_checkpoint(tmp_path / "w" / "hostile.pt", model)
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(src / "a.jpg"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    before = _files_under(tmp_path)
    out = detect.run(weights=str(weights), source=str(src), imgsz=(64, 64), conf_thres=0.0, max_det=30, save_crop=True,
                     save_txt=True, project=str(tmp_path / "det"), name="exp", device="cpu")
    created = _files_under(tmp_path) - before
    crops = [p for p in created if p.suffix == ".jpg" and "crops" in p.parts]
    assert crops, "the untrained model at conf 0 must produce crops for the test to mean anything"
    assert out.parent == tmp_path / "det"
    assert all(p.resolve().is_relative_to(out.parent.resolve()) for p in created), sorted(map(str, created))
    assert not (tmp_path / "abs_target").exists()


def test_export_refuses_to_replace_a_user_folder(tmp_path: Path) -> None:
    user = tmp_path / "mine.onnx"  # a folder that happens to carry the export's name
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    with pytest.raises(SystemExit) as e:
        export.main(["--cfg", TINY_CFG, "--include", "onnx", "--imgsz", "64", "--output", str(user)])
    one_line_exit(e, "export", str(user), "did not create")
    assert (user / "thesis.txt").read_text() == "years of work"


def test_atomic_path_replaces_only_its_own_export_folder(tmp_path: Path) -> None:
    ours = tmp_path / "best_openvino_model"
    ours.mkdir()
    meta = export_metadata(DetectionModel(TINY_CFG), (64, 64), 1, False, False)
    (ours / "metadata.yaml").write_text(yaml.safe_dump(meta))
    (ours / "best.xml").write_text("<old/>")
    with atomic_path(ours) as tmp:
        tmp.mkdir()
        (tmp / "best.xml").write_text("<new/>")
    assert (ours / "best.xml").read_text() == "<new/>"
    (ours / "notes.txt").write_text("user file added later")  # no longer purely ours
    with pytest.raises(ExportError, match="did not create"), atomic_path(ours) as tmp:
        tmp.mkdir()
    assert (ours / "notes.txt").exists()


def test_export_into_read_only_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root ignores permission bits: fail the temp-folder creation as the kernel would
        real = tempfile.mkdtemp

        def deny(*args: object, dir: object = None, **kwargs: object) -> str:
            if dir is not None and Path(str(dir)).resolve() == ro.resolve():
                raise PermissionError(13, "Permission denied", str(Path(str(dir)) / ".x.tmp"))
            return real(*args, dir=dir, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(tempfile, "mkdtemp", deny)
    try:
        with pytest.raises(SystemExit) as e:
            export.main(["--cfg", TINY_CFG, "--include", "torchscript", "--imgsz", "64", "--output", str(ro / "m.torchscript")])
        one_line_exit(e, "export", str(ro), "Permission denied")
    finally:
        ro.chmod(0o700)


def test_resume_of_a_copied_checkpoint_never_writes_beside_it(run_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "sub").mkdir(parents=True)
    (outside / "results.csv").write_text("unrelated,data\n1,2\n")
    last = outside / "sub" / "last.pt"
    shutil.copy(run_dir / "weights" / "last.pt", last)
    ckpt = torch.load(last, weights_only=True)
    ckpt["opt"]["save_dir"] = str(tmp_path / "deleted_run")  # the run folder it came from is gone
    torch.save(ckpt, last)
    before = {p: p.read_bytes() for p in _files_under(outside) if p.is_file()}
    with pytest.raises(SystemExit) as e:
        train.cli(["--resume", str(last)])
    one_line_exit(e, "train", "no longer exists")
    assert {p: p.read_bytes() for p in _files_under(outside) if p.is_file()} == before
    assert not (outside / "weights").exists()


def test_resume_writes_only_into_the_recorded_run_folder(run_copy: Path, tmp_path: Path) -> None:
    """Resume from a copy of last.pt elsewhere: results and weights go to the run folder the checkpoint names."""
    elsewhere = tmp_path / "copy" / "weights" / "last.pt"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(run_copy / "weights" / "last.pt", elsewhere)
    opt = train.resume_options(train.parse_opt(["--resume", str(elsewhere)]))
    assert Path(opt.save_dir) == run_copy


# ---- silent wrong results and lost work ----------------------------------------------------------------------------


def test_weights_with_any_suffix_are_loaded(run_dir: Path, tmp_path: Path) -> None:
    pth = tmp_path / "fine_tune.pth"
    shutil.copy(run_dir / "weights" / "last.pt", pth)
    opt = train.parse_opt(["--weights", str(pth)])
    opt.cfg = ""
    model = build_model(opt, nc=3, names=["a", "b", "c"], device=torch.device("cpu"))
    stored = read_checkpoint(pth)["ema"]
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in stored.items() if k in own and own[k].shape == v.shape)
    assert sum(k in own for k in stored) == len(own)


def test_missing_pth_weights_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        train.cli(["--weights", str(tmp_path / "missing.pth"), "--project", str(tmp_path / "p")])
    one_line_exit(e, "train", "missing.pth", "not found")
    assert not (tmp_path / "p").exists()  # setup failures leave no run folder behind


def test_train_rounds_imgsz_to_stride(run_dir: Path) -> None:
    assert read_checkpoint(run_dir / "weights" / "last.pt")["opt"]["imgsz"] == 64  # asked for --img 50


def test_check_img_size_rounds_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        assert check_img_size(33, 32) == 64
        assert check_img_size([33, 64], 32) == [64, 64]
    assert "multiple of the max stride 32" in caplog.text
    for bad in (0, -1, [64, 0], True, "640", []):
        with pytest.raises(OptionError, match="--imgsz"):
            check_img_size(bad, 32)  # type: ignore[arg-type]


def test_garbage_results_tail_does_not_block_resume(run_copy: Path) -> None:
    csv = run_copy / "results.csv"
    csv.write_text(csv.read_text() + "   1,  0.5,\x00\x00garbage\nnot,a,row\n")
    stale = run_copy / "weights" / ".last.pt.ab12cd34.tmp"  # left by a save that was killed
    stale.write_bytes(b"half a checkpoint")
    last = train.main(train.resume_options(train.parse_opt(["--resume", str(run_copy / "weights" / "last.pt")])))
    assert last.parent == run_copy / "weights"
    rows = csv.read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [0, 1]
    assert not stale.exists()


def test_truncate_results_replaces_the_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv = tmp_path / "results.csv"
    for epoch in range(3):
        append_results(csv, epoch, [1.0, 2.0, 3.0], [0.5] * 7, [0.01] * 3)
    original = csv.read_text()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        truncate_results(csv, 0)
    assert csv.read_text() == original  # an interrupted rewrite leaves the old file whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # and no temp file behind
    monkeypatch.undo()
    truncate_results(csv, 0)
    assert len(csv.read_text().splitlines()) == 2 and len(COLUMNS) == 14


# ---- one line, not a traceback -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "-3"], "--epochs"),
        (["--img", "0"], "--imgsz"),
        (["--img", "-64"], "--imgsz"),
        (["--img", "50000"], "--imgsz 50000 exceeds the limit of 8192 pixels (raise it with MOBILE_YOLO_MAX_IMGSZ=50000)"),
        (["--max-params", "1000"], "parameters exceed the limit of 1,000 (raise it with --max-params"),
        (["--device", "foo"], "--device foo"),
    ],
)
def test_train_bad_values_one_line_no_run_folder(argv: list[str], needle: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        train.cli([*argv, "--project", str(tmp_path / "p"), "--cfg", TINY_CFG])
    one_line_exit(e, "train", needle)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [(["--img", "0"], "--imgsz"), (["--img", "-1"], "--imgsz"), (["--batch-size", "0"], "--batch-size"),
     (["--device", "foo"], "--device foo"), (["--conf-thres", "2"], "--conf-thres"),
     (["--img", "50000"], "--imgsz 50000 exceeds the limit of 8192")],
)
def test_val_bad_values_one_line(argv: list[str], needle: str, run_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    weights = str(run_dir / "weights" / "best.pt")
    with pytest.raises(SystemExit) as e:
        val.main([*argv, "--weights", weights, "--data", str(tiny_data), "--project", str(tmp_path / "v")])
    one_line_exit(e, "val", needle)
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("argv, needle", [(["--img", "0"], "--imgsz"), (["--img", "-5"], "--imgsz"), (["--max-det", "0"], "--max-det")])
def test_detect_bad_values_one_line(argv: list[str], needle: str, run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        detect.main([*argv, "--weights", str(run_dir / "weights" / "best.pt"), "--project", str(tmp_path / "d")])
    one_line_exit(e, "detect", needle)
    assert not (tmp_path / "d").exists()


def test_resume_with_mismatched_state_dict_is_one_line(run_copy: Path) -> None:
    last = run_copy / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.ndim == 4)
    ckpt["model"][key] = torch.zeros(1, 1, 1, 1)
    torch.save(ckpt, last)
    with pytest.raises(SystemExit) as e:
        train.cli(["--resume", str(last)])
    one_line_exit(e, "train", str(last), "do not fit")


@pytest.mark.parametrize("cfg", [{"nc": 3}, {"nc": 3, "anchors": 3, "backbone": 5, "head": None}, 42, "models/does_not_exist.yaml"])
def test_resume_with_malformed_cfg_is_one_line(cfg: object, run_copy: Path) -> None:
    last = run_copy / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["cfg"] = cfg
    torch.save(ckpt, last)
    with pytest.raises(SystemExit) as e:
        train.cli(["--resume", str(last)])
    one_line_exit(e, "train", str(last))


def test_full_disk_during_checkpoint_save_is_one_line_and_keeps_last(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    last = run_copy / "weights" / "last.pt"
    before = last.read_bytes()

    def full_disk(obj: object, f: object, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        train.cli(["--resume", str(last)])
    one_line_exit(e, "train", "last.pt", "No space left on device")
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*.tmp"))


def test_unsafe_checkpoint_message_explains_instead_of_inviting(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": {}, "cfg": {}, "payload": logging.Formatter()}, path)  # an arbitrary Python object
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and "arbitrary code" in msg and "logging.Formatter" in msg
    assert "can still be loaded" not in msg and "will likely succeed" not in msg


def test_check_int_names_the_flag() -> None:
    assert check_int("--batch-size", -1, allow=(-1,)) == -1
    for bad in (0, -2, 1.5, "4", True, None):
        with pytest.raises(OptionError, match="--batch-size"):
            check_int("--batch-size", bad, allow=(-1,))


@pytest.mark.parametrize("script", [detect, export])
def test_image_size_limit_on_predict_and_export(script: Any, run_dir: Path, tmp_path: Path) -> None:
    """`--img 50000` once filled 8 GB before a cv2 traceback; every script refuses sizes past the limit in one line."""
    weights = str(run_dir / "weights" / "best.pt")
    extra = ["--source", str(tmp_path)] if script is detect else ["--include", "onnx"]
    with pytest.raises(SystemExit) as e:
        script.main(["--weights", weights, "--img", "50000", *extra])
    one_line_exit(e, script.__name__, "--imgsz 50000 exceeds the limit of 8192 pixels")


def test_image_size_limit_is_raisable(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OptionError, match="exceeds the limit of 8192"):
        check_img_size(8193)
    monkeypatch.setenv("MOBILE_YOLO_MAX_IMGSZ", "16384")
    assert check_img_size(8193, 32) == 8224
    monkeypatch.setenv("MOBILE_YOLO_MAX_IMGSZ", "-5")
    with pytest.raises(ValueError, match="environment variable MOBILE_YOLO_MAX_IMGSZ must be a positive integer, got '-5'"):
        check_img_size(640)


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    """Checkpoints and logs written through a temp file get a new file's usual mode (0666 less the umask), not mkstemp's
    0600; a replaced file keeps its own mode."""
    from utils.files import _umask, atomic_write_text

    fresh = atomic_write_text(tmp_path / "new.txt", "a")
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~_umask()
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640
    mask = os.umask(0o027)
    try:
        assert _umask() == 0o027 and atomic_write_text(tmp_path / "masked.txt", "b").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)
