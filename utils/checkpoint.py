"""Checkpoints as plain data: state_dicts + model config + metadata, written atomically, loaded weights_only."""

from __future__ import annotations

import pickle
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from models.model import DetectionModel
from models.parse import ModelConfigError
from utils.files import atomic_write, first_line

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A weights file that is missing, unreadable or not one of ours; the message is one line."""


def save_checkpoint(path: Union[str, Path], model: nn.Module, **meta: Any) -> Path:
    """Write {model state_dict, cfg, names, **meta} to `path` via a temp file + rename (never half-written)."""
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
    try:
        with atomic_write(path) as f:
            torch.save(ckpt, f)
    except OSError as e:  # full disk, read-only folder: the previous file at `path` is untouched
        raise CheckpointError(f"{path}: cannot save checkpoint ({e.strerror or e}); the previous file there is unchanged") from None
    return path


def read_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Load a checkpoint dict with weights_only=True; clear one-line errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {_unpickling_reason(e)}") from None
    except Exception as e:  # the unpickler raises many types on corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "cfg" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected keys 'model' and 'cfg')")
    if not isinstance(ckpt["cfg"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: malformed checkpoint ('cfg' and 'model' must be mappings)")
    return ckpt


def _unpickling_reason(e: Exception) -> str:
    """Why a weights_only load refused a file, without inviting the unsafe weights_only=False work-around."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if "Weights only load failed" in text or found:
        what = f" ({found.group(1)})" if found else ""
        return (f"refused to load: the file stores Python objects beyond tensors{what}; unpickling those "
                "(torch.load with weights_only=False) would let the file run arbitrary code, so only plain "
                "state_dict checkpoints are loaded")
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
