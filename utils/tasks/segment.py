"""The segmentation task (YOLOv5-seg): the detection task plus polygon labels, ground-truth masks and mask metrics."""

from __future__ import annotations

import argparse
from typing import Any, Sequence, cast

import torch

from models.heads.segment import masks_from_protos
from utils.cli import check_int
from utils.data.seg_dataset import create_seg_dataloader
from utils.evaluation.evaluator import SegmentEvaluator
from utils.paths import ROOT
from utils.segmentation import MASK_THRESHOLD, index_to_binary, scale_masks
from utils.tasks.base import register_task
from utils.tasks.detect import DetectionValidator, DetectTask


class SegmentationValidator(DetectionValidator):
    """The detection loop, also scoring each detection's mask (from the prototypes) against the ground-truth masks."""

    def split_output(self, out: Any) -> tuple[torch.Tensor, Any, Any]:
        """(decoded, protos, raw) from a .pt model in eval (loss input (raw, protos)), (decoded, protos) from a backend."""
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise ValueError("segmentation validation needs a model that returns prototypes and a loader that yields masks")
        raw = (out[2], out[1]) if len(out) > 2 else None
        return out[0], out[1], raw

    def extra_columns(self, extra: Any) -> int:
        """The mask coefficients: one per prototype."""
        return int(extra.shape[1])

    def score(self, dets: list[torch.Tensor], predn: list[torch.Tensor], labelsn: list[torch.Tensor], extra: Any, targets: torch.Tensor,
              gt: list[torch.Tensor], img_hw: tuple[int, int], shapes: Sequence[Any], dataset: Any) -> list[Any]:
        """Boxes and masks of one batch into the evaluator; returns each image's predicted masks (for the json records)."""
        if not gt:
            raise ValueError("segmentation validation needs a model that returns prototypes and a loader that yields masks")
        overlap = bool(getattr(dataset, "overlap", True))  # how the loader encodes its ground-truth masks
        pmasks, gmasks = _masks_to_original(dets, extra, gt[0], targets, img_hw, shapes, overlap)
        cast(SegmentEvaluator, self.evaluator).update(predn, labelsn, pmasks, gmasks)
        return pmasks


def _masks_to_original(
    dets: list[torch.Tensor], protos: torch.Tensor, gt: torch.Tensor, targets: torch.Tensor, img_hw: tuple[int, int], shapes: Sequence[Any],
    overlap: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image, predicted masks (from each detection's coefficients, cropped to its box) and ground-truth masks (one index
    mask per image when `overlap`, else one mask per label row), both as (n, h0, w0) bool at the original image resolution."""
    preds, labels = [], []
    row = 0
    for si, det in enumerate(dets):
        shape0, ratio_pad = shapes[si][0], shapes[si][1]
        m = int((targets[:, 0] == si).sum())
        pm = masks_from_protos(protos[si], det[:, 6:], det[:, :4], img_hw, upsample=True)
        preds.append(scale_masks(pm, img_hw, shape0, ratio_pad).gt(MASK_THRESHOLD).cpu())
        g = index_to_binary(gt[si], m) if overlap else gt[row : row + m].bool()
        row += m
        labels.append(scale_masks(g.float(), img_hw, shape0, ratio_pad).gt(MASK_THRESHOLD).cpu())
    return preds, labels


@register_task
class SegmentTask(DetectTask):
    """Instance segmentation: polygon labels rasterised into masks; box and mask P/R/mAP."""

    name = "segment"
    what = "segmentation model"
    train_script, val_script, predict_script = "segment/train.py", "segment/val.py", "segment/predict.py"
    default_cfg = "models/yolov5_mobilenetv4-seg.yaml"
    default_data = str(ROOT / "data" / "shapes-seg.yaml")
    train_project, val_project, predict_project = "runs/train-seg", "runs/val-seg", "runs/predict-seg"
    metric_columns = (*(f"{m}(B)" for m in DetectTask.metric_columns), *(f"{m}(M)" for m in DetectTask.metric_columns))
    val_loss_width = 4
    polygons = True
    validator = SegmentationValidator
    make_loader = staticmethod(create_seg_dataloader)

    def add_train_args(self, parser: argparse.ArgumentParser) -> None:
        """YOLOv5's segment/train.py flags."""
        parser.add_argument("--mask-ratio", type=int, default=4, help="ground-truth masks at 1/mask-ratio of the image size")
        parser.add_argument("--no-overlap", action="store_true", help="one mask per instance instead of one index mask per image")

    def add_predict_args(self, parser: argparse.ArgumentParser) -> None:
        """YOLOv5's segment/predict.py --retina-masks."""
        parser.add_argument("--retina-masks", action="store_true", help="masks at the original image resolution (sharper edges)")

    def resolve_train_options(self, config: Any) -> Any:
        """--mask-ratio must be a positive integer."""
        check_int("--mask-ratio", config.mask_ratio)
        return config

    def loader_options(self, opt: Any, train: bool) -> dict[str, Any]:
        """Training masks at 1/--mask-ratio; validation scores masks at full resolution."""
        overlap = not getattr(opt, "no_overlap", False)
        return {"mask_ratio": opt.mask_ratio if train and opt is not None else 1, "overlap": overlap}

    def loss_hyp(self, opt: Any) -> dict[str, Any]:
        """--no-overlap changes how the loss reads the ground-truth masks."""
        return {"overlap_mask": not opt.no_overlap}

    def evaluator(self, nc: int, names: Sequence[str]) -> SegmentEvaluator:
        """Box and mask P, R, mAP50, mAP50-95 per class."""
        return SegmentEvaluator(nc, list(names))
