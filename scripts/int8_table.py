"""INT8 vs float ONNX latency of every shipped detection and segmentation config, one interleaved run (ONNX Runtime CPU,
markdown table).

python -m scripts.int8_table --imgsz 320 --threads 1 2 --rounds 7 --per-round 3 --wait-load 1.5
Every config whose head allows --int8 to ONNX (HeadPolicy.allows_int8; -cls configs are classifiers) is built with
random weights, its BatchNorm statistics estimated on random images (so activations have realistic ranges), fused,
exported to float ONNX and quantised with the exporter's defaults (utils/export/quantize.py), calibrated on
--n-calib images of --data. Latency: for each config, every round runs float and INT8 at each thread count in turn
(the order reversed every other round), each the best of --per-round calls after the warm-up; reported are the median
per model and the median of the per-round INT8/float ratios. The 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def shipped_configs(names: list[str] | None) -> list[Path]:
    """models/*.yaml minus classifiers (or the given names), sorted."""
    if names:
        return [Path(n) if Path(n).exists() else ROOT / "models" / n for n in names]
    return sorted(p for p in (ROOT / "models").glob("*.yaml") if not p.stem.endswith("-cls"))


def calibrate_bn(model: nn.Module, shape: tuple[int, ...], steps: int = 3, seed: int = 0) -> nn.Module:
    """Estimate every BatchNorm's running statistics on random images (cumulative average); returns the model in eval."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    for name, p in model.named_parameters():
        if name.split(".")[-1] == "gamma":  # layer scale: its 1e-5 init would shrink the signal to nothing
            p.data.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.25)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.rand(shape, generator=gen))
    return model.eval()


def export_pair(cfg: Path, imgsz: int, images: list[Path], out: Path, n_calib: int) -> tuple[Path, Path] | None:
    """(float ONNX, INT8 ONNX) of a BN-calibrated random-init model of `cfg`; None if its head has no INT8 export."""
    from models.model import DetectionModel
    from utils.export.formats import export_onnx_model
    from utils.export.quantize import quantize_onnx

    torch.manual_seed(0)
    model = DetectionModel(str(cfg), nc=80)
    if model.head.policy.task not in ("detect", "segment") or not model.head.policy.allows_int8("onnx"):
        print(f"{cfg.stem}: skipped ({model.head.policy.title} models have no ONNX INT8 export)", flush=True)
        return None
    calibrate_bn(model, (4, 3, imgsz, imgsz))
    model.fuse()
    fp32 = export_onnx_model(model, out / f"{cfg.stem}.onnx", (imgsz, imgsz))
    return Path(fp32), quantize_onnx(fp32, out / f"{cfg.stem}_int8.onnx", images, imgsz, n_calib=n_calib)


def graph_counts(path: Path) -> Counter:
    """Op counts of the graph ONNX Runtime runs (after its QDQ fusions)."""
    from utils.export.quantize import optimized_graph

    return Counter(n.op_type for n in optimized_graph(path).graph.node)


def _best_ms(session: Any, feed: dict[str, np.ndarray], n: int) -> float:
    """Best wall time of n session.run calls, in ms."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def interleaved(
    pair: tuple[Path, Path], threads: list[int], rounds: int, per_round: int, warmup: int
) -> dict[int, tuple[float, float, float]]:
    """{threads: (float ms, INT8 ms, median per-round INT8/float ratio)}: all sessions take turns every round."""
    from utils.timing import ort_session

    keys = [(t, k) for t in threads for k in range(2)]
    sessions = {key: ort_session(pair[key[1]], key[0]) for key in keys}
    first = sessions[keys[0]].get_inputs()[0]
    feed = {first.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in first.shape], dtype=np.float32)}
    for s in sessions.values():
        _best_ms(s, feed, warmup)  # discarded: allocation and weight pre-packing
    times: dict[tuple[int, int], list[float]] = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            times[key].append(_best_ms(sessions[key], feed, per_round))
    out = {}
    for t in threads:
        ratio = statistics.median(b / a for a, b in zip(times[(t, 0)], times[(t, 1)]))
        out[t] = (statistics.median(times[(t, 0)]), statistics.median(times[(t, 1)]), ratio)
    return out


def op_profile(path: Path, threads: int, runs: int = 20) -> dict[str, float]:
    """ms per run spent in each op type (ORT's profiler, kernel time only, after one discarded run), largest first."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    feed = {first.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in first.shape], dtype=np.float32)}
    for _ in range(runs + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 1)
    return dict(per_op.most_common())


def print_profiles(pairs: dict[Path, tuple[Path, Path]], threads: list[int]) -> None:
    """Per-op-type kernel ms of float and INT8 at each thread count (where the time goes; not the latency table)."""
    for cfg, pair in pairs.items():
        for t in threads:
            for label, path in zip(("float", "INT8"), pair):
                ops = op_profile(path, t)
                top = ", ".join(f"{k} {v:.2f}" for k, v in list(ops.items())[:6])
                print(f"profile {cfg.stem} {label} {t}T: {sum(ops.values()):.2f} ms in kernels: {top}", flush=True)


def wait_for_load(limit: float, poll_s: float = 30, most_s: float = 600) -> float:
    """Poll the 1-minute load average until it is under `limit` (at most `most_s`); returns the last reading."""
    t0 = time.monotonic()
    while (load := os.getloadavg()[0]) >= limit and time.monotonic() - t0 < most_s:
        print(f"load {load:.2f} >= {limit}: waiting", flush=True)
        time.sleep(poll_s)
    return load


def row(cfg: Path, pair: tuple[Path, Path], lat: dict[int, tuple[float, float, float]], threads: list[int]) -> str:
    """One markdown row: float ms, INT8 ms and ratio per thread count, and what ORT runs in int8 / float."""
    ops = graph_counts(pair[1])
    cells = " | ".join(f"{lat[t][0]:.1f} | {lat[t][1]:.1f} | **{lat[t][2]:.2f}x**" for t in threads)
    quant = f"{ops['QLinearConv']} QLinearConv, {ops['Conv'] + ops['FusedConv']} float Conv, {ops['QLinearSigmoid']} QLinearSigmoid"
    return f"| {cfg.stem} | {cells} | {quant} |"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--cfg", nargs="*", default=None, help="config names or paths (default: every detection config)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--data", default="data/shapes.yaml", help="dataset yaml or image folder for INT8 calibration")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--wait-load", type=float, default=0.0, help="before timing, wait (<= 10 min) for a 1-min load under this")
    p.add_argument("--profile", action="store_true", help="only print where the time goes per op type (ORT profiler)")
    p.add_argument("--out", type=Path, default=None, help="keep the ONNX files here (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    """Export every config's float/INT8 pair, then time them (one interleaved run) and print one markdown table."""
    from utils.export.quantize import calibration_images

    opt = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="int8_table_") as tmp:
        out = opt.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        images = calibration_images(opt.data, limit=opt.n_calib)
        pairs = {cfg: pair for cfg in shipped_configs(opt.cfg) if (pair := export_pair(cfg, opt.imgsz, images, out, opt.n_calib))}
        if opt.profile:
            print_profiles(pairs, opt.threads)
            return []
        before = wait_for_load(opt.wait_load) if opt.wait_load else os.getloadavg()[0]
        rows = []
        for cfg, pair in pairs.items():
            rows.append(row(cfg, pair, interleaved(pair, opt.threads, opt.rounds, opt.per_round, opt.warmup), opt.threads))
            print(rows[-1], flush=True)
    head = " | ".join(f"float ms {t}T | INT8 ms {t}T | ratio {t}T" for t in opt.threads)
    lines = [
        f"ONNX Runtime CPU, imgsz {opt.imgsz}, batch 1, {opt.rounds} interleaved rounds x best of {opt.per_round} "
        f"({opt.warmup} warm-up runs discarded); {os.cpu_count()} cores; 1-min load {before:.2f} before, {os.getloadavg()[0]:.2f} after",
        "",
        f"| config | {head} | INT8 graph as ORT runs it |",
        "|---|" + "---|---|---|" * len(opt.threads) + "---|",
        *rows,
    ]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
