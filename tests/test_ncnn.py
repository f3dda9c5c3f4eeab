"""NCNN export (PNNX) and NcnnRunner: parity with PyTorch across head kinds and backbones, a clean folder, clean errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("ncnn", reason="NCNN runtime tests need the ncnn package (pip install ncnn)")
pytest.importorskip("pnnx", reason="NCNN export tests need the pnnx converter (pip install pnnx)")

from test_export import assert_close_predictions, checkpoint_tol, make_checkpoint  # noqa: E402

from tests.conftest import random_images  # noqa: E402
from utils.checkpoint import load_model  # noqa: E402
from utils.export.formats import ExportError, export_metadata  # noqa: E402
from utils.export.ncnn import export_ncnn, pnnx_executable  # noqa: E402
from utils.runtime.ncnn import BIN_FILE, PARAM_FILE, NcnnImportError, NcnnRunner, import_ncnn, read_param  # noqa: E402

FOLDER_FILES = sorted([PARAM_FILE, BIN_FILE, "metadata.yaml"])


def fused_model(weights: Path) -> torch.nn.Module:
    """The fused eval model of a checkpoint; anchor-free heads get zero class biases.

    The anchor-free class prior (~1e-5) pins untrained scores near 0, where score parity proves nothing; a trained
    head's scores spread over (0, 1), as they do with a zero bias (the same step as test_export.assert_onnx_parity).
    """
    model = load_model(weights).fuse()
    if hasattr(model.head, "cv3"):
        for branch in model.head.cv3:
            torch.nn.init.zeros_(branch[-1].bias)
    return model


def export_folder(model: torch.nn.Module, out: Path, imgsz: tuple[int, int], half: bool = False) -> Path:
    """Export `model` with the project's metadata for a static batch-1 input."""
    return export_ncnn(model, out, imgsz, 1, export_metadata(model, imgsz, 1, False, half), half=half)


def as_rows(model: torch.nn.Module, y: np.ndarray) -> np.ndarray:
    """(B, N, 4 + scores) whatever the head layout ((B, 4+nc, N) anchor-free heads are transposed)."""
    return np.swapaxes(y, 1, 2) if model.head.anchor_axis == 2 else y


@pytest.fixture(scope="module")
def v5n(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ncnn_v5n") / "best.pt")


@pytest.mark.parametrize(
    ("cfg", "imgsz"),
    [
        ("yolov5n.yaml", (64, 96)),  # anchor-based
        ("yolov8n.yaml", (96, 64)),  # anchor-free, (B, 4+nc, N) layout
        ("yolov5n_mobileone_s0.yaml", (64, 96)),  # re-parameterised by fuse()
        ("yolov5s_mobilenetv4_hybrid_medium.yaml", (64, 96)),  # multi-query attention blocks
    ],
)
def test_ncnn_matches_pytorch(cfg: str, imgsz: tuple[int, int], tmp_path: Path) -> None:
    weights = make_checkpoint(tmp_path / "best.pt", cfg=cfg)
    model = fused_model(weights)
    # NCNN runs the same fused fp32 graph (runner: fp16/bf16 off) with other kernels (im2col/sgemm, winograd), so only
    # float32 rounding differs: checkpoint_tol is the project's eps32 * sqrt(fan_in) * layers bound (see conftest).
    tol = checkpoint_tol(weights)
    x = random_images((2, 3, *imgsz), seed=0, normalise=False)  # B=2: the runner runs image by image and stacks
    with torch.no_grad():
        ref = model(x)[0].numpy()
        other = model(random_images((2, 3, *imgsz), seed=1, normalise=False))[0].numpy()
    assert np.abs(as_rows(model, other)[..., 4:] - as_rows(model, ref)[..., 4:]).max() > 10 * tol  # parity means something
    folder = export_folder(model, tmp_path / "best_ncnn_model", imgsz)
    runner = NcnnRunner(folder, threads=1)
    y = runner(x.numpy())
    assert y.shape == ref.shape and y.dtype == np.float32
    assert_close_predictions(as_rows(model, y), as_rows(model, ref), tol)


def test_folder_has_only_model_files_and_cwd_stays_clean(v5n: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    model = load_model(v5n).fuse()
    meta = export_metadata(model, (64, 96), 1, False, False)
    folder = export_ncnn(model, out / "best_ncnn_model", (64, 96), 1, meta)
    assert folder == out / "best_ncnn_model"
    assert sorted(p.name for p in folder.iterdir()) == FOLDER_FILES
    assert list(cwd.iterdir()) == [] and [p.name for p in out.iterdir()] == ["best_ncnn_model"]  # no scratch, no temp
    assert yaml.safe_load((folder / "metadata.yaml").read_text(encoding="utf-8")) == meta
    runner = NcnnRunner(folder / PARAM_FILE)  # the .param file works as well as its folder
    assert runner.metadata == meta and runner.input_shape == (1, 3, 64, 96)
    _, inputs, outputs = read_param(folder / PARAM_FILE)
    assert [runner.input_name] == inputs and [runner.output_name] == outputs


def test_half_weights_halve_the_bin_within_fp16_tolerance(v5n: Path, tmp_path: Path) -> None:
    model = load_model(v5n).fuse()
    full = export_folder(model, tmp_path / "full_ncnn_model", (64, 96))
    half = export_folder(model, tmp_path / "half_ncnn_model", (64, 96), half=True)
    assert (half / BIN_FILE).stat().st_size < 0.55 * (full / BIN_FILE).stat().st_size
    x = random_images((1, 3, 64, 96), seed=0, normalise=False)
    with torch.no_grad():
        ref = model(x)[0].numpy()
    # fp16 storage rounds each weight by <= u = 2^-11 (relative), so each conv's output moves by ~u of its scale; with
    # BN-calibrated gains ~1 the L conv layers' errors add to <= ~u*L (measured 0.4 u*L for yolov5n); 2x covers the '~'.
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert_close_predictions(NcnnRunner(half, threads=1)(x.numpy()), ref, 2 * 2.0**-11 * layers)
    assert NcnnRunner(half).metadata["half"] is True


def test_runner_errors_name_the_path(v5n: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope_ncnn_model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        NcnnRunner(missing)
    bad = tmp_path / "bad_ncnn_model"
    bad.mkdir()
    (bad / PARAM_FILE).write_text("not a param\n")
    (bad / BIN_FILE).write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=re.escape(f"{bad / PARAM_FILE}: not a readable NCNN .param")) as e:
        NcnnRunner(bad)
    assert "\n" not in str(e.value)
    (bad / BIN_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(bad / BIN_FILE))):
        NcnnRunner(bad)
    folder = export_folder(load_model(v5n).fuse(), tmp_path / "best_ncnn_model", (64, 96))
    runner = NcnnRunner(folder, threads=1)
    with pytest.raises(ValueError, match="exported for 64x96 images, got 96x64"):
        runner(np.zeros((1, 3, 96, 64), np.float32))
    with pytest.raises(ValueError, match=r"expected a \(B, 3, H, W\)"):
        runner(np.zeros((3, 64, 96), np.float32))


def test_unconverted_ops_and_pnnx_failures_are_one_line_export_errors(v5n: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.export import ncnn as ncnn_export

    param = tmp_path / "left.param"
    param.write_text("7767517\n2 2\nInput in0 0 1 in0\ntorch.special.foo op0 1 1 in0 out0\n")
    with pytest.raises(ExportError, match="PNNX left ops NCNN cannot run: torch.special.foo"):
        ncnn_export._check_layers(param)
    monkeypatch.setattr(ncnn_export, "pnnx_executable", lambda: Path("/bin/false"))
    out = tmp_path / "fail_ncnn_model"
    with pytest.raises(ExportError, match=r"PNNX could not convert the model to NCNN \(exit code 1\)") as e:
        export_ncnn(load_model(v5n).fuse(), out, (64, 96), 1, {})
    assert "\n" not in str(e.value) and not out.exists() and list(tmp_path.iterdir()) == [param]


def test_missing_packages_name_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pnnx", None)  # a None entry makes `import pnnx` raise ImportError
    monkeypatch.setitem(sys.modules, "ncnn", None)
    with pytest.raises(ExportError, match=r"^NCNN export needs the pnnx package: pip install pnnx$"):
        pnnx_executable()
    with pytest.raises(NcnnImportError, match=r"^NCNN inference needs the ncnn package: pip install ncnn$"):
        import_ncnn()
    with pytest.raises(ImportError, match="pip install ncnn"):
        NcnnRunner(Path("anything_ncnn_model"))


def test_export_py_and_backend_run_ncnn(tmp_path: Path) -> None:
    """export.py --include ncnn writes best_ncnn_model/, and DetectBackend (so detect.py and val.py) runs it like the .pt."""
    from utils.export.exporter import export_model
    from utils.runtime.backend import DetectBackend

    pt = make_checkpoint(tmp_path / "best.pt")
    (folder,) = export_model(weights=pt, include=["ncnn"], imgsz=[64, 96])
    assert folder == tmp_path / "best_ncnn_model" and sorted(p.name for p in folder.iterdir()) == FOLDER_FILES
    backend, reference = DetectBackend(folder), DetectBackend(pt)
    assert backend.format == "ncnn" and backend.names == reference.names and backend.fixed_imgsz == (64, 96)
    x = random_images((2, 3, 64, 96), normalise=False)
    with torch.no_grad():
        assert_close_predictions(backend(x), reference(x), checkpoint_tol(pt))
    assert DetectBackend(folder / PARAM_FILE).format == "ncnn"
    with pytest.raises(ExportError, match="--agnostic-nms is not available for ncnn"):  # --nms itself: test_ncnn_export.py
        export_model(weights=pt, include=["ncnn"], imgsz=64, nms=True, agnostic_nms=True)
