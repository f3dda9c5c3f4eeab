"""Latency measurement: median of repeated runs after warm-up, for PyTorch (CPU/CUDA) and ONNX Runtime."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def median_ms(fn: Callable[[], object], runs: int = 30, warmup: int = 5, cuda: bool = False) -> float:
    """Median wall time of fn() in milliseconds (CUDA-synchronised when `cuda`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def torch_latency(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, half: bool, runs: int, warmup: int) -> float:
    """Median ms per forward of an eval-mode model on a random batch of `shape`."""
    x = torch.rand(shape, device=device)
    x = x.half() if half else x
    return median_ms(lambda: model(x), runs, warmup, cuda=device.type == "cuda")


def ort_session(onnx_path: Path, threads: int, cuda: bool = False):
    """An ONNX Runtime session with `threads` intra-op threads (0 = all cores), CUDA provider when asked."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
    if cuda and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError("onnxruntime CUDA provider is not available (pip install onnxruntime-gpu)")
    return session


def ort_latency(onnx_path: Path, shape: tuple[int, ...], threads: int, runs: int, warmup: int, cuda: bool = False) -> float:
    """Median ms per ONNX Runtime run on a random float32 batch of `shape`."""
    session = ort_session(onnx_path, threads, cuda)
    name = session.get_inputs()[0].name
    x = np.random.rand(*shape).astype(np.float32)
    return median_ms(lambda: session.run(None, {name: x}), runs, warmup)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux ru_maxrss is in KB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
