"""INT8 vs float ONNX report: export both, time them interleaved (ONNX Runtime CPU) and validate both; markdown table.

python -m scripts.int8_report --weights runs/train/demo/weights/best.pt --imgsz 320 640 --data data/shapes.yaml
Latency: in every round the two models take turns (the order alternating between rounds) and each records its best of
--per-round runs; reported are the median per model and the median of the per-round int8/float ratios, so machine
noise hits both alike. The load average before and after is printed: repeat the run if it exceeds the core count.
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

QUANTISED_CONVS = ("QLinearConv", "ConvInteger")


def export_pair(weights: str, imgsz: int, data: str, out: Path, opt: argparse.Namespace) -> tuple[Path, Path]:
    """Export float ONNX with the exporter, then quantise it with this run's quantize_onnx options (metadata kept)."""
    import onnx

    from utils.export.exporter import export_model
    from utils.export.quantize import calibration_images, quantize_onnx

    fp32 = Path(export_model(weights=weights, include=["onnx"], imgsz=imgsz, output=out / f"fp32_{imgsz}.onnx")[0])
    int8 = out / f"int8_{imgsz}.onnx"
    images = calibration_images(data, limit=opt.n_calib)
    quantize_onnx(fp32, int8, images, imgsz, n_calib=opt.n_calib, per_channel=not opt.per_tensor, activation_type=opt.activation_type,
                  calibrate_method=opt.calibrate_method, keep_float_ops=opt.keep_float_ops,
                  reduce_range=not opt.full_range_weights)  # fmt: skip
    proto = onnx.load(str(int8))
    del proto.metadata_props[:]
    proto.metadata_props.extend(onnx.load(str(fp32)).metadata_props)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "int8", "true"
    onnx.save(proto, str(int8))
    return fp32, int8


def interleaved_ms(paths: list[Path], threads: int, rounds: int, per_round: int) -> tuple[list[float], float]:
    """Median ms of each model over interleaved rounds, and the median per-round ratio of the last to the first."""
    from utils.timing import ort_session

    sessions = [ort_session(p, threads) for p in paths]
    name = sessions[0].get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in sessions[0].get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for s in sessions:  # warm-up: first runs allocate and pre-pack weights
        for _ in range(3):
            s.run(None, {name: x})
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            times[i].append(min(_run_ms(sessions[i], name, x) for _ in range(per_round)))
    ratio = statistics.median(b / a for a, b in zip(times[0], times[-1]))
    return [statistics.median(t) for t in times], ratio


def _run_ms(session: Any, name: str, x: np.ndarray) -> float:
    """Wall time of one session.run in milliseconds."""
    t0 = time.perf_counter()
    session.run(None, {name: x})
    return (time.perf_counter() - t0) * 1e3


def validate(path: Path, imgsz: int, data: str) -> tuple[float, float]:
    """(mAP50, mAP50-95) of an exported model on the dataset's val split."""
    import val

    with tempfile.TemporaryDirectory(prefix="int8_val_") as tmp:
        results = val.run(data=data, weights=str(path), imgsz=imgsz, batch_size=1, workers=0, plots=False, project=tmp, quiet=True)[0]
    return float(results[2]), float(results[3])


def graph_summary(path: Path) -> str:
    """What ORT runs: quantised vs float convs in the optimised graph, and DequantizeLinear->QuantizeLinear pairs left."""
    from utils.export.quantize import dequantize_quantize_pairs, optimized_graph

    proto = optimized_graph(path)
    ops = Counter(n.op_type for n in proto.graph.node)
    q = sum(ops[o] for o in QUANTISED_CONVS)
    return f"{q} quantised / {ops['Conv']} float Conv, {len(dequantize_quantize_pairs(proto))} DQ->Q pairs"


def report(opt: argparse.Namespace, imgsz: int, out: Path) -> list[str]:
    """Markdown rows for one image size: latency per thread count, ratio, mAP of float and int8."""
    fp32, int8 = export_pair(opt.weights, imgsz, opt.data, out, opt)
    lat = {t: interleaved_ms([fp32, int8], t, opt.rounds, opt.per_round) for t in opt.threads}
    maps = [validate(p, imgsz, opt.data) for p in (fp32, int8)]
    rows = []
    for k, (label, path) in enumerate((("float32", fp32), ("int8", int8))):
        cells = [f"{lat[t][0][k]:.2f}" + ("" if k == 0 else f" ({lat[t][1]:.2f}x)") for t in opt.threads]
        mb = path.stat().st_size / 1e6
        rows.append(f"| {imgsz} | {label} | " + " | ".join(cells) + f" | {maps[k][0]:.4f} | {maps[k][1]:.4f} | {mb:.1f} |")
    delta = 100 * (maps[1][1] - maps[0][1])
    ratios = " | ".join(f"ratio {lat[t][1]:.3f}" for t in opt.threads)
    rows.append(f"| {imgsz} | int8 vs float | {ratios} | | {delta:+.2f} pt | |")
    print(f"imgsz {imgsz}: int8 graph: {graph_summary(int8)}", flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--imgsz", type=int, nargs="+", default=[320])
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--n-calib", type=int, default=300)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per output channel")
    p.add_argument("--activation-type", default="uint8", choices=["uint8", "int8"])
    p.add_argument("--calibrate-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--full-range-weights", action="store_true", help="8-bit weights (default 7-bit: no x86 int8 kernel saturates)")
    p.add_argument("--keep-float-ops", nargs="*", default=[], help="op types left float, e.g. Sigmoid Mul")
    p.add_argument("--out", type=Path, default=None, help="keep the exported models here (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    """Run the report for every --imgsz and print one markdown table."""
    opt = parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="int8_report_") as tmp:
        out = opt.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        rows = [row for s in opt.imgsz for row in report(opt, s, out)]
    ms = " | ".join(f"ms {t} thread{'s' if t > 1 else ''}" for t in opt.threads)
    lines = [
        f"ONNX Runtime CPU, batch 1, {opt.rounds} interleaved rounds x best of {opt.per_round}; {os.cpu_count()} cores; "
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after",
        "",
        f"| imgsz | model | {ms} | mAP50 | mAP50-95 | MB |",
        "|---|---|" + "---|" * len(opt.threads) + "---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
