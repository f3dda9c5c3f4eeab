"""YOLO segmentation dataset: polygon labels rasterised into instance masks after the same augmentation as the boxes.

Each label row carries its instance's outline, resampled to SEGMENT_POINTS points in pixels, after the box
([cls x1 y1 x2 y2 x y x y ...]). LoadImagesAndLabels and utils.data.augmentations move every x and y column with
the box (letterbox, both mosaic paths, warps, mixup, flips) and, for such rows, take the box from the points inside
the output; so whatever rows survive cropping and filtering keep their own outline, mapped exactly as the image.
Masks are drawn last, at 1/mask_ratio of the image size.
"""

from __future__ import annotations

from typing import Any, Union, cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils.boxes import xywh2xyxy
from utils.data.augmentations import outline_points
from utils.data.dataset_config import DatasetError
from utils.data.datasets import LoadImagesAndLabels, PathLike, create_dataloader
from utils.data.labels import read_segment_label_file
from utils.data.polygons import SEGMENT_POINTS, box_polygon, polygons_to_index_mask, polygons_to_masks, resample_polygon


class LoadImagesAndMasks(LoadImagesAndLabels):
    """Segmentation dataset: item -> (image, (n, 6) labels, path, shapes, masks) with masks uint8 at 1/mask_ratio size:
    overlap=True one (h, w) index mask whose value k + 1 marks label row k (0 background; int32 over 255 instances),
    overlap=False (n, h, w) binary masks aligned with the label rows."""

    cache_suffix = ".seg.cache"
    cache_tag = " segments"
    label_columns = 5 + 2 * SEGMENT_POINTS  # cls x1 y1 x2 y2, then the outline resampled to SEGMENT_POINTS points

    def __init__(self, *args: Any, mask_ratio: int = 4, overlap: bool = True, **kwargs: Any) -> None:
        if not isinstance(mask_ratio, int) or mask_ratio < 1:
            raise DatasetError(f"{kwargs.get('prefix', '')}mask_ratio must be a positive integer, got {mask_ratio!r}")
        self.mask_ratio, self.overlap = mask_ratio, overlap
        self.segments: list[list[np.ndarray]] = []
        super().__init__(*args, **kwargs)

    @staticmethod
    def read_labels(lb_file: str, nc: int | None) -> tuple[dict[str, Any], str | None, str]:
        """Cache record fields {"labels": boxes, "segments": normalised outlines ([] for files without polygons)}."""
        labels, segments, msg, status = read_segment_label_file(lb_file, nc)
        return {"labels": labels.tolist(), "segments": [s.tolist() for s in segments]}, msg, status

    def _set_records(self, records: list[dict], single_cls: bool, where: str) -> None:
        """Detection fields plus one normalised outline per label (box rows of files without polygons: rectangles)."""
        if not any(r.get("segments") for r in records):
            raise DatasetError(f"{where}: no polygon labels found; this is a detection dataset (use train.py)")
        super()._set_records(records, single_cls, where)
        self.segments = [_outlines(r.get("segments") or [], lb) for r, lb in zip(records, self.labels)]

    def _reorder(self, order: np.ndarray) -> None:
        """Apply a new item order to the outlines too."""
        super()._reorder(order)
        self.segments = [self.segments[i] for i in order]

    def _placed_labels(self, i: int, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
        """Pixel rows [cls x1 y1 x2 y2] followed by the outline, resampled to (label_columns - 5) / 2 points, same mapping."""
        lb = super()._placed_labels(i, w, h, padw, padh)
        n = (self.label_columns - 5) // 2
        points = [resample_polygon(s * (w, h) + (padw, padh), n) for s in self.segments[i]]
        outline = np.array(points, np.float32).reshape(len(lb), 2 * n)
        return np.concatenate((lb, outline), 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None, torch.Tensor]:  # type: ignore[override]
        img, labels, shapes = self._load_item(index)
        h, w = img.shape[:2]
        polygons = list(outline_points(labels) * (w, h))
        if self.overlap:
            masks, order = polygons_to_index_mask(polygons, (h, w), self.mask_ratio)
            labels = labels[order]
        else:
            masks = polygons_to_masks(polygons, (h, w), self.mask_ratio)
        return (*self._item_tensors(img, labels, index, shapes), torch.from_numpy(masks))

    @staticmethod
    def collate_fn(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple, torch.Tensor]:  # type: ignore[override]
        """LoadImagesAndLabels.collate_fn plus the masks: index masks stacked (B, h, w), binary masks concatenated (N, h, w)."""
        imgs, targets, paths, shapes = LoadImagesAndLabels.collate_fn([item[:4] for item in batch])
        masks = [item[4] for item in batch]
        if masks[0].ndim == 3:
            return imgs, targets, paths, shapes, torch.cat(masks, 0)
        dtype = torch.uint8 if all(m.dtype == torch.uint8 for m in masks) else torch.int32
        return imgs, targets, paths, shapes, torch.stack([m.to(dtype) for m in masks], 0)


def _outlines(segments: list, labels: np.ndarray) -> list[np.ndarray]:
    """Normalised float32 (k, 2) outlines of one image's labels: its polygons, or rectangles when it has none."""
    if len(segments) == len(labels) and len(segments):
        return [np.array(s, np.float32).reshape(-1, 2) for s in segments]
    return [box_polygon(b).astype(np.float32) for b in xywh2xyxy(labels[:, 1:5].astype(np.float64))]


def create_seg_dataloader(path: Union[PathLike, list[PathLike]], imgsz: int, batch_size: int, stride: int, mask_ratio: int = 4,
                          overlap: bool = True, quad: bool = False, image_weights: bool = False,
                          **kwargs: Any) -> tuple[DataLoader, LoadImagesAndMasks]:
    """create_dataloader (same arguments, passed on) over a LoadImagesAndMasks with mask_ratio and overlap."""
    prefix = kwargs.get("prefix", "")
    for flag, name in ((quad, "quad collate (--quad)"), (image_weights, "image_weights sampling (--image-weights)")):
        if flag:
            raise DatasetError(f"{prefix}{name} is not supported for segmentation datasets (masks)")
    loader, dataset = create_dataloader(path, imgsz, batch_size, stride, dataset_cls=LoadImagesAndMasks,
                                        dataset_kwargs={"mask_ratio": mask_ratio, "overlap": overlap}, **kwargs)
    return loader, cast(LoadImagesAndMasks, dataset)
