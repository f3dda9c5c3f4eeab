"""A restricted reader for torch zip checkpoints that holds pickled YOLOv5 / ultralytics modules: nothing in it runs.

The file's pickle (data.pkl) is read by a pickle.Unpickler whose find_class admits only an explicit allowlist:
- the container types torch writes (collections.OrderedDict, set), as inert constructors, and builtins.getattr only as
  getattr(<allowlisted class>, 'forward'), which YOLOv5's Segment pickles (`self.detect = Detect.forward`), as a name;
- torch's tensor and parameter rebuild functions, replaced by our own that slice the raw storage bytes (bounds-checked);
- torch's storage type names, as dtype tokens;
- the named module classes of YOLOv5, ultralytics (YOLOv8 detection) and torch.nn, each mapped to a StandIn class whose
  instances only record the state the file gives them (an nn.Module's __dict__);
- the metadata a trained file pickles beside the model (train args, metrics), each validated, then kept as plain data:
  torch.Size -> a tuple of ints; torch.device -> its name ('cuda:0'); pathlib's PosixPath / WindowsPath (and the Pure
  ones) -> the path as a str, joined by the pure path class; protocol 2's bytes: _codecs.encode only as
  encode(<str>, 'latin1'), builtins.bytes only as bytes(); numpy.dtype only from a numeric type string (kinds b, i, u,
  f, c; never object, string or record dtypes); numpy's scalar -> the Python number np.frombuffer decodes from its
  bytes; numpy's _reconstruct(ndarray) -> a NumpyArray holding what np.frombuffer decodes from its state's bytes;
  argparse.Namespace, types.SimpleNamespace and ultralytics' IterableSimpleNamespace -> a RecordedNamespace holding
  its attributes as a dict.
Every other global is refused with one line naming it, and calling (REDUCE) anything but the inert constructors and
rebuild functions is refused too: no class or function of the file's choosing is ever called.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Union, cast

import numpy as np
import torch

MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl of YOLOv5x: ~1 MB
MAX_STORAGE_BYTES = 4 * 2**30  # all tensor data together (YOLOv5x in float32: ~350 MB)

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_TORCH_NN = {
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.batchnorm": ("BatchNorm2d",),
    "torch.nn.modules.activation": ("SiLU", "ReLU", "LeakyReLU", "Hardswish"),
    "torch.nn.modules.linear": ("Identity",),
    "torch.nn.modules.container": ("Sequential", "ModuleList"),
    "torch.nn.modules.upsampling": ("Upsample",),
    "torch.nn.modules.pooling": ("MaxPool2d",),
}
_YOLOV5 = {
    "models.yolo": ("DetectionModel", "Model", "SegmentationModel", "Detect", "Segment"),
    "models.common": ("Conv", "DWConv", "Bottleneck", "C3", "SPP", "SPPF", "Focus", "Concat", "Proto"),
}
_ULTRALYTICS_BLOCKS = {"conv": ("Conv", "Concat"), "block": ("Bottleneck", "C2f", "SPPF", "DFL"), "head": ("Detect",)}
_ULTRALYTICS = {
    "ultralytics.nn.tasks": ("DetectionModel",),
    **{f"ultralytics.nn.modules.{m}": names for m, names in _ULTRALYTICS_BLOCKS.items()},
    "ultralytics.nn.modules": tuple(n for names in _ULTRALYTICS_BLOCKS.values() for n in names),  # ultralytics 8.0.x layout
}
MODULE_CLASSES: frozenset[str] = frozenset(f"{m}.{n}" for t in (_TORCH_NN, _YOLOV5, _ULTRALYTICS) for m, ns in t.items() for n in ns)
UPSTREAM_PACKAGES = ("models.", "ultralytics.")
ONLY_UPSTREAM = "only the classes a YOLOv5/YOLOv8 checkpoint holds are read"


class UnsafeCheckpointError(ValueError):
    """A file the restricted reader will not read; the message is one line (the caller prefixes the file name)."""


class StandIn:
    """An inert object standing for an upstream module class: it records the pickled state and does nothing else."""

    __slots__ = ("state",)
    upstream: str = ""  # the dotted global name this stand-in class answers for

    def __new__(cls, *args: Any) -> StandIn:
        if args:
            raise UnsafeCheckpointError(f"refuses arguments to {cls.upstream}.__new__ (it is built empty, then given its state)")
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        """Record the pickled __dict__ (only a mapping with string keys is accepted)."""
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafeCheckpointError(f"refuses a {type(state).__name__} state for {self.upstream} (expected a mapping of attributes)")
        self.state = state

    def __call__(self, *args: Any) -> None:
        raise UnsafeCheckpointError(f"refuses REDUCE on an instance of {self.upstream}")

    def __repr__(self) -> str:
        return f"<stand-in {self.upstream}>"


class _NoCall(type):
    """Metaclass of the stand-in classes: calling one (REDUCE on a class) is refused; NEWOBJ uses __new__ only."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(f"refuses REDUCE on {getattr(cls, 'upstream', cls.__name__)} (only its stored state is read)")


_STAND_INS: dict[str, type[StandIn]] = {}


def stand_in(name: str) -> type[StandIn]:
    """The stand-in class for the allowlisted dotted class name `name` (one class per name)."""
    if name not in _STAND_INS:
        _STAND_INS[name] = cast("type[StandIn]", _NoCall(name.rsplit(".", 1)[1], (StandIn,), {"__slots__": (), "upstream": name}))
    return _STAND_INS[name]


class _Sealed:
    """Base of the reader's own value holders: a BUILD opcode aimed at one (to swap its tensor or name) is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"refuses state for {type(self).__name__.lstrip('_')} (it is built by the reader only)")

    def _called(self) -> str:
        """What a refused call (pickle's REDUCE) names."""
        return f"an instance of {type(self).__name__.lstrip('_')}"

    def __call__(self, *args: Any) -> None:
        raise UnsafeCheckpointError(f"refuses REDUCE on {self._called()}")


class TensorRef(_Sealed):
    """A tensor read from the file, held in an object pickle cannot call or give state to."""

    __slots__ = ("tensor", "parameter")

    def __init__(self, tensor: torch.Tensor, parameter: bool = False) -> None:
        self.tensor = tensor
        self.parameter = parameter

    def _called(self) -> str:
        return "a tensor"


class _StorageType(_Sealed):
    """A storage type name (torch.FloatStorage, ...) as a dtype token."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def _called(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Sealed):
    """One storage record of the zip file as a flat tensor of its dtype."""

    __slots__ = ("key", "flat")

    def __init__(self, key: str, flat: torch.Tensor) -> None:
        self.key, self.flat = key, flat

    def _called(self) -> str:
        return f"storage {self.key}"


def _is_int(x: Any, low: int = 0) -> bool:
    """A plain int (not bool) >= low."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> TensorRef:
    """Our torch._utils._rebuild_tensor_v2: a bounds-checked strided copy out of the storage; half precision widened."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("refuses a tensor whose storage is not a storage record of the file")
    shape_ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= 8
    if not (shape_ok and _is_int(offset) and all(map(_is_int, size)) and all(map(_is_int, stride))):
        raise UnsafeCheckpointError(f"refuses a tensor with malformed geometry (size {size!r}, stride {stride!r}, offset {offset!r})")
    numel = math.prod(size)
    if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.flat.numel():
        raise UnsafeCheckpointError(f"refuses a tensor of size {tuple(size)} that reaches past its storage {storage.key}")
    t = torch.as_strided(storage.flat, size, stride, offset).clone() if numel else storage.flat.new_empty(size)
    return TensorRef(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)


def _rebuild_parameter(data: Any, *_rest: Any) -> TensorRef:
    """Our torch._utils._rebuild_parameter(_with_state): the tensor marked as a parameter; hooks and state ignored."""
    if not isinstance(data, TensorRef):
        raise UnsafeCheckpointError("refuses a parameter whose data is not a tensor")
    return TensorRef(data.tensor, parameter=True)


def _ordered_dict(*args: Any) -> OrderedDict:
    """collections.OrderedDict from nothing or a list of pairs (torch writes it empty, then SETITEMS)."""
    if not args:
        return OrderedDict()
    if len(args) == 1 and isinstance(args[0], list) and all(isinstance(p, tuple) and len(p) == 2 for p in args[0]):
        return OrderedDict(args[0])
    raise UnsafeCheckpointError("refuses collections.OrderedDict with arguments other than a list of pairs")


def _plain_set(*args: Any) -> set:
    """builtins.set from nothing or a list of strings (nn.Module's _non_persistent_buffers_set)."""
    if not args:
        return set()
    if len(args) == 1 and isinstance(args[0], list) and all(isinstance(x, (str, int)) for x in args[0]):
        return set(args[0])
    raise UnsafeCheckpointError("refuses builtins.set with arguments other than a list of names")


class MethodRef(_Sealed):
    """A method of an allowlisted class named in the file (YOLOv5's Segment stores `detect = Detect.forward`); inert."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> None:
        raise UnsafeCheckpointError(f"refuses REDUCE on {self.name}")


def _method_ref(owner: Any, name: Any) -> MethodRef:
    """builtins.getattr, admitted only as getattr(<allowlisted module class>, 'forward'): a name, never the method."""
    if isinstance(owner, type) and issubclass(owner, StandIn) and name == "forward":
        return MethodRef(f"{owner.upstream}.{name}")
    what = getattr(owner, "upstream", type(owner).__name__)
    raise UnsafeCheckpointError(f"refuses builtins.getattr({what}, {str(name)[:40]!r}) (only a module class's forward is named)")


def _brief(x: Any) -> str:
    """A short description of a refused argument for a one-line message."""
    if isinstance(x, (bytes, NumpyDtype)):
        return f"{len(x)} bytes" if isinstance(x, bytes) else repr(x)
    return f"a {type(x).__name__}" if not isinstance(x, (str, int, float, tuple)) else repr(x)[:60]


def _torch_size(*args: Any) -> tuple[int, ...]:
    """torch.Size(<tuple of ints>) -> the tuple (ultralytics' Detect keeps its last input shape as one)."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)) and len(args[0]) <= 32 and all(map(_is_int, args[0])):
        return tuple(args[0])
    raise UnsafeCheckpointError(f"refuses torch.Size of {', '.join(map(_brief, args)) or 'nothing'} (expected a tuple of ints)")


def _torch_device(*args: Any) -> str:
    """torch.device(<type>[, <index>]) -> its name as a str ('cpu', 'cuda:0')."""
    ok = 1 <= len(args) <= 2 and isinstance(args[0], str) and re.fullmatch(r"[a-z_]{1,16}", args[0])
    if ok and (len(args) == 1 or args[1] is None or _is_int(args[1])):
        return args[0] if len(args) == 1 or args[1] is None else f"{args[0]}:{args[1]}"
    raise UnsafeCheckpointError(f"refuses torch.device({', '.join(map(_brief, args))}) (expected a device type and index)")


def _path_as_str(flavour: type[PurePosixPath] | type[PureWindowsPath], name: str) -> Callable[..., str]:
    """pathlib's `name`(*parts) -> the path as a str, joined by the pure (string-only) path class of its flavour."""

    def join(*parts: Any) -> str:
        if len(parts) <= 256 and all(isinstance(p, str) and len(p) <= 4096 for p in parts):
            return str(flavour(*parts))
        raise UnsafeCheckpointError(f"refuses {name} of {', '.join(map(_brief, parts[:3]))} (expected path segments as str)")

    return join


def _codecs_encode(*args: Any) -> bytes:
    """_codecs.encode(<str>, 'latin1'): how protocol 2 writes a bytes object; no other encoding or argument."""
    if len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1":
        return args[0].encode("latin1")
    raise UnsafeCheckpointError(f"refuses _codecs.encode({', '.join(map(_brief, args))}) (only a str with 'latin1' is read)")


def _empty_bytes(*args: Any) -> bytes:
    """builtins.bytes(): how protocol 2 writes an empty bytes object (an empty array's data); no argument."""
    if not args:
        return b""
    raise UnsafeCheckpointError(f"refuses builtins.bytes({', '.join(map(_brief, args))}) (only the empty bytes() is read)")


class NumpyDtype:
    """A numpy dtype of a numeric kind (b, i, u, f, c), built from its type string; its pickled state sets only the byte order."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        """numpy's dtype state (3, byteorder, None, None, None, -1, -1, flags): no subarray, fields or names."""
        ok = isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
        if not ok or state[2:7] != (None, None, None, -1, -1) or not _is_int(state[7]):
            raise UnsafeCheckpointError(f"refuses the numpy dtype state {str(state)[:80]} (only a plain numeric dtype is read)")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])

    def __call__(self, *args: Any) -> None:
        raise UnsafeCheckpointError("refuses REDUCE on a numpy dtype")

    def __repr__(self) -> str:
        return f"dtype({self.dtype.str!r})"


NUMERIC_KINDS = "biufc"


def _numpy_dtype(*args: Any) -> NumpyDtype:
    """numpy.dtype(<type string>, align, copy), admitted only for a numeric type string ('f8', 'i4', 'b1', ...)."""
    text = args[0] if 1 <= len(args) <= 3 and all(isinstance(a, bool) for a in args[1:]) else None
    if isinstance(text, str) and re.fullmatch(r"[biufc](1|2|4|8|16)", text):
        with contextlib.suppress(TypeError):  # 'b2', 'u16': numeric-looking strings numpy has no type for
            dtype = np.dtype(text)  # a numeric type string: no class or object is looked up
            if dtype.kind in NUMERIC_KINDS:
                return NumpyDtype(dtype)
    raise UnsafeCheckpointError(f"refuses numpy.dtype({', '.join(map(_brief, args))}) (only numeric dtypes {NUMERIC_KINDS!r} are read)")


def _numpy_scalar(*args: Any) -> Any:
    """numpy's scalar(<numeric dtype>, <bytes>) -> the Python number np.frombuffer decodes from the bytes."""
    if len(args) == 2 and isinstance(args[0], NumpyDtype) and isinstance(args[1], bytes) and len(args[1]) == args[0].dtype.itemsize:
        return np.frombuffer(args[1], dtype=args[0].dtype)[0].item()
    raise UnsafeCheckpointError(f"refuses a numpy scalar of {', '.join(map(_brief, args))} (expected a numeric dtype and its bytes)")


class _NdarrayType(_Sealed):
    """numpy.ndarray as a name: only the first argument of numpy's _reconstruct."""

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
        raise UnsafeCheckpointError("refuses REDUCE on numpy.ndarray")


class NumpyArray:
    """An ndarray of a numeric dtype, decoded by np.frombuffer from the bytes of its pickled state (set once)."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        """numpy's array state (1, shape, dtype, is_fortran, raw bytes), the byte count matching shape and dtype exactly."""
        if self.array is not None or not _array_state_ok(state):
            what = ", ".join(map(_brief, state)) if isinstance(state, tuple) else _brief(state)
            raise UnsafeCheckpointError(f"refuses the numpy array state ({what}) (expected 1, shape, a numeric dtype, "
                                        "is_fortran and exactly its bytes)")
        _, shape, dtype, fortran, raw = state
        self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()

    def __call__(self, *args: Any) -> None:
        raise UnsafeCheckpointError("refuses REDUCE on a numpy array")

    def __repr__(self) -> str:
        return f"<numpy array {self.array!r}>"


def _array_state_ok(state: Any) -> bool:
    """numpy's array state (1, shape, NumpyDtype, is_fortran, bytes) with exactly the bytes shape and dtype need."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        return False
    _, shape, dtype, fortran, raw = state
    if not (isinstance(shape, tuple) and len(shape) <= 32 and all(map(_is_int, shape)) and isinstance(fortran, bool)):
        return False
    return isinstance(dtype, NumpyDtype) and isinstance(raw, bytes) and len(raw) == math.prod(shape) * dtype.dtype.itemsize


def _numpy_reconstruct(*args: Any) -> NumpyArray:
    """numpy's _reconstruct(ndarray, (0,), b'b'): an empty NumpyArray its BUILD state then fills."""
    if len(args) == 3 and isinstance(args[0], _NdarrayType) and args[1] == (0,) and args[2] == b"b":
        return NumpyArray()
    raise UnsafeCheckpointError(f"refuses numpy _reconstruct of {', '.join(map(_brief, args))} (only a plain ndarray is read)")


class RecordedNamespace(StandIn):
    """An argparse / SimpleNamespace-like object (a file's train args): its attributes recorded as a plain dict."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<recorded {self.upstream} {self.state!r}>"


NAMESPACES = ("argparse.Namespace", "types.SimpleNamespace", "ultralytics.utils.IterableSimpleNamespace")
_NAMESPACE_TYPES = {n: cast("type[RecordedNamespace]", type(n.rsplit(".", 1)[1], (RecordedNamespace,), {"__slots__": (), "upstream": n}))
                    for n in NAMESPACES}  # fmt: skip
_PATHS = {f"pathlib.{n}": _path_as_str(flavour, f"pathlib.{n}") for flavour, names in
          ((PurePosixPath, ("PosixPath", "PurePosixPath")), (PureWindowsPath, ("WindowsPath", "PureWindowsPath"))) for n in names}
_NUMPY = {f"{m}.{n}": f for m in ("numpy.core.multiarray", "numpy._core.multiarray")
          for n, f in (("scalar", _numpy_scalar), ("_reconstruct", _numpy_reconstruct))}  # numpy 1.x and 2.x names

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _plain_set,
    "builtins.getattr": _method_ref,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    # metadata of trained files, as plain data
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "_codecs.encode": _codecs_encode,
    "builtins.bytes": _empty_bytes,
    "numpy.dtype": _numpy_dtype,
    **_NUMPY,
    **_PATHS,
    **{f"pathlib._local.{n.split('.')[1]}": f for n, f in _PATHS.items()},  # Python 3.13's module of the path classes
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler of a torch zip file's data.pkl admitting only the allowlisted globals (see the module docstring)."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, _Storage] = {}
        self.total_bytes = 0

    def find_class(self, module: str, name: str) -> Any:
        """The inert object standing for global `module.name`; anything not allowlisted is refused in one line."""
        module = "builtins" if module == "__builtin__" else module  # protocol 2 writes Python 2 names
        full = f"{module}.{name}"
        if full in FUNCTIONS:
            return FUNCTIONS[full]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if full in MODULE_CLASSES:
            return stand_in(full)
        if full in _NAMESPACE_TYPES:
            return _NAMESPACE_TYPES[full]
        if full == "numpy.ndarray":
            return _NdarrayType()
        why = "not a class this converter maps" if full.startswith(UPSTREAM_PACKAGES) else ONLY_UPSTREAM
        raise UnsafeCheckpointError(f"refuses global {full} ({why})")

    def persistent_load(self, pid: Any) -> _Storage:
        """A storage record ('storage', storage type, key, location, numel) read from the zip's data/ folder."""
        ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
        if not ok or not isinstance(pid[2], str) or not re.fullmatch(r"\w{1,64}", pid[2]) or not _is_int(pid[4]):
            raise UnsafeCheckpointError(f"refuses persistent id {str(pid)[:80]} (not a torch storage record)")
        key, dtype, numel = pid[2], pid[1].dtype, pid[4]
        if key not in self.storages:
            self.storages[key] = _Storage(key, self._read_storage(key, dtype, numel))
        storage = self.storages[key]
        if storage.flat.dtype != dtype:
            raise UnsafeCheckpointError(f"refuses storage {key} used with two dtypes")
        return storage

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The record data/<key> as a flat tensor of `numel` values; its byte size must match exactly."""
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise UnsafeCheckpointError(f"storage record {name} is missing from the archive") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.total_bytes += info.file_size
        if info.file_size != numel * itemsize or self.total_bytes > MAX_STORAGE_BYTES:
            raise UnsafeCheckpointError(f"storage record {name} holds {info.file_size} bytes, its header says {numel * itemsize}")
        raw = bytearray(self.archive.read(name))
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _data_prefix(archive: zipfile.ZipFile) -> str:
    """The folder of the archive's data.pkl ('<name>/'); torch writes exactly one, one level deep."""
    found = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(found) != 1:
        raise UnsafeCheckpointError(f"not a torch checkpoint (found {len(found)} data.pkl records, expected one)")
    return found[0][: -len("data.pkl")]


def read_torch_zip(path: Union[str, Path]) -> Any:
    """The object pickled in torch zip file `path`, with modules as StandIns and tensors as TensorRefs; nothing executed.

    Raises UnsafeCheckpointError (one line, without the file name) for refused or unreadable content.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError("not a torch zip checkpoint (a legacy pre-1.6 torch file or not a torch file at all; "
                                    "only the zip format of torch >= 1.6 is read)")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _data_prefix(archive)
            if archive.getinfo(prefix + "data.pkl").file_size > MAX_PICKLE_BYTES:
                raise UnsafeCheckpointError(f"{prefix}data.pkl is larger than {MAX_PICKLE_BYTES // 2**20} MB")
            order = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in archive.namelist() else "little"
            if order != "little":
                raise UnsafeCheckpointError(f"tensors stored {order}-endian are not read (only little-endian)")
            return RestrictedUnpickler(archive.read(prefix + "data.pkl"), archive, prefix).load()
    except UnsafeCheckpointError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, RecursionError, UnicodeDecodeError, OverflowError, MemoryError, RuntimeError) as e:
        text = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(f"not a readable torch checkpoint ({text})") from None
