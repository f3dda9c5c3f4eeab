"""Every GPU figure of issue 28 part 2 in one run: AMP vs float32 training, fp16 inference, TensorRT status, `-m gpu` tests.

python scripts/gpu_report.py --out runs/gpu_report      (on a CUDA machine; `python -m scripts.gpu_report` works too)
python scripts/gpu_report.py --allow-cpu --imgsz 64 --epochs 1 --images 8 --batch 2 --out /tmp/gpu_dry   (CPU dry run)

For each --cfg (default: yolov5s, yolov5_mobilenetv4, the anchor-free default detector, RT-DETR MobileNetV4 and the
segmentation default) the task comes from the model's head. Steps, each in its own try/except (a failure becomes one
row and the rest still runs), the report rewritten after each so a run cut short still leaves its figures:
1. a generated shapes dataset per task (boxes, or polygons for segmentation) of --images training images, with its yaml;
2. per config, in a child process (a CUDA fault or a hang costs one config, not the report): training through
   train_options + train_main (what train.py runs) with the Trainer's default AMP, then the same run in float32, forced
   by an on_train_start callback through Trainer.use_amp (train.py has no flag for it); images/s from the wall time of
   each epoch's training part (validation and checkpoints excluded), peak torch.cuda.max_memory_allocated during
   training, whether every epoch's mean losses were finite; then fp16 inference of the fused model, PyTorch and
   ONNX Runtime CUDA (I/O bound on the GPU), batch 1 latency and batch --big-batch throughput, timed interleaved;
3. TensorRT: whether export.py has an 'engine' format (not implemented here when it has none);
4. `python -m pytest -m gpu -q`, its output saved.
Writes OUT/gpu_report.md (card, versions, each table with its command) and OUT/gpu_report.json (raw numbers).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python scripts/gpu_report.py`: import the repository's packages

PROG = "gpu_report"
CONFIGS = (
    "models/yolov5s.yaml",
    "models/yolov5_mobilenetv4.yaml",
    "models/yolov5_mobilenetv4_anchor_free.yaml",
    "models/rtdetr_mobilenetv4_conv_small.yaml",
    "models/yolov5_mobilenetv4-seg.yaml",
)
PRECISIONS = ("amp", "float32")
STEPS = ("train", "infer", "tensorrt", "pytest")
RESULT = "RESULT "  # prefix of a child process's result lines
TENSORRT_MISSING = "TensorRT: not implemented (export.py has no engine format)"
PYTEST_CMD = ("-m", "pytest", "-m", "gpu", "-q")
DRY_TIMING = {"big_batch": 4, "rounds": 2, "block": 2, "block_big": 1, "warmup": 1}  # caps of the inference timing on a CPU


# ------------------------------------------------------------------------------------------------------------- options
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu_report"), help="report folder (gpu_report.md, .json, logs)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu_report_work",
                   help="generated datasets (and their yamls), training runs and ONNX files: gigabytes, so not under --out")
    p.add_argument("--cfg", nargs="+", default=list(CONFIGS), help="model yamls")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=384, help="training images per dataset (validation: an eighth, >= 2)")
    p.add_argument("--batch", type=int, default=32, help="training batch size")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="training loader workers")
    p.add_argument("--big-batch", type=int, default=32, help="inference throughput batch")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--block", type=int, default=20, help="timed batch-1 calls per runner per round")
    p.add_argument("--block-big", type=int, default=5, help="timed big-batch calls per runner per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per runner before each block")
    p.add_argument("--timeout", type=int, default=300, help="seconds for one config's child process (training + inference)")
    p.add_argument("--pytest-timeout", type=int, default=300)
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="the steps to run (default all)")
    p.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU when CUDA is missing (code path only: "
                   "inference timing capped at 2 rounds, big batch 4; pytest only collects)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one config's child process (JSON spec)
    return p.parse_args(argv)


def cuda_refusal() -> str:
    """The one-line error when CUDA is missing."""
    return (f"{PROG}: error: CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); run it on a GPU machine, "
            "or pass --allow-cpu for a dry run")


def first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------- environment
def gpu_facts() -> dict[str, Any]:
    """Card name, memory, compute capability, driver (nvidia-smi), CUDA and cuDNN versions; empty-ish without CUDA."""
    facts: dict[str, Any] = {"cuda": torch.version.cuda or "none", "cudnn": torch.backends.cudnn.version()}
    if not torch.cuda.is_available():
        return {**facts, "card": "none (CPU dry run)"}
    props = torch.cuda.get_device_properties(0)
    facts.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        facts["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        facts["driver"] = "unknown (no nvidia-smi)"
    return facts


def ort_cuda_missing() -> str | None:
    """None when ONNX Runtime has its CUDA provider, else the one-line reason it is skipped."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "ONNX Runtime CUDA: skipped (onnxruntime is not installed; pip install onnxruntime-gpu)"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return f"ONNX Runtime CUDA: skipped (onnxruntime-gpu is not installed; providers: {', '.join(providers)})"
    return None


def environment(cuda: bool) -> dict[str, Any]:
    """Machine and library facts of the report's header."""
    from utils.timing import package_version, system_info

    info = {**system_info(0), **gpu_facts(), "device": "cuda:0" if cuda else "cpu", "dry_run": not cuda}
    info["onnxruntime"] = package_version("onnxruntime-gpu", "onnxruntime")
    try:
        import onnxruntime as ort

        info["ort_providers"] = ort.get_available_providers()
    except ImportError:
        info["ort_providers"] = []
    return info


# ------------------------------------------------------------------------------------------------------------- datasets
def config_task(cfg: str) -> str:
    """The task of a model yaml, read from its head's policy (the model is built on the CPU)."""
    from models.model import DetectionModel

    return str(DetectionModel(cfg).head.policy.task)


def make_dataset(task: str, root: Path, opt: argparse.Namespace) -> dict[str, Any]:
    """Generate the task's shapes dataset (photo-sized images, polygon labels where the task wants them) and its yaml."""
    import yaml

    from utils.data.shapes_dataset import SHAPE_NAMES, generate_shapes
    from utils.tasks import get_task

    t0 = time.perf_counter()
    n_val, sides = max(2, opt.images // 8), (max(32, opt.imgsz * 3 // 4), opt.imgsz)
    polygons = bool(get_task(task).polygons)
    path = generate_shapes(root / task / "shapes", n_train=opt.images, n_val=n_val, seed=0, sides=sides, polygons=polygons)
    cfg = {"path": str(path), "train": "images/train", "val": "images/val", "names": dict(enumerate(SHAPE_NAMES))}
    yaml_file = root / f"shapes-{task}.yaml"
    yaml_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {"yaml": str(yaml_file), "train": opt.images, "val": n_val, "sides": list(sides), "polygons": polygons,
            "seed": 0, "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------------- child: training
class TrainProbe:
    """Trainer callbacks: wall time, images and peak memory of each epoch's training part, and its mean losses."""

    def __init__(self, force_float32: bool, device: torch.device) -> None:
        self.force_float32, self.device, self.cuda = force_float32, device, device.type == "cuda"
        self.epochs: list[dict[str, Any]] = []
        self.amp, self.t0, self.images = "", 0.0, 0
        self.save_dir: Path | None = None

    def register(self, callbacks: Any) -> None:
        """Attach to the Trainer's events."""
        callbacks.register("on_train_start", self.start)
        callbacks.register("on_train_batch_end", self.batch)
        callbacks.register("on_train_epoch_end", self.epoch_end)
        callbacks.register("on_fit_epoch_end", self.mark)

    def start(self, trainer: Any, **_: Any) -> None:
        """Switch to float32 when asked (Trainer.use_amp), note the precision in effect, start the first epoch's clock."""
        if self.force_float32:
            from utils.engine.amp import amp_policy

            if not hasattr(trainer, "use_amp"):
                raise RuntimeError("float32 row missing: the Trainer has no use_amp switch to force float32 training")
            trainer.use_amp(amp_policy(trainer.device, torch.float32))
        self.amp = trainer.amp.describe() if hasattr(trainer, "amp") else "unknown"
        self.save_dir = Path(trainer.save_dir)
        self.mark()

    def mark(self, **_: Any) -> None:
        """Start an epoch's clock: synchronise, reset the peak-memory counter and the image count."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0, self.images = time.perf_counter(), 0

    def batch(self, imgs: torch.Tensor, **_: Any) -> None:
        """Count the batch's images."""
        self.images += int(imgs.shape[0])

    def epoch_end(self, trainer: Any, epoch: int, losses: torch.Tensor) -> None:
        """Close the epoch: seconds, images, peak MiB, mean losses, grad scale."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None
        scaler = getattr(trainer, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        self.epochs.append({"epoch": epoch, "seconds": time.perf_counter() - self.t0, "images": self.images, "peak_mib": peak,
                            "losses": [float(x) for x in losses], "grad_scale": scale})


def summarize_training(rec: dict[str, Any], epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Images/s over all epochs and in the last, peak MiB, finiteness, from the probe's epoch records."""
    rec["epochs"] = epochs
    if not epochs:
        return rec
    seconds, images = sum(e["seconds"] for e in epochs), sum(e["images"] for e in epochs)
    peaks = [e["peak_mib"] for e in epochs if e["peak_mib"] is not None]
    rec.update(img_s_all=images / seconds, img_s_last=epochs[-1]["images"] / epochs[-1]["seconds"], images=images,
               seconds=seconds, peak_mib=max(peaks) if peaks else None)
    rec["finite"] = rec.get("finite", True) and all(math.isfinite(v) for e in epochs for v in e["losses"])
    return rec


def train_command(spec: dict[str, Any], precision: str) -> str:
    """The train.py command the run equals (float32: plus the Trainer.use_amp callback, which has no flag)."""
    words = ["python", "train.py", "--cfg", spec["cfg"], "--data", spec["data"], "--imgsz", spec["imgsz"], "--epochs",
             spec["epochs"], "--batch-size", spec["batch"], "--workers", spec["workers"], "--device", spec["device_arg"],
             "--noval", "--nosave", "--noplots"]
    cmd = " ".join(shlex.quote(str(w)) for w in words)
    return cmd + (" + on_train_start: trainer.use_amp(amp_policy(device, torch.float32))" if precision == "float32" else "")


def train_run(spec: dict[str, Any], precision: str, device: torch.device) -> dict[str, Any]:
    """One training run of the config in `precision` ('amp': the Trainer's default; 'float32': forced) through train_main."""
    from utils.engine.callbacks import Callbacks
    from utils.engine.launch import train_main
    from utils.engine.options import train_options
    from utils.engine.torch_utils import NonFiniteLossError
    from utils.engine.trainer import DistInfo

    rec: dict[str, Any] = {"step": "train", "cfg": spec["cfg"], "precision": precision, "command": train_command(spec, precision)}
    probe, callbacks = TrainProbe(precision == "float32", device), Callbacks()
    probe.register(callbacks)
    opt = train_options(spec["task"], cfg=spec["cfg"], data=spec["data"], epochs=spec["epochs"], imgsz=spec["imgsz"],
                        batch_size=spec["batch"], workers=spec["workers"], device=spec["device_arg"], project=spec["project"],
                        name=f"{Path(spec['cfg']).stem}_{precision}", exist_ok=True, noplots=True, noval=True, nosave=True)
    try:
        train_main(opt, callbacks, DistInfo())
    except NonFiniteLossError as e:
        rec.update(finite=False, error=first_line(e))
    finally:
        rec["amp"] = probe.amp
        if probe.save_dir is not None:  # checkpoints: hundreds of MB, unused here
            shutil.rmtree(probe.save_dir / "weights", ignore_errors=True)
        free_memory(device)
    return summarize_training(rec, probe.epochs)


def free_memory(device: torch.device) -> None:
    """Drop what the last run left (cycles, the CUDA cache) so that the next run's peak starts from nothing."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ child: inference
def ort_bound_runner(session: Any, shape: tuple[int, ...], device: str) -> Callable[[], None]:
    """A no-argument ONNX Runtime run with input and outputs bound on `device` ('cuda' or 'cpu'), in the input's dtype."""
    import numpy as np
    import onnxruntime as ort

    first = session.get_inputs()[0]
    dtype = np.float16 if first.type == "tensor(float16)" else np.float32
    x = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(0).random(shape).astype(dtype), device, 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(first.name, x)
    for out in session.get_outputs():
        binding.bind_output(out.name, device)

    def run() -> None:
        session.run_with_iobinding(binding)  # synchronises the execution provider before it returns

    return run


def time_batch(model: torch.nn.Module, batch: int, spec: dict[str, Any], onnx_dir: Path, ort_skip: str | None) -> dict[str, Any]:
    """Interleaved timing of PyTorch and (unless skipped) ONNX Runtime on one batch size: LatencyStats per runtime."""
    from dataclasses import asdict

    from utils.export.formats import ExportModel, export_onnx_model
    from utils.timing import interleaved_times, ort_session, summarize, torch_runner

    p = next(model.parameters())
    shape = (batch, 3, spec["imgsz"], spec["imgsz"])
    runners = {"pytorch": torch_runner(ExportModel(model), torch.rand(shape, device=p.device, dtype=p.dtype))}  # what ONNX holds
    row: dict[str, Any] = {"batch": batch}
    if ort_skip is None:
        try:
            path = export_onnx_model(model, onnx_dir / f"{Path(spec['cfg']).stem}_b{batch}.onnx", shape[2:], batch_size=batch)
            cuda = p.device.type == "cuda"
            runners["onnxruntime"] = ort_bound_runner(ort_session(path, 0, cuda=cuda), shape, "cuda" if cuda else "cpu")
        except Exception as e:  # noqa: BLE001 - the PyTorch figure still stands
            row["onnxruntime_error"] = first_line(e)
    block = spec["block"] if batch == 1 else spec["block_big"]
    stats = summarize(interleaved_times(runners, spec["rounds"], block, spec["warmup"]), "pytorch")
    row.update({k: asdict(v) for k, v in stats.items()})
    return row


def infer_run(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Batch-1 latency and big-batch throughput of the fused model: fp16 on CUDA (float32 in a CPU dry run)."""
    from models.model import DetectionModel

    half = device.type == "cuda"
    model = DetectionModel(spec["cfg"]).eval().fuse().to(device)
    model = model.half() if half else model
    ort_skip = ort_cuda_missing() if half else None
    rec: dict[str, Any] = {"step": "infer", "cfg": spec["cfg"], "dtype": "float16" if half else "float32",
                           "ort_provider": "CUDAExecutionProvider" if half else "CPUExecutionProvider", "ort_skipped": ort_skip}
    onnx_dir = Path(spec["project"]) / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    rec["rows"] = [time_batch(model, b, spec, onnx_dir, ort_skip) for b in (1, spec["big_batch"])]
    del model
    free_memory(device)
    return rec


def worker_main(spec: dict[str, Any]) -> int:
    """Child process: both training runs, then inference, each printing one RESULT line (or its error)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.init()
    jobs: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = []
    if "train" in spec["steps"]:
        jobs += [({"step": "train", "cfg": spec["cfg"], "precision": p}, lambda p=p: train_run(spec, p, device)) for p in PRECISIONS]
    if "infer" in spec["steps"]:
        jobs.append(({"step": "infer", "cfg": spec["cfg"]}, lambda: infer_run(spec, device)))
    for head, job in jobs:
        try:
            rec = job()
        except Exception as e:  # noqa: BLE001 - one failed run is one row; the others still run
            rec = {**head, "error": first_line(e)}
            free_memory(device)
        print(RESULT + json.dumps(rec), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------- parent: children
def expected_rows(cfg: str, steps: list[str]) -> list[dict[str, Any]]:
    """The row heads one config's child should print."""
    rows = [{"step": "train", "cfg": cfg, "precision": p} for p in PRECISIONS] if "train" in steps else []
    return rows + ([{"step": "infer", "cfg": cfg}] if "infer" in steps else [])


def run_child(cmd: list[str], log: Path, timeout: int) -> tuple[int | None, str]:
    """Run a child in its own process group (killed whole on timeout: loader workers too), output to `log`;
    returns (exit code, None on timeout; '' or one line saying what went wrong)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"timed out after {timeout}s"
    if rc == 0:
        return rc, ""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, f"exited {rc}: {lines[-1][:300] if lines else 'no output'}"


def config_rows(spec: dict[str, Any], log: Path, timeout: int) -> list[dict[str, Any]]:
    """One config's result rows from its child process; rows it never printed become one-line error rows."""
    _, problem = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], log, timeout)
    problem = f"child process {problem} (log {log})" if problem else ""
    got = [json.loads(ln[len(RESULT):]) for ln in log.read_text(errors="replace").splitlines() if ln.startswith(RESULT)]
    rows = []
    for head in expected_rows(spec["cfg"], spec["steps"]):
        found = [r for r in got if all(r.get(k) == v for k, v in head.items())]
        rows.append(found[0] if found else {**head, "error": problem or "no result printed", "log": str(log)})
    return rows


# --------------------------------------------------------------------------------------------------------------- report
def fmt(value: Any, digits: int = 1) -> str:
    """A number for a table cell ('-' when missing)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def ratio(a: Any, b: Any) -> str:
    """a / b as '0.62x', '-' when either is missing."""
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def header_lines(results: dict[str, Any]) -> list[str]:
    """Title, command, card and versions."""
    env = results.get("env", {})
    lines = ["# GPU report (issue 28, part 2)", "", f"Command: `{results.get('command', '')}`", ""]
    if env.get("dry_run"):
        lines += ["**Dry run on the CPU (--allow-cpu): every figure below only exercises the code path; none is a GPU figure.**", ""]
    lines += [
        f"- Date: {env.get('date', '?')}; device {env.get('device', '?')}",
        f"- Card: {env.get('card', '?')} ({env.get('memory_gib', '?')} GiB, compute {env.get('capability', '?')}, "
        f"driver {env.get('driver', '?')})",
        f"- torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, cuDNN {env.get('cudnn', '?')}, Python {env.get('python', '?')}",
        f"- onnxruntime {env.get('onnxruntime', '?')} (providers: {', '.join(env.get('ort_providers', [])) or 'none'})",
        f"- CPU: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; 1-min load {env.get('load_1min', '?')} at the start",
    ]
    return lines + [f"- Failed before any step: {results['error']}"] if results.get("error") else lines


def dataset_lines(results: dict[str, Any]) -> list[str]:
    """The generated datasets, one row per task."""
    lines = ["", "## Datasets", "", "`utils.data.shapes_dataset.generate_shapes(root, n_train, n_val, seed, sides, polygons)`", "",
             "| task | yaml | train | val | image sides (px) | labels | seconds |", "|---|---|---|---|---|---|---|"]
    datasets = results.get("datasets", {})
    for task, d in datasets.items() if isinstance(datasets, dict) else []:
        if not isinstance(d, dict) or "error" in d:
            d = d if isinstance(d, dict) else {"error": d}
            lines.append(f"| {task} | failed: {d['error']} | | | | | |")
            continue
        labels = "polygons" if d["polygons"] else "boxes"
        lines.append(f"| {task} | {d['yaml']} | {d['train']} | {d['val']} | {d['sides'][0]}-{d['sides'][1]} | {labels} | {d['seconds']} |")
    return lines


def train_row(cfg: str, task: str, runs: dict[str, dict[str, Any]]) -> str:
    """One config's AMP and float32 figures side by side, their ratios, finiteness; failures as one-line cells."""
    amp, f32 = runs.get("amp", {}), runs.get("float32", {})
    errors = "; ".join(f"{p}: {r['error']}" for p, r in (("AMP", amp), ("float32", f32)) if r.get("error"))
    if not amp and not f32:
        return f"| {Path(cfg).stem} | {task} | not run | | | | | | | |"
    fin = " / ".join("-" if "finite" not in r else ("yes" if r["finite"] else "**NO**") for r in (amp, f32))
    cells = [fmt(amp.get("img_s_last")), fmt(f32.get("img_s_last")), ratio(amp.get("img_s_last"), f32.get("img_s_last")),
             fmt(amp.get("peak_mib"), 0), fmt(f32.get("peak_mib"), 0), ratio(amp.get("peak_mib"), f32.get("peak_mib")), fin,
             f"{amp.get('amp', '-')} / {f32.get('amp', '-')}"]
    return f"| {Path(cfg).stem} | {task} | " + " | ".join([*cells, errors]) + " |"


def train_lines(results: dict[str, Any]) -> list[str]:
    """The AMP-vs-float32 training table and the commands behind it."""
    s = results.get("settings", {})
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results.get("train", []):
        runs.setdefault(r["cfg"], {})[r["precision"]] = r
    example = next((r["command"] for r in results.get("train", []) if r.get("command")), "python train.py --cfg CFG ...")
    lines = ["", "## AMP training vs float32", "",
             f"{s.get('epochs')} epochs at {s.get('imgsz')}, batch {s.get('batch')}, {s.get('workers')} loader workers, "
             f"{s.get('images')} training images. Each run is `train_options(task, ...)` + `train_main` (what train.py runs), e.g. "
             f"`{example}`; float32 is the same run with the Trainer switched by `trainer.use_amp(amp_policy(device, torch.float32))` "
             "in an on_train_start callback (train.py has no float32 flag). img/s: training images of the last epoch / wall time of its "
             "training part (validation and checkpoints excluded); peak: torch.cuda.max_memory_allocated during training (reset "
             "before each run and each epoch); finite: every epoch's mean losses.", "",
             "| config | task | AMP img/s | fp32 img/s | AMP/fp32 speed | AMP peak MiB | fp32 peak MiB | AMP/fp32 memory | "
             "losses finite AMP / fp32 | precision in effect | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    tasks = results.get("tasks", {})
    lines += [train_row(cfg, "?" if str(tasks.get(cfg, "error")).startswith("error") else tasks[cfg], r) for cfg, r in runs.items()]
    return lines


def latency_cell(row: dict[str, Any], runtime: str, batch: int) -> str:
    """'ms (q1-q3)' at batch 1, images/s at a big batch, from one runtime's LatencyStats."""
    st = row.get(runtime)
    if not st:
        return "-"
    if batch == 1:
        return f"{st['median']:.2f} ({st['q1']:.2f}-{st['q3']:.2f})"
    return f"{batch / st['median'] * 1e3:,.0f}"


def infer_row(r: dict[str, Any]) -> str:
    """One config's inference figures, or its one-line failure."""
    name = Path(r["cfg"]).stem
    if r.get("error"):
        return f"| {name} | failed: {r['error']} | | | | | |"
    by_batch = {row["batch"]: row for row in r.get("rows", [])}
    b1, (big, bb) = by_batch.get(1, {}), max(by_batch.items(), default=(0, {}))
    ort_ratio = f"{b1['onnxruntime']['ratio']:.2f}x" if b1.get("onnxruntime") else "-"
    notes = "; ".join(row[k] for row in by_batch.values() for k in ("onnxruntime_error",) if k in row) or r.get("ort_skipped") or ""
    cells = [latency_cell(b1, "pytorch", 1), latency_cell(b1, "onnxruntime", 1), ort_ratio, latency_cell(bb, "pytorch", big),
             latency_cell(bb, "onnxruntime", big), notes]
    return f"| {name} | " + " | ".join(cells) + " |"


def infer_lines(results: dict[str, Any]) -> list[str]:
    """The inference table and how it was measured."""
    s, rows = {**results.get("settings", {}), **results.get("timing", {})}, results.get("infer", [])
    dtype = rows[0].get("dtype", "float16") if rows else "float16"
    provider = rows[0].get("ort_provider", "CUDAExecutionProvider") if rows else "CUDAExecutionProvider"
    skipped = next((r["ort_skipped"] for r in rows if r.get("ort_skipped")), None)
    lines = ["", f"## {dtype} inference", "",
             f"Each yaml built with random weights, `.eval().fuse()`, `.half()` on the GPU (float32 in a dry run); forward to the "
             f"decoded head output (no NMS) at {s.get('imgsz')}x{s.get('imgsz')}. ONNX: `export_onnx_model` of that same model "
             f"(opset 17, static batch), ONNX Runtime {provider} with input and outputs bound on the device (I/O binding). "
             f"Timing: utils.timing.interleaved_times, {s.get('rounds')} rounds, each runner {s.get('warmup')} untimed calls then "
             f"{s.get('block')} (batch 1) or {s.get('block_big')} (batch {s.get('big_batch')}) timed; figures are the median over "
             "rounds of each round's block median, batch-1 ms with the interquartile range over rounds.", ""]
    if skipped:
        lines += [skipped, ""]
    big = s.get("big_batch", 32)
    lines += [f"| config | PyTorch b1 ms | ORT b1 ms | ORT/PyTorch b1 | PyTorch b{big} img/s | ORT b{big} img/s | notes |",
              "|---|---|---|---|---|---|---|", *[infer_row(r) for r in rows]]
    return lines


def tail_lines(results: dict[str, Any]) -> list[str]:
    """TensorRT, the CUDA-only tests and what this report cannot measure."""
    lines = ["", "## TensorRT", "", results.get("tensorrt", "not run")]
    pt = results.get("pytest")
    lines += ["", "## CUDA-only tests", ""]
    if not pt:
        lines.append("not run")
    elif "error" in pt:
        lines.append(f"`{pt.get('command', '')}`: failed: {pt['error']}")
    else:
        lines.append(f"`{pt['command']}`: exit code {pt['rc']}, {pt['summary']} (output: {pt['log']})")
    lines += ["", "## Not measured here", "", *[f"- {n}" for n in results.get("not_measured", [])]]
    return lines


def write_report(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """OUT/gpu_report.md (tables) and OUT/gpu_report.json (everything), both rewritten whole."""
    out.mkdir(parents=True, exist_ok=True)
    md = [*header_lines(results), *dataset_lines(results), *train_lines(results), *infer_lines(results), *tail_lines(results)]
    md_path, json_path = out / "gpu_report.md", out / "gpu_report.json"
    md_path.write_text("\n".join(md) + "\n")
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return md_path, json_path


# ---------------------------------------------------------------------------------------------------------------- steps
def tensorrt_status() -> str:
    """The TensorRT line: missing unless export.py lists an 'engine' format."""
    from utils.export.exporter import FORMATS

    if "engine" not in FORMATS:
        return TENSORRT_MISSING
    return "TensorRT: export.py lists an 'engine' format, but this script does not measure it yet (export, val.py/detect.py, .pt parity)"


def run_pytest(out: Path, timeout: int, cuda: bool) -> dict[str, Any]:
    """`python -m pytest -m gpu -q` (in a CPU dry run only --collect-only), its output saved; rc and the summary line."""
    cmd = [sys.executable, *PYTEST_CMD, *([] if cuda else ["--collect-only"])]
    log = out / "pytest_gpu.txt"
    rc, problem = run_child(cmd, log, timeout)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    summary = (problem if rc is None else lines[-1]) if lines or rc is None else "no output"
    return {"command": "python " + " ".join(cmd[1:]), "rc": rc, "summary": summary, "log": str(log)}


def not_measured(results: dict[str, Any]) -> list[str]:
    """What the report leaves out, and why."""
    notes = ["TensorRT export, its val.py/detect.py run and its parity with the .pt: export.py has no engine format"
             if results.get("tensorrt") == TENSORRT_MISSING else "TensorRT figures: see the TensorRT section"]
    notes += ["INT8 TensorRT with calibration: no TensorRT export to calibrate",
              "accuracy: random-weight models and 2-epoch runs; the figures are speed, memory and numerical health only",
              "inference latency excludes pre-processing and NMS (forward to the decoded head output)",
              "--compile and DDP training: not part of this run"]
    if results.get("env", {}).get("dry_run"):
        notes.insert(0, "every GPU figure: this was a CPU dry run (--allow-cpu)")
    return notes


def step(results: dict[str, Any], out: Path, name: str, fn: Callable[[], Any]) -> Any:
    """Run one step; its failure becomes results[name] = {'error': one line}; the report is rewritten after it."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - every step is independent
        value = {"error": first_line(e)}
    results[name] = value
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    write_report(results, out)
    print(f"{PROG}: {name} done in {results['seconds'][name]}s", flush=True)
    return value


def prepare(results: dict[str, Any], opt: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """Each config's task, then one dataset per task; returns the datasets (errors included)."""
    tasks: dict[str, str] = {}
    for cfg in opt.cfg:
        try:
            tasks[cfg] = config_task(cfg)
        except Exception as e:  # noqa: BLE001
            tasks[cfg] = f"error: {first_line(e)}"
    results["tasks"] = tasks
    datasets: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(t for t in tasks.values() if not t.startswith("error")):
        try:
            datasets[task] = make_dataset(task, work / "data", opt)
        except Exception as e:  # noqa: BLE001
            datasets[task] = {"error": first_line(e)}
    return datasets


def child_spec(opt: argparse.Namespace, cfg: str, task: str, data: str, work: Path, cuda: bool) -> dict[str, Any]:
    """What one config's child process needs (a CPU dry run times only DRY_TIMING's few calls: the path, not the speed)."""
    timing = {k: getattr(opt, k) for k in DRY_TIMING}
    if not cuda:
        timing = {k: min(v, DRY_TIMING[k]) for k, v in timing.items()}
    return {"cfg": cfg, "task": task, "data": data, "imgsz": opt.imgsz, "epochs": opt.epochs, "batch": opt.batch,
            "workers": opt.workers, "device_arg": "0" if cuda else "cpu", "project": str(work / "runs"), **timing,
            "steps": [s for s in opt.steps if s in ("train", "infer")]}


def config_input(results: dict[str, Any], cfg: str) -> tuple[str, str, str]:
    """(task, dataset yaml, '') of a config, or what kept it from running as the third item."""
    tasks, datasets = results.get("tasks", {}), results.get("datasets")
    task = str(tasks.get(cfg, "error: its task was not read"))
    if task.startswith("error"):
        return task, "", task.removeprefix("error: ")
    data = datasets.get(task, {}) if isinstance(datasets, dict) else {}
    if not isinstance(data, dict) or "yaml" not in data:
        why = data.get("error") if isinstance(data, dict) and "error" in data else "missing"
        return task, "", f"dataset: {why}"
    return task, str(data["yaml"]), ""


def run_configs(results: dict[str, Any], opt: argparse.Namespace, work: Path, cuda: bool) -> None:
    """Each config's child (training, inference), its rows appended to results and the report rewritten after each."""
    results.setdefault("train", [])
    results.setdefault("infer", [])
    (opt.out / "logs").mkdir(parents=True, exist_ok=True)
    for cfg in opt.cfg:
        task, data, why = config_input(results, cfg)
        spec = child_spec(opt, cfg, task, data, work, cuda)
        results["timing"] = {k: spec[k] for k in DRY_TIMING}  # what the children time with (capped in a dry run)
        if why:
            rows = [{**h, "error": why} for h in expected_rows(cfg, spec["steps"])]
        else:
            rows = config_rows(spec, opt.out / "logs" / f"{Path(cfg).stem}.log", opt.timeout)
        for r in rows:
            results[r["step"]].append(r)
        write_report(results, opt.out)
        done = ", ".join(f"{' '.join(filter(None, (r['step'], r.get('precision'))))}: {r.get('error', 'ok')}" for r in rows)
        print(f"{PROG}: {cfg}: {done}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Refuse without CUDA (unless --allow-cpu), then every step; returns the exit code."""
    opt = parse_args(argv)
    if opt.worker:
        return worker_main(json.loads(opt.worker))
    cuda = torch.cuda.is_available()
    if not cuda and not opt.allow_cpu:
        print(cuda_refusal(), file=sys.stderr)
        return 2
    work = opt.work.resolve()
    results: dict[str, Any] = {"command": "python scripts/gpu_report.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                               "settings": {k: v for k, v in vars(opt).items() if k != "worker"}}
    step(results, opt.out, "env", lambda: environment(cuda))
    step(results, opt.out, "datasets", lambda: prepare(results, opt, work))
    if {"train", "infer"} & set(opt.steps):
        step(results, opt.out, "configs_done", lambda: run_configs(results, opt, work, cuda) or True)
    if "tensorrt" in opt.steps:
        step(results, opt.out, "tensorrt", tensorrt_status)
    if "pytest" in opt.steps:
        step(results, opt.out, "pytest", lambda: run_pytest(opt.out, opt.pytest_timeout, cuda))
    results["not_measured"] = not_measured(results)
    md, js = write_report(results, opt.out)
    print(f"{PROG}: wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
