"""The typed training configuration: it declares every shared train.py flag, keeps a task's own flags, is frozen, and
what opt.yaml and checkpoints store reads back to the same config (resume)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from utils.engine.config import TrainConfig
from utils.engine.options import train_options, train_parser
from utils.tasks import get_task, known_tasks


def test_declares_every_flag_train_py_has() -> None:
    declared = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra", "save_dir"}
    assert declared == set(vars(train_parser("detect").parse_args([])))


@pytest.mark.parametrize("name", known_tasks())
def test_task_flags_live_in_extra_and_read_like_the_others(name: str) -> None:
    ns = train_parser(name).parse_args([])
    config = TrainConfig.of(ns)
    declared = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(config.extra) == set(vars(ns)) - declared
    for key, value in vars(ns).items():
        assert getattr(config, key) == (tuple(value) if key == "freeze" else value)
    assert config.task == name and config.project.endswith(get_task(name).train_project)


def test_frozen_and_replace_gives_a_new_config() -> None:
    config = train_options("segment", epochs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 5  # type: ignore[misc]
    changed = config.replace(epochs=5, mask_ratio=2)
    assert (config.epochs, config.mask_ratio, changed.epochs, changed.mask_ratio) == (3, 4, 5, 2)
    with pytest.raises(AttributeError, match="does not exist"):
        _ = config.no_such_option


def test_opt_yaml_round_trip() -> None:
    config = train_options("classify", epochs=2, freeze=[3], lr0=0.01)
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.as_dict()))) == config
