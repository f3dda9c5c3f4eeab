"""Device choice shared by training, validation, detection, export and the inference backend."""

from __future__ import annotations

import logging
from typing import Union

import torch

LOGGER = logging.getLogger("mobile_yolo")


def select_device(device: Union[str, int, torch.device, None] = "") -> torch.device:
    """torch.device for '', 'cpu', 'mps', '0', '0,1', 'cuda:0', an index or a torch.device; ValueError when it cannot be met."""
    if isinstance(device, torch.device):
        device = "cpu" if device.type == "cpu" else device.type if device.index is None else str(device.index)
    spec = str(device if device is not None else "").strip().lower().replace("cuda:", "").replace(" ", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device {device} requested but MPS is not available")
        return torch.device("mps")
    if spec in ("", "cuda"):
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    ids = spec.split(",")
    if not all(i.isdigit() for i in ids):
        raise ValueError(f"--device {device}: expected 'cpu', 'mps', or CUDA indices such as 0 or 0,1")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available")
    count = torch.cuda.device_count()
    bad = [i for i in ids if int(i) >= count]
    if bad:
        raise ValueError(f"--device {device} requested but only {count} CUDA device(s) are visible")
    if len(ids) > 1:
        LOGGER.info(f"--device {device}: this process uses cuda:{ids[0]}; launch with torchrun for multi-GPU DDP")
    return torch.device(f"cuda:{ids[0]}")
