"""Hostile and careless input to training, round two: absurd hyperparameters are refused when the hyp file loads (and
evolve never writes one), a diverging run stops in one line keeping the last finite checkpoints, RT-DETR warns once when
images hold more objects than its queries, and every val/predict script refuses weights of a task it does not run."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import detect
import train
import val
from classify import predict as cls_predict
from classify import val as cls_val
from models.model import DetectionModel
from segment import predict as seg_predict
from segment import val as seg_val
from tests.conftest import one_line_exit, tiny_shapes_yaml
from utils.checkpoint import save_checkpoint
from utils.engine.callbacks import Callbacks
from utils.engine.evolve import HYP_KEYS, MUTATION_TABLES, mutate
from utils.engine.hyp import HYP_DIR, Hyp, HypError, load_hyp
from utils.engine.torch_utils import NonFiniteLossError
from utils.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = "models/yolov5n.yaml"
KW = dict(imgsz=64, batch_size=4, workers=0, noplots=True, noautoanchor=True, device="cpu")
RTDETR_TINY = {  # test_rtdetr.py's small RT-DETR with 3 queries: fewer than the shapes images' objects
    "nc": 3,
    "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],
                 [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [64, 3, 2]]],
    "head": [[-1, 1, "Conv", [64, 1, 1, None, 1, 1, False]], [-1, 1, "AIFI", [128, 4]], [-1, 1, "RepC3", [64, 0.5]],
             [[2, 3, 7], 1, "RTDETRDecoder", ["nc", 64, 3, 4, 4, 2]]],
}


def _hyp_file(folder: Path, **changes: float) -> Path:
    """hyp.scratch-low.yaml with some values changed, written to folder/hyp.yaml."""
    values = {**yaml.safe_load((HYP_DIR / "hyp.scratch-low.yaml").read_text()), **changes}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hyp.yaml").write_text(yaml.safe_dump(values))
    return folder / "hyp.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8+4 image shapes dataset (up to 6 objects per image) and its yaml."""
    return tiny_shapes_yaml(tmp_path_factory.mktemp("hostile_training"), n_train=8, n_val=4, seed=3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained checkpoints of each task: detect, segment, classify."""
    root = tmp_path_factory.mktemp("task_weights")
    cfgs = {"detect": TINY_CFG, "segment": "models/yolov5n-seg.yaml", "classify": "models/yolov5n-cls.yaml"}
    return {t: save_checkpoint(root / f"{t}.pt", DetectionModel(ROOT / c, nc=3), names=["a", "b", "c"]) for t, c in cfgs.items()}


# ---- absurd hyperparameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("lr0", 1e12, "(0, 1]"), ("lr0", 0.0, "(0, 1]"), ("momentum", 1.0, "[0, 1)"), ("weight_decay", 0.5, "[0, 0.1]"),
    ("warmup_epochs", 1e6, "[0, 100]"), ("box", 1e9, "[0, 50]"), ("fliplr", 1.5, "[0, 1]"), ("degrees", 720.0, "[0, 180]"),
    ("anchor_t", 0.5, "[1, 20]"), ("scale", 1.0, "[0, 1)"),
])
def test_absurd_hyp_value_is_one_line_naming_file_key_value_and_range(key: str, value: float, allowed: str, tmp_path: Path) -> None:
    path = _hyp_file(tmp_path, **{key: value})
    with pytest.raises(HypError) as e:
        load_hyp(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and key in msg and repr(value) in msg and allowed in msg, msg


def test_train_refuses_lr0_1e12_before_making_a_run_folder(data: Path, tmp_path: Path) -> None:
    hyp = _hyp_file(tmp_path, lr0=1e12)
    with pytest.raises(SystemExit) as e:
        train.cli(["--cfg", TINY_CFG, "--data", str(data), "--hyp", str(hyp), "--epochs", "1", "--img", "64", "--batch", "4",
                   "--workers", "0", "--device", "cpu", "--noplots", "--noautoanchor", "--project", str(tmp_path / "runs")])
    one_line_exit(e, "train", str(hyp), "lr0", "1000000000000.0", "(0, 1]")
    assert not (tmp_path / "runs").exists()


def test_shipped_hyp_files_defaults_and_evolve_bounds_fit_the_ranges() -> None:
    from utils.engine.hyp import HYP_RANGES

    assert set(HYP_RANGES) == set(Hyp.__dataclass_fields__)
    for path in sorted(HYP_DIR.glob("*.yaml")):
        assert all(v in HYP_RANGES[k] for k, v in load_hyp(path).as_dict().items()), path
    for table in MUTATION_TABLES.values():
        for key, (scale, lo, hi) in table.items():
            assert scale == 0 or (lo in HYP_RANGES[key] and hi in HYP_RANGES[key]), key


def test_evolve_mutations_stay_loadable_even_with_wide_bounds() -> None:
    parent = {k: v for k, v in load_hyp(HYP_DIR / "hyp.scratch-low.yaml").as_dict().items() if k in HYP_KEYS}
    wide = {k: (1.0, 0.0, 1e3) for k in HYP_KEYS}  # a table far wider than any hyp file may hold
    for seed in range(20):
        child = mutate(parent, wide, np.random.default_rng(seed), prob=1.0, sigma=3.0)
        Hyp.from_dict(child, f"mutation {seed}")  # never a refused hyp
        assert child["momentum"] < 1 and child["fliplr"] <= 1 and child["lr0"] <= 1 and child["scale"] < 1, child


# ---- divergence -----------------------------------------------------------------------------------------------------


def test_real_divergence_exits_one_line_and_saves_no_nan_weights(data: Path, tmp_path: Path) -> None:
    """In range but explosive: lr0 1 with gains of 50, no clipping, no warm-up (the first epoch's weights overflow)."""
    hyp = _hyp_file(tmp_path, lr0=1.0, momentum=0.99, warmup_epochs=0.0, warmup_bias_lr=1.0, clip_grad=0.0, box=50.0,
                    obj=50.0, cls=50.0)
    with pytest.raises(SystemExit) as e:
        train.cli(["--cfg", TINY_CFG, "--data", str(data), "--hyp", str(hyp), "--epochs", "1", "--img", "64", "--batch", "4",
                   "--workers", "0", "--device", "cpu", "--noplots", "--noautoanchor", "--project", str(tmp_path / "runs")])
    one_line_exit(e, "train", "at epoch 0", f"lr0 1 from {hyp}", "no weights were saved")
    assert not list(tmp_path.rglob("*.pt"))


def _poison(event: str) -> Callbacks:
    """Callbacks setting the first weight tensor to NaN in epoch 1: after its first batch, or after its training part."""
    def nan_weights(trainer: object, **kw: object) -> None:
        if kw.get("epoch") == 1 or kw.get("ni") == len(trainer.train_loader):  # type: ignore[attr-defined]
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))  # type: ignore[attr-defined]

    cb = Callbacks()
    cb.register(event, nan_weights)
    return cb


@pytest.mark.parametrize(("event", "cause"), [("on_train_batch_end", "loss became nan at epoch 1 batch 1"),
                                              ("on_train_epoch_end", "weights became NaN/inf at epoch 1")])
def test_divergence_keeps_the_last_finite_last_and_best(event: str, cause: str, data: Path, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError) as e:
        train.run(_poison(event), cfg=TINY_CFG, data=str(data), epochs=2, project=str(tmp_path), name="r", noval=True, **KW)
    wdir = tmp_path / "r" / "weights"
    assert cause in str(e.value) and f"{wdir / 'last.pt'} (epoch 0) and best.pt keep the last finite weights" in str(e.value)
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(wdir / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 0, name
        states = [ckpt[k] for k in ("model", "ema") if k in ckpt]  # best.pt holds final weights: the EMA as its model
        assert all(torch.isfinite(t).all() for sd in states for t in sd.values() if t.is_floating_point())
    rows = (tmp_path / "r" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and not any("nan" in r for r in rows)  # the header and epoch 0 only


# ---- RT-DETR's output cap -------------------------------------------------------------------------------------------


def test_heads_declare_their_output_cap() -> None:
    assert DetectionModel(RTDETR_TINY).head.max_detections == 3
    assert DetectionModel(ROOT / TINY_CFG).head.max_detections is None  # NMS's max_det is the only bound


def test_rtdetr_warns_once_when_images_hold_more_objects_than_queries(data: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "rtdetr_3q.yaml"
    cfg.write_text(yaml.safe_dump(RTDETR_TINY))
    caplog.set_level(logging.WARNING, logger="mobile_yolo")
    best = train.run(cfg=str(cfg), data=str(data), epochs=1, project=str(tmp_path), name="r", **KW)
    capped = [r.getMessage() for r in caplog.records if "outputs at most 3 objects per image" in r.getMessage()]
    assert len(capped) == 1 and "training set" in capped[0] and "\n" not in capped[0], capped
    caplog.clear()
    val.run(weights=str(best), data=str(data), imgsz=64, batch_size=4, workers=0, device="cpu", project=str(tmp_path / "val"))
    capped = [r.getMessage() for r in caplog.records if "outputs at most 3 objects per image" in r.getMessage()]
    assert len(capped) == 1 and "val split" in capped[0], capped


# ---- weights of another task ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("script", "prog", "kind", "use"), [
    (seg_val, "segment/val", "detect", "val.py"), (seg_predict, "segment/predict", "detect", "detect.py"),
    (cls_val, "classify/val", "detect", "val.py"), (cls_predict, "classify/predict", "detect", "detect.py"),
    (val, "val", "classify", "classify/val.py"), (detect, "detect", "classify", "classify/predict.py"),
    (seg_val, "segment/val", "classify", "classify/val.py"),
])
def test_val_and_predict_scripts_refuse_another_tasks_weights(script: object, prog: str, kind: str, use: str, data: Path,
                                                              weights: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--weights", str(weights[kind]), "--device", "cpu", "--project", str(tmp_path / "runs"), "--img", "64"]
    argv += ["--source", str(ROOT / "data" / "images")] if prog.endswith(("predict", "detect")) else ["--data", str(data)]
    with pytest.raises(SystemExit) as e:
        script.main(argv)  # type: ignore[attr-defined]
    one_line_exit(e, prog, f"weights {weights[kind]} are a {get_task(kind).what}", f"use {use}")
    assert not (tmp_path / "runs").exists()


def test_regression_guard_val_and_detect_run_segmentation_weights_in_full(weights: dict[str, Path], tmp_path: Path) -> None:
    """Regression guard (passes before the change too): val.py and detect.py run a segmentation model, masks included."""
    seg_data = get_task("segment").sample_data(tmp_path / "seg", n_train=2, n_val=2, seed=1)
    row, _, _ = val.run(weights=str(weights["segment"]), data=str(seg_data), imgsz=64, batch_size=2, workers=0, device="cpu",
                        project=str(tmp_path / "val"))
    assert len(row) == 12 and all(math.isfinite(v) for v in row)  # box and mask P R mAP50 mAP50-95, four losses
    out = detect.run(weights=str(weights["segment"]), source=str(ROOT / "data" / "images"), imgsz=(64, 64), conf_thres=0.0,
                     max_det=5, device="cpu", project=str(tmp_path / "detect"))
    assert list(out.glob("*.jpg"))
