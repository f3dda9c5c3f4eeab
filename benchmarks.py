"""Benchmark models side by side in interleaved rounds: params, GFLOPs, CPU/GPU latency with spreads and ratios, optional mAP.

python benchmarks.py --cfg models/yolov5n.yaml models/yolov5_mobilenetv4.yaml --img 320       # configs x backends, interleaved
python benchmarks.py --cfg models/*.yaml --sizes 320 640 --write-docs                         # regenerate docs/benchmarks.md
python benchmarks.py --weights best.pt --formats --img 320 --data data/shapes.yaml --hard-fail 0.3   # every export format
python benchmarks.py --train-throughput --cfg models/yolov5_mobilenetv4.yaml --imgsz 320
python benchmarks.py --loader --imgsz 640      # training loader images/s (mosaic), one process and one thread

Latency is measured in rounds: every round, each model (and backend, or export format) in turn runs --warmup untimed
then --block consecutive timed forwards, so load from other processes hits all of them alike. Reported: the median over
rounds of each round's block median, its IQR across rounds, and the median per-round ratio to the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from models.flops import count_gflops
from models.mobileone import MobileOneUnit
from models.model import DetectionModel
from utils.checkpoint import CheckpointError, load_model
from utils.cli import check_img_size, error_boundary, shell_command
from utils.files import claim_new_files
from utils.logs import set_logging
from utils.paths import ROOT
from utils.timing import (
    LatencyStats,
    interleaved_times,
    ort_runner,
    ort_session,
    restored_threads,
    set_threads,
    summarize,
    system_info,
    torch_latency,
    torch_runner,
)

LOGGER = logging.getLogger("mobile_yolo")
BACKENDS = ("pytorch", "onnx", "cuda", "onnx-cuda")
BACKEND_LABELS = {"pytorch": "PyTorch CPU", "onnx": "ONNX Runtime CPU", "cuda": "PyTorch GPU fp16", "onnx-cuda": "ONNX Runtime GPU"}
FORMAT_LABELS = {"pytorch": "PyTorch", "torchscript": "TorchScript", "onnx": "ONNX", "openvino": "OpenVINO", "engine": "TensorRT",
                 "coreml": "CoreML", "tflite": "TensorFlow Lite", "ncnn": "NCNN"}  # fmt: skip
DOCS = ROOT / "docs" / "benchmarks.md"


def build(spec: str) -> tuple[str, DetectionModel]:
    """A model from a yaml (random weights) or a .pt checkpoint, in eval mode on the CPU."""
    if spec.endswith(".pt"):
        return Path(spec).stem, load_model(spec)
    return Path(spec).stem, DetectionModel(spec).eval()


def export_onnx(model: DetectionModel, out: Path, imgsz: tuple[int, int], batch: int) -> Path:
    """Static-shape ONNX of the model as given (through export.py's ONNX writer)."""
    from utils.export.formats import export_onnx_model

    return export_onnx_model(model, out, imgsz, batch_size=batch)


# ----------------------------------------------------------------------------------------------------------------- configs


@dataclass
class Variant:
    """One table row: a model in the form it is timed in (fused, or MobileOne's unfused training form)."""

    name: str
    spec: str
    model: DetectionModel
    params: int
    params_fused: int | None


def load_variants(opt: argparse.Namespace) -> list[Variant]:
    """Every --weights/--cfg model fused (plus its unfused form with --unfused for MobileOne), names made unique."""
    variants: list[Variant] = []
    for spec in opt.models:
        try:
            name, model = build(spec)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise SystemExit(f"benchmarks: error: {e}") from None
        while any(v.name == name for v in variants):
            name += "#2"
        params = sum(p.numel() for p in model.parameters())
        unfused = copy.deepcopy(model) if opt.unfused and any(isinstance(m, MobileOneUnit) for m in model.modules()) else None
        model.fuse()
        variants.append(Variant(name, spec, model, params, sum(p.numel() for p in model.parameters())))
        if unfused is not None:
            variants.append(Variant(f"{name} (unfused)", spec, unfused, params, None))
    return variants


def resolve_backends(opt: argparse.Namespace) -> list[str]:
    """--backends (default pytorch onnx) plus their GPU twins when CUDA is present; --no-cpu drops the CPU ones."""
    wanted = list(dict.fromkeys(opt.backends or ["pytorch", "onnx"]))
    if torch.cuda.is_available() and (opt.backends is None or opt.no_cpu):
        wanted += [twin for b, twin in (("pytorch", "cuda"), ("onnx", "onnx-cuda")) if b in wanted]
    if opt.no_cpu:
        wanted = [b for b in wanted if b not in ("pytorch", "onnx")]
    if "onnx-cuda" in wanted:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            LOGGER.warning("WARNING: onnxruntime has no CUDA provider (pip install onnxruntime-gpu); skipping onnx-cuda")
            wanted.remove("onnx-cuda")
    if not wanted:
        raise SystemExit("benchmarks: error: no backend left to time (GPU backends need CUDA)")
    return list(dict.fromkeys(wanted))


def make_runner(
    v: Variant, backend: str, size: tuple[int, int], opt: argparse.Namespace, onnx_file: Callable[[], Path]
) -> Callable[[], None]:
    """A no-argument forward of variant `v` on `backend` at `size` (batch --batch-size), for interleaved_times."""
    shape = (opt.batch_size, 3, *size)
    if backend == "pytorch":
        return torch_runner(v.model, torch.rand(shape))
    if backend == "onnx":
        return ort_runner(ort_session(onnx_file(), opt.threads), shape)
    if backend == "onnx-cuda":
        return ort_runner(ort_session(onnx_file(), 0, cuda=True), shape)
    dev = torch.device("cuda", 0)
    return torch_runner(copy.deepcopy(v.model).to(dev).half(), torch.rand(shape, device=dev).half())


def gpu_extras(v: Variant, size: tuple[int, int], opt: argparse.Namespace) -> dict[str, Any]:
    """fp16 batch-32 throughput and peak GPU memory of one variant (one block, not interleaved: a capacity figure)."""
    dev = torch.device("cuda", 0)
    gpu = copy.deepcopy(v.model).to(dev).half()
    torch.cuda.reset_peak_memory_stats(dev)
    ms32 = torch_latency(gpu, (32, 3, *size), dev, True, max(opt.block, 5), opt.warmup)
    out = {"gpu_fp16_b32_img_s": round(32 / ms32 * 1e3), "gpu_peak_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20)}
    del gpu
    torch.cuda.empty_cache()
    return out


def rounds_plan(opt: argparse.Namespace) -> tuple[int, int]:
    """(rounds, block): interleaved by default; --sequential runs each model's rounds x block back to back instead."""
    return (1, opt.rounds * opt.block) if opt.sequential else (opt.rounds, opt.block)


def stats_columns(prefix: str, s: LatencyStats) -> dict[str, float]:
    """CSV-ready columns of one backend's stats: ms, quartiles, range and ratio with its range."""
    vals = {"ms": s.median, "q1": s.q1, "q3": s.q3, "min": s.lo, "max": s.hi, "x": s.ratio, "x_min": s.ratio_lo, "x_max": s.ratio_hi}
    return {f"{prefix}_{k}": round(v, 3) for k, v in vals.items()}


def bench_size(variants: list[Variant], backends: list[str], size: tuple[int, int], opt: argparse.Namespace, tmp: Path) -> list[dict]:
    """One interleaved run of every variant x backend at `size`; one row per variant."""
    runners: dict[tuple[str, str], Callable[[], None]] = {}
    for i, v in enumerate(variants):
        cache: dict[str, Path] = {}

        def onnx_file(v: Variant = v, i: int = i, cache: dict[str, Path] = cache) -> Path:
            if "p" not in cache:
                cache["p"] = export_onnx(v.model, tmp / f"m{i}_{size[0]}x{size[1]}.onnx", size, opt.batch_size)
            return cache["p"]

        for b in backends:
            runners[(v.name, b)] = make_runner(v, b, size, opt, onnx_file)
    LOGGER.warning(f"{size[0]}x{size[1]}: timing {len(runners)} model x backend pairs in {rounds_plan(opt)[0]} rounds")
    times = interleaved_times(runners, *rounds_plan(opt), warmup=opt.warmup)
    del runners
    rows = [{"model": v.name, "imgsz": f"{size[0]}x{size[1]}", "params": v.params, "params_fused": v.params_fused,
             "gflops": round(count_gflops(v.model, size), 2)} for v in variants]  # fmt: skip
    for b in backends:
        stats = summarize({k[0]: t for k, t in times.items() if k[1] == b}, opt.baseline_name)
        for row in rows:
            row.update(stats_columns(b, stats[row["model"]]))
    if "cuda" in backends:
        for row, v in zip(rows, variants):
            row.update(gpu_extras(v, size, opt))
    return rows


def add_maps(rows: list[dict], variants: list[Variant], opt: argparse.Namespace) -> None:
    """mAP50-95 / mAP50 of every fused checkpoint row on --data (same loader and evaluator for all)."""
    from utils.data.dataset_config import load_dataset_config
    from utils.device import select_device
    from utils.runtime.backend import DetectBackend

    dev, data = select_device(opt.device or "cpu"), load_dataset_config(opt.data)
    for row, v in zip(rows, variants):
        if v.spec.endswith(".pt") and v.params_fused is not None:
            backend = DetectBackend(v.spec, device=dev)
            row["mAP50-95"], row["mAP50"] = evaluate_map(backend, data, int(row["imgsz"].split("x")[0]), dev, batch=16)


def evaluate_map(backend: Any, data: dict, imgsz: int, device: torch.device, batch: int = 1) -> tuple[float, float]:
    """(mAP50-95, mAP50) of a DetectBackend on data's val split: square letterbox at imgsz, its task's val.py loop."""
    from utils.evaluation.evaluator import DetectionEvaluator
    from utils.tasks import task_of

    task = task_of(backend)
    evaluator = task.evaluator(int(data["nc"]), list(data["names"]))
    if not isinstance(evaluator, DetectionEvaluator):  # the table's columns are box mAP
        raise ValueError(f"{backend.weights}: the benchmark table scores box mAP; score a {task.what} with {task.val_script}")
    loader = task.val_loader(data, "val", imgsz, batch, int(backend.stride), rect=False, single_cls=False, workers=0, pad=0.0)
    result = task.validate(backend, loader, evaluator, device=device, quiet=True)
    return round(float(result.map), 4), round(float(result.map50), 4)


# ------------------------------------------------------------------------------------------------------------- rendering


def _fmt_range(lo: float, hi: float, digits: int) -> str:
    return f"{lo:.{digits}f}–{hi:.{digits}f}"


def config_table(rows: list[dict], backends: list[str], baseline: str) -> list[str]:
    """Markdown table of a config run: size figures, then per backend median ms, IQR and ratio to the baseline (range)."""
    cols = ["model", "params", "fused params", "GFLOPs"]
    for b in backends:
        cols += [f"{BACKEND_LABELS[b]} ms", "IQR", f"× {baseline} (range)"]
    extra = [k for k in ("gpu_fp16_b32_img_s", "gpu_peak_mb", "mAP50-95", "mAP50") if any(k in r for r in rows)]
    lines = ["| " + " | ".join(cols + extra) + " |", "|" + "---|" * len(cols + extra)]
    for r in rows:
        fused = f"{r['params_fused'] / 1e6:.2f}M" if r["params_fused"] is not None else "(unfused)"
        cells = [r["model"], f"{r['params'] / 1e6:.2f}M", fused, f"{r['gflops']:.2f}"]
        for b in backends:
            cells += [f"{r[f'{b}_ms']:.1f}", _fmt_range(r[f"{b}_q1"], r[f"{b}_q3"], 1),
                      f"{r[f'{b}_x']:.2f} ({_fmt_range(r[f'{b}_x_min'], r[f'{b}_x_max'], 2)})"]  # fmt: skip
        cells += [str(r.get(k, "")) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def header_lines(info: dict[str, Any], opt: argparse.Namespace, what: str) -> list[str]:
    """The facts every table carries: date, machine, threads, library versions and how latency was measured."""
    rounds, block = rounds_plan(opt)
    order = "one block per model (--sequential)" if opt.sequential else "round-robin, interleaved"
    return [
        f"Date: {info['date']}. CPU: {info['cpu']} ({info['cores']} cores), torch/ONNX Runtime threads: {info['threads']}, "
        f"1-min load average at start: {info['load_1min']}, GPU: {info['gpu']}.",
        f"Python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}, openvino {info['openvino']}.",
        f"{what}: batch {opt.batch_size}; {rounds} round(s) ({order}), in each every entry runs {opt.warmup} warm-up + {block} timed "
        "consecutive forwards. ms = median over rounds of each round's block median; IQR across rounds; ratio = median of the "
        "per-round ratios to the baseline (min–max across rounds in brackets).",
    ]


def write_tables(rows: list[dict[str, Any]], out: Path, md: list[str]) -> tuple[Path, Path]:
    """Print the Markdown lines and write them to `out`.md, and every row's raw columns to `out`.csv (suffixes appended:
    --out exp.v1 gives exp.v1.md); where either exists, to the next free out-2, out-3, ... pair, as runs/ folders are
    numbered, so no earlier result is ever replaced and this run's minutes of measuring are never thrown away."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out.parent.mkdir(parents=True, exist_ok=True)
    md_file, csv_file = claim_new_files(out, (".md", ".csv"))
    md_file.write_text("\n".join(md) + "\n", encoding="utf-8")
    csv = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    csv_file.write_text("\n".join(csv) + "\n", encoding="utf-8")
    print("\n".join(md))
    if md_file.name != f"{out.name}.md":
        print(f"\n{out}.md or {out.name}.csv exists already: this run is saved under a new name, {md_file.name}")
    print(f"\nSaved {md_file} and {csv_file}")
    return md_file, csv_file


def command_line(argv: list[str]) -> str:
    """The shell command that reproduces this run."""
    return shell_command("python", "benchmarks.py", *argv)


def docs_text(command: str, header: list[str], sections: list[tuple[str, list[str]]]) -> str:
    """docs/benchmarks.md: the generating command, the header, one table per image size and the open items."""
    lines = ["# Benchmarks", "", "Generated by one run of `benchmarks.py` (do not edit by hand; re-run it to refresh):", "", "```bash",
             command, "```", "", *[f"{h}  " for h in header], "",
             "Random weights (latency does not depend on them). `(unfused)` rows are MobileOne before re-parameterisation. "
             "Compare models through the ratio column: it is taken within each round, so machine load cancels out; absolute "
             "ms move with the load of the shared machine. On a machine shared with other jobs, `--threads 1` keeps the figures "
             "stable: multi-threaded PyTorch waits at every op's barrier whenever another process holds a core.", ""]  # fmt: skip
    for title, table in sections:
        lines += [f"## {title}", "", *table, ""]
    lines += ["## Not yet measured", "",
              "- GPU fp16 latency (batch 1), throughput (batch 32) and ONNX Runtime CUDA: `scripts/gpu_report.sh` on a CUDA machine.",
              "- mAP of every detector after the same short training: `scripts/train_compare.sh` (GPU recommended).",
              "- Every export format of one trained model (latency, mAP): `python benchmarks.py --weights best.pt --formats`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_configs(opt: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Config mode: every size's interleaved table, printed, saved to --out and optionally written to the docs."""
    threads = set_threads(opt.threads)
    info, backends = system_info(threads), resolve_backends(opt)
    variants = load_variants(opt)
    opt.baseline_name = opt.baseline or variants[0].name
    if opt.baseline_name not in [v.name for v in variants]:
        raise SystemExit(f"benchmarks: error: --baseline {opt.baseline} is none of the models ({', '.join(v.name for v in variants)})")
    rows: list[dict] = []
    sections: list[tuple[str, list[str]]] = []
    with tempfile.TemporaryDirectory(prefix="benchmarks_") as tmp:
        for size in opt.sizes:
            size_rows = bench_size(variants, backends, size, opt, Path(tmp))
            if opt.data and any(v.spec.endswith(".pt") for v in variants):
                add_maps(size_rows, variants, opt)
            sections.append((f"{size[0]}x{size[1]}", config_table(size_rows, backends, opt.baseline_name)))
            rows += size_rows
    header = header_lines(info, opt, "Latency")
    md = [f"Command: `{command_line(argv)}`", "", *header]
    for title, table in sections:
        md += ["", f"## {title}", "", *table]
    write_tables(rows, Path(opt.out), md)
    if opt.write_docs:
        Path(opt.write_docs).write_text(docs_text(command_line(argv), header, sections), encoding="utf-8")
        print(f"Wrote {opt.write_docs}")
    return rows


# --------------------------------------------------------------------------------------------------------------- formats


@dataclass
class FormatResult:
    """One export format's row: where it went, whether it ran, and its figures."""

    fmt: str
    path: Path | None = None
    status: str = "ok"  # ok | skipped | exported (no runtime here) | failed
    note: str = ""
    backend: Any = None
    map50_95: float | None = None
    map50: float | None = None
    stats: LatencyStats | None = None


def _missing_package(e: Exception) -> bool:
    """An ImportError, or a project error that names a package to install."""
    text = str(e).lower()
    return isinstance(e, ImportError) or any(s in text for s in ("pip install", "not installed", "needs the", "no module named"))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def export_format(weights: Path, fmt: str, size: tuple[int, int], tmp: Path, device: str) -> FormatResult:
    """Export `weights` to `fmt` under `tmp` (quietly); a missing package skips the format, any other error fails it."""
    from utils.export.exporter import export_model

    out = tmp / fmt
    out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            paths = export_model(weights=str(weights), include=[fmt], imgsz=size, device=device, output=str(out / weights.stem))
    except Exception as e:  # an export error of one format is a row of the table, not the end of the benchmark
        if _missing_package(e):
            return FormatResult(fmt, status="skipped", note=_first_line(e))
        return FormatResult(fmt, status="failed", note=f"export: {_first_line(e)}")
    return FormatResult(fmt, path=Path(paths[0]))


def open_format(res: FormatResult, size: tuple[int, int], device: torch.device, threads: int) -> None:
    """Load an exported format into DetectBackend and run it once; records why when it cannot run here."""
    from utils.runtime.backend import DetectBackend

    if res.fmt == "coreml" and sys.platform != "darwin":
        res.status, res.note = "exported", "no CoreML runtime off macOS"
        return
    try:
        res.backend = DetectBackend(res.path or "", device=device)
        if threads and res.backend.onnx and device.type == "cpu":
            res.backend.session = ort_session(Path(res.backend.weights), threads)  # DetectBackend's session uses every core
        res.backend.warmup((1, 3, *size))
    except Exception as e:  # a format that exports but cannot run is a row of the table too
        res.backend = None
        res.status, res.note = ("skipped", f"runtime: {_first_line(e)}") if _missing_package(e) else ("failed", f"run: {_first_line(e)}")


def size_mb(path: Path | None) -> float | None:
    """Size of a file or of every file in a folder, in MB."""
    if path is None or not path.exists():
        return None
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 1)


def formats_table(results: list[FormatResult]) -> list[str]:
    """YOLOv5-style table: format, status, size, mAP50-95, interleaved latency with IQR, ratio to PyTorch."""
    lines = ["| Format | Status | Size (MB) | mAP50-95 | mAP50 | Inference (ms) | IQR | × PyTorch (range) | Note |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        s = r.stats
        lat = [f"{s.median:.1f}", _fmt_range(s.q1, s.q3, 1), f"{s.ratio:.2f} ({_fmt_range(s.ratio_lo, s.ratio_hi, 2)})"] if s else ["-"] * 3
        maps = [f"{m:.4f}" if m is not None else "-" for m in (r.map50_95, r.map50)]
        cells = [FORMAT_LABELS.get(r.fmt, r.fmt), r.status, str(size_mb(r.path) or "-"), *maps, *lat, r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def hard_fail_message(results: list[FormatResult], floor: float | None) -> str | None:
    """One line naming every failed format and every mAP50-95 below `floor`; None when all passed (or no --hard-fail)."""
    if floor is None:
        return None
    bad = [f"{r.fmt} {r.note}" for r in results if r.status == "failed"]
    bad += [f"{r.fmt} mAP50-95 {r.map50_95:.4f} < {floor}" for r in results if r.map50_95 is not None and r.map50_95 < floor]
    return f"hard-fail: {'; '.join(bad)}" if bad else None


def format_results(opt: argparse.Namespace, tmp: Path, dev: torch.device, data: dict) -> list[FormatResult]:
    """Export, open, time (interleaved, PyTorch first) and validate every requested format."""
    from utils.export.exporter import FORMATS

    weights, size = Path(opt.models[0]), tuple(opt.imgsz)
    if not weights.is_file():
        raise SystemExit(f"benchmarks: error: {weights}: weights not found")
    unknown = [f for f in opt.formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"benchmarks: error: unknown --formats {unknown}; known: {', '.join(FORMATS)}")
    results = [FormatResult("pytorch", path=weights)]
    results += [export_format(weights, f, size, tmp, opt.device or "cpu") for f in (opt.formats or FORMATS)]
    for r in results:
        if r.status == "ok":
            open_format(r, size, dev, opt.threads)
    live = [r for r in results if r.backend is not None]
    x = torch.rand(opt.batch_size, 3, *size, device=dev)
    if live and live[0].fmt == "pytorch":
        times = interleaved_times({r.fmt: torch_runner(r.backend, x) for r in live}, *rounds_plan(opt), warmup=opt.warmup)
        stats = summarize(times, "pytorch")
        for r in live:
            r.stats = stats[r.fmt]
    for r in live:
        try:
            r.map50_95, r.map50 = evaluate_map(r.backend, data, size[0], dev)
        except Exception as e:  # a format whose outputs break validation fails its row, not the run
            r.status, r.note = "failed", f"val: {_first_line(e)}"
    return results


def run_formats(opt: argparse.Namespace, argv: list[str]) -> list[FormatResult]:
    """--formats mode: one checkpoint in every installed export format, side by side; exports live in a temp dir only."""
    from utils.data.dataset_config import load_dataset_config
    from utils.device import select_device

    info = system_info(set_threads(opt.threads))
    dev, data = select_device(opt.device or "cpu"), load_dataset_config(opt.data)
    with tempfile.TemporaryDirectory(prefix="benchmarks_formats_") as tmp:
        results = format_results(opt, Path(tmp), dev, data)
        what = f"Formats of {opt.models[0]} at {opt.imgsz[0]}x{opt.imgsz[1]}"
        md = [f"Command: `{command_line(argv)}`", "", *header_lines(info, opt, what),
              f"mAP on {data.get('yaml_file') or opt.data or 'the default dataset'} val split (square letterbox, batch 1).", "",
              *formats_table(results)]  # fmt: skip
        rows = [{"format": r.fmt, "status": r.status, "size_mb": size_mb(r.path), "mAP50-95": r.map50_95, "mAP50": r.map50,
                 **(stats_columns("latency", r.stats) if r.stats else {}), "note": r.note} for r in results]  # fmt: skip
    write_tables(rows, Path(opt.out + "_formats"), md)
    message = hard_fail_message(results, opt.hard_fail)
    if message:
        raise SystemExit(f"benchmarks: error: {message}")
    return results


# -------------------------------------------------------------------------------------------------- training throughput


def train_throughput(spec: str, opt: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the Trainer's own training step (data loading included) and of its data loader alone."""
    import time

    from utils.device import select_device
    from utils.engine.options import train_options
    from utils.engine.trainer import Trainer

    dev = select_device(opt.device)
    with tempfile.TemporaryDirectory() as tmp:
        topt = train_options(cfg=spec, data=opt.data, imgsz=opt.imgsz[0], batch_size=opt.train_batch, workers=opt.workers,
                             epochs=1, noplots=True, noval=True, noautoanchor=True, save_dir=tmp)
        trainer = Trainer(topt, dev)
        trainer.warmup_iters = -1  # time steady-state steps; the warm-up only changes learning rates

        def timed(with_model: bool) -> float:
            seen, t0 = 0, time.perf_counter()
            trainer.model.train()
            for i, (imgs, targets, _, _) in enumerate(trainer.train_loader):
                if with_model:
                    trainer.train_step(imgs.to(dev).float() / 255, targets, ni=i, epoch=0)
                seen += imgs.shape[0]
                if i + 1 >= opt.train_batches:
                    break
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return seen / (time.perf_counter() - t0)

        timed(True)  # warm-up slice (worker start-up, cudnn autotune)
        train_s, loader_s = timed(True), timed(False)
    return {"model": Path(spec).stem, "device": str(dev), "imgsz": opt.imgsz[0], "batch": opt.train_batch,
            "workers": opt.workers, "train_img_s": round(train_s, 1), "loader_only_img_s": round(loader_s, 1)}


def loader_dataset(opt: argparse.Namespace, tmp: Path) -> str:
    """Training images for --loader: --data's train split, else generated photo-sized JPEGs (--loader-sides)."""
    if opt.data:
        from utils.data.dataset_config import load_dataset_config

        train = load_dataset_config(opt.data)["train"]
        return str(train[0] if isinstance(train, list) else train)
    from utils.data.shapes_dataset import generate_shapes

    lo, hi = opt.loader_sides
    return str(generate_shapes(tmp / "loader", n_train=opt.loader_images, n_val=1, seed=0, sides=(lo, hi)) / "images" / "train")


def loader_throughput(opt: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s of the training loader's work (decode, mosaic, augmentation, collate) in this one process and thread:
    what one DataLoader worker delivers, with the default hyps of the anchor-free and anchor-based heads."""
    import time

    import cv2
    import numpy as np

    from utils.data.datasets import LoadImagesAndLabels
    from utils.engine.hyp import load_hyp

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = loader_dataset(opt, Path(tmp))
        for hyp_file in ("hyp.scratch-af.yaml", "hyp.scratch-low.yaml"):
            hyp = load_hyp(ROOT / "data/hyps" / hyp_file).as_dict()
            ds = LoadImagesAndLabels(path, opt.imgsz[0], opt.train_batch, augment=True, hyp=hyp)
            np.random.seed(0)
            n, b = opt.train_batches * opt.train_batch, opt.train_batch
            order = np.random.permutation(np.arange(n + b) % len(ds))
            LoadImagesAndLabels.collate_fn([ds[int(i)] for i in order[:b]])  # warm-up batch
            t0 = time.perf_counter()
            for start in range(b, n + b, b):
                LoadImagesAndLabels.collate_fn([ds[int(i)] for i in order[start:start + b]])
            rows.append({"hyp": hyp_file, "images": len(ds), "imgsz": opt.imgsz[0], "batch": b, "batches": opt.train_batches,
                         "loader_img_s": round(n / (time.perf_counter() - t0), 1)})
    return rows


def environment(opt: argparse.Namespace) -> str:
    """The one-line header of the throughput tables: machine, threads, versions, image size and batch."""
    info = system_info(opt.threads)
    return (f"{info['date']}, CPU: {info['cpu']} ({info['cores']} cores), threads: {info['threads']}, GPU: {info['gpu']}, "
            f"image {opt.imgsz[0]}x{opt.imgsz[1]}, batch {opt.batch_size}, torch {info['torch']}")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------ CLI


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--cfg", nargs="*", default=[], help="model yamls (random weights)")
    p.add_argument("--weights", nargs="*", default=[], help="trained .pt checkpoints (mAP with --data; the model of --formats)")
    p.add_argument("--imgsz", "--img", nargs="+", type=int, default=[640], help="h [w]")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="square sizes, one table each (overrides --imgsz)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0 = all cores)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--block", "--runs", type=int, default=5, help="timed consecutive forwards per entry per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards before each block")
    p.add_argument("--sequential", action="store_true", help="time each entry's rounds x block in one go (not interleaved)")
    p.add_argument("--baseline", default=None, help="model name the ratios refer to (default: the first)")
    p.add_argument("--backends", nargs="+", default=None, choices=BACKENDS, help="default: pytorch onnx (+ cuda twins on a GPU)")
    p.add_argument("--unfused", action="store_true", help="also time MobileOne models before re-parameterisation")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU backends (GPU-only report)")
    p.add_argument("--formats", nargs="*", default=None, help="benchmark --weights in these export formats (none named: all)")
    p.add_argument("--hard-fail", nargs="?", type=float, const=0.0, default=None, help="--formats: exit 1 on a failure or mAP50-95 < FLOOR")
    p.add_argument("--write-docs", nargs="?", const=str(DOCS), default=None, help="regenerate docs/benchmarks.md (or PATH) from this run")
    p.add_argument("--data", default=None, help="dataset yaml for mAP of --weights")
    p.add_argument("--device", default="")
    p.add_argument("--train-throughput", action="store_true", help="measure train.py's loop speed instead")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader", action="store_true", help="measure the training loader alone (one process, one thread)")
    p.add_argument("--loader-images", type=int, default=200, help="generated images for --loader without --data")
    p.add_argument("--loader-sides", nargs=2, type=int, default=[480, 640], help="side range of those images, pixels")
    p.add_argument("--out", default=str(ROOT / "runs/benchmarks/benchmarks"),
                   help="results go to OUT.md and OUT.csv (OUT-2.md ... when taken; never replaced)")
    opt = p.parse_args(argv)
    check_opt(p, opt)
    return opt


def check_opt(p: argparse.ArgumentParser, opt: argparse.Namespace) -> None:
    """Normalise sizes and model lists; reject combinations that cannot run (argparse's one-line error)."""
    opt.imgsz = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz[:2]
    opt.sizes = [(s, s) for s in opt.sizes] if opt.sizes else [tuple(opt.imgsz)]
    opt.models = opt.weights + opt.cfg
    opt.weights_given = bool(opt.weights)
    if not opt.models and not opt.loader:
        p.error("give --cfg and/or --weights (or --loader)")
    if opt.loader_images < 1 or not 16 <= opt.loader_sides[0] <= opt.loader_sides[1]:
        p.error("--loader-images must be >= 1 and --loader-sides two sizes 16 <= lo <= hi")
    if min(opt.rounds, opt.block) < 1 or opt.warmup < 0 or opt.threads < 0 or opt.batch_size < 1:
        p.error("--rounds, --block and --batch-size must be >= 1, --warmup and --threads >= 0")
    if opt.formats is not None and (len(opt.weights) != 1 or opt.cfg or not opt.weights[0].endswith(".pt")):
        p.error("--formats benchmarks exactly one --weights .pt checkpoint (and no --cfg)")
    if opt.formats is not None and (opt.imgsz[0] != opt.imgsz[1] or opt.batch_size != 1):
        p.error("--formats exports and validates batch-1 square images: give one --img size and no --batch-size")
    if opt.hard_fail is not None and opt.formats is None:
        p.error("--hard-fail applies to --formats")
    if opt.write_docs and (opt.formats is not None or opt.loader or opt.train_throughput):
        p.error("--write-docs regenerates the config tables: not with --formats, --loader or --train-throughput")


def main(argv: list[str] | None = None) -> Any:
    """Run the chosen benchmark and write its tables (the caller's torch/OpenCV thread counts are restored after)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opt = parse_opt(argv)
    set_logging(verbose=False)
    for size in opt.sizes:
        check_img_size(list(size))
    with restored_threads():
        return run_mode(opt, argv)


def run_mode(opt: argparse.Namespace, argv: list[str]) -> Any:
    """The benchmark --loader, --train-throughput, --formats or the config tables choose."""
    if opt.loader:
        rows = loader_throughput(opt)
        write_tables(rows, Path(opt.out + "_loader"), [f"Training loader throughput: {environment(opt)}", "", *plain_table(rows)])
        return rows
    if opt.train_throughput:
        rows = [train_throughput(m, opt) for m in opt.models]
        write_tables(rows, Path(opt.out + "_train"), [f"Training throughput: {environment(opt)}", "", *plain_table(rows)])
        return rows
    if opt.formats is not None:
        return run_formats(opt, argv)
    return run_configs(opt, argv)


def plain_table(rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of the rows' raw columns."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    body = ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *body]


if __name__ == "__main__":
    with error_boundary("benchmarks"):
        main()
