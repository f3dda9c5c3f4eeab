"""YOLOv5's console and checkpoint hygiene in the Trainer: the hyperparameter and model summary lines at the start, the
validation line after each epoch (the task's own table), final weights stripped to float16 EMA without optimizer, and a
full last.pt that an interrupted run resumes from."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import train
from tests.conftest import EPS16, one_line_exit, rel_err, tiny_shapes_yaml
from utils.checkpoint import FINAL_KEYS, final_weights, load_model, read_checkpoint, save_checkpoint
from utils.engine.callbacks import Callbacks
from utils.engine.trainer import Trainer
from utils.evaluation.classify import ClassifyResult
from utils.loggers import OFF_ENV
from utils.nms import non_max_suppression

TINY_CFG = "models/yolov5n.yaml"
KW = dict(imgsz=64, batch_size=4, workers=0, noplots=True, noautoanchor=True, device="cpu")
ROW = "%22s%11s%11s%11.3g%11.3g%11.3g%11.3g"  # YOLOv5's 'all' row: class, images, instances, P, R, mAP50, mAP50-95


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in the middle of a run, raised by a test callback."""


class _Lines(logging.Handler):
    """Collects every 'mobile_yolo' message (and the test's markers) in order."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A 2-epoch run on 8 images killed after epoch 0's checkpoints, then resumed to the end. Keeps the log, the results
    rows each epoch reported, a copy of last.pt as the kill left it and, each time best.pt is written, the EMA it holds
    in float32 as a full checkpoint."""
    root = tmp_path_factory.mktemp("console")
    data = tiny_shapes_yaml(root, n_train=8, n_val=4, seed=3)
    out = SimpleNamespace(root=root, data=data, rows={}, killed=root / "killed_last.pt", full_best=root / "full_best.pt")
    lines = _Lines()
    state = {"kill": True}
    env = pytest.MonkeyPatch()
    env.setenv(OFF_ENV, "all")  # the experiment loggers are not what this module tests, and they cost seconds

    def saved(path: Path, trainer: Trainer, **_: Any) -> None:
        if path.name == "best.pt":  # the float32 EMA the final weights were made from, as a full checkpoint
            ema = trainer.ema.ema  # type: ignore[union-attr]  (the main rank always keeps one)
            save_checkpoint(out.full_best, ema, ema=ema.state_dict(), epoch=read_checkpoint(path)["epoch"])
            if state["kill"]:
                shutil.copy(path.with_name("last.pt"), out.killed)
                raise Interrupted

    def epoch_end(epoch: int, results: tuple, **_: Any) -> None:
        out.rows[epoch] = results
        lines.lines.append(f"<epoch {epoch} end>")

    callbacks = Callbacks()
    callbacks.register("on_model_save", saved)
    callbacks.register("on_fit_epoch_end", epoch_end)
    logger = logging.getLogger("mobile_yolo")
    logger.addHandler(lines)
    try:
        with pytest.raises(Interrupted):
            train.run(callbacks, cfg=TINY_CFG, data=str(data), epochs=2, project=str(root / "runs"), name="r", **KW)
        out.first_log = list(lines.lines)
        lines.lines.clear()
        state["kill"] = False
        out.best = Path(train.run(callbacks, resume=str(root / "runs" / "r" / "weights" / "last.pt")))
        out.second_log = list(lines.lines)
        out.model = load_model(out.best)
    finally:
        logger.removeHandler(lines)
        env.undo()
    yield out


def test_start_lines_hyp_and_model_summary(run: SimpleNamespace) -> None:
    hyp = read_checkpoint(run.killed)["hyp"]
    for log in (run.first_log, run.second_log):  # a resumed run prints them again, as YOLOv5 does
        starts = [ln for ln in log if ln.startswith("hyperparameters: ")]
        assert len(starts) == 1
        assert starts[0] == "hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hyp.items())
        assert "lr0=0.01" in starts[0] and "momentum=0.937" in starts[0]
        summary = [ln for ln in log if " summary: " in ln]
        assert len(summary) == 1 and summary[0].startswith("yolov5n summary: ")
        n_params = sum(p.numel() for p in run.model.parameters())
        assert f"{n_params:,} parameters, {n_params:,} gradients" in summary[0] and summary[0].endswith(" GFLOPs")
        assert log.index(starts[0]) < log.index(summary[0]) < log.index("Starting training for 2 epochs...")


def test_validation_line_after_every_epoch(run: SimpleNamespace) -> None:
    header = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
    for log, epoch in ((run.first_log, 0), (run.second_log, 1)):
        end = log.index(f"<epoch {epoch} end>")
        start = max(i for i, ln in enumerate(log[:end]) if ln.strip().startswith("Epoch"))  # this epoch's training header
        between = log[start:end]
        assert between.count(header) == 1, between
        p, r, map50, map_ = run.rows[epoch][:4]
        alls = [ln for ln in between if ln.split()[:1] == ["all"]]
        assert len(alls) == 1 and alls[0] == ROW % ("all", 4, alls[0].split()[2], p, r, map50, map_)
    assert sum(ln.split()[:1] == ["all"] for ln in run.second_log) == 2  # epoch 1's line and the final best.pt table


def test_each_task_prints_its_own_validation_table(caplog: pytest.LogCaptureFixture) -> None:
    names = ("a", "b")
    result = ClassifyResult(top1=0.5, top5=1.0, class_top1=np.array([1.0, 0.0]), class_top5=np.array([1.0, 1.0]),
                            instances=np.array([1, 1]), seen=2, speed=(0.0, 0.0, 0.0), loss=(), names=names)
    task = SimpleNamespace(validate=lambda *a, **k: result, evaluator=lambda nc, names: None)
    trainer = SimpleNamespace(task=task, val_loader=None, device=torch.device("cpu"), loss=None, save_dir=Path("."),
                              names=list(names), nc=2, opt=SimpleNamespace(single_cls=False))
    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        assert Trainer.validate(trainer, nn.Identity(), plots=False) is result  # type: ignore[arg-type]  (a stand-in Trainer)
    assert caplog.messages == result.table(verbose=False) and caplog.messages[1].split() == ["all", "2", "0.5", "1"]


def test_interrupted_last_pt_is_full_and_resumes(run: SimpleNamespace) -> None:
    killed = torch.load(run.killed, map_location="cpu", weights_only=True)
    assert killed["epoch"] == 0 and killed["optimizer"]["state"] and killed["ema"] and killed["updates"] > 0
    assert all(v.dtype == torch.float32 for v in killed["model"].values() if v.is_floating_point())
    rows = (run.best.parent.parent / "results.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [0, 1]
    assert any(ln.startswith(f"Resuming training from {run.best.parent / 'last.pt'} at epoch 2 of 2") for ln in run.second_log)


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_final_weights_are_float16_ema_without_optimizer(run: SimpleNamespace, name: str) -> None:
    ckpt = torch.load(run.best.parent / name, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", *FINAL_KEYS}  # no optimizer, no ema copy, no updates
    epoch = torch.load(run.full_best, map_location="cpu", weights_only=True)["epoch"] if name == "best.pt" else 1
    assert ckpt["epoch"] == epoch and ckpt["opt"]["epochs"] == 2 and ckpt["names"] == ["circle", "rectangle", "triangle"]
    assert ckpt["cfg"]["nc"] == 3 and ckpt["hyp"]["lr0"] == 0.01 and "best_fitness" in ckpt and ckpt["date"]
    floats = [v for v in ckpt["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    finals = [ln for ln in run.second_log if ln.startswith("Final weights (EMA in float16, no optimizer): ")]
    assert len(finals) == 1 and f"{name} " in finals[0]


def _conv_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def _have_partners(rows: torch.Tensor, other: torch.Tensor, dz: float, max_stride: float) -> bool:
    """Every detection in `rows` has one in `other` of the same class within what a logit change of at most dz allows in
    YOLOv5's decode: log-scores (log of two sigmoids, slope <= 1) move <= 2 dz; centres (2 sigmoid - 0.5 + grid) x stride
    <= stride dz / 2; sides (2 sigmoid)^2 x anchor by a factor <= exp(2 dz) (and the float16 anchor's rounding)."""
    grow = math.exp(2 * dz) * (1 + EPS16 / 2)
    for row in rows:
        same = other[other[:, 5] == row[5]]
        box_tol = max_stride * dz / 2 + float((row[2:4] - row[:2]).max()) / 2 * (grow - 1)
        near = (same[:, :4] - row[:4]).abs().amax(1) <= box_tol
        if not (near & (same[:, 4] <= row[4] * grow) & (same[:, 4] >= row[4] / grow)).any():
            return False
    return True


def test_best_pt_detects_as_the_ema_weights_did(run: SimpleNamespace) -> None:
    full = torch.load(run.full_best, map_location="cpu", weights_only=True)
    stripped = torch.load(run.best, map_location="cpu", weights_only=True)
    assert full["epoch"] == stripped["epoch"]
    for k, v in full["ema"].items():  # the stored weights are the EMA's, rounded to float16
        assert torch.equal(stripped["model"][k], v.half() if v.is_floating_point() else v), k
    ref, got = load_model(run.full_best), run.model  # load_model prefers the EMA; final weights load as float32
    assert all(p.dtype == torch.float32 for p in got.state_dict().values() if p.is_floating_point())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (a, raw_a), (b, raw_b) = ref(x), got(x)
    za, zb = torch.cat([t.flatten() for t in raw_a]), torch.cat([t.flatten() for t in raw_b])
    # Rounding a weight to float16 changes it by at most EPS16 / 2 (relative); each layer's output then moves by about as
    # much of its scale, and L layers of gain ~1 add such errors like a random walk: ~EPS16 / 2 * sqrt(L) of the logits'
    # scale. 4 covers the constant in "~" (no BN is folded here, the cancellation conftest's ROUNDING_K = 16 allows for).
    tol = 4 * EPS16 / 2 * math.sqrt(_conv_layers(ref))
    assert rel_err(zb, za) < tol
    dz = tol * float(za.abs().max())  # the largest logit change that passes
    scores = a[..., 4] * a[..., 5:].amax(-1)  # what NMS keeps a box by: objectness x best class probability
    conf = float(scores.quantile(0.9))  # an untrained model's scores are all low: keep its top 10 % of candidates
    margin = math.exp(2 * dz)  # detections this far above conf stay above it in the other model
    stride = float(ref.stride.max())
    for da, db in zip(non_max_suppression(a, conf, 0.45), non_max_suppression(b, conf, 0.45)):
        sure_a, sure_b = da[da[:, 4] > conf * margin], db[db[:, 4] > conf * margin]
        assert len(sure_a) and _have_partners(sure_a, db, dz, stride) and _have_partners(sure_b, da, dz, stride)


def test_fine_tuning_from_final_weights_loads_float32(run: SimpleNamespace) -> None:
    from utils.engine.trainer import build_model

    opt = train.parse_opt(["--weights", str(run.best)])
    opt.cfg = ""
    model = build_model(opt, nc=3, names=["circle", "rectangle", "triangle"], device=torch.device("cpu"))
    stored = torch.load(run.best, map_location="cpu", weights_only=True)["model"]
    own = model.state_dict()
    assert set(own) == set(stored)
    assert all(own[k].dtype == torch.float32 and torch.equal(own[k], v.float()) for k, v in stored.items() if v.is_floating_point())


def test_resume_from_final_weights_is_one_line(run: SimpleNamespace, tmp_path: Path) -> None:
    final = tmp_path / "final.pt"
    ckpt = torch.load(run.best.parent / "last.pt", map_location="cpu", weights_only=True)
    ckpt["epoch"] = 0  # final weights of an earlier epoch: epochs are left, but no optimizer state to continue with
    torch.save(ckpt, final)
    with pytest.raises(SystemExit) as e:
        train.cli(["--resume", str(final)])
    one_line_exit(e, "train", str(final), "final weights only", "--weights")


def test_final_weights_are_idempotent_and_keep_overflowing_tensors(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    state = {"a": torch.tensor([1.0, 1e-3]), "big": torch.tensor([1e6]), "n": torch.tensor(3)}
    torch.save(final_weights({"model": state, "ema": {**state, "a": torch.tensor([2.0, 2e-3])}, "cfg": {},
                              "optimizer": {"state": {}}, "epoch": 4, "updates": 9}), path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model", "cfg", "epoch"}
    assert ckpt["model"]["a"].dtype == torch.float16 and ckpt["model"]["a"][0] == 2.0  # the EMA's
    assert ckpt["model"]["big"].dtype == torch.float32 and ckpt["model"]["n"].dtype == torch.int64  # 1e6 overflows float16
    assert read_checkpoint(path)["model"]["a"].dtype == torch.float32
    torch.save(final_weights(read_checkpoint(path)), path)  # final weights of final weights: the same content
    again = torch.load(path, weights_only=True)
    assert set(again) == set(ckpt) and all(torch.equal(again["model"][k], v) and again["model"][k].dtype == v.dtype
                                           for k, v in ckpt["model"].items())
