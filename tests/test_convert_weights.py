"""utils.convert: YOLOv5 / ultralytics YOLOv8 checkpoints converted without executing them, outputs equal to the source
model's, and hostile files refused in one line with nothing run.

The upstream files are written here without YOLOv5 or ultralytics installed: one of our models (BN statistics
calibrated) is pickled as the upstream layout with the upstream global names written explicitly into the pickle (no
module of those names is imported or registered), in half precision like the released weights, inside torch's zip format.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import pathlib
import pickle
import pickletools
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from models.model import DetectionModel
from tests.conftest import calibrate_bn, random_images, rel_err, rounding_tol
from utils.checkpoint import CheckpointError, load_model, read_checkpoint
from utils.convert import ConversionError, convert_checkpoint, read_torch_zip
from utils.convert.__main__ import main
from utils.convert.converter import output_path
from utils.convert.mapping import read_upstream
from utils.convert.unpickler import ONLY_UPSTREAM, NumpyArray, RecordedNamespace

ROOT = Path(__file__).resolve().parents[1]
V5 = {"Conv": "models.common", "C3": "models.common", "Bottleneck": "models.common", "SPPF": "models.common",
      "Concat": "models.common", "Proto": "models.common", "Detect": "models.yolo", "Segment": "models.yolo"}  # fmt: skip
V8 = {"Conv": "ultralytics.nn.modules.conv", "Concat": "ultralytics.nn.modules.conv", "C2f": "ultralytics.nn.modules.block",
      "Bottleneck": "ultralytics.nn.modules.block", "SPPF": "ultralytics.nn.modules.block", "DFL": "ultralytics.nn.modules.block",
      "AnchorFreeDetect": "ultralytics.nn.modules.head"}  # fmt: skip
ROOTS = {"yolov5n.yaml": "models.yolo.DetectionModel", "yolov5n-seg.yaml": "models.yolo.SegmentationModel",
         "yolov8n.yaml": "ultralytics.nn.tasks.DetectionModel"}  # fmt: skip
NN_KEYS = ("training", "_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks")


class Global:
    """A global written into the pickle by name (GLOBAL opcode); nothing of that name is imported."""

    def __init__(self, dotted: str) -> None:
        self.dotted = dotted


class Fake:
    """An upstream module instance: pickled as NEWOBJ of its upstream class + BUILD with an nn.Module-like __dict__."""

    def __init__(self, dotted: str, state: dict[str, Any]) -> None:
        self.dotted, self.state = dotted, state


class Call:
    """A REDUCE of a named global on arguments: what a malicious file does (os.system('...'))."""

    def __init__(self, dotted: str, *args: Any) -> None:
        self.dotted, self.args = dotted, args


class Built(Call):
    """A REDUCE followed by BUILD with `state` (how SimpleNamespace, numpy dtypes and arrays pickle)."""

    def __init__(self, dotted: str, args: tuple, state: Any) -> None:
        super().__init__(dotted, *args)
        self.state = state


class UpstreamPickler(pickle._Pickler):  # the pure-Python pickler: its save() can write these opcodes itself
    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, Built):
            self.save(Call(obj.dotted, *obj.args))
            self.save(obj.state)
            self.write(pickle.BUILD)
        elif isinstance(obj, Global):
            module, name = obj.dotted.rsplit(".", 1)
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        elif isinstance(obj, Call):
            self.save(Global(obj.dotted))
            self.save(tuple(obj.args))
            self.write(pickle.REDUCE)
        elif isinstance(obj, Fake):
            self.save(Global(obj.dotted))
            self.save(())
            self.write(pickle.NEWOBJ)
            self.save(obj.state)
            self.write(pickle.BUILD)
        else:
            super().save(obj, save_persistent_id)


def save_upstream(obj: Any, path: Path) -> Path:
    """torch.save with the pickler above (torch writes the zip and the tensor storages as usual)."""
    module = types.ModuleType("upstream_pickle")
    module.Pickler = UpstreamPickler  # type: ignore[attr-defined]
    torch.save(obj, path, pickle_module=module, pickle_protocol=2)
    return path


def to_upstream(module: nn.Module, cfg: str) -> Any:
    """Our module tree as the upstream package pickles it: project classes as Fakes named by the upstream paths, torch.nn
    modules as themselves; persistent state only (stride as a plain attribute, as upstream keeps it)."""
    children = OrderedDict((k, to_upstream(v, cfg) if v is not None else None) for k, v in module._modules.items())
    cls = type(module).__name__
    if not type(module).__module__.startswith("models."):
        twin = copy.copy(module)
        twin.__dict__["_modules"] = children
        return twin
    state = {k: module.__dict__[k] for k in NN_KEYS}
    skip = module._non_persistent_buffers_set
    state.update(_buffers=OrderedDict((k, v) for k, v in module._buffers.items() if k not in skip), _modules=children,
                 _non_persistent_buffers_set=set())
    state.update(upstream_attributes(module, cfg))
    if cls == "DetectionModel":
        return Fake(ROOTS[cfg], state)
    return Fake(f"{(V8 if cfg.startswith('yolov8') else V5)[cls]}.{'Detect' if cls == 'AnchorFreeDetect' else cls}", state)


def upstream_attributes(module: nn.Module, cfg: str) -> dict[str, Any]:
    """The plain attributes the upstream classes carry (yaml, names, stride, nc, ...)."""
    if isinstance(module, DetectionModel):
        yaml = copy.deepcopy(module.yaml)
        if cfg.startswith("yolov8"):
            yaml["channels"] = yaml.pop("ch")  # ultralytics' name
            names: Any = {i: f"class{i}" for i in range(yaml["nc"])}  # ultralytics: a dict
        else:
            names = [f"class{i}" for i in range(yaml["nc"])]
        return {"yaml": yaml, "names": names, "stride": module.stride.clone(), "save": list(module.save), "inplace": True}
    out: dict[str, Any] = {k: getattr(module, k) for k in ("nc", "no", "nl", "na", "nm", "npr", "reg_max") if hasattr(module, k)}
    if hasattr(module, "level_strides"):
        out["stride"] = torch.tensor(module.level_strides)
        out["grid"] = out["anchor_grid"] = [torch.empty(0) for _ in module.level_strides]
    if type(module).__name__ == "Segment":
        out["detect"] = Call("builtins.getattr", Global("models.yolo.Detect"), "forward")  # YOLOv5: self.detect = Detect.forward
    return out


def upstream_file(tmp_path: Path, cfg: str, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """A checkpoint as YOLOv5's strip_optimizer / ultralytics' save write it: the model in float16 plus metadata."""
    half = copy.deepcopy(model).half()
    ckpt = {"epoch": -1, "model": to_upstream(half, cfg), "ema": None, "optimizer": None, "date": "2024-01-01T00:00:00",
            "opt": {"imgsz": 640}, **(extra or {})}  # fmt: skip
    return save_upstream(ckpt, tmp_path / f"{Path(cfg).stem}.pt")


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """yolov5n, yolov5n-seg and yolov8n with calibrated BN, their weights rounded through float16 (what the files hold)."""
    out = {}
    for cfg in ROOTS:
        torch.manual_seed(0)
        model = calibrate_bn(DetectionModel(cfg), shape=(8, 3, 64, 64), normalise=False)
        out[cfg] = copy.deepcopy(model).half().float().eval()
    return out


@pytest.fixture(scope="module")
def converted(models: dict[str, nn.Module], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str]]:
    """Each model's upstream file converted once: (source file, converted file, what the command printed);
    yolov8n through the command line's main(), the others through convert_checkpoint()."""
    out = {}
    for cfg, model in models.items():
        src = upstream_file(tmp_path_factory.mktemp(Path(cfg).stem), cfg, model)
        if cfg.startswith("yolov8"):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert main([str(src)]) == 0
            out[cfg] = (src, src.with_name(f"{src.stem}-converted.pt"), buf.getvalue())
        else:
            out[cfg] = (src, convert_checkpoint(src), "")
    return out


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor of an eval output (decoded detections, prototypes, raw maps), flattened in order."""
    with torch.no_grad():
        y = model(x)
    flat: list[torch.Tensor] = []
    stack = [y]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            flat.append(item)
        else:
            stack[:0] = list(item)
    return flat


@pytest.mark.parametrize("cfg", list(ROOTS))
def test_converted_model_equals_source(cfg: str, models: dict[str, nn.Module], converted: dict[str, tuple[Path, Path, str]]) -> None:
    src_model, (src, out, printed) = models[cfg], converted[cfg]
    assert out == src.with_name(f"{src.stem}-converted.pt") and out.is_file()
    if printed:  # the command line names the file and the script to use it with
        assert printed.startswith(f"wrote {out}; use it with python detect.py --weights {out}")
    ckpt = read_checkpoint(out)  # a plain state_dict checkpoint: loads with weights_only=True
    assert ckpt["names"][:2] == ["class0", "class1"] and ckpt["model"]["model.0.conv.weight"].dtype == torch.float32
    converted_model = load_model(out)  # what detect.py, val.py and the hub load
    assert converted_model.head_kind == src_model.head_kind and converted_model.stride.tolist() == src_model.stride.tolist()
    x = random_images((2, 3, 64, 96), seed=5, normalise=False)
    got, ref = outputs(converted_model, x), outputs(src_model, x)
    assert len(got) == len(ref) >= 2
    tol = rounding_tol(src_model)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and rel_err(g, r) <= tol, (cfg, rel_err(g, r), tol)
    if cfg.startswith("yolov5"):  # anchors in grid units, as YOLOv5 stores them, and back in pixels in the config
        assert torch.equal(converted_model.head.anchors, src_model.head.anchors)
        assert ckpt["cfg"]["anchors"][0] == [10.0, 13.0, 16.0, 30.0, 33.0, 23.0]


def test_ema_preferred_and_output_paths(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model = models["yolov5n.yaml"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model[0].conv.weight.mul_(2)
    src = upstream_file(tmp_path, "yolov5n.yaml", other, extra={"ema": to_upstream(copy.deepcopy(model).half(), "yolov5n.yaml")})
    upstream = read_upstream(read_torch_zip(src), src)
    assert torch.equal(upstream.state["model.0.conv.weight"], model.model[0].conv.weight)  # the EMA, as YOLOv5 loads it
    assert upstream.family == "yolov5" and upstream.names[:1] == ["class0"]
    assert output_path(src, None) == tmp_path / "yolov5n-converted.pt"
    assert output_path(src, tmp_path / "x.pt") == tmp_path / "x.pt"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert output_path(src, folder) == folder / src.name  # an existing folder gets the source's name
    with pytest.raises(ConversionError, match="replace the source"):
        output_path(src, tmp_path)
    (tmp_path / "x.pt").touch()
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(src, tmp_path / "x.pt")


def hostile(tmp_path: Path, models: dict[str, nn.Module], payload: Any, name: str) -> Path:
    """A YOLOv5-shaped checkpoint whose metadata holds `payload`."""
    return upstream_file(tmp_path / name, "yolov5n.yaml", models["yolov5n.yaml"], extra={"opt": {"x": payload}})


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (Call("os.system", "touch {marker}"), "global os.system"),
        (Call("posix.system", "touch {marker}"), "global posix.system"),
        (Call("builtins.eval", "open({marker!r}, 'w')"), "global builtins.eval"),
        (Call("subprocess.Popen", ["touch", "{marker}"]), "global subprocess.Popen"),
        (Call("models.common.Conv", 3, 16), "REDUCE on models.common.Conv"),  # an allowlisted class is never called
        (Call("builtins.getattr", Global("models.common.Conv"), "__init__"), "builtins.getattr(models.common.Conv, '__init__')"),
        (Fake("models.common.C3TR", {}), "global models.common.C3TR (not a class this converter maps)"),
        (Fake("mypkg.Evil", {}), "global mypkg.Evil (only the classes a YOLOv5/YOLOv8 checkpoint holds are read)"),
    ],
    ids=["os.system", "posix.system", "eval", "Popen", "reduce-on-class", "getattr", "unmapped-class", "unknown-class"],
)
def test_hostile_globals_refused_and_nothing_runs(payload: Any, named: str, models: dict[str, nn.Module], tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    if isinstance(payload, Call):
        payload.args = tuple(a.format(marker=str(marker)) if isinstance(a, str) else
                             [b.format(marker=str(marker)) for b in a] if isinstance(a, list) else a for a in payload.args)
    (tmp_path / "h").mkdir()
    src = hostile(tmp_path, models, payload, "h")
    ops = [op.name for op, _, _ in pickletools.genops(zipfile.ZipFile(src).read(f"{src.stem}/data.pkl"))]
    assert "REDUCE" in ops  # the payload is in the file
    with pytest.raises(ConversionError) as e:
        convert_checkpoint(src)
    msg = str(e.value)
    assert msg.startswith(f"{src}: refuses ") and named in msg and "\n" not in msg, msg
    assert not marker.exists() and not (tmp_path / "h" / "yolov5n-converted.pt").exists()


def test_damaged_and_foreign_files_refused(models: dict[str, nn.Module], tmp_path: Path) -> None:
    good = upstream_file(tmp_path, "yolov5n.yaml", models["yolov5n.yaml"])
    data = good.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "garbage.pt": b"\x80\x02not a zip file at all" * 10}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02garbage")
    cases["zip-garbage.pt"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(buf, "w") as zout:  # one storage record cut short
        for item in zin.infolist():
            zout.writestr(item, zin.read(item)[:4] if item.filename.endswith("/data/0") else zin.read(item))
    cases["short-storage.pt"] = buf.getvalue()
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "not-a-checkpoint.pt")
    torch.save({"format_version": 1, "cfg": {}, "model": {}}, tmp_path / "ours.pt")
    expected = {"truncated.pt": "not a torch zip", "garbage.pt": "not a torch zip", "zip-garbage.pt": "not a readable torch checkpoint",
                "short-storage.pt": "holds 4 bytes", "not-a-checkpoint.pt": "not a YOLOv5/YOLOv8 checkpoint",
                "ours.pt": "already a checkpoint of this project", "missing.pt": "file not found"}  # fmt: skip
    for name, needle in expected.items():
        with pytest.raises(ConversionError) as e:
            convert_checkpoint(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: ") and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_weights_that_do_not_fit_name_the_first_key(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model = copy.deepcopy(models["yolov5n.yaml"])
    model.model[24].m[0] = nn.Conv2d(64, 10, 1)  # a head conv of another width than the config builds
    with pytest.raises(ConversionError, match=r"model\.24\.m\.0\.weight is \(10, 64, 1, 1\) in the file but \(255, 64, 1, 1\) here"):
        convert_checkpoint(upstream_file(tmp_path, "yolov5n.yaml", model))


def test_train_refusal_offers_conversion_and_cli_one_line(converted: dict[str, tuple[Path, Path, str]], tmp_path: Path) -> None:
    src = converted["yolov8n.yaml"][0]
    with pytest.raises(CheckpointError) as e:  # what train.py / val.py --weights say about the upstream file
        read_checkpoint(src)
    assert "arbitrary code" in str(e.value) and f"python -m utils.convert {src}" in str(e.value)
    bad = tmp_path / "bad.pt"
    save_upstream({"model": Call("os.system", "true")}, bad)
    res = subprocess.run([sys.executable, "-m", "utils.convert", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.strip() == f"convert: error: {bad}: refuses global os.system ({ONLY_UPSTREAM})"


def test_trained_file_metadata_converts(models: dict[str, nn.Module], tmp_path: Path) -> None:
    """What trained files pickle beside the model (torch.Size, numpy numbers and arrays, namespaces, paths) is read as
    plain data: ultralytics' model.args, train_args and train_metrics, YOLOv5's opt with pathlib paths."""
    model = models["yolov8n.yaml"]
    upstream = to_upstream(copy.deepcopy(model).half(), "yolov8n.yaml")
    upstream.state["args"] = Built("ultralytics.utils.IterableSimpleNamespace", (), {"imgsz": 320, "device": torch.device("cuda", 0)})
    upstream.state["_modules"]["model"]._modules["22"].state["shape"] = torch.Size([2, 64, 40, 40])
    arrays = {"f4": np.arange(6, dtype=np.float32).reshape(2, 3), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              "bool": np.array([True, False]), "big-endian": np.arange(3, dtype=">i4"), "empty": np.zeros((0, 2), np.uint8)}  # fmt: skip
    metadata = {"train_args": argparse.Namespace(data=pathlib.PurePosixPath("/data/coco.yaml"), epochs=np.int64(10)),
                "train_metrics": {"fitness": np.float64(0.25), "map": np.float32(0.5), "best": np.bool_(True)},
                "results": arrays, "opt": types.SimpleNamespace(evolve=pathlib.PosixPath("data", "hyps"),
                                                                win=pathlib.PureWindowsPath("C:/runs", "exp"))}  # fmt: skip
    src = save_upstream({"epoch": -1, "model": upstream, "ema": None, **metadata}, tmp_path / "trained.pt")
    ops = {arg for op, arg, _ in pickletools.genops(zipfile.ZipFile(src).read("trained/data.pkl")) if op.name == "GLOBAL"}
    assert {"torch Size", "numpy dtype", "_codecs encode", "pathlib PosixPath", "argparse Namespace"} <= ops
    obj = read_torch_zip(src)
    args = obj["model"].state["args"]
    assert isinstance(args, RecordedNamespace) and args.state == {"imgsz": 320, "device": "cuda:0"}
    assert obj["model"].state["_modules"]["model"].state["_modules"]["22"].state["shape"] == (2, 64, 40, 40)
    assert obj["train_args"].state == {"data": "/data/coco.yaml", "epochs": 10}
    assert obj["train_metrics"] == {"fitness": 0.25, "map": 0.5, "best": True}
    assert type(obj["train_metrics"]["fitness"]) is float  # a plain Python number, not a numpy object
    for key, want in arrays.items():
        got = obj["results"][key]
        assert isinstance(got, NumpyArray) and got.array is not None and got.array.dtype == want.dtype
        assert np.array_equal(got.array, want) and got.array.shape == want.shape, key
    assert obj["opt"].state == {"evolve": "data/hyps", "win": "C:\\runs\\exp"}
    weights = read_checkpoint(convert_checkpoint(src))["model"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


HOSTILE_METADATA: dict[str, tuple[Callable[[str], Any], str]] = {  # payload(marker) and what the refusal names
    "object-array": (lambda m: np.array([Call("os.system", f"touch {m}"), 1], dtype=object), "refuses numpy.dtype('O8', False, True)"),
    "dtype-O": (lambda m: Call("numpy.dtype", "O", False, True), "refuses numpy.dtype('O', False, True)"),
    "record-dtype": (lambda m: np.zeros(2, dtype=[("a", "f4")]), "refuses numpy.dtype('V4', False, True)"),
    "dtype-fields": (lambda m: Built("numpy.dtype", ("f8", False, True), (3, "<", None, ("a",), {"a": 1}, -1, -1, 0)),
                     "refuses the numpy dtype state"),
    "array-state-list": (lambda m: Built("numpy._core.multiarray._reconstruct", (Global("numpy.ndarray"), (0,), b"b"),
                                         (1, (1,), np.dtype("f8"), False, [m])), "refuses the numpy array state"),
    "array-short-bytes": (lambda m: Built("numpy.core.multiarray._reconstruct", (Global("numpy.ndarray"), (0,), b"b"),
                                          (1, (4,), np.dtype("f8"), False, b"\0" * 8)), "refuses the numpy array state"),
    "reconstruct-other-class": (lambda m: Call("numpy._core.multiarray._reconstruct", Global("numpy.ndarray"), (0,), m),
                                "refuses numpy _reconstruct"),
    "scalar-short-bytes": (lambda m: Call("numpy._core.multiarray.scalar", np.dtype("f8"), b"\0"), "refuses a numpy scalar"),
    "codecs-rot13": (lambda m: Call("_codecs.encode", f"touch {m}", "rot13"), "refuses _codecs.encode("),
    "namespace-state-list": (lambda m: Built("ultralytics.utils.IterableSimpleNamespace", (), [m]),
                             "refuses a list state for ultralytics.utils.IterableSimpleNamespace"),
    "namespace-args": (lambda m: Call("argparse.Namespace", f"touch {m}"), "refuses arguments to argparse.Namespace"),
    "size-of-str": (lambda m: Call("torch.Size", (m,)), "refuses torch.Size of"),
    "path-of-int": (lambda m: Call("pathlib.PosixPath", 1), "refuses pathlib.PosixPath of 1"),
    "state-on-a-tensor": (lambda m: Built("torch._utils._rebuild_parameter", (torch.zeros(2), False, OrderedDict()), (None, {"tensor": m})),
                          "refuses state for TensorRef"),
}


@pytest.mark.parametrize("case", list(HOSTILE_METADATA))
def test_hostile_metadata_refused_and_nothing_runs(case: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload, named = HOSTILE_METADATA[case]
    src = save_upstream({"model": None, "opt": {"x": payload(str(marker))}}, tmp_path / "meta.pt")
    with pytest.raises(ConversionError) as e:
        convert_checkpoint(src)
    msg = str(e.value)
    assert msg.startswith(f"{src}: refuses ") and named in msg and "\n" not in msg, msg
    assert not marker.exists() and not (tmp_path / "meta-converted.pt").exists()
