"""The active set of experiment loggers: which are on, and how the Trainer's callbacks reach them.

A logger is on when its packages are importable (YOLOv5's rule) and MOBILE_YOLO_LOGGERS_OFF does not name it; a missing
package gives one hint line. Every call into a logger is guarded: the first error switches that logger off with one
warning line, and training goes on unchanged. Loggers only work at the start, once per epoch (reading back the row just
appended to results.csv) and at the end (plots and best.pt): nothing per batch.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import suppress
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from utils.files import first_line
from utils.loggers.base import RunInfo, RunLogger
from utils.loggers.mlflow_logger import MLflowLogger
from utils.loggers.tensorboard_logger import TensorBoardLogger
from utils.loggers.wandb_logger import WandbLogger

LOGGER = logging.getLogger("mobile_yolo")
OFF_ENV = "MOBILE_YOLO_LOGGERS_OFF"  # e.g. "wandb,mlflow" or "all"
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg")


class LoggerError(ValueError):
    """A bad logger setting (one line)."""


class EventSink(Protocol):
    """What the loggers attach to: utils.engine.callbacks.Callbacks."""

    def register(self, event: str, handler: Callable[..., Any]) -> None: ...


def _mlflow_modules() -> tuple[str, ...]:
    """mlflow, plus SQLAlchemy and Alembic for the default local store (a tracking server needs neither)."""
    return ("mlflow",) if os.environ.get("MLFLOW_TRACKING_URI") else ("mlflow", "sqlalchemy", "alembic")


@dataclass(frozen=True)
class LoggerSpec:
    """One kind of logger: its OFF_ENV key, display name, the modules it needs and how to build it for a run."""

    key: str
    name: str
    modules: Callable[[], tuple[str, ...]]
    build: Callable[[RunInfo], RunLogger]

    def missing(self) -> list[str]:
        """The needed modules that cannot be imported."""
        return [m for m in self.modules() if not _importable(m)]


def _importable(module: str) -> bool:
    """Whether `import module` can work, found without importing it (a None entry in sys.modules blocks the import)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


LOGGERS: tuple[LoggerSpec, ...] = (
    LoggerSpec("tensorboard", "TensorBoard", lambda: ("tensorboard",), lambda run: TensorBoardLogger(run.save_dir)),
    LoggerSpec("mlflow", "MLflow", _mlflow_modules, MLflowLogger),
    LoggerSpec("wandb", "Weights & Biases", lambda: ("wandb",), WandbLogger),
)


def switched_off(specs: Sequence[LoggerSpec], value: str | None = None) -> set[str]:
    """The keys OFF_ENV (or `value`) names: comma- or space-separated keys, or "all"; an unknown key raises LoggerError."""
    text = os.environ.get(OFF_ENV, "") if value is None else value
    words = {w.strip().lower() for w in text.replace(",", " ").split() if w.strip()}
    keys = {s.key for s in specs}
    if "all" in words:
        return keys
    unknown = sorted(words - keys)
    if unknown:
        raise LoggerError(f"environment variable {OFF_ENV}: unknown logger {unknown[0]!r}; known: {', '.join(sorted(keys))}, all")
    return words


def results_row(csv: Path, epoch: int) -> dict[str, float]:
    """The last results.csv row by column name (the epoch column left out); it must be `epoch`'s."""
    lines = [ln for ln in csv.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"{csv}: no results row")
    header, row = [c.strip() for c in lines[0].split(",")], [v.strip() for v in lines[-1].split(",")]
    if len(row) != len(header) or int(row[0]) != epoch:
        raise ValueError(f"{csv}: the last row is not epoch {epoch}'s")
    return {name: float(value) for name, value in zip(header[1:], row[1:])}


def plot_files(save_dir: Path) -> list[Path]:
    """The images the run wrote into its folder (results.png, PR curves, confusion matrix, labels, batches), by name."""
    return sorted(p for p in save_dir.iterdir() if p.suffix.lower() in PLOT_SUFFIXES and p.is_file())


class ActiveLoggers:
    """The loggers of one Trainer (`owner`): built at on_train_start, closed at on_train_end; events of other trainers
    that share the callbacks object are ignored."""

    def __init__(self, owner: object, specs: Sequence[LoggerSpec], off: set[str]) -> None:
        self.owner: Any = owner  # Any: comparing a trainer with it must not narrow the trainer's type
        self.specs, self.off = tuple(specs), off
        self.active: list[tuple[str, RunLogger]] = []

    def on_train_start(self, trainer: Any, **_: Any) -> None:
        """Build each logger that is on and log the parameters; hint at the ones whose packages are missing."""
        if trainer is not self.owner:
            return
        self.close_all()
        try:
            run = RunInfo(Path(trainer.save_dir), {"hyp": trainer.hyp.as_dict(), "opt": trainer.options_record()})
        except Exception as e:
            LOGGER.warning(f"WARNING: loggers off: the run's options are unreadable: {type(e).__name__}: {first_line(e)}")
            return
        for spec in self.specs:
            if spec.key in self.off:
                continue
            missing = spec.missing()
            if missing:
                LOGGER.info(f"{spec.name}: off, {', '.join(missing)} not installed (pip install -r requirements-loggers.txt; "
                            f"{OFF_ENV}={spec.key} hides this line)")
                continue
            try:
                self.active.append((spec.name, spec.build(run)))
            except Exception as e:
                self._warn(spec.name, "start", e)
        self._each("start", "log_params", run.params)

    def on_fit_epoch_end(self, trainer: Any, epoch: int, **_: Any) -> None:
        """The epoch's results.csv row to every logger, the epoch as step."""
        if trainer is not self.owner or not self.active:
            return
        csv = Path(trainer.save_dir) / "results.csv"
        try:
            metrics = results_row(csv, epoch)
        except Exception as e:
            LOGGER.warning(f"WARNING: loggers: epoch {epoch} not logged, {csv} unreadable: {first_line(e)}")
            return
        self._each(f"epoch {epoch}", "log_epoch", epoch, metrics)

    def on_train_end(self, trainer: Any, best: Path, **_: Any) -> None:
        """The run's plots and the best checkpoint (the uploads, all at the end), then close every logger."""
        if trainer is not self.owner or not self.active:
            return
        self._each("end", "log_plots", plot_files(Path(trainer.save_dir)))
        if Path(best).is_file():
            self._each("end", "log_model", Path(best))
        self._each("end", "close")
        self.active = []

    def close_all(self) -> None:
        """Close every active logger (a second fit() of the same trainer starts new runs)."""
        self._each("close", "close")
        self.active = []

    def _each(self, stage: str, method: str, *args: Any) -> None:
        """Call `method` on every active logger; one that raises is warned about once and dropped."""
        for entry in list(self.active):
            name, logger = entry
            try:
                getattr(logger, method)(*args)
            except Exception as e:
                self.active.remove(entry)
                self._warn(name, stage, e)
                if method != "close":
                    with suppress(Exception):
                        logger.close()

    @staticmethod
    def _warn(name: str, stage: str, e: Exception) -> None:
        LOGGER.warning(f"WARNING: {name} logging off after an error at {stage}: {type(e).__name__}: {first_line(e)}")


def attach_loggers(callbacks: EventSink, owner: object, specs: Sequence[LoggerSpec] | None = None) -> ActiveLoggers:
    """The loggers of `owner` (a Trainer, main rank only), attached to its callbacks; the switch is read now, so a bad
    MOBILE_YOLO_LOGGERS_OFF fails before any work."""
    specs = LOGGERS if specs is None else specs
    loggers = ActiveLoggers(owner, specs, switched_off(specs))
    callbacks.register("on_train_start", loggers.on_train_start)
    callbacks.register("on_fit_epoch_end", loggers.on_fit_epoch_end)
    callbacks.register("on_train_end", loggers.on_train_end)
    return loggers
