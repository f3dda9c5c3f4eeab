"""Checkpoints as plain data: state_dicts + model config + metadata, written atomically, loaded weights_only."""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from models.yolo import DetectionModel

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A weights file that is missing, unreadable or not one of ours; the message is one line."""


def save_checkpoint(path: Union[str, Path], model: nn.Module, **meta: Any) -> Path:
    """Write {model state_dict, cfg, names, **meta} to `path` via a temp file + rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    core = unwrap_model(model)
    ckpt: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "cfg": core.yaml,
        "names": list(meta.pop("names", getattr(core, "names", []))),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    ckpt.update(meta)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Load a checkpoint dict with weights_only=True; clear one-line errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types on corrupt or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "cfg" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected keys 'model' and 'cfg')")
    return ckpt


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu", use_ema: bool = True) -> DetectionModel:
    """Rebuild the DetectionModel stored in `path` (EMA weights when present) and load its weights."""
    ckpt = read_checkpoint(path)
    model = DetectionModel(ckpt["cfg"], ch=int(ckpt["cfg"].get("ch", 3)))
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") else ckpt["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored model config ({str(e).splitlines()[0]})") from None
    if ckpt.get("names"):
        model.names = list(ckpt["names"])
    return model.to(device).eval()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel/DistributedDataParallel wrappers."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
