"""Every conv geometry of a model, run as the Trainer runs it, against the same conv in the plain layout.

Used in subprocesses (a faulty kernel may crash the process): by tests/test_training_layout.py as
`python -m tests.layout_worker IMGSZ NAME [...]` (shipped or given configs ending in .yaml, else registered backbone
names), and by tests/train_worker.py on the model a Trainer built. A forward pass at IMGSZ records the input size of each
Conv2d; each distinct geometry (channels, kernel, stride, padding, dilation, groups, bias, input size, weight layout) is
then run once in the training layout (channels-last input and output gradient, the conv's own weights and hooks) and
once in the contiguous layout, and its output and input, weight and bias gradients are compared.

Bound (Higham, any summation order or blocking): a float32 sum of n products differs from the exact value by at most
gamma_n * sum(|products|), gamma_n = n*u / (1 - n*u), u = 2**-24. Two correct kernels therefore differ by at most
2 * gamma_n * sum(|products|); the magnitudes come from the same conv applied to absolute values (their own rounding,
a factor of at most 1 + gamma_n, is covered by using 3 * gamma_n). n is the reduction length of each result:
C_in/groups*k*k (+1 for the bias) for the output, C_out/groups*k*k for the input gradient, batch*H_out*W_out for the
weight and bias gradients. A kernel that computes a wrong result (as oneDNN's channels-last 1x1 strided weight gradient
does, or did) misses it by orders of magnitude, or crashes the process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from models.model import DetectionModel
from models.registry import get_module
from utils.engine.memory_format import to_training_layout

U = 2.0**-24
BATCH = 2
Geometries = dict[tuple, tuple[nn.Conv2d, tuple[int, ...]]]


def build(name: str) -> nn.Module:
    """A config (a path ending in .yaml) or a registered backbone built with its defaults."""
    return DetectionModel(name, nc=3) if name.endswith(".yaml") else get_module(name).cls()


def conv_geometries(model: nn.Module, imgsz: int) -> Geometries:
    """Distinct conv geometries of `model` (as laid out now) -> (one conv with it, its input shape at batch BATCH)."""
    found: Geometries = {}

    def record(conv: nn.Module, args: tuple) -> None:
        assert isinstance(conv, nn.Conv2d)
        shape = (BATCH, *args[0].shape[1:])
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
               conv.bias is not None, shape[2:], conv.weight.is_contiguous(memory_format=torch.channels_last))
        found.setdefault(key, (conv, shape))

    hooks = [m.register_forward_pre_hook(record, prepend=True) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.rand(1, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


def _results(conv: nn.Conv2d, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and the gradients the Trainer would compute (a frozen weight, like the DFL conv's, gets none)."""
    x = x.detach().requires_grad_()
    y = conv(x)
    trained = {k: p for k, p in (("weight_grad", conv.weight), ("bias_grad", conv.bias)) if p is not None and p.requires_grad}
    grads = torch.autograd.grad(y, [x, *trained.values()], dy)
    return dict(zip(["output", "input_grad", *trained], (y.detach(), *grads)))


def _magnitudes(conv: nn.Conv2d, x: torch.Tensor, dy: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Per result: the sum of |products| of each element (in the contiguous layout) and its reduction length n."""
    geo: dict[str, Any] = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    ax, aw, ady = x.abs().contiguous(), conv.weight.detach().abs().contiguous(), dy.abs().contiguous()
    bias = None if conv.bias is None else conv.bias.detach().abs()
    k, per_position = conv.weight[0].numel(), dy[0, 0].numel() * dy.shape[0]  # C_in/groups*kh*kw, batch*H_out*W_out
    return {
        "output": (F.conv2d(ax, aw, bias, **geo), k + 1),
        "input_grad": (conv2d_input(ax.shape, aw, ady, **geo), k * conv.out_channels // conv.in_channels),
        "weight_grad": (conv2d_weight(ax, aw.shape, ady, **geo), per_position),
        "bias_grad": (ady.sum((0, 2, 3)), per_position),
    }


def check(conv: nn.Conv2d, shape: tuple[int, ...], seed: int) -> dict[str, float]:
    """Worst |training layout - contiguous| / bound over each result of `conv` on random data (<= 1 passes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        y_shape = conv(x).shape
    dy = torch.randn(y_shape, generator=gen)
    got = _results(conv, x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last))
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                      conv.bias is not None)
    plain.load_state_dict(conv.state_dict())
    plain.weight.requires_grad_(conv.weight.requires_grad)
    ref = _results(plain, x, dy)
    worst = {}
    for name, (magnitude, n) in _magnitudes(conv, x, dy).items():
        if name in got:
            bound = 3 * n * U / (1 - n * U) * magnitude + n * torch.finfo(torch.float32).tiny  # + denormals flushed to zero
            worst[name] = float(((got[name] - ref[name]).abs() / bound).max())
    return worst


def check_model(model: nn.Module, imgsz: int) -> tuple[int, list[dict[str, Any]]]:
    """(number of distinct conv geometries of `model`, the ones whose training-layout results miss the bound)."""
    geometries = conv_geometries(model, imgsz)
    failed = []
    for i, (key, (conv, shape)) in enumerate(sorted(geometries.items(), key=str)):
        ratios = check(conv, shape, seed=i)
        if max(ratios.values()) > 1:
            failed.append({"geometry": str(key), "error_over_bound": ratios})
    return len(geometries), failed


def main(imgsz: int, names: list[str]) -> None:
    """Check each named model in the training layout; print CHECKED n and one FAILED line per failing geometry."""
    torch.manual_seed(0)
    total = 0
    for name in names:
        n, failed = check_model(to_training_layout(build(name)), imgsz)
        total += n
        for f in failed:
            print("FAILED " + json.dumps({"model": name, **f}), flush=True)
    print(f"CHECKED {total}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
