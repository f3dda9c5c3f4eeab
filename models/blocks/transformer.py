"""Transformer pieces of RT-DETR: AIFI (one encoder layer on the stride-32 map), multi-scale deformable attention and
the decoder layer that uses it, and the small MLP its heads are made of."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from models.registry import register_module

SINCOS_TEMPERATURE = 10000.0


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (none after the last)."""

    def __init__(self, c_in: int, c_hidden: int, c_out: int, num_layers: int) -> None:
        super().__init__()
        dims = [c_in] + [c_hidden] * (num_layers - 1) + [c_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sincos_position_2d(h: int, w: int, dim: int, temperature: float = SINCOS_TEMPERATURE) -> torch.Tensor:
    """(1, h * w, dim) fixed sine-cosine embedding of each cell of an h x w map, in the map's row-major flatten order.

    A quarter of the channels each: sin(x), cos(x), sin(y), cos(y) at geometrically spaced frequencies.
    """
    if dim % 4:
        raise ValueError(f"sincos_position_2d: dim {dim} must be divisible by 4")
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    x = gx.flatten()[:, None] * omega[None]
    y = gy.flatten()[:, None] * omega[None]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), 1)[None]


@register_module("AIFI", kind="keep")
class AIFI(nn.Module):
    """RT-DETR's attention-based intra-scale feature interaction: one post-norm transformer encoder layer (GELU FFN)
    over the flattened map plus a 2-D sine-cosine position embedding computed for the actual H x W."""

    def __init__(self, c1: int, cm: int = 2048, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if c1 % num_heads or c1 % 4:
            raise ValueError(f"AIFI: its {c1} input channels must divide by num_heads ({num_heads}) and by 4 (the position embedding)")
        self.attn = nn.MultiheadAttention(c1, num_heads, dropout=dropout, batch_first=True)
        self.fc1 = nn.Linear(c1, cm)
        self.fc2 = nn.Linear(cm, c1)
        self.norm1 = nn.LayerNorm(c1)
        self.norm2 = nn.LayerNorm(c1)
        self.dropout = nn.Dropout(dropout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pos = sincos_position_2d(h, w, c).to(device=x.device, dtype=x.dtype)
        seq = x.flatten(2).transpose(1, 2)
        q = seq + pos
        seq = self.norm1(seq + self.dropout(self.attn(q, q, seq, need_weights=False)[0]))
        seq = self.norm2(seq + self.dropout(self.fc2(self.dropout(self.act(self.fc1(seq))))))
        return seq.transpose(1, 2).reshape(b, c, h, w)


def deformable_attention(
    value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Multi-scale deformable attention by bilinear sampling (grid_sample, so it exports to ONNX opset >= 16).

    value (B, S, heads, dh) with S = sum of h * w over `shapes`; locations (B, Q, heads, levels * points, 2) as x, y in
    [0, 1], level-major; weights (B, Q, heads, levels * points) -> (B, Q, heads * dh). No tensor has more than 5 axes
    (Core ML's limit).
    """
    b, _, nh, dh = value.shape
    q, npoint = locations.shape[1], locations.shape[3] // len(shapes)
    grids = 2 * locations - 1  # grid_sample's [-1, 1] with align_corners=False
    sampled = []
    for level, v in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[level]
        v = v.flatten(2).transpose(1, 2).reshape(b * nh, dh, h, w)
        g = grids[:, :, :, level * npoint : (level + 1) * npoint].transpose(1, 2).flatten(0, 1)  # (B * heads, Q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.cat(sampled, -1)  # (B * heads, dh, Q, levels * points)
    attn = weights.transpose(1, 2).reshape(b * nh, 1, q, -1)
    return (stacked * attn).sum(-1).view(b, nh * dh, q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples `n_points` positions per level and head around its
    reference box, with offsets and weights predicted from the query."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model {d_model} must be divisible by n_heads {n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """Offsets start as rays in `n_heads` directions, point k at distance k + 1; attention starts uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        rays = torch.stack((angles.cos(), angles.sin()), -1)
        rays = rays / rays.abs().max(-1, keepdim=True).values
        rays = rays.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        rays *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(rays.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, ref_boxes: torch.Tensor, value: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B, Q, C), reference boxes (B, Q, 4) cxcywh in [0, 1], value (B, S, C) -> (B, Q, C)."""
        b, q, _ = query.shape
        nh, nl, npoint = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).view(b, value.shape[1], nh, -1)
        offsets = self.sampling_offsets(query).view(b, q, nh, nl * npoint, 2)  # levels * points, level-major
        weights = self.attention_weights(query).view(b, q, nh, nl * npoint).softmax(-1)
        ref = ref_boxes[:, :, None, None, :]
        locations = ref[..., :2] + offsets / npoint * ref[..., 2:] * 0.5  # offsets scale with the box size
        return self.output_proj(deformable_attention(v, shapes, locations, weights))


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention over the queries, deformable cross-attention into the encoder's
    multi-scale features, then a feed-forward block."""

    def __init__(
        self, d_model: int = 256, n_heads: int = 8, d_ffn: int = 1024, dropout: float = 0.0,
        act: Callable[[], nn.Module] = nn.ReLU, n_levels: int = 4, n_points: int = 4,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"decoder layer: hidden width {d_model} must be divisible by the number of heads {n_heads}")
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.act = act()
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, embed: torch.Tensor, ref_boxes: torch.Tensor, feats: torch.Tensor, shapes: list[tuple[int, int]],
        attn_mask: torch.Tensor | None, query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """embed (B, Q, C), reference boxes (B, Q, 4), feats (B, S, C); attn_mask (Q, Q) True where attention is barred."""
        q = embed + query_pos
        embed = self.norm1(embed + self.dropout(self.self_attn(q, q, embed, attn_mask=attn_mask, need_weights=False)[0]))
        embed = self.norm2(embed + self.dropout(self.cross_attn(embed + query_pos, ref_boxes, feats, shapes)))
        return self.norm3(embed + self.dropout(self.linear2(self.dropout(self.act(self.linear1(embed))))))
