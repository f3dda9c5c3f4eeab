"""DetectionEvaluator on hand-made detections (values worked out by hand), agreement with ap_per_class, the evaluate()
loop and val.run end to end against numbers recorded from the val.py that preceded the evaluator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tests.conftest import calibrate_bn, tiny_shapes_yaml
from utils.evaluation.evaluator import DetectionEvaluator, DetectionResult
from utils.evaluation.metrics import ap_per_class, default_iouv, match_predictions
from utils.evaluation.report import plot_result
from utils.tasks.detect import evaluate

NAMES = ("a", "b", "c")


def det(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def lab(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def evaluated(preds: list[torch.Tensor], labels: list[torch.Tensor], nc: int = 3, **kwargs: object) -> DetectionResult:
    ev = DetectionEvaluator(nc, NAMES[:nc], **kwargs)  # type: ignore[arg-type]
    ev.update(preds, labels)
    return ev.compute()


# ---- hand-made cases ------------------------------------------------------------------------------------------------


def test_perfect_detections_score_one() -> None:
    r = evaluated([det([0, 0, 10, 10, 0.9, 0], [20, 20, 40, 30, 0.8, 1])], [lab([0, 0, 0, 10, 10], [1, 20, 20, 40, 30])])
    assert (r.precision, r.recall, r.map50, r.map) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert r.per_class.ap_class.tolist() == [0, 1] and r.instances.tolist() == [1, 1, 0]
    assert r.maps.tolist() == pytest.approx([1.0, 1.0, 1.0])  # class 2 has no labels: the mean
    assert r.seen == 1 and r.fitness() == pytest.approx(1.0)


def test_all_wrong_class_scores_zero_like_yolov5() -> None:
    r = evaluated([det([0, 0, 10, 10, 0.9, 1])], [lab([0, 0, 0, 10, 10])])
    assert (r.precision, r.recall, r.map50, r.map) == (0.0, 0.0, 0.0, 0.0)
    assert r.per_class.ap_class.size == 0 and r.curves is None  # YOLOv5 scores nothing without one correct detection
    assert r.maps.tolist() == [0.0, 0.0, 0.0]
    assert r.confusion[1, 0] == 1 and r.confusion.sum() == 1  # predicted b where a is


def test_missed_label_halves_recall() -> None:
    # one of two labels found at conf 0.9: AP = 51/101 (recall thresholds 0..0.5 at precision 1); P = 1, R = 0.5
    r = evaluated([det([0, 0, 10, 10, 0.9, 0])], [lab([0, 0, 0, 10, 10], [0, 50, 50, 60, 60])])
    assert (r.precision, r.recall) == pytest.approx((1.0, 0.5))
    assert r.map50 == pytest.approx(51 / 101) and r.map == pytest.approx(51 / 101)
    assert r.confusion[3, 0] == 1 and r.confusion[0, 0] == 1  # the missed label counts as background


def test_duplicate_detection_is_a_false_positive() -> None:
    # TP at 0.9, its duplicate at 0.8: precision [1, 0.5] at recall [1, 1] -> the envelope keeps AP at 1.
    # F1 is 1 between conf 0.8 and 0.9, as wide as YOLOv5's smoothing window (0.1): the best-F1 point lies there, where the
    # precision curve (interpolated between the two ranked detections, as YOLOv5's is) reads 0.75.
    r = evaluated([det([0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0])], [lab([0, 0, 0, 10, 10])])
    assert r.map50 == pytest.approx(1.0) and r.map == pytest.approx(1.0)
    assert r.precision == pytest.approx(0.75, abs=0.01) and r.recall == pytest.approx(1.0)
    assert r.confusion[0, 0] == 1 and r.confusion[0, 3] == 1  # the duplicate is a false positive on background


def test_empty_images_count_and_false_positives_on_them() -> None:
    # image 1: TP at 0.8; image 2: no labels, one FP at 0.9; image 3: nothing at all.
    # Ranked FP, TP: precision [0, .5], recall [0, 1] -> envelope 0.5 everywhere: AP 0.5; best F1 at P 0.5, R 1.
    preds = [det([0, 0, 10, 10, 0.8, 0]), det([5, 5, 9, 9, 0.9, 0]), det()]
    r = evaluated(preds, [lab([0, 0, 0, 10, 10]), lab(), lab()])
    assert r.seen == 3 and r.instances.tolist() == [1, 0, 0]
    assert (r.precision, r.recall, r.map50, r.map) == pytest.approx((0.5, 1.0, 0.5, 0.5))
    assert r.confusion[0, 3] == 1  # the detection on the label-free image


def test_partial_iou_counts_at_low_thresholds_only() -> None:
    # IoU 0.7 -> correct at 0.50..0.70, 5 of 10 thresholds: mAP50 1, mAP50-95 0.5, fitness 0.1 + 0.45
    r = evaluated([det([0, 0, 7, 10, 0.9, 2])], [lab([2, 0, 0, 10, 10])])
    assert r.map50 == pytest.approx(1.0) and r.map == pytest.approx(0.5) and r.fitness() == pytest.approx(0.55)
    assert r.per_class.ap50.tolist() == pytest.approx([1.0]) and r.per_class.ap.tolist() == pytest.approx([0.5])


def test_single_cls_merges_classes() -> None:
    preds, labels = [det([0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.8, 0])], [lab([0, 0, 0, 10, 10], [1, 20, 20, 30, 30])]
    assert evaluated(preds, labels, nc=2).map == 0.0
    r = evaluated(preds, labels, nc=2, single_cls=True)
    assert (r.precision, r.recall, r.map50, r.map) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert r.instances.tolist() == [2, 0]


def test_extra_prediction_columns_are_ignored() -> None:
    plain = det([0, 0, 7, 10, 0.9, 0], [30, 30, 40, 40, 0.4, 1])
    extra = torch.cat((plain, torch.randn(2, 32)), 1)  # e.g. mask coefficients
    labels = [lab([0, 0, 0, 10, 10], [1, 30, 31, 40, 40])]
    a, b = evaluated([plain], labels), evaluated([extra], labels)
    assert a.results_row() == b.results_row() and np.array_equal(a.confusion, b.confusion)


def test_bad_shapes_are_rejected() -> None:
    ev = DetectionEvaluator(2)
    with pytest.raises(ValueError, match="prediction tensors"):
        ev.update([det()], [lab(), lab()])
    with pytest.raises(ValueError, match="6"):
        ev.update([torch.zeros(2, 4)], [lab()])
    with pytest.raises(ValueError, match="stage"):
        ev.add_time("warmup", 1.0)


def test_confusion_matrix_counts_over_batches() -> None:
    ev = DetectionEvaluator(3, NAMES, conf_cm=0.25, iou_cm=0.45)
    labels = lab([0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [2, 50, 50, 60, 60])
    preds = det([0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 2], [80, 80, 90, 90, 0.7, 1], [50, 50, 60, 60, 0.1, 2])
    ev.update([preds], [labels])
    ev.update([det()], [lab([1, 0, 0, 5, 5])])
    m = ev.compute().confusion
    assert m[0, 0] == 1 and m[2, 1] == 1 and m[1, 3] == 1  # correct, confused, FP on background
    assert m[3].tolist() == [0, 1, 1, 0]  # missed: label 2 (its detection is below conf_cm), the second image's label 1
    assert m.sum() == 5


def test_results_row_loss_speed_and_reset() -> None:
    ev = DetectionEvaluator(1, ["x"])
    ev.update([det([0, 0, 10, 10, 0.9, 0]), det()], [lab([0, 0, 0, 10, 10]), lab()])
    ev.add_loss(torch.tensor([0.1, 0.2, 0.3]))
    ev.add_loss(torch.tensor([0.3, 0.4, 0.5]))
    ev.add_time("inference", 0.5)
    ev.add_time("nms", 0.1)
    r = ev.compute()
    assert r.results_row() == pytest.approx((1.0, 1.0, 1.0, 1.0, 0.2, 0.3, 0.4))
    assert r.speed == pytest.approx((0.0, 250.0, 50.0))  # ms per image over 2 images
    ev.reset()
    empty = ev.compute()
    assert empty.seen == 0 and empty.loss == () and empty.results_row() == (0.0, 0.0, 0.0, 0.0) and empty.speed == (0.0, 0.0, 0.0)


def test_table_lines() -> None:
    r = evaluated([det([0, 0, 10, 10, 0.9, 0], [20, 20, 40, 30, 0.8, 1])], [lab([0, 0, 0, 10, 10], [1, 20, 20, 40, 30])])
    lines = r.table(verbose=True)
    assert lines[0].split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    assert lines[1].split() == ["all", "1", "2", "1", "1", "1", "1"] and len(lines[1]) == 22 + 6 * 11
    assert [line.split()[0] for line in lines[2:]] == ["a", "b"]
    assert len(r.table(verbose=False)) == 2


# ---- agreement with the plain metrics path --------------------------------------------------------------------------


def _random_image(rng: np.random.Generator, nc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels in a 100 px image and detections: jittered copies (some misclassified), plus random boxes."""
    n = int(rng.integers(0, 6))
    xy, wh = rng.uniform(0, 70, (n, 2)), rng.uniform(5, 30, (n, 2))
    labels = np.column_stack([rng.integers(0, nc, n), xy, xy + wh])
    rows = [[*(box + rng.normal(0, 2, 4)), rng.uniform(0.05, 1), c if rng.random() < 0.8 else (c + 1) % nc]
            for c, *box in labels.tolist() if rng.random() < 0.85]
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, 80, 2)
        rows.append([x, y, x + rng.uniform(3, 20), y + rng.uniform(3, 20), rng.uniform(0, 0.6), int(rng.integers(0, nc))])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6), torch.tensor(labels, dtype=torch.float32).reshape(-1, 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_ap_per_class_on_random_sets(seed: int) -> None:
    rng, nc = np.random.default_rng(seed), 3
    images = [_random_image(rng, nc) for _ in range(25)]
    ev = DetectionEvaluator(nc, NAMES)
    for i in range(0, len(images), 4):  # batches of four
        chunk = images[i : i + 4]
        ev.update([d for d, _ in chunk], [lb for _, lb in chunk])
    r = ev.compute()
    iouv = default_iouv()
    tp = np.concatenate([match_predictions(d, lb, iouv).numpy() for d, lb in images])
    conf, pcls = (np.concatenate([d[:, k].numpy() for d, _ in images]) for k in (4, 5))
    tcls = np.concatenate([lb[:, 0].numpy() for _, lb in images])
    _, _, p, rec, _, ap, classes = ap_per_class(tp, conf, pcls, tcls)
    assert 0.1 < r.map < 0.95
    assert (r.precision, r.recall, r.map50, r.map) == pytest.approx((p.mean(), rec.mean(), ap[:, 0].mean(), ap.mean()), abs=1e-12)
    assert r.per_class.ap_class.tolist() == classes.tolist()
    assert r.instances.tolist() == np.bincount(tcls.astype(int), minlength=nc).tolist()
    assert r.curves is not None and r.curves.pr.shape == r.curves.f1.shape == (len(classes), 1000)
    assert r.curves.classes.tolist() == classes.tolist() and np.allclose(r.curves.ap, ap)


def test_plot_result_writes_figures(tmp_path: Path) -> None:
    r = evaluated([det([0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.5, 1])], [lab([0, 0, 0, 10, 10], [1, 40, 40, 50, 50])])
    files = plot_result(r, tmp_path)
    names = ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png")
    assert sorted(f.name for f in files) == sorted(names)
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
    nothing = evaluated([det()], [lab([0, 0, 0, 5, 5])])
    assert [f.name for f in plot_result(nothing, tmp_path / "none")] == ["confusion_matrix.png"]


# ---- the loop and val.run end to end --------------------------------------------------------------------------------


def oracle_outputs(loader: object, nc: int, n_rows: int = 24) -> list[torch.Tensor]:
    """Per batch (B, n_rows, 5+nc) letterboxed xywh outputs from the labels: jittered, misclassified, missed, duplicated, plus FPs."""
    outs = []
    for bi, (im, targets, _, _) in enumerate(loader):  # type: ignore[attr-defined]
        g = torch.Generator().manual_seed(100 + bi)
        b, _, h, w = im.shape
        out = torch.zeros(b, n_rows, 5 + nc)
        for si in range(b):
            rows = []
            for c, cx, cy, bw, bh in targets[targets[:, 0] == si, 1:].float().tolist():
                r = torch.rand(4, generator=g).tolist()
                if r[0] < 0.15:
                    continue  # missed
                size = torch.tensor([bw * w, bh * h] * 2)
                box = torch.tensor([cx * w, cy * h, bw * w, bh * h]) + torch.randn(4, generator=g) * 0.08 * size
                cls = int(c) if r[1] < 0.85 else (int(c) + 1) % nc
                rows.append((box, 0.3 + 0.7 * r[2], cls))
                if r[3] < 0.3:
                    rows.append((box + torch.randn(4, generator=g), 0.2 * r[2], cls))  # duplicate, lower conf
            for _ in range(2):
                xy = torch.rand(2, generator=g) * torch.tensor([w, h])
                wh = 4 + torch.rand(2, generator=g) * 12
                rows.append((torch.cat([xy, wh]), float(torch.rand(1, generator=g)) * 0.6, int(torch.randint(nc, (1,), generator=g))))
            for k, (box, obj, cls) in enumerate(rows[:n_rows]):
                out[si, k, :4], out[si, k, 4], out[si, k, 5:] = box, obj, 0.05
                out[si, k, 5 + cls] = 0.9
        outs.append(out)
    return outs


class OracleModel(nn.Module):
    """Replays prepared outputs in call order like an eval-mode detector returning (decoded, raw)."""

    head_kind = "anchor_based"  # what validation asks to find the model's task and output layout

    def __init__(self, outputs: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.outputs, self.calls = outputs, 0
        self.scale = nn.Parameter(torch.ones(1, dtype=dtype))
        self.bn = nn.BatchNorm2d(2).to(dtype)

    def forward(self, im: torch.Tensor, augment: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.outputs[self.calls % len(self.outputs)].to(im.device)
        self.calls += 1
        return out * self.scale.detach().float(), [out[..., 4:5].clone()]


def fake_loss(raw: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, 3 items) from the raw outputs and targets: deterministic and batch dependent."""
    cls_mean = targets[:, 1].float().mean() if len(targets) else torch.tensor(0.0)
    items = torch.stack([raw[0].mean(), cls_mean, torch.tensor(float(len(targets)) / 10)])
    return items.sum(), items


def seeded_detector(cfg: str, nc: int) -> nn.Module:
    """A DetectionModel whose weights depend only on a seed and the module names (not on construction order)."""
    from models.model import DetectionModel

    model = DetectionModel(cfg, nc=nc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.zero_()  # objectness and class logits 0: every anchor scores 0.25, so some boxes match by chance
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return calibrate_bn(model, shape=(4, 3, 64, 64), normalise=False, affine=False)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4+12 image shapes dataset (one val image without labels) and its yaml."""
    return tiny_shapes_yaml(tmp_path_factory.mktemp("eval_shapes"), n_train=4, n_val=12, seed=5)


def val_loader(data: Path, single_cls: bool = False) -> object:
    from utils.data.datasets import create_dataloader

    cfg = yaml.safe_load(data.read_text())
    return create_dataloader(str(Path(cfg["path"]) / cfg["val"]), 64, 4, 32, pad=0.5, rect=True, workers=0, nc=3, single_cls=single_cls)[0]


# ((P, R, mAP50, mAP50-95, 3 loss items), maps) recorded from val.run before the evaluator existed (commit b69c463);
# P and R recorded again when the best-F1 smoothing window became YOLOv5's (101 of 1000 points, not 201).
RECORDED_ORACLE = {
    False: ((0.6698453242370971, 0.6694735271997595, 0.6116227098900365, 0.290472707527163, 0.08605163544416428, 1.2087541818618774,
             1.1666666269302368), [0.23677510608203675, 0.2524045261669024, 0.38223849033254975]),
    True: ((0.7759969290670451, 0.7919861808017028, 0.7254124131357236, 0.3500677021828719, 0.08605163544416428, 0.0, 1.1666666269302368),
           [0.3500677021828719]),
}
# The seeded yolov5n through DetectBackend; old maps[0] was the mean 0.000155 (class 0 scored AP 0: YOLOv5 keeps 0, see maps).
RECORDED_REAL = ((0.002350250705199251, 0.022222222222222223, 0.0006477230493950374, 0.00015550226182397726, 0.0, 0.0, 0.0),
                 [0.0, 7.046968041999928e-05, 0.00039603710505193245])


@pytest.mark.parametrize("single_cls", [False, True])
def test_val_run_in_process_matches_recorded_numbers(single_cls: bool, shapes_data: Path, tmp_path: Path) -> None:
    import val

    outputs = oracle_outputs(val_loader(shapes_data), 3)
    results, maps, speed = val.run(data=str(shapes_data), model=OracleModel(outputs), dataloader=val_loader(shapes_data, single_cls),
                                   compute_loss=fake_loss, plots=False, save_dir=tmp_path, single_cls=single_cls, quiet=True)
    want, want_maps = RECORDED_ORACLE[single_cls]
    assert results == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert maps.tolist() == pytest.approx(want_maps, rel=1e-9) and len(speed) == 3


def test_evaluate_restores_mode_and_weights_and_writes_outputs(shapes_data: Path, tmp_path: Path) -> None:
    loader = val_loader(shapes_data)
    model = OracleModel(oracle_outputs(loader, 3), dtype=torch.float64).train()
    model.bn.eval()
    with torch.no_grad():
        model.scale.fill_(1 + 1e-12)  # not representable in float32: must survive the pass bit for bit
        model.bn.running_mean.fill_(1 / 3)
    result = evaluate(model, loader, DetectionEvaluator(3, ["circle", "rectangle", "triangle"]), device="cpu", compute_loss=fake_loss,
                      plots=True, save_dir=tmp_path, save_txt=True, save_json=True)
    assert model.training and not model.bn.training
    assert model.scale.dtype == torch.float64 and model.scale.item() == 1 + 1e-12 and model.bn.running_mean[0].item() == 1 / 3
    assert result.results_row() == pytest.approx(RECORDED_ORACLE[False][0], rel=1e-9, abs=1e-12)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png", "predictions.json", "labels"} <= files
    assert {f"val_batch{i}_{k}.jpg" for i in range(3) for k in ("labels", "pred")} <= files
    assert len(list((tmp_path / "labels").glob("*.txt"))) == 12
    # the recorded confusion matrix plus the one detection (above conf 0.25) on the label-free image, which val.py skipped
    assert result.confusion.tolist() == [[6, 0, 3, 5], [1, 7, 0, 3], [0, 0, 11, 3], [2, 4, 1, 0]]


def test_val_run_on_seeded_checkpoint_matches_recorded_numbers(shapes_data: Path, tmp_path: Path) -> None:
    import val
    from utils.checkpoint import save_checkpoint

    model = seeded_detector("models/yolov5n.yaml", 3)
    weights = save_checkpoint(tmp_path / "seeded.pt", model, names=["circle", "rectangle", "triangle"])
    results, maps, _ = val.run(data=str(shapes_data), weights=str(weights), imgsz=64, batch_size=4, workers=0, project=str(tmp_path),
                               name="v", device="cpu", plots=False, quiet=True)
    # float32 convolutions round differently with the thread count: a relative 1e-4 covers that, not a scoring change
    assert results == pytest.approx(RECORDED_REAL[0], rel=1e-4, abs=1e-9)
    assert maps.tolist() == pytest.approx(RECORDED_REAL[1], rel=1e-4, abs=1e-9)
