"""Benchmark models side by side: params, GFLOPs, CPU/ONNX Runtime/GPU latency, throughput, memory, optional mAP.

python benchmarks.py --cfg models/yolov5s.yaml models/yolov5_mobilenetv4.yaml --imgsz 640
python benchmarks.py --train-throughput --cfg models/yolov5_mobilenetv4.yaml --imgsz 320
python benchmarks.py --loader --imgsz 640      # training loader images/s (mosaic), one process and one thread
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.flops import count_gflops
from models.mobileone import MobileOneUnit
from models.yolo import DetectionModel
from utils.checkpoint import CheckpointError, load_model
from utils.cli import check_img_size, error_boundary
from utils.logs import set_logging
from utils.paths import ROOT
from utils.timing import ort_latency, peak_rss_mb, torch_latency

LOGGER = logging.getLogger("mobile_yolo")


def build(spec: str) -> tuple[str, DetectionModel]:
    """A model from a yaml (random weights) or a .pt checkpoint, in eval mode on the CPU."""
    if spec.endswith(".pt"):
        return Path(spec).stem, load_model(spec)
    return Path(spec).stem, DetectionModel(spec).eval()


def export_onnx(model: DetectionModel, out: Path, imgsz: tuple[int, int], batch: int) -> Path:
    """Static-shape ONNX of the fused model (through export.py's exporter)."""
    from utils.export.formats import export_onnx_model

    return export_onnx_model(model, out, imgsz, batch_size=batch)


def measure(name: str, model: DetectionModel, opt: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every figure for one model; GPU columns only when CUDA is present."""
    h, w = opt.imgsz
    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    if opt.unfused and any(isinstance(m, MobileOneUnit) for m in model.modules()):
        row.update(measure_training_form(name, model, opt, tmp))
    model.fuse()
    row["params_fused"] = sum(p.numel() for p in model.parameters())
    row["gflops"] = round(count_gflops(model, (h, w)), 2)
    torch.set_num_threads(opt.threads or os.cpu_count() or 1)
    shape = (opt.batch_size, 3, h, w)
    if "pytorch" in opt.backends and not opt.no_cpu:
        row["torch_cpu_ms"] = round(torch_latency(model, shape, torch.device("cpu"), False, opt.runs, opt.warmup), 2)
    onnx_path = export_onnx(model, tmp / f"{name}.onnx", (h, w), opt.batch_size) if "onnx" in opt.backends else None
    if onnx_path is not None and not opt.no_cpu:
        row["ort_cpu_ms"] = round(ort_latency(onnx_path, shape, opt.threads, opt.runs, opt.warmup), 2)
    row["peak_rss_mb"] = round(peak_rss_mb())
    if torch.cuda.is_available():
        row.update(measure_gpu(model, onnx_path, opt))
    if opt.data and opt.weights_given:
        row.update(measure_map(name, opt))
    return row


def measure_training_form(name: str, model: DetectionModel, opt: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Latency of the multi-branch (not re-parameterised) form, to show what fuse() buys on MobileOne."""
    h, w = opt.imgsz
    shape, out = (opt.batch_size, 3, h, w), {}
    torch.set_num_threads(opt.threads or os.cpu_count() or 1)
    if not opt.no_cpu and "pytorch" in opt.backends:
        out["torch_cpu_ms_trainform"] = round(torch_latency(model, shape, torch.device("cpu"), False, opt.runs, opt.warmup), 2)
    if not opt.no_cpu and "onnx" in opt.backends:
        onnx_path = export_onnx(model, tmp / f"{name}_trainform.onnx", (h, w), opt.batch_size)
        out["ort_cpu_ms_trainform"] = round(ort_latency(onnx_path, shape, opt.threads, opt.runs, opt.warmup), 2)
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        out["gpu_fp16_ms_trainform"] = round(torch_latency(model.to(dev).half(), (1, 3, h, w), dev, True, opt.runs, opt.warmup), 3)
        model.float().cpu()
    return out


def measure_gpu(model: DetectionModel, onnx_path: Path | None, opt: argparse.Namespace) -> dict[str, Any]:
    """fp16 PyTorch latency (batch 1), fp16 throughput (batch 32), ORT CUDA latency and peak GPU memory."""
    h, w = opt.imgsz
    dev = torch.device("cuda", 0)
    gpu = model.to(dev).half()
    torch.cuda.reset_peak_memory_stats(dev)
    out = {"gpu_fp16_ms": round(torch_latency(gpu, (1, 3, h, w), dev, True, opt.runs, opt.warmup), 3)}
    ms32 = torch_latency(gpu, (32, 3, h, w), dev, True, max(opt.runs // 3, 5), opt.warmup)
    out["gpu_fp16_b32_img_s"] = round(32 / ms32 * 1e3)
    out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    model.float().cpu()
    if onnx_path is not None:
        try:
            out["ort_cuda_ms"] = round(ort_latency(onnx_path, (opt.batch_size, 3, h, w), 0, opt.runs, opt.warmup, cuda=True), 3)
        except RuntimeError as e:
            LOGGER.warning(f"ONNX Runtime CUDA skipped: {e}")
    return out


def measure_map(name: str, opt: argparse.Namespace) -> dict[str, Any]:
    """mAP50-95 / mAP50 of the trained checkpoint on --data, through the same backend and Evaluator as val.py."""
    from utils.data.dataset_config import load_dataset_config
    from utils.data.datasets import create_dataloader
    from utils.device import select_device
    from utils.evaluation.evaluator import DetectionEvaluator
    from utils.evaluation.validate import evaluate
    from utils.export.backend import DetectBackend

    spec = next(s for s in opt.models if Path(s).stem == name)
    dev = select_device(opt.device)
    data = load_dataset_config(opt.data)
    backend = DetectBackend(spec, device=dev)
    loader, _ = create_dataloader(data["val"], opt.imgsz[0], 16, int(backend.stride), pad=0.5, rect=backend.pt, nc=int(data["nc"]))
    result = evaluate(backend, loader, DetectionEvaluator(int(data["nc"]), list(data["names"])), device=dev, quiet=True)
    return {"mAP50": round(result.map50, 4), "mAP50-95": round(result.map, 4)}


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
    """The line every table carries: device, threads, image size, batch."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores), ORT/torch threads: "
            f"{opt.threads or os.cpu_count()}, GPU: {gpu}, image {opt.imgsz[0]}x{opt.imgsz[1]}, batch {opt.batch_size}, "
            f"median of {opt.runs} runs after {opt.warmup} warm-up, torch {torch.__version__}")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Latency ratios against the first model, taken within this one run."""
    base = rows[0]
    for row in rows:
        for key in ("torch_cpu_ms", "ort_cpu_ms", "gpu_fp16_ms"):
            if key in row and base.get(key):
                row[f"{key}_x"] = round(row[key] / base[key], 3)


def write_tables(rows: list[dict[str, Any]], out: Path, header: str) -> None:
    """Print a Markdown table and write it (+ CSV) to `out`.md/.csv."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    md = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".csv").write_text("\n".join([",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]) + "\n")
    print("\n".join(md))
    print(f"\nSaved {out.with_suffix('.md')} and {out.with_suffix('.csv')}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", nargs="*", default=[], help="model yamls (random weights)")
    p.add_argument("--weights", nargs="*", default=[], help="trained .pt checkpoints (enables --data mAP)")
    p.add_argument("--imgsz", "--img", nargs="+", type=int, default=[640])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0 = all cores)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=["pytorch", "onnx"], choices=("pytorch", "onnx"))
    p.add_argument("--unfused", action="store_true", help="also time MobileOne models before re-parameterisation")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU latency columns (GPU-only report)")
    p.add_argument("--data", default=None, help="dataset yaml for mAP of --weights")
    p.add_argument("--device", default="")
    p.add_argument("--train-throughput", action="store_true", help="measure train.py's loop speed instead")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader", action="store_true", help="measure the training loader alone (one process, one thread)")
    p.add_argument("--loader-images", type=int, default=200, help="generated images for --loader without --data")
    p.add_argument("--loader-sides", nargs=2, type=int, default=[480, 640], help="side range of those images, pixels")
    p.add_argument("--out", default=str(ROOT / "runs/benchmarks/benchmarks"))
    opt = p.parse_args(argv)
    opt.imgsz = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz[:2]
    opt.models = opt.weights + opt.cfg
    opt.weights_given = bool(opt.weights)
    if not opt.models and not opt.loader:
        p.error("give --cfg and/or --weights (or --loader)")
    if opt.loader_images < 1 or not 16 <= opt.loader_sides[0] <= opt.loader_sides[1]:
        p.error("--loader-images must be >= 1 and --loader-sides two sizes 16 <= lo <= hi")
    return opt


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every model and write the tables."""
    opt = parse_opt(argv)
    set_logging(verbose=False)
    check_img_size(opt.imgsz)
    if opt.loader:
        rows = loader_throughput(opt)
        write_tables(rows, Path(opt.out + "_loader"), f"Training loader throughput: {environment(opt)}")
        return rows
    if opt.train_throughput:
        rows = [train_throughput(m, opt) for m in opt.models]
        write_tables(rows, Path(opt.out + "_train"), f"Training throughput: {environment(opt)}")
        return rows
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in opt.models:
            try:
                name, model = build(spec)
            except (CheckpointError, FileNotFoundError, ValueError) as e:
                raise SystemExit(f"benchmarks: error: {e}") from None
            rows.append(measure(name, model, opt, Path(tmp)))
            LOGGER.warning(f"{name}: {rows[-1]}")
    add_ratios(rows)
    write_tables(rows, Path(opt.out), environment(opt))
    return rows


if __name__ == "__main__":
    with error_boundary("benchmarks"):
        main()
