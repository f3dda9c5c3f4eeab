"""Contrastive denoising queries (DN-DETR / DINO, as RT-DETR trains): noised copies of the ground truth that the decoder
learns to reconstruct (positives) or to reject (negatives, pushed further away)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from models.heads.rtdetr_output import DenoisingMeta

EPS = 1e-5  # keeps inverse_sigmoid finite at 0 and 1


def inverse_sigmoid(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both terms to >= eps."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DenoisingQueries(NamedTuple):
    """What the decoder prepends to its queries: embeddings, reference boxes (logit space), the attention mask and meta."""

    embed: torch.Tensor  # (B, num_dn, C)
    boxes: torch.Tensor  # (B, num_dn, 4) inverse-sigmoid cxcywh
    attn_mask: torch.Tensor  # (num_dn + num_queries, num_dn + num_queries), True where attention is barred
    meta: DenoisingMeta


def _pad_per_image(targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [image, class, cx, cy, w, h] -> classes (B, M), boxes (B, M, 4), valid (B, M) and counts (B,), M = max count."""
    img = targets[:, 0].long()
    counts = torch.bincount(img, minlength=batch_size)
    m = int(counts.max())
    order = torch.sort(img, stable=True).indices
    slot = torch.arange(len(img), device=img.device) - (torch.cumsum(counts, 0) - counts)[img[order]]
    cls = torch.zeros(batch_size, m, dtype=torch.long, device=img.device)
    boxes = torch.zeros(batch_size, m, 4, dtype=targets.dtype, device=img.device)
    cls[img[order], slot] = targets[order, 1].long()
    boxes[img[order], slot] = targets[order, 2:6]
    valid = torch.arange(m, device=img.device)[None] < counts[:, None]
    return cls, boxes, valid, counts


def _noised_boxes(boxes: torch.Tensor, negative: torch.Tensor, box_noise: float) -> torch.Tensor:
    """Shift each corner by up to half the box size (positives) or between one and two halves (negatives); cxcywh in [0, 1]."""
    half = boxes[..., 2:] / 2
    xyxy = torch.cat((boxes[..., :2] - half, boxes[..., :2] + half), -1)
    sign = torch.randint_like(boxes, 0, 2) * 2 - 1
    part = torch.rand_like(boxes) + negative[..., None].to(boxes.dtype)
    xyxy = (xyxy + sign * part * half.repeat(1, 1, 2) * box_noise).clamp(0, 1)
    return torch.cat(((xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]), -1)


def _attention_mask(num_dn: int, group_size: int, num_queries: int, device: torch.device) -> torch.Tensor:
    """Matching queries may not see denoising ones (they would read the answers); groups may not see each other."""
    size = num_dn + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    group = torch.arange(num_dn, device=device) // group_size
    mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
    return mask


def denoising_queries(
    targets: torch.Tensor, batch_size: int, class_embed: torch.Tensor, num_queries: int,
    num_dn: int = 100, label_noise: float = 0.5, box_noise: float = 1.0,
) -> DenoisingQueries | None:
    """Groups of positive and negative noised ground-truth queries (about `num_dn` in all); None without boxes.

    Each group holds 2M queries (M = most boxes in one image): the M positives, then the M negatives; slots of images with
    fewer boxes are zero padding. A fraction label_noise / 2 of the labels is replaced by a random class.
    """
    if num_dn <= 0 or targets.shape[0] == 0:
        return None
    cls, boxes, valid, counts = _pad_per_image(targets, batch_size)
    m = cls.shape[1]
    groups = max(num_dn // m, 1)
    cls, boxes, valid = cls.repeat(1, 2 * groups), boxes.repeat(1, 2 * groups, 1), valid.repeat(1, 2 * groups)
    negative = (torch.arange(cls.shape[1], device=cls.device) // m % 2 == 1)[None].expand_as(cls)
    if label_noise > 0:
        flip = torch.rand(cls.shape, device=cls.device) < label_noise * 0.5
        cls = torch.where(flip, torch.randint_like(cls, 0, class_embed.shape[0]), cls)
    if box_noise > 0:
        boxes = _noised_boxes(boxes, negative, box_noise)
    embed = class_embed[cls] * valid[..., None].to(class_embed.dtype)
    logits = inverse_sigmoid(boxes) * valid[..., None].to(boxes.dtype)
    starts = torch.arange(groups, device=cls.device) * 2 * m
    positive = [(starts[:, None] + torch.arange(int(n), device=cls.device)[None]).flatten() for n in counts.tolist()]
    meta = DenoisingMeta(num_dn=cls.shape[1], groups=groups, positive=positive)
    return DenoisingQueries(embed, logits, _attention_mask(cls.shape[1], 2 * m, num_queries, cls.device), meta)
