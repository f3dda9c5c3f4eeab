"""The study's run: options, then per model a resumable training, validation, size figures and ONNX exports (the peers
after the configs), one interleaved ONNX Runtime timing run over every exported file, and the report.

Every config goes through the same public entry points (train.py's, val.py's and export.py's library functions), so
every head is treated alike. A model's folder, <project>/<name>/<config stem>/, holds its training run and
study_row.json: the recipe it was trained with, whether training finished, and its measured row once validated and
exported. A later run skips what that file records as done and resumes an interrupted training from its last.pt.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from models.flops import count_gflops
from models.model import load_model_config
from models.parse import ModelConfigError
from utils.checkpoint import load_model, read_checkpoint
from utils.cli import check_img_size, check_int, shell_command
from utils.data.dataset_config import load_dataset_config
from utils.engine.launch import train_main
from utils.engine.options import train_options
from utils.engine.validation import run as validate
from utils.export.exporter import export_model
from utils.export.quantize import calibration_images, quantize_onnx
from utils.files import atomic_write_text, first_line, safe_component
from utils.paths import ROOT
from utils.study.peers import PEERS, UltralyticsTrainer, import_ultralytics, mirror_dataset, onnx_metadata, set_metadata, tag_output_layout
from utils.study.report import StudyRow, check_writable, mark_pareto, write_report
from utils.timing import interleaved_times, ort_runner, ort_session, package_version, summarize, system_info

LOGGER = logging.getLogger("mobile_yolo")
STATE_FILE = "study_row.json"
TIMING_CALIBRATION = 32  # images calibrating the INT8 files timed at --time-img: speed does not depend on the ranges found
PEER_PREFIX = "ultralytics-"  # peer rows and folders: ultralytics-yolov8n, ...


class StudyError(ValueError):
    """A study option or folder that cannot work; the message is one line naming the flag or the file."""


@dataclass(frozen=True)
class StudyOptions:
    """study.py's flags (the names of study.run's keyword arguments)."""

    cfg: tuple[str, ...] = ()
    data: str = str(ROOT / "data" / "shapes.yaml")
    epochs: int = 100
    imgsz: int = 640
    time_imgsz: int = 0  # size of the timed ONNX files (and GFLOPs); 0: --img
    batch_size: int = 16
    project: str = str(ROOT / "runs" / "study")
    name: str = "exp"
    threads: int = 2
    rounds: int = 10
    block: int = 5
    warmup: int = 2
    peers: tuple[str, ...] = ()
    no_int8: bool = False
    device: str = ""
    workers: int = 8
    seed: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> StudyOptions:
        """Options from keyword arguments; an unknown name is a StudyError, a single --cfg or --peers string is a list of one."""
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise StudyError(f"unknown study option {unknown[0]!r}")
        for key in ("cfg", "peers"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = (value,) if isinstance(value, str) else tuple(value or ())
        return cls(**kwargs)

    @property
    def folder(self) -> Path:
        """The study folder, <project>/<name>."""
        return Path(self.project) / self.name

    @property
    def time_size(self) -> int:
        """The size the timed files are exported at (--time-img, else --img)."""
        return self.time_imgsz or self.imgsz

    def recipe(self) -> dict[str, Any]:
        """What must match for a model trained by an earlier run to count for this one."""
        return {"data": str(self.data), "epochs": self.epochs, "imgsz": self.imgsz, "batch_size": self.batch_size, "seed": self.seed}

    def schedule(self) -> str:
        """The training run in words: epochs, image size and batch."""
        return f"epochs {self.epochs}, image size {self.imgsz} px, batch {self.batch_size}"

    def command(self) -> str:
        """The study.py command that reproduces this study, every option spelled out."""
        words: list[object] = ["python", "study.py", "--cfg", *self.cfg, "--data", self.data, "--epochs", self.epochs, "--img",
                               self.imgsz, "--batch-size", self.batch_size, "--project", self.project, "--name", self.name,
                               "--threads", self.threads, "--rounds", self.rounds, "--block", self.block, "--warmup", self.warmup,
                               "--workers", self.workers, "--seed", self.seed]  # fmt: skip
        words += ["--time-img", self.time_imgsz] if self.time_imgsz else []
        words += (["--device", self.device] if self.device else []) + (["--peers", *self.peers] if self.peers else [])
        return shell_command(*words, *(["--no-int8"] if self.no_int8 else []))


def model_names(opt: StudyOptions) -> list[str]:
    """Row and folder names: each config's stem, then ultralytics-<peer>."""
    return [Path(c).stem for c in opt.cfg] + [PEER_PREFIX + p for p in opt.peers]


def check_options(opt: StudyOptions) -> None:
    """Reject options that cannot run, before anything is written (one line naming the flag)."""
    if not opt.cfg:
        raise StudyError("--cfg: give one or more model configs (yaml files under models/)")
    limits = (("--epochs", opt.epochs, 1), ("--batch-size", opt.batch_size, 1), ("--threads", opt.threads, 0), ("--rounds", opt.rounds, 1),
              ("--block", opt.block, 1), ("--warmup", opt.warmup, 0), ("--workers", opt.workers, 0), ("--seed", opt.seed, 0))  # fmt: skip
    for flag, value, minimum in limits:
        check_int(flag, value, minimum)
    check_img_size(opt.imgsz)
    if opt.time_imgsz:
        check_img_size(opt.time_imgsz)
    for peer in opt.peers:
        if peer not in PEERS:
            raise StudyError(f"--peers {peer!r}: choose from {', '.join(PEERS)}")
    if not opt.name or opt.name != safe_component(opt.name):
        raise StudyError(f"--name {opt.name!r}: must be one folder name (no path separators, no leading dots)")
    for cfg in opt.cfg:
        try:
            load_model_config(cfg)
        except (FileNotFoundError, ModelConfigError) as e:
            raise StudyError(f"--cfg: {first_line(e)}") from None
    names = model_names(opt)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StudyError(f"--cfg: two models named {twice[0]!r} would share one folder; give each config once")


def progress(step: str, model: str, text: str) -> None:
    """One progress line of the study."""
    print(f"study: {step:<6} {model}: {text}", flush=True)


# ------------------------------------------------------------------------------------------------------ model folders


def read_state(folder: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """The model folder's study_row.json ({} for a new folder); a folder that is not the study's, or trained with other
    settings, is refused (StudyError): nothing in it is touched."""
    file = folder / STATE_FILE
    if not file.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise StudyError(f"{folder}: exists without {STATE_FILE}, not a study folder; refusing to write into it "
                             "(choose another --name)")
        return {}
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StudyError(f"{file}: unreadable ({first_line(e)}); move {folder} away to train this model again") from None
    recorded = state.get("recipe") if isinstance(state, dict) else None
    if not isinstance(recorded, dict):
        raise StudyError(f"{file}: no recipe recorded; move {folder} away to train this model again")
    wanted = json.loads(json.dumps(recipe))
    if recorded != wanted:
        diff = ", ".join(f"{k} {recorded.get(k)!r}, not {v!r}" for k, v in wanted.items() if recorded.get(k) != v)
        raise StudyError(f"{folder}: trained with other settings ({diff}); choose another --name for this recipe")
    return state


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Write the model folder's study_row.json (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=2) + "\n")


def cached_row(state: dict[str, Any], folder: Path, opt: StudyOptions) -> StudyRow | None:
    """The row an earlier run measured, when its ONNX files are still there (and INT8 was tried unless --no-int8)."""
    if not isinstance(state.get("row"), dict) or (not opt.no_int8 and not state.get("int8")):
        return None
    if state.get("time_size", opt.imgsz) != opt.time_size:  # measured for another --time-img: export and time again
        return None
    row = StudyRow.from_dict(state["row"])
    if not row.float_onnx or not (folder / row.float_onnx).is_file() or (row.int8_onnx and not (folder / row.int8_onnx).is_file()):
        return None
    if opt.no_int8:
        row.int8_onnx, row.int8_map50_95 = None, None
    return row


def run_model(row: StudyRow, folder: Path, recipe: dict[str, Any], opt: StudyOptions, train: Callable[[Path], dict[str, Any]],
              measure: Callable[[dict[str, Any], Path, StudyRow], None]) -> StudyRow:  # fmt: skip
    """One model through its steps: train (unless done), measure (unless cached); a failure becomes its row's status."""
    try:
        state = read_state(folder, recipe)
        cached = cached_row(state, folder, opt)
        if cached is not None:
            progress("skip", row.model, f"trained, validated and exported in an earlier run ({folder / STATE_FILE})")
            return cached
        if state.get("trained"):
            progress("train", row.model, f"skipped: finished in an earlier run ({folder / STATE_FILE})")
        else:
            save_state(folder, {"recipe": recipe, "trained": False})  # the folder is the study's from here on
            state = {"recipe": recipe, "trained": True, "train": train(folder)}
            save_state(folder, state)
        measure(state["train"], folder, row)
        save_state(folder, {**state, "row": row.as_dict(), "int8": not opt.no_int8, "time_size": opt.time_size})
    except Exception as e:  # one model's failure (training, export, ...) is its row; the study goes on with the others
        row.status = f"failed: {first_line(e)}"
        progress("failed", row.model, row.status[len("failed: ") :])
    return row


def _note(row: StudyRow, text: str) -> None:
    """Add a remark to the row's note."""
    row.note = "; ".join(t for t in (row.note, text) if t)


# ------------------------------------------------------------------------------------------------ this project's models


def train_config(cfg: str, folder: Path, opt: StudyOptions) -> dict[str, Any]:
    """Train `cfg` into `folder` with its head's default hyp (no --hyp), or resume the interrupted run there."""
    last = folder / "weights" / "last.pt"
    done = int(read_checkpoint(last).get("epoch", -1)) + 1 if last.is_file() else 0
    if done >= opt.epochs:
        progress("train", folder.name, f"skipped: {last} holds all {opt.epochs} epochs")
        best = folder / "weights" / "best.pt"
        return {"best": "weights/best.pt" if best.is_file() else "weights/last.pt"}
    if done:
        progress("train", folder.name, f"resuming {last} at epoch {done + 1}/{opt.epochs}")
        result = train_main(train_options("detect", resume=str(last)))
    else:
        progress("train", folder.name, f"{cfg}, {opt.schedule()}, its head's default hyp")
        result = train_main(train_options("detect", cfg=cfg, data=opt.data, epochs=opt.epochs, imgsz=opt.imgsz, batch_size=opt.batch_size,
                                          seed=opt.seed, device=opt.device, workers=opt.workers, project=str(folder.parent),
                                          name=folder.name, exist_ok=True, noplots=True))  # fmt: skip
    return {"best": Path(result).resolve().relative_to(folder.resolve()).as_posix()}


def validate_file(weights: Path, opt: StudyOptions, folder: Path, name: str) -> tuple[float, float, float, float]:
    """(P, R, mAP50, mAP50-95) of a .pt or .onnx file on --data's val split at --img, with val.py's evaluator."""
    results, _, _ = validate(data=opt.data, weights=str(weights), batch_size=opt.batch_size, imgsz=opt.imgsz, device=opt.device,
                             workers=opt.workers, plots=False, project=str(folder), name=name, exist_ok=True, quiet=True)  # fmt: skip
    p, r, map50, map50_95 = (float(x) for x in results[:4])
    return p, r, map50, map50_95


def add_int8(make: Callable[[], Path], folder: Path, opt: StudyOptions, row: StudyRow) -> None:
    """The INT8 ONNX made by `make` and its mAP50-95; a failure is a note on the row, which keeps its float figures."""
    if opt.no_int8:
        return
    progress("int8", row.model, "static INT8 ONNX, calibrated on --data's train images")
    try:
        int8 = make()
        row.int8_onnx = int8.resolve().relative_to(folder.resolve()).as_posix()
        row.int8_map50_95 = validate_file(int8, opt, folder, "val_int8")[3]
    except Exception as e:  # a head or graph the quantiser cannot take: the float row stands
        row.int8_onnx = row.int8_map50_95 = None
        _note(row, f"INT8: {first_line(e)}")


def measure_config(train: dict[str, Any], folder: Path, opt: StudyOptions, row: StudyRow) -> None:
    """Head, fused size at the timing size, P/R/mAP of best.pt, its float ONNX and (unless --no-int8) INT8 ONNX with its
    mAP at --img; with --time-img the timed files are a second float/INT8 pair exported at that size."""
    best = folder / train["best"]
    model = load_model(best).fuse()
    size = check_img_size(opt.time_size, max(int(model.stride.max()), 32))
    row.head, row.params, row.gflops = model.head_kind, sum(p.numel() for p in model.parameters()), count_gflops(model, size)
    progress("val", row.model, f"{best} on the val split of {opt.data}")
    row.precision, row.recall, row.map50, row.map50_95 = validate_file(best, opt, folder, "val")
    progress("export", row.model, f"{best} to ONNX at {opt.imgsz} px")
    onnx_file = export_model(weights=best, include=["onnx"], imgsz=opt.imgsz)[0]
    row.float_onnx = onnx_file.resolve().relative_to(folder.resolve()).as_posix()
    add_int8(lambda: export_model(weights=best, include=["onnx"], imgsz=opt.imgsz, int8=True, data=opt.data)[0], folder, opt, row)
    if opt.time_size != opt.imgsz:
        out = folder / f"time{opt.time_size}" / "best.onnx"
        progress("export", row.model, f"{best} to ONNX at {opt.time_size} px, for the timing")
        int8_out, size = out.with_name("best_int8.onnx"), opt.time_size
        timed_files(lambda: export_model(weights=best, include=["onnx"], imgsz=size, output=out)[0],
                    lambda: export_model(weights=best, include=["onnx"], imgsz=size, int8=True, data=opt.data,
                                         n_calib=TIMING_CALIBRATION, output=int8_out)[0], folder, opt, row)  # fmt: skip


def timed_files(make_float: Callable[[], Path], make_int8: Callable[[], Path], folder: Path, opt: StudyOptions, row: StudyRow) -> None:
    """Point the row's timed files at a float/INT8 pair made at --time-img (the INT8 one unless --no-int8 or it fails)."""
    row.float_onnx = make_float().resolve().relative_to(folder.resolve()).as_posix()
    if opt.no_int8 or row.int8_onnx is None:
        return
    try:
        row.int8_onnx = make_int8().resolve().relative_to(folder.resolve()).as_posix()
    except Exception as e:  # the --img INT8 file worked, so this is unexpected: keep the float timing, say why
        row.int8_onnx = None
        _note(row, f"INT8 at {opt.time_size} px: {first_line(e)}")


def config_row(cfg: str, opt: StudyOptions) -> StudyRow:
    """The row of one --cfg model."""
    folder = opt.folder / Path(cfg).stem
    return run_model(StudyRow(Path(cfg).stem, source=cfg), folder, {"cfg": cfg, **opt.recipe()}, opt,
                     lambda f: train_config(cfg, f, opt), lambda t, f, r: measure_config(t, f, opt, r))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- the peers


def quantize_peer(float_onnx: Path, opt: StudyOptions, size: int = 0) -> Path:
    """A peer's INT8 ONNX: the same static quantiser as export.py --int8, on the same calibration images (as few as the
    project's own timed files at --time-img); metadata kept."""
    int8 = float_onnx.with_name(f"{float_onnx.stem}_int8.onnx")
    images = calibration_images(opt.data, limit=TIMING_CALIBRATION) if size else calibration_images(opt.data)
    quantize_onnx(float_onnx, int8, images, size or opt.imgsz)
    set_metadata(int8, onnx_metadata(float_onnx))
    return int8


def measure_peer(train: dict[str, Any], folder: Path, opt: StudyOptions, row: StudyRow, nc: int) -> None:
    """A peer's layout, size, and mAP from this project's evaluator on its ONNX export (float, then INT8)."""
    onnx_file = folder / train["onnx"]
    row.head = f"{tag_output_layout(onnx_file, nc)} (ultralytics)"
    row.params, row.gflops = train.get("params"), train.get("gflops")
    if train.get("own_map50_95") is not None:
        _note(row, f"ultralytics' own val mAP50-95 {train['own_map50_95']:.4f}")
    progress("val", row.model, f"{onnx_file} on the val split of {opt.data} (this project's evaluator)")
    row.precision, row.recall, row.map50, row.map50_95 = validate_file(onnx_file, opt, folder, "val")
    row.float_onnx = train["onnx"]
    add_int8(lambda: quantize_peer(onnx_file, opt), folder, opt, row)
    if train.get("time_onnx"):
        timed = folder / train["time_onnx"]
        timed_files(lambda: timed, lambda: quantize_peer(timed, opt, opt.time_size), folder, opt, row)


def train_peer(name: str, trainer: UltralyticsTrainer, data_yaml: Path, folder: Path, *, opt: StudyOptions) -> dict[str, Any]:
    """Train and export one peer with ultralytics; what measure_peer needs, paths relative to `folder`."""
    progress("train", folder.name, f"{name}.yaml, {opt.schedule()}, ultralytics' default recipe")
    peer = trainer.train_export(name, data_yaml, folder, opt)
    rel = {k: getattr(peer, k).resolve().relative_to(folder.resolve()).as_posix() for k in ("best", "onnx")}
    if opt.time_size != opt.imgsz:
        timed = trainer.export(peer.best, opt.time_size, folder / f"time{opt.time_size}")
        rel["time_onnx"] = timed.resolve().relative_to(folder.resolve()).as_posix()
    return {**rel, "params": peer.params, "gflops": peer.gflops, "own_map50_95": peer.own_map50_95}


def peer_rows(opt: StudyOptions, data: dict[str, Any]) -> list[StudyRow]:
    """The --peers rows (none, after one line, without ultralytics)."""
    if not opt.peers:
        return []
    module, why = import_ultralytics(opt.folder / "ultralytics-settings")
    if module is None:
        print(why, flush=True)
        return []
    trainer = UltralyticsTrainer(module, opt.folder)
    data_yaml = mirror_dataset(data, opt.folder / "ultralytics-data")
    rows = []
    for name in opt.peers:
        folder, recipe = opt.folder / f"{PEER_PREFIX}{name}", {"peer": name, **opt.recipe()}
        rows.append(run_model(StudyRow(folder.name, source=f"{name}.yaml (ultralytics)"), folder, recipe, opt,
                              functools.partial(train_peer, name, trainer, data_yaml, opt=opt),
                              lambda t, f, r: measure_peer(t, f, opt, r, int(data["nc"]))))  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------- timing and the run


def onnx_runner(path: Path, threads: int) -> Callable[[], None]:
    """A batch-1 ONNX Runtime run of a static-shape ONNX file at `threads` intra-op threads."""
    session = ort_session(path, threads)
    shape = session.get_inputs()[0].shape
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise StudyError(f"{path}: input shape {shape} is not static; the study times fixed-size exports")
    return ort_runner(session, tuple(shape))


def time_rows(rows: list[StudyRow], opt: StudyOptions) -> None:
    """Every exported file (float and INT8, every model) in one interleaved ONNX Runtime run: median ms per model and
    format, and the median per-round INT8/float ratio."""
    runners: dict[tuple[str, str], Callable[[], None]] = {}
    for r in (r for r in rows if r.ok):
        for kind, rel in (("float", r.float_onnx), ("int8", r.int8_onnx)):
            try:
                if rel:
                    runners[(r.model, kind)] = onnx_runner(opt.folder / r.model / rel, opt.threads)
            except Exception as e:  # a file ONNX Runtime cannot open stays out of the timing, said on its row
                _note(r, f"{kind} ONNX not timed: {first_line(e)}")
    if not runners:
        return
    progress("time", f"{len(runners)} ONNX files", f"{opt.rounds} interleaved rounds at {opt.threads} threads, batch 1")
    times = interleaved_times(runners, opt.rounds, opt.block, opt.warmup)
    for r in rows:
        pair = {kind: times[(r.model, kind)] for kind in ("float", "int8") if (r.model, kind) in times}
        if "float" in pair:
            stats = summarize(pair, "float")
            r.float_ms = stats["float"].median
            if "int8" in stats:
                r.int8_ms, r.int8_ratio = stats["int8"].median, stats["int8"].ratio
            progress("time", r.model, f"float {r.float_ms:.2f} ms" + (f", INT8 {r.int8_ms:.2f} ms" if r.int8_ms is not None else ""))


def header_lines(opt: StudyOptions, info: dict[str, Any]) -> list[str]:
    """study.md's opening: the command, the machine and versions, the recipe, and how each figure was measured."""
    versions = f"Python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}"
    versions += f", ultralytics {package_version('ultralytics')}" if opt.peers else ""
    return [
        "Command:", "", "```bash", opt.command(), "```", "",
        f"Date: {info['date']}. CPU: {info['cpu']} ({info['cores']} cores), ONNX Runtime intra-op threads: {opt.threads}, "
        f"1-min load average at start: {info['load_1min']}, GPU: {info['gpu']}. {versions}.",
        "",
        f"Recipe: {opt.schedule()}, seed {opt.seed}, data `{opt.data}`; each model with its "
        "head's default hyperparameters (train.py without --hyp); peers (ultralytics-*) with ultralytics' own defaults.",
        f"params and GFLOPs: the fused inference model at {opt.time_size} px. P, R, mAP50, mAP50-95: val.py's evaluator on the val split "
        "(best.pt; peers: their exported ONNX); INT8 mAP50-95: the INT8 ONNX, same evaluator."
        + (f" Timed files: exported again at {opt.time_size} px (INT8 calibrated on {TIMING_CALIBRATION} images)."
           if opt.time_size != opt.imgsz else ""),
        f"Latency: ONNX Runtime CPU, batch 1, static {opt.time_size}x{opt.time_size} input; {opt.rounds} rounds, round-robin "
        "over every model's float32 and INT8 "
        f"file, each doing {opt.warmup} warm-up + {opt.block} timed runs per round. ms = median over rounds of each round's "
        "block median; INT8/float = median of the per-round ratios. Pareto: not dominated in (mAP50-95 higher, float ms lower).",
    ]  # fmt: skip


def run_study(**kwargs: Any) -> Path:
    """study.py's run(): train, validate, export and time every model, write study.md/.csv/.png; returns study.md."""
    opt = StudyOptions.from_kwargs(**kwargs)
    check_options(opt)
    data = load_dataset_config(opt.data)  # the shapes dataset is generated here on first use
    opt.folder.mkdir(parents=True, exist_ok=True)
    check_writable(opt.folder)  # before hours of training, not after
    info = system_info(opt.threads)
    rows = [config_row(cfg, opt) for cfg in opt.cfg] + peer_rows(opt, data)
    time_rows(rows, opt)
    mark_pareto(rows)
    files = write_report(rows, opt.folder, header_lines(opt, info))
    print(f"study: saved {', '.join(str(f) for f in files)}", flush=True)
    return files[0]
