"""TFLite INT8 vs float32 report: INT8 boxes and scores against float32 on val images, and LiteRT latency at 1 thread.

python -m scripts.tflite_int8_report --cfg yolov5n.yaml yolov5_mobilenetv4.yaml yolov8n.yaml --imgsz 160 --data data/shapes.yaml
Needs requirements-mobile.txt. With --cfg (random weights) every BatchNorm's statistics are first estimated on the
calibration images (the dataset's train split) so activations have realistic ranges; --weights takes checkpoints instead.
Box error is relative to the largest float box coordinate; IoU pairs each image's 20 top-scoring float rows with the
same INT8 rows. Latency: the two files take turns every round (order alternating); medians of per-round bests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def bn_calibrated_checkpoint(cfg: str, data: str, imgsz: int, out: Path) -> Path:
    """A random-weight model of `cfg` (seed 0) whose BatchNorm statistics are averaged over 32 train images."""
    from models.model import DetectionModel
    from utils.checkpoint import save_checkpoint
    from utils.data.dataset_config import load_dataset_config
    from utils.export.quantize import calibration_images, letterboxed_images

    names = load_dataset_config(data)["names"]
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=len(names))
    images = np.stack(list(letterboxed_images(calibration_images(data, limit=32), (imgsz, imgsz))))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    with torch.no_grad():
        for i in range(0, len(images), 8):
            model(torch.from_numpy(images[i : i + 8]))
    return save_checkpoint(out / f"{Path(cfg).stem}.pt", model.eval(), names=names)


def rows_last(y: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """Head output as (B, N, C) rows, whatever the head's layout."""
    from utils.runtime.tflite import box_channel_axis

    return y if box_channel_axis(metadata) == 2 else y.transpose(0, 2, 1)


def top_box_iou(y: np.ndarray, ref: np.ndarray, k: int = 20) -> float:
    """Mean IoU of each image's top-k float rows (by best score channel) with the same rows of `y`; (B, N, C) xywh."""
    ious = []
    for yi, ri in zip(y, ref):
        top = np.argsort(-ri[:, 4:].max(1))[:k]
        a, b = yi[top, :4], ri[top, :4]
        lo = np.maximum(a[:, :2] - a[:, 2:] / 2, b[:, :2] - b[:, 2:] / 2)
        hi = np.minimum(a[:, :2] + a[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2)
        inter = np.clip(hi - lo, 0, None).prod(1)
        ious.append(inter / (a[:, 2:].prod(1) + b[:, 2:].prod(1) - inter))
    return float(np.concatenate(ious).mean())


def compare(fp32: Path, int8: Path, data: str, imgsz: int, n_val: int) -> dict[str, float]:
    """INT8 vs float32 .tflite on n_val val images: box error / box scale, score errors, top-20 IoU, wh correlation."""
    from utils.data.dataset_config import load_dataset_config
    from utils.export.quantize import _list_images, letterboxed_images
    from utils.runtime.tflite import TfliteRunner

    val = load_dataset_config(data)["val"]
    files = _list_images(Path(val[0] if isinstance(val, list) else val))[:n_val]
    x = np.stack(list(letterboxed_images(files, (imgsz, imgsz))))
    runners = [TfliteRunner(p) for p in (fp32, int8)]
    ref, y = (rows_last(r(x), r.metadata) for r in runners)
    box, score = np.abs(y[..., :4] - ref[..., :4]), np.abs(y[..., 4:] - ref[..., 4:])
    scale = float(np.abs(ref[..., :4]).max())
    wh_corr = float(np.corrcoef(np.log(y[..., 2:4].ravel().clip(1e-6)), np.log(ref[..., 2:4].ravel()))[0, 1])
    return {"box_max": float(box.max()) / scale, "box_mean": float(box.mean()) / scale, "score_max": float(score.max()),
            "score_rms": float(np.sqrt((score**2).mean())), "iou_top20": top_box_iou(y, ref), "wh_corr": wh_corr}  # fmt: skip


def interleaved_ms(paths: list[Path], imgsz: int, rounds: int, per_round: int, threads: int = 1) -> list[float]:
    """Median over rounds of each file's best-of-per_round latency (ms), the files taking turns in alternating order."""
    from utils.runtime.tflite import TfliteRunner

    runners = [TfliteRunner(p, num_threads=threads) for p in paths]
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for r in runners:
        r(x)  # warm-up
    best: list[list[float]] = [[] for _ in runners]
    for k in range(rounds):
        order = range(len(runners)) if k % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            times = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                runners[i](x)
                times.append((time.perf_counter() - t0) * 1e3)
            best[i].append(min(times))
    return [statistics.median(b) for b in best]


def report(weights: Path, opt: argparse.Namespace, out: Path) -> str:
    """One markdown row: model, errors of INT8 against float32, latencies and sizes."""
    from utils.export.exporter import export_model

    common = dict(weights=weights, include=["tflite"], imgsz=opt.imgsz)
    (fp32,) = export_model(**common, output=out / f"{weights.stem}_float32.tflite")
    (int8,) = export_model(**common, int8=True, data=opt.data, n_calib=opt.n_calib, output=out / f"{weights.stem}_int8.tflite")
    m = compare(fp32, int8, opt.data, opt.imgsz, opt.n_val)
    ms = interleaved_ms([fp32, int8], opt.imgsz, opt.rounds, opt.per_round)
    mb = [p.stat().st_size / 1e6 for p in (fp32, int8)]
    return (f"| {weights.stem} | {opt.imgsz} | {m['box_max']:.3f} / {m['box_mean']:.4f} | {m['score_max']:.3f} / {m['score_rms']:.4f} "
            f"| {m['iou_top20']:.3f} | {m['wh_corr']:.3f} | {ms[0]:.2f} / {ms[1]:.2f} ({ms[1] / ms[0]:.2f}x) "
            f"| {mb[0]:.1f} / {mb[1]:.1f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> list[str]:
    """Export float32 and INT8 .tflite files of every model and print one markdown table."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--cfg", nargs="*", default=[], help="model yamls (random weights, BN statistics from --data)")
    p.add_argument("--weights", nargs="*", default=[], type=Path, help="trained checkpoints")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--per-round", type=int, default=5)
    opt = p.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tflite_int8_") as tmp:
        weights = opt.weights + [bn_calibrated_checkpoint(c, opt.data, opt.imgsz, Path(tmp)) for c in opt.cfg]
        rows = [report(w, opt, Path(tmp)) for w in weights]
    lines = [f"LiteRT, 1 thread, batch 1, {opt.rounds} interleaved rounds x best of {opt.per_round}; {os.cpu_count()} cores; "
             f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after",
             "| model | imgsz | box err max / mean (of box scale) | score err max / RMS | top-20 IoU | wh corr "
             "| ms float32 / int8 | MB float32 / int8 |",
             "|---|---|---|---|---|---|---|---|", *rows]  # fmt: skip
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
