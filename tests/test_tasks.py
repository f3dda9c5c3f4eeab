"""The task and head registries: every registered task and head is checked here, so one added later is tested without
editing a test (timm's way). Training, validation and ONNX export of every head run in tests/test_train_every_backbone.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models  # noqa: F401  (registers the built-in heads)
from models.heads.base import head_class, head_policy, known_heads
from models.model import DetectionModel
from utils.engine.evolve import MUTATION_TABLES
from utils.engine.hyp import default_hyp_file, load_hyp
from utils.engine.options import train_parser
from utils.export.exporter import FORMATS
from utils.inference.predict import predict_parser
from utils.tasks import get_task, known_tasks, task_of

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_names_raise_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'pose'; known: classify, detect, segment"):
        get_task("pose")
    with pytest.raises(ValueError, match="unknown head kind"):
        head_policy("pose")


@pytest.mark.parametrize("kind", known_heads())
def test_every_head_has_a_complete_policy(kind: str) -> None:
    policy = head_policy(kind)
    assert policy.task in known_tasks() and policy.title
    assert load_hyp(default_hyp_file(kind))  # the file exists and holds every key
    assert policy.optimizer in ("SGD", "Adam", "AdamW")
    assert policy.evolve_table is None or policy.evolve_table in MUTATION_TABLES
    assert policy.export_formats is None or set(policy.export_formats) <= set(FORMATS)
    assert 0 <= policy.close_mosaic_share < 1 and policy.min_opset >= 0
    assert len(head_class(kind).output_axes()) >= 1 and all(0 in axes for axes in head_class(kind).output_axes())


@pytest.mark.parametrize("name", known_tasks())
def test_every_task_has_heads_scripts_and_a_default_model_of_its_own(name: str) -> None:
    task = get_task(name)
    assert any(head_policy(k).task == name for k in known_heads())
    for script in (task.train_script, task.val_script, task.predict_script):
        assert (ROOT / script).is_file(), script
    model = DetectionModel(ROOT / task.default_cfg)
    assert task_of(model) is task and model.task == name


@pytest.mark.parametrize("name", known_tasks())
def test_every_task_parses_its_scripts_flags_with_its_defaults(name: str) -> None:
    task = get_task(name)
    opt = train_parser(name).parse_args([])
    assert opt.task == name and Path(opt.project) == ROOT / task.train_project and opt.data == task.default_data
    assert Path(predict_parser(name).parse_args([]).project) == ROOT / task.predict_project


@pytest.mark.parametrize("name", known_tasks())
def test_every_task_loads_its_sample_data_and_scores_an_empty_pass(name: str, tmp_path: Path) -> None:
    task = get_task(name)
    data = task.load_data(task.sample_data(tmp_path, n_train=2, n_val=1, seed=3))
    assert data["nc"] == len(data["names"]) == 3
    loader = task.val_loader(data, "val", 64, 2, 32, rect=False, single_cls=False, workers=0)
    assert len(loader.dataset) >= 1
    result = task.evaluator(data["nc"], data["names"]).compute()  # no batch seen: zeros, in the task's columns
    assert len(result.results_row()) == len(task.metric_columns)
    assert result.fitness() == 0


@pytest.mark.parametrize("name", known_tasks())
def test_every_task_turns_a_loader_batch_into_a_training_batch(name: str, tmp_path: Path) -> None:
    task = get_task(name)
    data = task.load_data(task.sample_data(tmp_path, n_train=2, n_val=1, seed=4))
    opt = train_parser(name).parse_args(["--imgsz", "64", "--workers", "0"])
    loader, dataset = task.train_loader(data, opt, load_hyp(ROOT / "data/hyps/hyp.scratch-low.yaml").as_dict(), 64, 2, 32, -1)
    batch = task.train_batch(next(iter(loader)), torch.device("cpu"))
    assert batch.imgs.dtype == torch.float32 and batch.imgs.shape[1:] == (3, 64, 64)
    assert float(batch.imgs.min()) >= 0 and float(batch.imgs.max()) <= 1  # every task feeds 0-1 RGB
    assert len(batch.targets) >= 1 and len(dataset) >= 2
