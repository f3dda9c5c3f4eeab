"""YOLOv5 training loss: target assignment to anchors and grid cells, CIoU box, objectness and class BCE."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import nn

from utils.boxes import bbox_iou
from utils.checkpoint import unwrap_model
from utils.loss.schedule import FixedOverTraining

if TYPE_CHECKING:
    from models.heads.detect import Detect

# Per-level objectness weights: small-stride (dense) levels get more weight because their cells see fewer objects.
BALANCE_3 = (4.0, 1.0, 0.4)
BALANCE_MORE = (4.0, 1.0, 0.25, 0.06, 0.02)
# Centre cell plus the four axis neighbours, in cell units (scaled by the 0.5 offset at use).
NEIGHBOURS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


def smooth_bce(eps: float = 0.0) -> tuple[float, float]:
    """Positive and negative BCE targets under label smoothing eps (1, 0 when eps is 0)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def scale_loss_gains(hyp: dict, nl: int, nc: int, imgsz: int) -> dict:
    """Copy of hyp with box/cls/obj gains rescaled for the number of levels, classes and image size (YOLOv5 rule)."""
    out = dict(hyp)
    levels = 3 / nl
    out["box"] = float(hyp["box"]) * levels
    out["cls"] = float(hyp["cls"]) * nc / 80 * levels
    out["obj"] = float(hyp["obj"]) * (imgsz / 640) ** 2 * levels
    return out


class FocalLoss(nn.Module):
    """Focal modulation of a BCE-with-logits loss: down-weights easy examples by (1 - p_t)^gamma."""

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25) -> None:
        super().__init__()
        self.bce = bce
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = bce.reduction
        self.bce.reduction = "none"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.bce(logits, target)
        p = logits.sigmoid()
        p_t = target * p + (1 - target) * (1 - p)
        alpha_t = target * self.alpha + (1 - target) * (1 - self.alpha)
        loss = loss * alpha_t * (1.0 - p_t) ** self.gamma
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


class LevelTargets(NamedTuple):
    """build_targets' per-level lists plus, for each positive, the row of `targets` it was assigned from."""

    tcls: list[torch.Tensor]  # (n,) class ids
    tbox: list[torch.Tensor]  # (n, 4) cell offset xy + wh, grid units
    indices: list[tuple[torch.Tensor, ...]]  # (img, anchor, gy, gx), each (n,)
    anchors: list[torch.Tensor]  # (n, 2) anchor wh, grid units
    rows: list[torch.Tensor]  # (n,) index into targets


class ComputeLoss(FixedOverTraining):
    """Callable YOLOv5 loss for a DetectionModel: (raw level outputs, targets) -> (loss * batch, [box, obj, cls])."""

    names: tuple[str, ...] = ("box_loss", "obj_loss", "cls_loss")

    def __init__(self, model: nn.Module, hyp: dict, label_smoothing: float = 0.0) -> None:
        self.det = cast("Detect", unwrap_model(model).detect)
        self.hyp = hyp
        self.na, self.nc, self.nl = self.det.na, self.det.nc, self.det.nl
        self.cp, self.cn = smooth_bce(label_smoothing)
        self.balance = BALANCE_3 if self.nl == 3 else BALANCE_MORE[: self.nl] + (0.02,) * max(self.nl - 5, 0)
        device = self.det.anchors.device
        self.bce_cls = self._criterion(hyp.get("cls_pw", 1.0), device)
        self.bce_obj = self._criterion(hyp.get("obj_pw", 1.0), device)

    def _criterion(self, pos_weight: float, device: torch.device) -> nn.Module:
        """BCE-with-logits with a positive weight, wrapped in FocalLoss when hyp fl_gamma > 0."""
        bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(pos_weight)], device=device))
        gamma = float(self.hyp.get("fl_gamma", 0.0))
        return FocalLoss(bce, gamma) if gamma > 0 else bce

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss scaled by batch size (for backward) and the detached (box, obj, cls) components."""
        device = preds[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            return self._compute([p.float() for p in preds], targets.to(device=device, dtype=torch.float32))

    def _compute(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss itself, in float32 (called by __call__ with autocast off)."""
        lbox, lobj, lcls, _ = self._detection_terms(preds, targets)
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls).sum() * bs, torch.cat((lbox, lobj, lcls)).detach()

    def _detection_terms(
        self, preds: list[torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LevelTargets]:
        """Gain-weighted (1,) box, obj and cls losses from each output's first 5 + nc channels, and the assignment used."""
        device = targets.device
        self._move_criteria(device)
        lbox, lobj, lcls = (torch.zeros(1, device=device) for _ in range(3))
        assigned = self.assign_targets(preds, targets)
        tcls, tbox, indices, anchors = assigned.tcls, assigned.tbox, assigned.indices, assigned.anchors
        for i, pi in enumerate(preds):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)
            if b.shape[0]:
                pxy, pwh, _, pcls = pi[b, a, gj, gi][:, : 5 + self.nc].split((2, 2, 1, self.nc), 1)
                pbox = torch.cat((pxy.sigmoid() * 2 - 0.5, (pwh.sigmoid() * 2) ** 2 * anchors[i]), 1)
                iou = bbox_iou(pbox, tbox[i], CIoU=True)
                lbox = lbox + (1.0 - iou).mean()
                tobj[b, a, gj, gi] = iou.detach().clamp(0).to(tobj.dtype)
                if self.nc > 1:
                    t = torch.full_like(pcls, self.cn)
                    t[torch.arange(b.shape[0], device=device), tcls[i]] = self.cp
                    lcls = lcls + self.bce_cls(pcls, t)
            lobj = lobj + self.bce_obj(pi[..., 4], tobj) * self.balance[i]
        return lbox * self.hyp["box"], lobj * self.hyp["obj"], lcls * self.hyp["cls"], assigned

    def _move_criteria(self, device: torch.device) -> None:
        """Keep the pos_weight tensors on the device of the targets (the model may have moved after __init__)."""
        for crit in (self.bce_cls, self.bce_obj):
            bce = crit.bce if isinstance(crit, FocalLoss) else crit
            if bce.pos_weight is not None and bce.pos_weight.device != device:
                bce.pos_weight = bce.pos_weight.to(device)

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[list, list, list, list]:
        """Per level: class ids, boxes (cell offset xy + wh, grid units), (img, anchor, gy, gx) indices and anchor wh."""
        assigned = self.assign_targets(preds, targets)
        return assigned.tcls, assigned.tbox, assigned.indices, assigned.anchors

    def assign_targets(self, preds: list[torch.Tensor], targets: torch.Tensor) -> LevelTargets:
        """build_targets' lists plus, per level, the `targets` row of each positive (for per-instance terms like masks)."""
        out = LevelTargets([], [], [], [], [])
        for i, p in enumerate(preds):
            ny, nx = p.shape[2], p.shape[3]
            level_anchors = self.det.anchors[i].to(device=targets.device, dtype=torch.float32)
            t, a, offsets, rows = self._assign_level(targets, level_anchors, nx, ny)
            img, cls = t[:, 0].long(), t[:, 1].long()
            gxy, gwh = t[:, 2:4], t[:, 4:6]
            cell = (gxy - offsets).long()
            gx, gy = cell[:, 0].clamp(0, nx - 1), cell[:, 1].clamp(0, ny - 1)
            out.indices.append((img, a, gy, gx))
            out.tbox.append(torch.cat((gxy - torch.stack((gx, gy), 1), gwh), 1))
            out.anchors.append(level_anchors[a])
            out.tcls.append(cls)
            out.rows.append(rows)
        return out

    def _assign_level(
        self, targets: torch.Tensor, anchors: torch.Tensor, nx: int, ny: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets in grid units matched to anchors (wh ratio < anchor_t) and to their centre + 2 nearest neighbour cells.

        Returns the matched targets, their anchor indices, cell offsets and the `targets` rows they came from.
        """
        scale = torch.tensor([1.0, 1.0, nx, ny, nx, ny], device=targets.device)
        t = targets * scale  # (nt, 6)
        if t.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long, device=targets.device)
            return t, empty, torch.zeros(0, 2, device=targets.device), empty
        ratio = t[None, :, 4:6] / anchors[:, None]  # (na, nt, 2)
        worst = torch.max(ratio, 1.0 / ratio).amax(2)
        a_idx, t_idx = torch.nonzero(worst < float(self.hyp["anchor_t"]), as_tuple=True)
        t, a = t[t_idx], a_idx
        g = 0.5
        gxy = t[:, 2:4]
        inv = torch.tensor([nx, ny], device=t.device) - gxy
        low = (gxy % 1 < g) & (gxy > 1)  # near the left/top edge of its cell -> also the left/top neighbour
        high = (inv % 1 < g) & (inv > 1)  # near the right/bottom edge -> also the right/bottom neighbour
        use = torch.stack((torch.ones_like(low[:, 0]), low[:, 0], low[:, 1], high[:, 0], high[:, 1]))  # (5, n)
        offs = torch.tensor(NEIGHBOURS, dtype=t.dtype, device=t.device) * g  # (5, 2)
        k_idx, n_idx = torch.nonzero(use, as_tuple=True)
        return t[n_idx], a[n_idx], offs[k_idx], t_idx[n_idx]
