"""The RT-DETR decoder's raw output types, shared by the head (models.heads.rtdetr), its denoising queries and the loss."""


from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class DenoisingMeta:
    """Where the denoising queries sit: the first `num_dn` queries of every decoder output are denoising ones.

    `positive[i]` holds, for image i with n_i ground-truth boxes, the indices (into those first num_dn queries) of its
    positive denoising queries in group-major order: query `positive[i][g * n_i + j]` reconstructs box j in group g.
    """

    num_dn: int
    groups: int
    positive: list[torch.Tensor]


class DETROutput(NamedTuple):
    """The decoder's training output (and the raw part of its eval output), everything the loss needs.

    boxes: (L, B, Q, 4) sigmoid cxcywh in [0, 1] (of the input image) after each decoder layer (eval: the last only);
    logits: (L, B, Q, nc) class logits per layer; Q = num_dn + the selected queries.
    enc_boxes / enc_logits: (B, K, 4) / (B, K, nc) the encoder's top-K proposals (K selected queries), before the decoder.
    dn: where the denoising queries are, or None (eval, or a batch without boxes).
    """

    boxes: torch.Tensor
    logits: torch.Tensor
    enc_boxes: torch.Tensor
    enc_logits: torch.Tensor
    dn: DenoisingMeta | None
