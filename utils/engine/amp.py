"""Automatic mixed precision (AMP) of the training step: one decision, the same code on every device.

The Trainer asks `amp_policy(device)` whether its step runs under autocast, in which dtype, and whether the loss needs a
GradScaler; it then uses the policy's `autocast()` and `grad_scaler()` and holds no device test of its own. By default
CUDA trains in float16 with a scaler (YOLOv5's AMP) and every other device in float32: float16 and bfloat16 kernels on
plain CPUs are slower than float32 ones. Passing a dtype turns autocast on for any device, so the CPU tests run the
exact step code a GPU runs (tests/test_mixed_precision.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AMP_DTYPES = (torch.float16, torch.bfloat16)  # what autocast computes in; float32 (or None) means autocast off
DEFAULT_AMP_DTYPE = {"cuda": torch.float16}  # device type -> its AMP dtype when none is asked for; others: float32


@dataclass(frozen=True)
class AmpPolicy:
    """Whether and how a training step runs under autocast on `device_type`; dtype None means plain float32."""

    device_type: str
    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        """Whether the forward pass and the loss run under autocast."""
        return self.dtype is not None

    @property
    def scaled(self) -> bool:
        """Whether the loss needs a GradScaler: float16's 5-bit exponent underflows small gradients; bfloat16 has float32's range."""
        return self.dtype == torch.float16

    def autocast(self) -> torch.autocast:
        """The autocast context of a training forward pass and loss (a no-op context when disabled)."""
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler for this device, active only when the dtype needs one (otherwise scale/step/update pass through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)

    def describe(self) -> str:
        """One phrase for the log: 'float32' or e.g. 'AMP float16 with loss scaling'."""
        if not self.enabled:
            return "float32"
        return f"AMP {str(self.dtype).removeprefix('torch.')}" + (" with loss scaling" if self.scaled else "")


def amp_policy(device: torch.device | str, dtype: torch.dtype | None = None) -> AmpPolicy:
    """The AMP policy of training on `device`: `dtype` when given (float32: off), else the device type's default."""
    device_type = torch.device(device).type
    if dtype is None:
        dtype = DEFAULT_AMP_DTYPE.get(device_type)
    elif dtype == torch.float32:
        dtype = None
    elif dtype not in AMP_DTYPES:
        raise ValueError(f"amp_policy: dtype must be one of float16, bfloat16, float32, got {dtype}")
    return AmpPolicy(device_type, dtype)
