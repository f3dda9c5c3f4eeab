"""Post-training static INT8 quantisation of an exported ONNX detector with ONNX Runtime (QDQ, per-channel weights).

The Detect head's final 1x1 convs and every node after them (sigmoid, grid/anchor decode, reshapes, concat) stay in
float: their outputs are pixel coordinates and probabilities whose ranges differ by orders of magnitude inside one
tensor, so one int8 scale per tensor would wipe out either the small scores or the box precision. The backbone and
neck, where the compute is, are quantised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

LOGGER = logging.getLogger("mobile_yolo")
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class QuantizeError(ValueError):
    """INT8 quantisation cannot run (no usable calibration images, bad model); one-line message."""


def float_tail_nodes(proto: Any) -> list[str]:
    """Names of the nodes from the graph outputs back to (and including) the last Conv on each path."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    stack = [o.name for o in proto.graph.output]
    seen: set[str] = set()
    tail: list[str] = []
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        tail.append(node.name)
        if node.op_type != "Conv":  # stop at the head convs: everything before them gets quantised
            stack.extend(i for i in node.input if i)
    return tail


def _name_unnamed_nodes(proto: Any) -> None:
    """Give every node a unique name so it can be listed in nodes_to_exclude."""
    used = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """Run a block with `path` as the current directory (for libraries that write scratch files there)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _preprocess(src: Path, dst: Path) -> Path:
    """Shape inference + graph optimisation recommended before quantize_static; fall back to the raw model."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(src), str(dst))
        return dst
    except Exception as e:  # pre-processing is an optimisation only
        LOGGER.warning(f"WARNING: INT8 pre-processing skipped ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        return src


def _letterboxed_chw(path: Path, imgsz: tuple[int, int]) -> np.ndarray | None:
    """Read one image and letterbox it to imgsz as RGB CHW float32 in 0-1; None (warned) if unreadable."""
    from utils.data.images import ImageError, letterbox, load_image

    try:
        img = load_image(path)
    except ImageError as e:
        LOGGER.warning(f"WARNING: calibration image skipped: {e}")
        return None
    img = letterbox(img, imgsz, auto=False)[0]
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0


def _calibration_batches(images: Sequence[Path], imgsz: tuple[int, int], batch: int) -> list[np.ndarray]:
    """Letterboxed calibration batches of `batch` images; corrupt files are skipped and counted."""
    arrays = [a for a in (_letterboxed_chw(Path(p), imgsz) for p in images) if a is not None]
    skipped = len(images) - len(arrays)
    if skipped:
        LOGGER.warning(f"WARNING: {skipped} of {len(images)} calibration images could not be read")
    n = len(arrays) // batch * batch
    if n == 0:
        raise QuantizeError(f"INT8 calibration needs at least {batch} readable image(s), found {len(arrays)}")
    return [np.stack(arrays[i : i + batch]) for i in range(0, n, batch)]


def _input_spec(proto: Any, imgsz: tuple[int, int]) -> tuple[str, int, tuple[int, int]]:
    """(input name, calibration batch, (h, w)): fixed dims of the model win over imgsz."""
    inp = proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise QuantizeError(f"expected a 4-D image input, got {len(dims)} dims for '{inp.name}'")
    batch = dims[0] or 1
    hw = (dims[2] or int(imgsz[0]), dims[3] or int(imgsz[1]))
    return inp.name, batch, hw


def quantize_onnx(
    fp32_path: Union[str, Path],
    int8_path: Union[str, Path],
    calib_images: Sequence[Path],
    imgsz: Union[int, tuple[int, int]],
    n_calib: int = 300,
) -> Path:
    """Statically quantise fp32_path to int8_path (QDQ, per-channel) calibrated on up to n_calib letterboxed images."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    hw = (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[1]))
    images = list(calib_images)
    if len(images) > n_calib:
        images = sorted(random.Random(0).sample(images, n_calib))  # a fixed, spread-out subset
    work = Path(tempfile.mkdtemp(prefix="int8_"))
    try:
        shutil.copyfile(fp32_path, work / "fp32.onnx")
        with _working_directory(work):  # ORT's shape inference of dynamic models leaves files beside its input and in the cwd
            src = _preprocess(work / "fp32.onnx", work / "pre.onnx")
        proto = onnx.load(str(src))
        _name_unnamed_nodes(proto)
        named = work / "named.onnx"
        onnx.save(proto, str(named))
        name, batch, hw = _input_spec(proto, hw)
        feeds = iter([{name: b} for b in _calibration_batches(images, hw, batch)])

        class _Reader(CalibrationDataReader):
            def get_next(self) -> dict | None:
                return next(feeds, None)

        with _working_directory(work):
            quantize_static(
                str(named), str(work / "int8.onnx"), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=float_tail_nodes(proto),
            )  # fmt: skip
        shutil.move(str(work / "int8.onnx"), str(int8_path))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return int8_path


def calibration_images(data: Union[str, Path, dict], limit: int = 300) -> list[Path]:
    """Image files for calibration: a folder of images, or the 'train' split of a dataset YAML."""
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        sources: list[Path] = [Path(data)]
    else:
        from utils.data.dataset_config import load_dataset_config

        train = load_dataset_config(data)["train"]
        sources = [Path(p) for p in (train if isinstance(train, list) else [train])]
    files: list[Path] = []
    for src in sources:
        files.extend(_list_images(src))
    if not files:
        raise QuantizeError(f"{data}: no calibration images found in {', '.join(map(str, sources))}")
    return files if len(files) <= limit else sorted(random.Random(0).sample(files, limit))


def _list_images(src: Path) -> list[Path]:
    """Images under a folder, or listed in a *.txt file (relative entries resolved against the file's folder)."""
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if src.suffix == ".txt" and src.is_file():
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [p if (p := Path(ln)).is_absolute() else (src.parent / p).resolve() for ln in lines]
    return []
