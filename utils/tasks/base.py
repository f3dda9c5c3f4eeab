"""The Task interface and its registry: everything that differs between detection, segmentation and classification.

The Trainer, val.py, prediction, the runtime and the exporter ask the model's task (`task_of(model)`, from its head's
policy) and hold no branch of their own on a task name. A new task is one module here plus its head in models/.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from models.heads.base import head_policy


@dataclass
class TrainBatch:
    """One training batch as the Trainer uses it: float images on the device, the loss targets, paths and further loss inputs."""

    imgs: torch.Tensor
    targets: torch.Tensor
    paths: Sequence[str]
    extras: list[torch.Tensor]


class Task:
    """Base class of tasks; subclasses set the class attributes and implement the hooks (see DetectTask for the reference)."""

    name: ClassVar[str] = ""  # registry key; a head's HeadPolicy.task names it
    what: ClassVar[str] = ""  # a model of this task, in words ("detector")
    train_script: ClassVar[str] = ""  # the scripts users run for it
    val_script: ClassVar[str] = ""
    predict_script: ClassVar[str] = ""
    default_cfg: ClassVar[str] = ""  # model yaml with neither --cfg nor --weights
    default_data: ClassVar[str | None] = None  # dataset with no --data (None: the embedded shapes dataset)
    train_project: ClassVar[str] = ""  # run folders under the repository root
    val_project: ClassVar[str] = ""
    predict_project: ClassVar[str] = ""
    metric_columns: ClassVar[tuple[str, ...]] = ()  # results.csv metric columns, in the order of a result's results_row()
    postprocess_stage: ClassVar[str] = "post-process"  # what val.py's speed line calls the step after inference
    val_loss_width: ClassVar[int] = 0  # loss entries val.py's run() returns after the metrics when it computed none (YOLOv5's)

    def handles(self, other: Task) -> bool:
        """Whether this task's val and predict scripts run models of task `other`: its own and those of tasks derived from
        it (val.py and detect.py run a segmentation model in full, boxes and masks; segment/val.py refuses a detector)."""
        return isinstance(other, type(self))

    def add_train_args(self, parser: argparse.ArgumentParser) -> None:
        """Flags of this task's training script beyond train.py's."""

    def add_val_args(self, parser: argparse.ArgumentParser) -> None:
        """Flags of this task's validation script beyond val.py's."""

    def add_predict_args(self, parser: argparse.ArgumentParser) -> None:
        """Flags of this task's prediction script beyond detect.py's."""

    def resolve_train_options(self, config: Any) -> Any:
        """Check this task's flags (one line naming a flag that cannot train) and return the config with what they imply
        resolved (a TrainConfig; the task's flags are in config.extra)."""
        return config

    def sample_data(self, root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
        """Write a small generated dataset of this task under `root` and return what --data takes for it (tests, demos)."""
        raise NotImplementedError

    def load_data(self, data: Any) -> dict:
        """The resolved dataset description (train/val paths, names, nc) for --data."""
        raise NotImplementedError

    def train_loader(self, data: dict, opt: Any, hyp: dict, imgsz: int, batch: int, stride: int, rank: int) -> tuple[Any, Any]:
        """The augmented training (loader, dataset)."""
        raise NotImplementedError

    def val_loader(self, data: dict, split: str, imgsz: int, batch: int, stride: int, *, rect: bool, single_cls: bool,
                   workers: int, cache: Any = None, pad: float = 0.5, **options: Any) -> Any:
        """The validation loader of `split` (what val.py and the Trainer score)."""
        raise NotImplementedError

    def hyp_overrides(self, opt: Any) -> dict[str, float]:
        """Hyperparameters this task's flags set in place of the hyp file's (classify: --lr0, --decay)."""
        return {}

    def scale_augmentation(self, dataset: Any, schedule: Any, hyp: dict[str, float]) -> None:
        """Apply the schedule's augmentation strength (short runs augment less) to the training dataset, before any loader
        worker copies it; `hyp` is the hyp file the loader was built from."""
        dataset.hyp = schedule.augment_hyp(dataset.hyp)

    def loss_hyp(self, opt: Any) -> dict[str, Any]:
        """Loss settings that come from this task's flags rather than the hyp file."""
        return {}

    def train_batch(self, batch: Sequence[Any], device: torch.device) -> TrainBatch:
        """A loader batch as the Trainer's step takes it."""
        raise NotImplementedError

    def evaluator(self, nc: int, names: Sequence[str]) -> Any:
        """A fresh metrics accumulator (update/compute) for one validation pass."""
        raise NotImplementedError

    def validate(self, model: Any, loader: Any, evaluator: Any, **options: Any) -> Any:
        """One validation pass of `model` over `loader` into `evaluator`; returns the result (results_row, fitness, table)."""
        raise NotImplementedError

    def before_fit(self, trainer: Any) -> None:
        """Checks and plots of the training data once model and loaders exist (YOLOv5's AutoAnchor and labels.jpg)."""

    def plot_train_batch(self, batch: TrainBatch, file: Path, names: Sequence[str]) -> None:
        """train_batch<i>.jpg: a training batch as the model sees it."""

    def warn_output_cap(self, model: Any, datasets: dict[str, Any]) -> None:
        """One warning line when images of `datasets` (description -> dataset) hold more objects than `model` can output
        (its head's max_detections); tasks without object counts have nothing to check."""

    def script(self, role: str) -> str:
        """The script users run to 'train', 'val' or 'predict' with this task's models."""
        return {"train": self.train_script, "val": self.val_script, "predict": self.predict_script}[role]


_TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register one instance of a Task subclass under its name (duplicates raise ValueError)."""
    if not cls.name:
        raise ValueError(f"register_task: {cls.__name__} needs a name")
    if cls.name in _TASKS and type(_TASKS[cls.name]) is not cls:
        raise ValueError(f"task {cls.name!r} is already registered to {type(_TASKS[cls.name]).__name__}")
    _TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    """The task registered as `name`; unknown names raise ValueError listing the known ones."""
    if not isinstance(name, str) or name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(known_tasks())}")
    return _TASKS[name]


def known_tasks() -> tuple[str, ...]:
    """Registered task names, sorted."""
    return tuple(sorted(_TASKS))


def task_of(model: Any) -> Task:
    """The task of a model (DetectionModel or inference backend): its own `task`, else its head kind's policy."""
    name = getattr(model, "task", None)
    return get_task(name if isinstance(name, str) else head_policy(str(model.head_kind)).task)


def check_script_task(task: Task, model: Any, role: str, weights: Any) -> Task:
    """The model's task when `task`'s `role` script ('val', 'predict') handles it (Task.handles), else ValueError naming
    the script to use instead; every validation and prediction entry point checks its weights through this."""
    own = task_of(model)
    if not task.handles(own):
        raise ValueError(f"weights {weights} are a {own.what}, not a {task.what}: use {own.script(role)}")
    return own
