"""Checkpoints: plain-data round trip with weights_only=True, atomic writes, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.model import DetectionModel
from utils.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_round_trip_same_outputs(tmp_path):
    model = DetectionModel(MODELS / "yolov5n.yaml", nc=3).eval()
    path = save_checkpoint(tmp_path / "w" / "best.pt", model, names=["a", "b", "c"], epoch=4)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 4 and raw["cfg"]["nc"] == 3 and raw["names"] == ["a", "b", "c"]
    loaded = load_model(path)
    assert loaded.names == ["a", "b", "c"] and not loaded.training
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])


def test_ema_weights_preferred(tmp_path):
    model = DetectionModel(MODELS / "yolov5n.yaml", nc=1)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["model.24.m.0.bias"] += 1.0
    path = save_checkpoint(tmp_path / "last.pt", model, ema=ema)
    assert torch.equal(load_model(path).detect.m[0].bias, ema["model.24.m.0.bias"])
    assert torch.equal(load_model(path, use_ema=False).detect.m[0].bias, model.detect.m[0].bias)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    model = DetectionModel(MODELS / "yolov5n.yaml", nc=1)
    path = save_checkpoint(tmp_path / "last.pt", model, epoch=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, epoch=2)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: not a readable checkpoint"):
        load_model(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_model(foreign)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": DetectionModel(MODELS / "yolov5n.yaml", nc=1), "cfg": {}}, path)
    with pytest.raises(CheckpointError, match="refused to load: .*arbitrary code"):
        load_model(path)
