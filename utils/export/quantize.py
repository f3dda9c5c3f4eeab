"""Post-training static INT8 quantisation of an exported ONNX detector with ONNX Runtime (QDQ, per-channel weights).

Defaults are chosen from measurements on x86, see scripts/int8_report.py: uint8 activations with int8 weights (U8S8)
let ONNX Runtime fuse every DequantizeLinear->Conv->QuantizeLinear group into QLinearConv and the SiLU (Sigmoid, Mul)
into QLinearSigmoid / QLinearMul; int8 activations (S8S8) leave most convs as float Conv fed by DequantizeLinear, which
is slower than the float model. MinMax calibration on real dataset images keeps accuracy.

Weights are quantised to 7 bits ([-64, 64], ORT's reduce_range) so that the file computes the same on every x86 CPU.
Without VNNI (AVX2, AVX-512F: most AMD Zen 2/3 and older Intel parts), ONNX Runtime's U8S8 kernels add pairs of
uint8 x int8 products into int16 with saturation (VPMADDUBSW): 255 * 127 * 2 overflows it, 255 * 64 * 2 = 32640 does
not. With VNNI the sums are exact. With 8-bit weights the results thus depended on the CPU: on an AVX2 CPU, ORT's
default kernels and its saturation-free path (session option session.x64quantprecision, exact like VNNI) gave boxes
up to 80 px apart on the test models, whose score error against float doubled; with 7-bit weights the two agree bit for
bit (tests/test_quantize.py). On the trained default detector mAP stays within noise of float either way.

The Detect head's final 1x1 convs and every node after them (sigmoid, DFL softmax, grid/anchor decode, reshapes, concat)
stay in float: their outputs are pixel coordinates and probabilities whose ranges differ by orders of magnitude inside
one tensor, so one int8 scale per tensor would wipe out either the small scores or the box precision. The backbone and
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
ACTIVATION_TYPES = ("uint8", "int8")  # uint8 (U8S8) is what ONNX Runtime's x86 kernels fuse; int8 (S8S8) mostly is not
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class QuantizeError(ValueError):
    """INT8 quantisation cannot run (no usable calibration images, bad model); one-line message."""


def float_tail_nodes(proto: Any) -> list[str]:
    """Names of the nodes from the graph outputs back to (and including) the last learned Conv on each path."""
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
        if node.op_type != "Conv" or _is_dfl_conv(node, producer):  # stop at the head convs: everything before gets quantised
            stack.extend(i for i in node.input if i)
    return tail


def _is_dfl_conv(node: Any, producer: dict[str, Any]) -> bool:
    """A Conv fed by a Softmax is the anchor-free head's DFL expectation (fixed 0..reg_max weights): decode, not compute."""
    src = producer.get(node.input[0])
    return src is not None and src.op_type == "Softmax"


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


def letterboxed_images(images: Sequence[Path], imgsz: tuple[int, int]) -> Iterator[np.ndarray]:
    """The readable images among `images`, letterboxed to imgsz as RGB CHW float32 in 0-1, one at a time (bounded memory)."""
    for path in images:
        arr = _letterboxed_chw(Path(path), imgsz)
        if arr is not None:
            yield arr


def _readable_images(images: Sequence[Path]) -> list[Path]:
    """The images that decode; unreadable ones are warned about and counted (decoded again, lazily, when calibrating)."""
    from utils.data.images import ImageError, load_image

    readable = []
    for p in map(Path, images):
        try:
            load_image(p)
            readable.append(p)
        except ImageError as e:
            LOGGER.warning(f"WARNING: calibration image skipped: {e}")
    skipped = len(images) - len(readable)
    if skipped:
        LOGGER.warning(f"WARNING: {skipped} of {len(images)} calibration images could not be read")
    return readable


class _CalibrationReader:
    """ORT calibration data reader that letterboxes batches on demand (bounded memory at any n_calib or imgsz).

    Supports ORT's strided calibration (__len__ + set_range), so histogram calibrators collect chunk by chunk instead
    of holding every activation of every image at once.
    """

    def __init__(self, name: str, images: Sequence[Path], hw: tuple[int, int], batch: int) -> None:
        self.name, self.images, self.hw, self.batch = name, list(images), hw, batch
        self.set_range(0, len(self))

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.images) // self.batch

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict the next get_next() calls to batches [start_index, end_index)."""
        self._next, self._end = start_index, min(end_index, len(self))

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as {input name: NCHW float32}, or None when the range is exhausted."""
        if self._next >= self._end:
            return None
        paths = self.images[self._next * self.batch : (self._next + 1) * self.batch]
        self._next += 1
        arrays = [a for a in (_letterboxed_chw(p, self.hw) for p in paths) if a is not None]
        if len(arrays) != len(paths):
            raise QuantizeError(f"a calibration image became unreadable during calibration: {', '.join(map(str, paths))}")
        return {self.name: np.stack(arrays)}


def _calibration_reader(name: str, images: Sequence[Path], hw: tuple[int, int], batch: int) -> _CalibrationReader:
    """A reader over the readable images, whole batches only; QuantizeError if not even one batch is readable."""
    readable = _readable_images(images)
    n = len(readable) // batch * batch
    if n == 0:
        raise QuantizeError(f"INT8 calibration needs at least {batch} readable image(s), found {len(readable)}")
    return _CalibrationReader(name, readable[:n], hw, batch)


def _input_spec(proto: Any, imgsz: tuple[int, int]) -> tuple[str, int, tuple[int, int]]:
    """(input name, calibration batch, (h, w)): fixed dims of the model win over imgsz."""
    inp = proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise QuantizeError(f"expected a 4-D image input, got {len(dims)} dims for '{inp.name}'")
    batch = dims[0] or 1
    hw = (dims[2] or int(imgsz[0]), dims[3] or int(imgsz[1]))
    return inp.name, batch, hw


def _strided_chunk(n_batches: int, most: int = 16) -> int:
    """Largest divisor of n_batches up to `most`: ORT's strided calibration needs chunks that tile the data exactly."""
    return max(d for d in range(1, min(most, n_batches) + 1) if n_batches % d == 0)


def _check_choices(activation_type: str, calibrate_method: str) -> None:
    """Fail fast (before any calibration work) on an unknown activation type or calibration method."""
    if activation_type not in ACTIVATION_TYPES:
        raise QuantizeError(f"activation_type must be one of {ACTIVATION_TYPES}, got {activation_type!r}")
    if calibrate_method not in CALIBRATION_METHODS:
        raise QuantizeError(f"calibrate_method must be one of {CALIBRATION_METHODS}, got {calibrate_method!r}")


def _static_options(
    proto: Any, n_batches: int, per_channel: bool, activation_type: str, calibrate_method: str, keep_float_ops: Sequence[str],
    reduce_range: bool,
) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments for onnxruntime.quantization.quantize_static: QDQ, int8 weights, float tail and kept ops excluded."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    acts = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    keep = set(keep_float_ops)
    exclude = float_tail_nodes(proto) + [n.name for n in proto.graph.node if n.op_type in keep]
    return dict(
        quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range, activation_type=acts[activation_type],
        weight_type=QuantType.QInt8, calibrate_method=methods[calibrate_method], nodes_to_exclude=list(dict.fromkeys(exclude)),
        extra_options={"CalibStridedMinMax": _strided_chunk(n_batches)},  # histogram calibrators: bounded memory
    )  # fmt: skip


def quantize_onnx(
    fp32_path: Union[str, Path],
    int8_path: Union[str, Path],
    calib_images: Sequence[Path],
    imgsz: Union[int, tuple[int, int]],
    n_calib: int = 300,
    per_channel: bool = True,
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    keep_float_ops: Sequence[str] = (),
    reduce_range: bool = True,
) -> Path:
    """Statically quantise fp32_path to int8_path (QDQ) calibrated on up to n_calib letterboxed images.

    per_channel=False gives one weight scale per tensor (YOLOv5's --per-tensor); activation_type 'uint8' (U8S8, fused
    to QLinearConv on x86) or 'int8'; calibrate_method 'minmax', 'entropy' or 'percentile'; keep_float_ops lists op
    types left in float (e.g. ('Sigmoid', 'Mul') for a float SiLU); reduce_range=True (default) quantises weights to
    7 bits, which no x86 int8 kernel can saturate (see the module docstring); False gives 8-bit weights, slightly more
    precise where the runtime sums exactly (VNNI, ARM) and wrong where it saturates.
    """
    import onnx
    from onnxruntime.quantization import quantize_static

    _check_choices(activation_type, calibrate_method)
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
        reader = _calibration_reader(name, images, hw, batch)
        opts = _static_options(proto, len(reader), per_channel, activation_type, calibrate_method, keep_float_ops, reduce_range)
        with _working_directory(work):
            quantize_static(str(named), str(work / "int8.onnx"), reader, **opts)
        shutil.move(str(work / "int8.onnx"), str(int8_path))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return int8_path


def optimized_graph(onnx_path: Union[str, Path], threads: int = 1) -> Any:
    """The graph ONNX Runtime's CPU provider actually runs (ORT_ENABLE_ALL), to check which QDQ groups it fused."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ortopt_") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # the "hardware-specific optimised model" warning is expected here
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def dequantize_quantize_pairs(proto: Any) -> list[tuple[str, str]]:
    """(DequantizeLinear, QuantizeLinear) node pairs wired back to back: a requantisation between quantised ops."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    return [
        (producer[n.input[0]].name, n.name)
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] in producer and producer[n.input[0]].op_type == "DequantizeLinear"
    ]


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
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        return [p if (p := Path(ln)).is_absolute() else (src.parent / p).resolve() for ln in lines]
    return []
