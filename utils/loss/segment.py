"""YOLOv5-seg training loss: the anchor-based detection loss plus a per-instance mask loss on prototype masks.

The head's raw output per level is (B, na, ny, nx, 5 + nc + nm) with the nm mask coefficients last, and the prototypes are
(B, nm, mh, mw). An instance's mask logits are its coefficients @ the image's prototypes; the mask loss is their per-pixel
BCE-with-logits against the ground-truth mask, kept inside the ground-truth box and normalised by the box's area.

Ground-truth masks come in one of two encodings, fixed per loss by `overlap` (YOLOv5's overlap_mask):
- overlap=True: (B, h, w) index masks; value k + 1 marks the k-th `targets` row of that image (rows counted in order).
- overlap=False: (N, h, w) binary masks, one per `targets` row in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.segment import crop_to_boxes
from utils.boxes import xywh2xyxy
from utils.loss.anchor_based import ComputeLoss, LevelTargets


def rank_within_image(image_index: torch.Tensor) -> torch.Tensor:
    """For each target row, how many earlier rows belong to the same image (0 for an image's first row)."""
    img = image_index.long()
    order = torch.sort(img, stable=True).indices
    sorted_img = img[order]
    first = torch.searchsorted(sorted_img, sorted_img)  # position of each image's first row in the sorted order
    rank = torch.empty_like(img)
    rank[order] = torch.arange(img.numel(), device=img.device) - first
    return rank


class SegmentLoss(ComputeLoss):
    """Callable YOLOv5-seg loss: ((raw level outputs, prototypes), targets, masks) -> (loss * batch, [box, seg, obj, cls])."""

    names: tuple[str, ...] = ("box_loss", "seg_loss", "obj_loss", "cls_loss")

    def __init__(self, model: nn.Module, hyp: dict, label_smoothing: float = 0.0, overlap: bool = True) -> None:
        super().__init__(model, hyp, label_smoothing)
        self.overlap = overlap

    def __call__(  # type: ignore[override]  # takes (levels, prototypes) and the masks, not just the levels
        self, preds: tuple[list[torch.Tensor], torch.Tensor], targets: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss scaled by batch size (for backward) and the detached (box, seg, obj, cls) components."""
        if masks is None:
            raise ValueError("SegmentLoss needs the ground-truth masks: loss(preds, targets, masks)")
        levels, protos = preds
        device = protos.device
        with torch.autocast(device_type=device.type, enabled=False):
            return self._compute_segment(
                [p.float() for p in levels], protos.float(), targets.to(device=device, dtype=torch.float32), masks.to(device)
            )

    def _compute_segment(
        self, preds: list[torch.Tensor], protos: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss itself, in float32 (called by __call__ with autocast off)."""
        bs, nm = protos.shape[:2]
        if preds[0].shape[-1] != 5 + self.nc + nm:
            raise ValueError(f"SegmentLoss: outputs have {preds[0].shape[-1]} channels, expected 5 + nc + nm = {5 + self.nc + nm}")
        lbox, lobj, lcls, assigned = self._detection_terms(preds, targets)
        lseg = self._mask_terms(preds, protos, targets, self._gt_masks(masks, targets, protos.shape[-2:]), assigned)
        lseg = lseg * (self.hyp["box"] / bs)
        return (lbox + lobj + lcls + lseg).sum() * bs, torch.cat((lbox, lseg, lobj, lcls)).detach()

    def _gt_masks(self, masks: torch.Tensor, targets: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """(N, mh, mw) float binary ground-truth mask per `targets` row at prototype resolution (nearest resize)."""
        masks = masks.float()
        if tuple(masks.shape[-2:]) != tuple(size):
            masks = F.interpolate(masks[None], size=tuple(size), mode="nearest")[0]
        if not self.overlap:
            if masks.shape[0] != targets.shape[0]:
                raise ValueError(f"SegmentLoss(overlap=False): {masks.shape[0]} masks for {targets.shape[0]} targets")
            return masks
        img = targets[:, 0].long()
        if img.numel() and int(img.max()) >= masks.shape[0]:
            raise ValueError(f"SegmentLoss(overlap=True): a target of image {int(img.max())} but {masks.shape[0]} index masks")
        index = (rank_within_image(img) + 1).to(masks.dtype)
        return (masks[img] == index.view(-1, 1, 1)).to(masks.dtype)

    def _mask_terms(
        self, preds: list[torch.Tensor], protos: torch.Tensor, targets: torch.Tensor, gt: torch.Tensor, assigned: LevelTargets
    ) -> torch.Tensor:
        """(1,) sum over levels and images of the mean area-normalised cropped mask BCE of the image's positives."""
        nm, mh, mw = protos.shape[1:]
        lseg = torch.zeros(1, device=protos.device)
        scale = torch.tensor([mw, mh, mw, mh], device=protos.device, dtype=torch.float32)
        for pi, (b, a, gj, gi), rows in zip(preds, assigned.indices, assigned.rows):
            if not b.shape[0]:
                continue
            coef = pi[b, a, gj, gi][:, -nm:]
            xywhn = targets[rows, 2:6]
            area = xywhn[:, 2:].prod(1)
            boxes = xywh2xyxy(xywhn * scale)
            for bi in b.unique():
                j = b == bi
                logits = (coef[j] @ protos[bi].reshape(nm, -1)).view(-1, mh, mw)
                bce = F.binary_cross_entropy_with_logits(logits, gt[rows[j]], reduction="none")
                lseg = lseg + (crop_to_boxes(bce, boxes[j]).mean(dim=(1, 2)) / area[j]).mean()
        return lseg
