"""What every experiment logger implements, and the run facts the loggers share (folder, name, parameters)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class RunInfo:
    """One training run as the loggers see it: its folder (project/name) and its parameters by group (hyp, opt)."""

    save_dir: Path
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def project_dir(self) -> Path:
        """The folder that holds this run and its siblings (--project): where the local MLflow store lives."""
        return self.save_dir.parent

    @property
    def name(self) -> str:
        """The run's name (--name with its increment, e.g. exp2)."""
        return self.save_dir.name


class RunLogger:
    """An experiment logger: the Trainer's events reach it through utils.loggers.registry; every method defaults to nothing."""

    def log_params(self, params: dict[str, dict[str, Any]]) -> None:
        """Once at the start: the hyperparameters and the options, by group ("hyp", "opt")."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """After each epoch: the results.csv row by column name (losses, metrics, learning rates), the epoch as step."""

    def log_plots(self, files: Sequence[Path]) -> None:
        """At the end: the plot images the run wrote."""

    def log_model(self, path: Path) -> None:
        """At the end: the best checkpoint."""

    def close(self) -> None:
        """At the end (or when the logger is switched off after an error): flush and release what it holds."""


def plain(value: Any) -> Any:
    """A value every logger can store: numbers, strings and booleans as they are, None as "", anything else as text."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def flat_params(params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"hyp": {"lr0": 0.01}} -> {"hyp/lr0": 0.01}: one namespace per group, so "hyp" the option and the group never clash."""
    return {f"{group}/{key}": plain(value) for group, values in params.items() for key, value in values.items()}


def safe_name(name: str) -> str:
    """A key every store accepts (letters, digits, _ - . / and spaces): metrics/mAP_0.5:0.95 -> metrics/mAP_0.5_0.95."""
    return re.sub(r"[^\w\-./ ]", "_", name)
