"""The typed, frozen training configuration: train.py's flags resolved once, before the Trainer starts.

`train_main` builds it from the parsed command line (or train_options for Python callers): defaults of the task, the
run folder, the batch size. The Trainer reads it and never writes to it; the values it derives (the checked image size,
the hyp file it loaded) are its own fields. A task's own flags (segment: --mask-ratio, classify: --lr0) live in `extra`
and read like the others (`config.mask_ratio`). opt.yaml and checkpoints store `as_dict()`, which `from_dict` reads back.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Union


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every train.py flag, typed (YOLOv5's names), plus the task, the run folder and the task's own flags."""

    task: str = "detect"
    weights: str = ""
    cfg: str = ""
    data: Union[str, None] = None
    hyp: str = ""
    epochs: int = 100
    batch_size: int = 16
    imgsz: int = 640
    rect: bool = False
    resume: Union[str, bool] = False
    nosave: bool = False
    noval: bool = False
    noautoanchor: bool = False
    noplots: bool = False
    cache: Union[str, None] = None
    device: str = ""
    multi_scale: bool = False
    single_cls: bool = False
    optimizer: str = "auto"
    sync_bn: bool = False
    workers: int = 8
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    cos_lr: bool = False
    label_smoothing: float = 0.0
    patience: int = 100
    freeze: tuple[int, ...] = (0,)
    save_period: int = -1
    seed: int = 0
    close_mosaic: int = 0
    recipe: str = "auto"
    backbone_weights: str = ""
    max_params: Union[int, None] = None  # the model size limit (models/limits.py); None: environment or default
    evolve: Union[int, None] = None
    image_weights: bool = False
    quad: bool = False
    compile: bool = False
    save_dir: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # the task's own flags

    def __getattr__(self, name: str) -> Any:
        """A task flag (`config.mask_ratio`); unknown names raise AttributeError as usual."""
        extra = self.__dict__.get("extra") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(f"training option {name!r} does not exist")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Known fields typed as declared, anything else (a task's flags) into `extra`; paths become strings."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        plain: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
        known: dict[str, Any] = {k: v for k, v in plain.items() if k in names}
        if "freeze" in known:
            known["freeze"] = tuple(int(i) for i in known["freeze"])
        extra = {**dict(plain.get("extra") or {}), **{k: v for k, v in plain.items() if k not in names and k != "extra"}}
        return cls(**known, extra=extra)

    @classmethod
    def of(cls, opt: Union[TrainConfig, argparse.Namespace, dict[str, Any]]) -> TrainConfig:
        """The config of parsed options (argparse), a dict (opt.yaml, a checkpoint's) or a config itself."""
        if isinstance(opt, TrainConfig):
            return opt
        return cls.from_dict(vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some options changed (task flags included)."""
        return TrainConfig.from_dict({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        """Plain data for opt.yaml and checkpoints: every option, the task's flags flattened in, tuples as lists."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["freeze"] = list(self.freeze)
        return {**out, **self.extra}
