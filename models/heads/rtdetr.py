"""RT-DETR's decoder head: encoder-side query selection, a deformable-attention decoder with iterative box refinement
and contrastive denoising queries in training. Its queries are one per object, so inference needs no NMS."""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
from torch import nn

from models.blocks.conv import TORCH_BN, Conv
from models.blocks.transformer import MLP, DeformableDecoderLayer
from models.heads.base import Head, HeadPolicy, check_output_width, register_head, xywh_to_xyxy
from models.heads.denoising import DenoisingQueries, denoising_queries, inverse_sigmoid
from models.heads.rtdetr_output import DenoisingMeta, DETROutput
from models.registry import register_module

ANCHOR_SIZE = 0.05  # anchor width/height at the first level, doubling per level (fraction of the image)
ANCHOR_EPS = 0.01  # anchors with any coordinate outside (eps, 1 - eps) cannot be selected as queries
PRIOR_PROB = 0.01  # initial class probability


@register_head
@register_module("RTDETRDecoder", kind="head")
class RTDETRDecoder(Head):
    """RTDETRDecoder(nc, ch, strides, hd, nq, ndp, nh, ndl): yaml arguments [nc, hidden, queries, points, heads, layers].

    Training returns a DETROutput (every layer's boxes and logits, the encoder proposals, denoising meta); eval returns
    ((B, queries, 4 + nc) xywh boxes in input pixels + class sigmoids, the DETROutput of the last layer).
    """

    kind: ClassVar[str] = "rtdetr"
    # Deformable attention needs grid_sample (ONNX opset 16; Core ML converts it to resample; TFLite stops before it; PNNX converts it to
    # ncnn's GridSample, but NCNN is blocked by the query selection, see export_refusals), the graph has its feature-map
    # sizes built in, and one query predicts one object, so there is nothing for NMS to do.
    policy: ClassVar[HeadPolicy] = HeadPolicy(
        task="detect", title="RT-DETR", hyp_file="hyp.rtdetr.yaml", optimizer="AdamW", close_mosaic_share=0.15,
        export_formats=("onnx", "torchscript", "openvino", "coreml"), min_opset=16, dynamic_export=False, nms_export=False,
        export_refusals=(("ncnn", "its query selection (torch.topk, then indexing by the top-k indices) has no ncnn layer, ncnn "
                                  "having no TopK or Gather (grid_sample does convert, to GridSample); it needs those layers in ncnn "
                                  "or the selection run outside the graph"),
                         ("tflite", "onnx2tf 1.28.8 gets past its query selection's TopK with K fed as a tensor "
                                    "(utils/export/onnx2tf_fixes.py), then mislays the gathered queries' (1, queries, hidden) layout: "
                                    "the decoder's first LayerNormalization gets hidden and queries swapped (grid_sample is not "
                                    "reached); it needs that converter to keep the layout, or the decoder written on 2-D rows")),
        nms_reason="RT-DETR predicts one box per object and needs no NMS; export without --nms",
        int8_formats=("coreml",),  # Core ML's --int8 quantises weights only; activations stay float
        int8_reason="post-training INT8 of its conv body leaves the encoder's input as noisy as it is strong (0 dB "
                    "signal-to-noise measured), and the query selection and boxes follow: a trained "
                    "rtdetr_mobilenetv4_conv_small fell from mAP50-95 0.681 to 0.198 (MinMax) and 0.495-0.520 "
                    "(Percentile, the transformer in float or not; docs/export.md); it needs quantisation-aware "
                    "training. Core ML's --int8 (weights only) is available",
    )
    export_layout: ClassVar[str] = "(batch, queries, 4 + nc)"
    anchor_axis: ClassVar[int] = 1
    nms_free: ClassVar[bool] = True
    uses_targets: ClassVar[bool] = True
    yaml_args: ClassVar[tuple[str, ...]] = ("nc", "hd", "nq", "ndp", "nh", "ndl")

    def __init__(
        self, nc: int = 80, ch: list | tuple = (), strides: list | tuple = (), hd: int = 256, nq: int = 300, ndp: int = 4,
        nh: int = 8, ndl: int = 6, d_ffn: int = 1024, dropout: float = 0.0, num_dn: int = 100, label_noise: float = 0.5,
        box_noise: float = 1.0,
    ) -> None:
        super().__init__()
        if not ch or len(ch) != len(strides):
            raise ValueError(f"RTDETRDecoder: {len(ch)} inputs and {len(strides)} strides must agree (and be at least one)")
        self.nc, self.nl, self.hd, self.nq, self.ndl = nc, len(ch), hd, nq, ndl
        self.num_dn, self.label_noise, self.box_noise = num_dn, label_noise, box_noise
        self.register_buffer("stride", torch.tensor([float(s) for s in strides]), persistent=False)
        self.input_proj = nn.ModuleList(Conv(c, hd, 1, act=False, bn=TORCH_BN) for c in ch)
        self.layers = nn.ModuleList(DeformableDecoderLayer(hd, nh, d_ffn, dropout, nn.ReLU, self.nl, ndp) for _ in range(ndl))
        self.denoising_class_embed = nn.Embedding(nc, hd)
        self.query_pos_head = MLP(4, 2 * hd, hd, num_layers=2)
        self.enc_output = nn.Sequential(nn.Linear(hd, hd), nn.LayerNorm(hd))
        self.enc_score_head = nn.Linear(hd, nc)
        self.enc_bbox_head = MLP(hd, hd, 4, num_layers=3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hd, nc) for _ in range(ndl))
        self.dec_bbox_head = nn.ModuleList(MLP(hd, hd, 4, num_layers=3) for _ in range(ndl))
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """Class biases at the 1% prior (scaled by nc / 80, as published), box-delta heads at zero, Xavier projections."""
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB) / 80 * self.nc
        for score in (self.enc_score_head, *self.dec_score_head):
            nn.init.constant_(score.bias, bias)
        for mlp in (self.enc_bbox_head, *self.dec_bbox_head):
            last = cast(nn.Linear, cast(MLP, mlp).layers[-1])
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        nn.init.xavier_uniform_(cast(nn.Linear, self.enc_output[0]).weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(cast(nn.Linear, layer).weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(cast(Conv, proj).conv.weight)

    @property
    def max_detections(self) -> int | None:
        """One object per query: an image never yields more than `nq` detections (the yaml's queries argument)."""
        return int(self.nq)

    def forward(
        self, xs: list[torch.Tensor], targets: torch.Tensor | None = None
    ) -> DETROutput | tuple[torch.Tensor, DETROutput]:
        """Training (with targets [image, class, cx, cy, w, h] for the denoising queries) or eval forward."""
        feats, shapes = self._flatten_levels(xs)
        dn = None
        if self.training and targets is not None:
            dn = denoising_queries(targets, feats.shape[0], self.denoising_class_embed.weight, min(self.nq, feats.shape[1]),
                                   self.num_dn, self.label_noise, self.box_noise)
        embed, ref, enc_boxes, enc_logits = self._select_queries(feats, shapes, dn)
        boxes, logits = self._decode(embed, ref, feats, shapes, None if dn is None else dn.attn_mask)
        raw = DETROutput(boxes, logits, enc_boxes, enc_logits, None if dn is None else dn.meta)
        if self.training:
            return raw
        h, w = shapes[0]
        scale = boxes.new_tensor([w, h, w, h]) * self.stride[0].to(boxes.dtype)  # normalised -> input pixels
        return torch.cat((boxes[-1] * scale, logits[-1].sigmoid()), -1), raw

    def _flatten_levels(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Project every level to `hd` channels and concatenate their cells: (B, sum h * w, hd) and the (h, w) per level."""
        feats, shapes = [], []
        for proj, x in zip(self.input_proj, xs):
            y = proj(x)
            shapes.append((int(y.shape[2]), int(y.shape[3])))
            feats.append(y.flatten(2).transpose(1, 2))
        return torch.cat(feats, 1), shapes

    @staticmethod
    def _level_anchors(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, 4) anchors in logit space (cell centres, size ANCHOR_SIZE * 2^level; invalid ones +inf) and (S, 1) validity."""
        anchors = []
        for level, (h, w) in enumerate(shapes):
            gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                    torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
            centres = (torch.stack((gx, gy), -1).view(-1, 2) + 0.5) / torch.tensor([w, h], dtype=torch.float32, device=device)
            anchors.append(torch.cat((centres, torch.full_like(centres, ANCHOR_SIZE * 2.0**level)), -1))
        boxes = torch.cat(anchors, 0)
        valid = torch.logical_and(boxes > ANCHOR_EPS, boxes < 1 - ANCHOR_EPS).all(-1, keepdim=True)  # Core ML lacks aten.__and__
        logits = torch.log(boxes / (1 - boxes)).masked_fill(~valid, float("inf"))
        return logits.to(dtype), valid

    def _select_queries(
        self, feats: torch.Tensor, shapes: list[tuple[int, int]], dn: DenoisingQueries | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score every encoder cell, keep the top `nq` as queries: (embeddings, reference boxes in logit space,
        proposal boxes (sigmoid), proposal logits); denoising queries, if any, go first."""
        anchors, valid = self._level_anchors(shapes, feats.dtype, feats.device)
        memory = self.enc_output(feats * valid.to(feats.dtype))
        scores = self.enc_score_head(memory)
        k = min(self.nq, memory.shape[1])
        index = scores.max(-1).values.topk(k, dim=1).indices
        batch = torch.arange(memory.shape[0], device=memory.device)[:, None]
        top = memory[batch, index]
        ref = self.enc_bbox_head(top) + anchors[index]
        enc_boxes, enc_logits = ref.sigmoid(), scores[batch, index]
        if self.training:  # the decoder refines the proposals; its gradients do not flow back into the selection
            ref, top = ref.detach(), top.detach()
        if dn is not None:
            ref, top = torch.cat((dn.boxes.to(ref.dtype), ref), 1), torch.cat((dn.embed.to(top.dtype), top), 1)
        return top, ref, enc_boxes, enc_logits

    def _decode(
        self, embed: torch.Tensor, ref_logits: torch.Tensor, feats: torch.Tensor, shapes: list[tuple[int, int]],
        attn_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder layers, each refining the previous layer's boxes: (L, B, Q, 4) boxes and (L, B, Q, nc) logits.

        Training keeps every layer (auxiliary losses); a layer's box is trained from the undetached previous refinement,
        while the next layer starts from a detached copy. Eval runs all layers and keeps the last.
        """
        ref = ref_logits.sigmoid()
        previous: torch.Tensor | None = None
        boxes, logits = [], []
        for i, layer in enumerate(self.layers):
            embed = layer(embed, ref, feats, shapes, attn_mask, self.query_pos_head(ref))
            delta = self.dec_bbox_head[i](embed)
            refined = torch.sigmoid(delta + inverse_sigmoid(ref))
            if self.training or i == self.ndl - 1:
                start = ref if previous is None or not self.training else previous
                boxes.append(torch.sigmoid(delta + inverse_sigmoid(start)))
                logits.append(self.dec_score_head[i](embed))
            previous = refined
            ref = refined.detach() if self.training else refined
        return torch.stack(boxes), torch.stack(logits)

    @staticmethod
    def split_output(pred: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, Q, 4 + nc + nm) xywh pixels + class scores -> (xyxy boxes, class scores, the nm extra columns)."""
        check_output_width(pred, 2, 5 + nm, "(batch, queries, 4 + nc)")
        nc = pred.shape[2] - 4 - nm
        return xywh_to_xyxy(pred[..., :4]), pred[..., 4 : 4 + nc], pred[..., 4 + nc :]


__all__ = ["DETROutput", "DenoisingMeta", "RTDETRDecoder"]
