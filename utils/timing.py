"""Latency measurement: interleaved rounds (round-robin over models, warm-up + a block of runs each), their robust
statistics and per-round ratios, the machine facts a benchmark header carries, and the older single-model medians."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

K = TypeVar("K", bound=Hashable)


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


def interleaved_times(
    runners: Mapping[K, Callable[[], object]], rounds: int, block: int, warmup: int, clock: Callable[[], float] = time.perf_counter
) -> dict[K, list[list[float]]]:
    """ms of every timed call, per runner and round: runners take turns each round (round-robin), each doing `warmup`
    untimed calls then `block` consecutive timed ones, so machine drift hits every runner alike (callers synchronise)."""
    times: dict[K, list[list[float]]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            for _ in range(warmup):
                fn()
            block_ms = []
            for _ in range(block):
                t0 = clock()
                fn()
                block_ms.append((clock() - t0) * 1e3)
            times[key].append(block_ms)
    return times


@dataclass(frozen=True)
class LatencyStats:
    """One runner's interleaved latency: figures over rounds of each round's block median, in ms."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float
    ratio: float  # median over rounds of (this round / baseline's same round)
    ratio_lo: float
    ratio_hi: float
    rounds: int
    runs: int


def _quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method); one value is its own quartiles."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(times: Mapping[K, list[list[float]]], baseline: K) -> dict[K, LatencyStats]:
    """Median, IQR and range over rounds of the per-round block medians, and the median per-round ratio to `baseline`."""
    if baseline not in times:
        raise ValueError(f"baseline {baseline!r} is not among the timed runners")
    per_round = {k: [statistics.median(b) for b in rounds] for k, rounds in times.items()}
    base = per_round[baseline]
    out: dict[K, LatencyStats] = {}
    for key, values in per_round.items():
        ratios = [v / b for v, b in zip(values, base)]
        q1, q3 = _quartiles(values)
        out[key] = LatencyStats(statistics.median(values), q1, q3, min(values), max(values), statistics.median(ratios), min(ratios),
                                max(ratios), len(values), sum(len(b) for b in times[key]))  # fmt: skip
    return out


@contextlib.contextmanager
def restored_threads() -> Iterator[None]:
    """Context: torch's and OpenCV's CPU thread counts are put back on exit, so a benchmark run from Python (tests,
    notebooks) that sets them does not slow everything after it."""
    import cv2

    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def set_threads(threads: int) -> int:
    """Use `threads` intra-op CPU threads in torch (0 = all cores); returns the count in effect."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(*names: str) -> str:
    """Installed version of the first distribution found among `names` (read from metadata, nothing imported)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def system_info(threads: int) -> dict[str, Any]:
    """Facts that decide a latency figure: date, CPU model and cores, threads, load, GPU, library versions."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads or os.cpu_count(),
        "load_1min": round(load, 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": package_version("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
        "openvino": package_version("openvino"),
    }


@torch.inference_mode()
def torch_latency(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, half: bool, runs: int, warmup: int) -> float:
    """Median ms per forward of an eval-mode model on a random batch of `shape`."""
    x = torch.rand(shape, device=device)
    x = x.half() if half else x
    return median_ms(lambda: model(x), runs, warmup, cuda=device.type == "cuda")


def torch_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A no-argument forward of `model` on `x` for interleaved_times (inference mode, CUDA-synchronised on a GPU)."""
    cuda = x.device.type == "cuda"

    def run() -> None:
        with torch.inference_mode():
            model(x)
        if cuda:
            torch.cuda.synchronize(x.device)

    return run


def ort_session(onnx_path: Path, threads: int, cuda: bool = False) -> Any:
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


def ort_runner(session: Any, shape: tuple[int, ...]) -> Callable[[], None]:
    """A no-argument ONNX Runtime run on a fixed random float32 batch of `shape`, for interleaved_times."""
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random(shape, dtype=np.float32)

    def run() -> None:
        session.run(None, {name: x})

    return run


def ort_latency(onnx_path: Path, shape: tuple[int, ...], threads: int, runs: int, warmup: int, cuda: bool = False) -> float:
    """Median ms per ONNX Runtime run on a random float32 batch of `shape`."""
    return median_ms(ort_runner(ort_session(onnx_path, threads, cuda), shape), runs, warmup)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux ru_maxrss is in KB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
