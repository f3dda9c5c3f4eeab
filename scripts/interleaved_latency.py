"""Interleaved ONNX Runtime CPU latency: models take turns in every round, so machine noise hits all of them alike.

PYTHONPATH=. python scripts/interleaved_latency.py --cfg models/yolov5s.yaml models/yolov5_mobilenetv4.yaml --imgsz 640 --rounds 15
Reports per model the median over rounds of the per-round best-of-N time, and the median per-round ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from models.yolo import DetectionModel
from utils.export.formats import export_onnx_model
from utils.timing import ort_session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", nargs="+", required=True)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--unfused", nargs="*", default=[], help="configs to also time before re-parameterisation")
    opt = p.parse_args()
    x = np.random.rand(1, 3, opt.imgsz, opt.imgsz).astype(np.float32)
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in opt.cfg + [f"{c}#trainform" for c in opt.unfused]:
            name = Path(cfg.split("#")[0]).stem + ("_trainform" if "#" in cfg else "")
            model = DetectionModel(cfg.split("#")[0]).eval()
            if "#" not in cfg:
                model.fuse()
            path = export_onnx_model(model, Path(tmp) / f"{name}.onnx", (opt.imgsz, opt.imgsz))
            sessions[name] = ort_session(path, opt.threads)
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for _ in range(opt.rounds):
            for name, s in sessions.items():
                inp = s.get_inputs()[0].name
                s.run(None, {inp: x})
                best = min(_timed(s, inp, x) for _ in range(opt.per_round))
                times[name].append(best)
    base = next(iter(times))
    print(f"ONNX Runtime CPU, {opt.imgsz}x{opt.imgsz}, batch 1, threads {opt.threads or 'all'}, {opt.rounds} interleaved rounds")
    print("| model | median ms | ratio to " + base + " |\n|---|---|---|")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, times[base]))
        print(f"| {name} | {statistics.median(t):.1f} | {ratio:.3f} |")


def _timed(session, inp: str, x: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    session.run(None, {inp: x})
    return (time.perf_counter() - t0) * 1e3


if __name__ == "__main__":
    main()
