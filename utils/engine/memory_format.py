"""The memory layout the Trainer trains in: channels-last, except the convolutions whose CPU kernels fail in it.

Channels-last is the layout the loader's batches arrive in and makes CPU training steps ~10-25% faster. One family
of convolutions is kept out of it: a 1x1 kernel with a stride above 1. On x86 CPUs with AVX2, oneDNN (PyTorch's CPU
conv backend; seen with torch 2.13.0 and 2.14.1, both on oneDNN 3.12.0) computes the weight gradient of such a conv
wrongly in channels-last when it has 2-7 input channels (groups 1) and the input size is a multiple of the stride:
a silently wrong gradient, a segmentation fault, heap corruption ("double free or corruption") or a hang. Its SSE4.1
and AVX kernels (ONEDNN_MAX_CPU_ISA=AVX) are correct. MobileOne's stem has exactly that conv (its 1x1 scale branch,
3 -> 48 channels, stride 2), so every MobileOne detector crashed in its first training step. Minimal reproduction
(no project code; crashes, or prints a relative error far above 1e-6):

    import torch
    x = torch.rand(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 3, 1, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.nn.functional.conv2d(x, w, stride=2).sum().backward()
    exact = x[:, :, ::2, ::2].sum((0, 2, 3)).view(1, 3, 1, 1)  # d(sum)/dw: the sum of the strided input
    print(((w.grad - exact).abs().max() / exact.abs().max()).item())

The same conv in the contiguous layout is correct, so every 1x1 strided conv gets contiguous weights and inputs,
whatever its channel count (2-7 lies below AVX2's 8 floats per vector; other instruction sets may fail elsewhere).
Measured, this costs nothing noticeable (a few strided 1x1 convs per model). Remove the exception once a torch release
computes the reproduction correctly. tests/test_training_layout.py and tests/test_train_every_backbone.py check the
output and gradients of every conv geometry of every backbone and head in this layout against the contiguous one.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def needs_contiguous(module: nn.Module) -> bool:
    """Whether `module` is a conv that oneDNN cannot train in channels-last: a 1x1 kernel with a stride above 1."""
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)


def _contiguous_inputs(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the input in the contiguous layout (the same values)."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def to_training_layout(model: ModuleT) -> ModuleT:
    """Put `model` in channels-last memory, except the convs that `needs_contiguous` names; returns `model`."""
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        if needs_contiguous(module):
            module.to(memory_format=torch.contiguous_format)
            module.register_forward_pre_hook(_contiguous_inputs)
    return model
