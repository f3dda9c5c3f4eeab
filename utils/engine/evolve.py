"""--evolve: YOLOv5's hyperparameter evolution, a genetic search that trains one short run per generation.

Generation 0 trains with the given (or the head's default) hyperparameters. Each later generation picks a parent
among the five fittest rows of evolve.csv (fitness = 0.1 mAP50 + 0.9 mAP50-95; one row drawn by fitness weight, or
the fitness-weighted average), mutates it (each key with probability 0.8, by a gain 1 + N(0, 1) * 0.2 * U(0, 1) * scale
clipped to [0.3, 3], then clipped to the key's bounds) and trains with it in its own folder gen<i>/ (validation only
after the last epoch, no plots). One row per generation goes to evolve.csv (P, R, mAP50, mAP50-95, validation losses,
then every hyperparameter) and the fittest hyperparameters to hyp_evolve.yaml. Running the same command again with
--name <folder> --exist-ok continues from the rows already there (they count toward N).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from models.heads.base import HeadPolicy
from models.model import load_model_config
from models.parse import config_head
from utils.checkpoint import read_checkpoint
from utils.cli import shell_command
from utils.engine.callbacks import EVENTS, Callbacks
from utils.engine.config import TrainConfig
from utils.engine.hyp import RTDETR_KEYS, Hyp, HypError, clip_hyp
from utils.engine.torch_utils import NonFiniteLossError
from utils.engine.trainer import DistInfo, Trainer, TrainError
from utils.files import atomic_write, atomic_write_text, first_line
from utils.paths import increment_path

LOGGER = logging.getLogger("mobile_yolo")

HYP_KEYS = tuple(f.name for f in dataclasses.fields(Hyp) if f.name not in RTDETR_KEYS)
METRICS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
Meta = dict[str, tuple[float, float, float]]  # key -> (mutation scale, lower bound, upper bound); scale 0: never mutated

_SHARED_META: Meta = {
    "lr0": (1.0, 1e-5, 0.1), "lrf": (1.0, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1.0, 0.0, 0.001),
    "warmup_epochs": (1.0, 0.0, 5.0), "warmup_momentum": (1.0, 0.0, 0.95), "warmup_bias_lr": (1.0, 0.0, 0.2),
    "hsv_h": (1.0, 0.0, 0.1), "hsv_s": (1.0, 0.0, 0.9), "hsv_v": (1.0, 0.0, 0.9), "degrees": (1.0, 0.0, 45.0),
    "translate": (1.0, 0.0, 0.9), "scale": (1.0, 0.0, 0.9), "shear": (1.0, 0.0, 10.0), "perspective": (0.0, 0.0, 0.001),
    "flipud": (1.0, 0.0, 1.0), "fliplr": (0.0, 0.0, 1.0), "mosaic": (1.0, 0.0, 1.0), "mixup": (1.0, 0.0, 1.0),
    "copy_paste": (0.0, 0.0, 1.0),  # this loader has no copy-paste augmentation
    "iou_t": (0.0, 0.1, 0.7),  # not used by either loss
}
# YOLOv5's loss gains and anchor threshold; dfl belongs to the anchor-free loss only
ANCHOR_BASED_META: Meta = {
    **_SHARED_META, "box": (1.0, 0.02, 0.2), "cls": (1.0, 0.2, 4.0), "cls_pw": (1.0, 0.5, 2.0), "obj": (1.0, 0.2, 4.0),
    "obj_pw": (1.0, 0.5, 2.0), "anchor_t": (1.0, 2.0, 8.0), "fl_gamma": (0.0, 0.0, 2.0), "dfl": (0.0, 0.4, 6.0),
}
# YOLOv8's gains (box 7.5, cls 0.5, dfl 1.5 by default); the objectness and anchor keys do nothing there
ANCHOR_FREE_META: Meta = {
    **_SHARED_META, "box": (1.0, 1.0, 20.0), "cls": (1.0, 0.2, 4.0), "dfl": (1.0, 0.4, 6.0), "cls_pw": (0.0, 0.5, 2.0),
    "obj": (0.0, 0.2, 4.0), "obj_pw": (0.0, 0.5, 2.0), "anchor_t": (0.0, 2.0, 8.0), "fl_gamma": (0.0, 0.0, 2.0),
}


MUTATION_TABLES: dict[str, Meta] = {"anchor_based": ANCHOR_BASED_META, "anchor_free": ANCHOR_FREE_META}


def meta_for(table: str) -> Meta:
    """The mutation table a head's policy names (HeadPolicy.evolve_table); unknown names raise ValueError."""
    if table not in MUTATION_TABLES:
        raise ValueError(f"unknown mutation table {table!r}; known: {', '.join(sorted(MUTATION_TABLES))}")
    return MUTATION_TABLES[table]


def evolve_meta(opt: TrainConfig) -> Meta:
    """The mutation table of the head being trained (from --cfg, else the --weights checkpoint's config), read before any
    generation trains; a head whose policy has none is refused in one line."""
    cfg: Any = opt.cfg or read_checkpoint(opt.weights)["cfg"]
    head = config_head(cfg if isinstance(cfg, dict) else load_model_config(cfg))
    policy = getattr(head, "policy", None)
    if not isinstance(policy, HeadPolicy):
        raise TrainError(f"--evolve: the model's last layer {head.__name__} is not a registered head")
    if policy.evolve_table is None:
        raise TrainError(f"--evolve is not supported for {policy.title} models yet")
    return meta_for(policy.evolve_table)


def evolve_columns(loss_names: Sequence[str]) -> tuple[str, ...]:
    """evolve.csv's columns: P, R, mAP50, mAP50-95, the validation losses, then every hyperparameter."""
    return (*METRICS, *(f"val/{n}" for n in loss_names), *HYP_KEYS)


@dataclasses.dataclass(frozen=True)
class EvolveTable:
    """The rows of evolve.csv as numbers, with the loss item names its columns were written for."""

    loss_names: tuple[str, ...]
    rows: np.ndarray  # (generations, len(evolve_columns(loss_names)))

    def results(self) -> np.ndarray:
        """(n, 4 + losses): P, R, mAP50, mAP50-95 and the validation losses of each generation."""
        return self.rows[:, : 4 + len(self.loss_names)]

    def hyps(self) -> np.ndarray:
        """(n, len(HYP_KEYS)) the hyperparameters of each generation."""
        return self.rows[:, 4 + len(self.loss_names):]

    def fitness(self) -> np.ndarray:
        """(n,) 0.1 * mAP50 + 0.9 * mAP50-95 of each generation."""
        return 0.1 * self.rows[:, 2] + 0.9 * self.rows[:, 3]

    def best_hyp(self) -> dict[str, float]:
        """The hyperparameters of the fittest generation (the first of equals)."""
        return dict(zip(HYP_KEYS, map(float, self.hyps()[int(np.argmax(self.fitness()))])))

    def append(self, results: Sequence[float], hyp: Hyp) -> EvolveTable:
        """A new table with one more generation."""
        row = np.array([*results, *(hyp.as_dict()[k] for k in HYP_KEYS)], dtype=np.float64)
        return EvolveTable(self.loss_names, np.vstack([self.rows, row[None]]))


def mutate(parent: dict[str, float], meta: Meta, rng: np.random.Generator, prob: float = 0.8, sigma: float = 0.2) -> dict[str, float]:
    """A child of `parent`: keys of scale > 0 multiplied by random gains (at least one changes), clipped to their bounds
    and to the ranges a hyp file may hold (HYP_RANGES)."""
    keys = list(parent)
    scale = np.array([meta.get(k, (0.0, 0.0, 0.0))[0] for k in keys], dtype=np.float64)
    gains = np.ones(len(keys))
    while scale.any() and (gains == 1).all():  # redraw until something mutates
        hit = rng.random(len(keys)) < prob
        gains = (scale * hit * rng.standard_normal(len(keys)) * rng.random() * sigma + 1).clip(0.3, 3.0)
    child = {}
    for k, s, g in zip(keys, scale, gains):
        if s == 0:
            child[k] = parent[k]  # frozen keys keep their value, even outside the bounds
            continue
        lo, hi = meta[k][1:]
        child[k] = float(f"{min(max(parent[k] * g, lo), hi):.5g}")
    return clip_hyp(child)  # a table's bounds wider than what a hyp file may hold cannot produce a refused file


def select_parent(table: EvolveTable, rng: np.random.Generator, mode: str = "single", top: int = 5) -> dict[str, float]:
    """The parent hyperparameters from the `top` fittest rows: one drawn by fitness ('single') or their weighted mean."""
    if mode not in ("single", "weighted"):
        raise ValueError(f"parent selection must be 'single' or 'weighted', got {mode!r}")
    fit = table.fitness()
    order = np.argsort(-fit, kind="stable")[:top]
    w = fit[order] - fit[order].min() + 1e-6  # the least fit of the top rows keeps a small chance
    hyps = table.hyps()[order]
    if mode == "weighted" and len(order) > 1:
        vec = (hyps * w[:, None]).sum(0) / w.sum()
    else:
        vec = hyps[rng.choice(len(order), p=w / w.sum())]
    return dict(zip(HYP_KEYS, map(float, vec)))


def _foreign(path: Path, why: str) -> TrainError:
    """The one-line refusal of an evolve.csv this code did not write (the file is left as it is)."""
    return TrainError(f"{path}: not an evolve.csv of this project ({why}); it is left untouched, choose another --name")


def _parse_header(path: Path, header: str) -> tuple[str, ...]:
    """The loss item names of an evolve.csv header, checking the metric and hyperparameter columns."""
    cols = [c.strip() for c in header.split(",")]
    losses = cols[len(METRICS): len(cols) - len(HYP_KEYS)]
    names = tuple(c[4:] for c in losses)
    if tuple(cols[: len(METRICS)]) != METRICS or not losses or any(not c.startswith("val/") or not c[4:] for c in losses):
        raise _foreign(path, f"header starts {header.strip()[:60]!r}")
    if tuple(cols[len(cols) - len(HYP_KEYS):]) != HYP_KEYS:
        raise _foreign(path, "its hyperparameter columns differ from this project's")
    return names


def _parse_row(path: Path, line_no: int, line: str, width: int) -> list[float]:
    """One data row: `width` finite numbers."""
    parts = line.split(",")
    if len(parts) != width:
        raise _foreign(path, f"line {line_no} has {len(parts)} values, expected {width}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise _foreign(path, f"line {line_no} holds a value that is not a number") from None
    if not all(math.isfinite(v) for v in values):
        raise _foreign(path, f"line {line_no} holds a value that is not finite")
    return values


def read_evolve_csv(path: Path) -> EvolveTable:
    """The rows of an existing evolve.csv; anything this code would not have written is one TrainError naming the file."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise _foreign(path, "not UTF-8 text") from None
    if not lines:
        raise _foreign(path, "the file is empty")
    losses = _parse_header(path, lines[0])
    width = len(evolve_columns(losses))
    rows = [_parse_row(path, i + 2, ln, width) for i, ln in enumerate(lines[1:])]
    table = EvolveTable(losses, np.array(rows, dtype=np.float64).reshape(-1, width))
    for i, values in enumerate(table.hyps()):
        try:
            Hyp.from_dict(dict(zip(HYP_KEYS, values.tolist())), f"{path} line {i + 2}")
        except HypError as e:
            raise _foreign(path, first_line(e)) from None
    return table


def write_evolve_csv(path: Path, table: EvolveTable) -> None:
    """Replace evolve.csv in one step (YOLOv5's layout: names and values right-aligned to 20 characters)."""
    lines = [",".join(f"{c:>20}" for c in evolve_columns(table.loss_names))]
    lines += [",".join(f"{v:>20.5g}" for v in row) for row in table.rows.tolist()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_best_hyp(path: Path, table: EvolveTable) -> None:
    """hyp_evolve.yaml: the fittest generation's hyperparameters, loadable with --hyp (atomic write)."""
    fit = table.fitness()
    best = int(np.argmax(fit))
    head = f"# Hyperparameter evolution: fittest of {len(fit)} generations (row {best + 1}, fitness {fit[best]:.5g})\n"
    atomic_write_text(path, head + yaml.safe_dump(table.best_hyp(), sort_keys=False))


def plot_evolve(path: Path, table: EvolveTable, meta: Meta) -> Path | None:
    """evolve.png: fitness against each mutated hyperparameter, the fittest marked; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    keys = [k for k in HYP_KEYS if meta[k][0] > 0]
    ncols = 5
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(2.4 * ncols, 2.0 * nrows), tight_layout=True)
    FigureCanvasAgg(fig)
    fit, hyps, best = table.fitness(), table.hyps(), int(np.argmax(table.fitness()))
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax, k in zip(axes, keys):
        j = HYP_KEYS.index(k)
        ax.scatter(hyps[:, j], fit, c=fit, cmap="viridis", s=10, alpha=0.8, edgecolors="none")
        ax.plot(hyps[best, j], fit[best], "k+", markersize=12)
        ax.set_title(f"{k} = {hyps[best, j]:.3g}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"fitness (y) against each mutated hyperparameter; + marks the fittest of {len(fit)}", fontsize=9)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def _generation_callbacks(user: Callbacks | None, rows: list, saved: list[Path]) -> Callbacks:
    """Callbacks of one generation: the user's (forwarded) plus recorders of the result rows and saved checkpoints."""
    cb = Callbacks()
    if user is not None:
        for event in EVENTS:
            cb.register(event, functools.partial(user.run, event))
    cb.register("on_fit_epoch_end", lambda results, **_: rows.append(tuple(float(v) for v in results)))
    cb.register("on_model_save", lambda path, **_: saved.append(Path(path)))
    return cb


def _remove_own_files(gen_dir: Path, files: Sequence[Path]) -> None:
    """Delete the files this generation wrote (checkpoints, or the set-up files on refusal) and then-empty folders."""
    for f in files:
        if f.parent in (gen_dir, gen_dir / "weights"):
            f.unlink(missing_ok=True)
    for folder in (gen_dir / "weights", gen_dir):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def run_generation(
    opt: TrainConfig, gen_dir: Path, hyp: str, device: torch.device, callbacks: Callbacks | None = None,
    expect_losses: tuple[str, ...] | None = None,
) -> tuple[tuple[float, ...], Hyp, tuple[str, ...]]:
    """Train one candidate in gen_dir and delete its checkpoints; returns (P, R, mAP50, mAP50-95, *val losses), Hyp, loss names."""
    gopt = TrainConfig.of(opt).replace(save_dir=str(gen_dir), hyp=hyp, evolve=None, resume=False, noval=True, nosave=True,
                                       noplots=True, save_period=-1)
    rows: list[tuple[float, ...]] = []
    saved: list[Path] = []
    trainer = Trainer(gopt, device, DistInfo(), _generation_callbacks(callbacks, rows, saved))
    names = tuple(trainer.loss.names)
    if expect_losses is not None and names != expect_losses:
        _remove_own_files(gen_dir, [gen_dir / "opt.yaml", gen_dir / "hyp.yaml"])
        raise TrainError(f"{Path(opt.save_dir) / 'evolve.csv'} was written for losses {', '.join(expect_losses)}, "
                         f"but this model's are {', '.join(names)}; evolve it under another --name")
    try:
        trainer.fit()
    except NonFiniteLossError as e:  # a diverging candidate is a poor one, not the end of the search
        LOGGER.warning(f"WARNING: generation in {gen_dir} diverged ({first_line(e)}); recorded with fitness 0")
        rows.append((0.0,) * (4 + len(names)))
    finally:
        _remove_own_files(gen_dir, saved)
    return rows[-1], trainer.hyp, names


def _next_generation(
    opt: TrainConfig, table: EvolveTable | None, meta: Meta, g: int, rng: np.random.Generator, device: torch.device,
    callbacks: Callbacks | None,
) -> EvolveTable:
    """Mutate a parent (from generation 1 on), train it in gen<g>/ and return the table with its row added."""
    gen_dir = increment_path(Path(opt.save_dir) / f"gen{g:03d}", sep="-")
    hyp = str(opt.hyp or "")
    if table is not None and len(table.rows):
        child = mutate(select_parent(table, rng), meta, rng)
        hyp = str(atomic_write_text(gen_dir / "hyp.yaml", yaml.safe_dump(child, sort_keys=False)))
    LOGGER.info(f"\nEvolve: generation {g + 1}/{opt.evolve} in {gen_dir}")
    results, used, names = run_generation(opt, gen_dir, hyp, device, callbacks, table.loss_names if table is not None else None)
    base = table if table is not None else EvolveTable(names, np.zeros((0, len(evolve_columns(names)))))
    return base.append(results, used)


def _check_own_folder(save_dir: Path) -> None:
    """Refuse a folder holding evolution outputs without their evolve.csv: those files are not this code's to replace."""
    for name in ("hyp_evolve.yaml", "evolve.png"):
        if (save_dir / name).exists() and not (save_dir / "evolve.csv").exists():
            raise TrainError(f"{save_dir / name} exists but {save_dir / 'evolve.csv'} does not; choose another --name")


def evolve(opt: TrainConfig, device: torch.device, callbacks: Callbacks | None = None,
           rng: np.random.Generator | None = None) -> Path:
    """Run generations until evolve.csv holds opt.evolve rows; returns hyp_evolve.yaml (rng: one stream for all, for tests)."""
    save_dir = Path(opt.save_dir)
    csv, best_yaml = save_dir / "evolve.csv", save_dir / "hyp_evolve.yaml"
    _check_own_folder(save_dir)
    meta = evolve_meta(opt)
    table = read_evolve_csv(csv) if csv.exists() else None  # checked before anything is written
    start = 0 if table is None else len(table.rows)
    if start:
        LOGGER.info(f"Evolve: continuing {csv} with {start} of {opt.evolve} generations done")
    for g in range(start, int(opt.evolve or 0)):
        table = _next_generation(opt, table, meta, g, rng or np.random.default_rng([opt.seed % 2**32, g]), device, callbacks)
        write_evolve_csv(csv, table)
        write_best_hyp(best_yaml, table)
        fit = table.fitness()
        LOGGER.info(f"Evolve: generation {g + 1} fitness {fit[-1]:.5g}, best {fit.max():.5g} (row {int(fit.argmax()) + 1})")
    if table is None or not len(table.rows):
        raise TrainError(f"{csv}: no generations recorded")
    write_best_hyp(best_yaml, table)
    if not opt.noplots:
        plot_evolve(save_dir / "evolve.png", table, meta)
    LOGGER.info(f"Evolve: {len(table.rows)} generations in {csv}; best hyperparameters {best_yaml} "
                f"(train with {shell_command('--hyp', best_yaml)})")
    return best_yaml
