"""The training schedule: YOLOv5's for large datasets, one counted in optimizer steps for small ones, chosen and printed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_shapes_yaml
from utils.engine.options import train_options
from utils.engine.recipe import SMALL_DATASET, choose_schedule
from utils.engine.trainer import DistInfo, Trainer


def test_auto_picks_by_dataset_size() -> None:
    small = choose_schedule("auto", 256, 16, 16, 3, 3.0, 0)
    assert small.name == "small" and small.accumulate(16) == 1
    assert small.warmup_iters == 5  # 10% of the 48 steps, rounded up (3 epochs of warm-up would be the whole run)
    assert small.close_mosaic == 1
    large = choose_schedule("auto", SMALL_DATASET, 16, 63, 100, 3.0, 0)
    assert large.name == "yolov5" and large.accumulate(16) == 4 and large.warmup_iters == 189 and large.close_mosaic == 0


def test_yolov5_recipe_is_yolov5s_exactly() -> None:
    s = choose_schedule("yolov5", 256, 16, 16, 3, 3.0, 2)
    assert (s.nominal_batch, s.accumulate(16), s.warmup_iters, s.close_mosaic) == (64, 4, 100, 2)
    assert choose_schedule("yolov5", 256, 16, 16, 3, 0.0, 0).warmup_iters == -1


def test_small_recipe_keeps_explicit_close_mosaic_and_long_warmups() -> None:
    s = choose_schedule("small", 500, 8, 63, 100, 3.0, 7)
    assert s.close_mosaic == 7 and s.warmup_iters == 189  # 3 epochs is well under 10% of 6300 steps
    assert choose_schedule("small", 500, 8, 63, 2, 3.0, 0).close_mosaic == 0  # too short to spare a mosaic-free epoch


def test_small_recipe_scales_augmentation_with_the_number_of_steps() -> None:
    hyp = {"hsv_s": 0.7, "scale": 0.5, "translate": 0.1, "fliplr": 0.5, "mosaic": 1.0, "lr0": 0.01}
    short = choose_schedule("small", 256, 16, 16, 10, 3.0, 0)  # 160 steps: the floor
    mid = choose_schedule("small", 500, 16, 32, 25, 3.0, 0)  # 800 steps: sqrt(800 / 3000) = 0.52
    full = choose_schedule("small", 500, 16, 32, 100, 3.0, 0)  # 3200 steps
    assert (short.augmentation, mid.augmentation, full.augmentation) == (0.5, 0.52, 1.0)
    assert short.augment_hyp(hyp) == {"hsv_s": 0.35, "scale": 0.25, "translate": 0.05, "fliplr": 0.5, "mosaic": 1.0, "lr0": 0.01}
    assert "augmentation x0.5" in short.reason
    assert choose_schedule("yolov5", 256, 16, 16, 10, 3.0, 0).augment_hyp(hyp) == hyp  # YOLOv5's recipe: the hyp file as is


def test_unknown_recipe_is_one_line() -> None:
    with pytest.raises(ValueError, match="--recipe 'fast': choose one of auto, small, yolov5"):
        choose_schedule("fast", 10, 1, 1, 1, 3.0, 0)


def test_trainer_prints_and_uses_the_schedule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tiny_shapes_yaml(tmp_path, n_train=16, n_val=4, seed=5)
    opt = train_options(cfg="models/yolov5n.yaml", data=str(data), epochs=3, imgsz=64, batch_size=8, workers=0, noplots=True,
                        noautoanchor=True, save_dir=str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        trainer = Trainer(opt, torch.device("cpu"), DistInfo())
    assert trainer.schedule.name == "small" and trainer.accumulate == 1
    assert trainer.dataset.hyp["scale"] == 0.5 * trainer.hyp.scale  # 6 steps: the weakest augmentation
    assert any("small-data schedule (16 training images < 1000)" in r.getMessage() for r in caplog.records)
    opt = opt.replace(recipe="yolov5", save_dir=str(tmp_path / "run2"))
    assert Trainer(opt, torch.device("cpu"), DistInfo()).accumulate == 8


@pytest.mark.slow
def test_readme_main_command_detects(tmp_path: Path) -> None:
    """The README's first command (10 epochs at 320 on the embedded dataset) reaches mAP50 >= 0.5 (about 4 min on 2 cores)."""
    import re

    import train

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    args = re.search(r"python train\.py --cfg (\S+) --img (\d+) --epochs (\d+)", readme)
    assert args is not None
    best = train.run(cfg=args.group(1), imgsz=int(args.group(2)), epochs=int(args.group(3)), project=str(tmp_path), name="main",
                     noplots=True)
    rows = (best.parent.parent / "results.csv").read_text().splitlines()
    header = [c.strip() for c in rows[0].split(",")]
    last = dict(zip(header, (float(v) for v in rows[-1].split(","))))
    assert last["metrics/mAP_0.5"] >= 0.5
    assert_finds_sample_objects(best)


def assert_finds_sample_objects(weights: Path) -> None:
    """Through the Python API, the trained detector finds at least half of the objects drawn in data/images (IoU 0.5, right class)."""
    from scripts.make_sample_images import SAMPLES, draw_sample
    from utils.boxes import box_iou, xywhn2xyxy
    from utils.inference.hub import load_custom

    model = load_custom(weights, device="cpu", verbose=False)
    root = Path(__file__).resolve().parents[1] / "data" / "images"
    results = model([root / s.name for s in SAMPLES], size=320)
    found = total = 0
    for sample, pred in zip(SAMPLES, results.xyxy):
        labels = torch.tensor([[float(v) for v in line.split()] for line in draw_sample(sample)[1]])
        truth = xywhn2xyxy(labels[:, 1:], w=sample.width, h=sample.height)
        iou = box_iou(truth, pred[:, :4]) * (labels[:, :1] == pred[:, 5][None])
        found += int((iou.max(1).values >= 0.5).sum()) if len(pred) else 0
        total += len(labels)
    assert found >= total / 2, f"{found} of {total} sample objects found"
