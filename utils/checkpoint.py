"""Checkpoints as plain data: state_dicts + model config + metadata, written atomically, loaded weights_only."""

from __future__ import annotations

import pickle
import re
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from models.model import DetectionModel
from models.parse import ModelConfigError
from utils.files import atomic_write, first_line

FORMAT_VERSION = 1
STATE_KEYS = ("model", "ema")  # the state_dicts a checkpoint may hold
FINAL_KEYS = ("format_version", "cfg", "names", "date", "epoch", "best_fitness", "opt", "hyp")  # what final weights keep


class CheckpointError(ValueError):
    """A weights file that is missing, unreadable or not one of ours; the message is one line."""


def save_checkpoint(path: Union[str, Path], model: nn.Module, final: bool = False, **meta: Any) -> Path:
    """Write {model state_dict, cfg, names, **meta} to `path` via a temp file + rename (never half-written); `final`
    writes final weights instead (final_weights: the EMA in float16, no optimizer)."""
    path = Path(path)
    core = unwrap_model(model)
    ckpt: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "cfg": core.yaml,
        "names": list(meta.pop("names", getattr(core, "names", []))),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    ckpt.update(meta)
    _write(path, final_weights(ckpt) if final else ckpt, "cannot save checkpoint")
    return path


def _write(path: Path, ckpt: dict[str, Any], what: str) -> None:
    """torch.save through a temp file + rename; a failure leaves the previous file at `path` untouched (one line)."""
    try:
        with atomic_write(path) as f:
            torch.save(ckpt, f)
    except OSError as e:  # full disk, read-only folder
        raise CheckpointError(f"{path}: {what} ({e.strerror or e}); the previous file there is unchanged") from None


def read_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Load a checkpoint dict with weights_only=True; clear one-line errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {_unpickling_reason(e, path)}") from None
    except Exception as e:  # the unpickler raises many types on corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "cfg" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected keys 'model' and 'cfg')")
    if not isinstance(ckpt["cfg"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: malformed checkpoint ('cfg' and 'model' must be mappings)")
    for key in STATE_KEYS:
        if isinstance(ckpt.get(key), dict):
            ckpt[key] = _float32(ckpt[key])  # final weights are stored in float16; every reader gets float32
    return ckpt


def _float32(state: dict[str, Any]) -> dict[str, Any]:
    """The state_dict with every reduced-precision floating tensor widened to float32 (others unchanged)."""
    low = (torch.float16, torch.bfloat16)
    return {k: v.float() if isinstance(v, torch.Tensor) and v.dtype in low else v for k, v in state.items()}


def _float16(state: dict[str, Any]) -> dict[str, Any]:
    """The state_dict with its floating tensors in float16; one whose values overflow float16 stays as it is."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            half = v.half()
            overflow = not bool(torch.isfinite(half).all()) and bool(torch.isfinite(v).all())
            v = v if overflow else half
        out[k] = v
    return out


def final_weights(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint as final weights, as YOLOv5's strip_optimizer makes them but state_dict style: the EMA
    weights (else the model's) as `model` in float16, no optimizer or EMA copy, the metadata (FINAL_KEYS) kept."""
    final: dict[str, Any] = {k: ckpt[k] for k in FINAL_KEYS if k in ckpt}
    final["model"] = _float16(ckpt.get("ema") or ckpt["model"])
    return final


def is_final(ckpt: dict[str, Any]) -> bool:
    """Whether a checkpoint holds final (stripped) weights: no optimizer state, so it cannot resume training."""
    return not ckpt.get("optimizer")


def _unpickling_reason(e: Exception, path: Union[str, Path] = "FILE") -> str:
    """Why a weights_only load refused a file, without inviting the unsafe weights_only=False work-around; offers the
    safe conversion of YOLOv5/YOLOv8 files."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if "Weights only load failed" in text or found:
        what = f" ({found.group(1)})" if found else ""
        return (f"refused to load: the file stores Python objects beyond tensors{what}; unpickling those "
                "(torch.load with weights_only=False) would let the file run arbitrary code, so only plain "
                "state_dict checkpoints are loaded; a YOLOv5 or ultralytics YOLOv8 checkpoint converts without running "
                f"anything: {shlex.join(['python', '-m', 'utils.convert', str(path)])}")
    return f"not a readable checkpoint ({first_line(e)})"


def model_from_checkpoint(ckpt: dict[str, Any], path: Union[str, Path], nc: int | None = None) -> DetectionModel:
    """Rebuild the (untrained) DetectionModel described by a checkpoint's cfg; malformed configs are one line."""
    try:
        return DetectionModel(ckpt["cfg"], ch=int(ckpt["cfg"].get("ch", 3)), nc=nc)
    except ModelConfigError as e:
        raise CheckpointError(f"{path}: stored model config cannot be built ({e})") from None
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed model config in checkpoint ({type(e).__name__}: {first_line(e)})") from None


def load_state(target: Any, state: Any, path: Union[str, Path], what: str = "weights") -> None:
    """target.load_state_dict(state) (strict for modules) with a mismatch reported as one line naming the file."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {what} do not fit the model being built ({first_line(e)})") from None


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu", use_ema: bool = True) -> DetectionModel:
    """Rebuild the DetectionModel stored in `path` (EMA weights when present) and load its weights."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    load_state(model, ckpt.get("ema") if use_ema and ckpt.get("ema") else ckpt["model"], path)
    if ckpt.get("names"):
        model.names = list(ckpt["names"])
    return model.to(device).eval()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel/DistributedDataParallel wrappers."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
