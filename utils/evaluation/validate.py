"""The validation loop: pre-process, timed inference, loss, NMS, scaling to original pixels, scoring and optional outputs.

`evaluate` serves val.py and the trainer alike; it takes everything as explicit arguments and returns a DetectionResult.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union, cast

import torch
from torch import nn
from tqdm import tqdm

from models.segment import masks_from_protos
from utils.boxes import scale_boxes, xywh2xyxy, xyxy2xywh
from utils.evaluation.evaluator import DetectionEvaluator, DetectionResult, SegmentEvaluator
from utils.evaluation.masks import encode_rle
from utils.evaluation.report import plot_result, plot_val_batch
from utils.files import safe_component
from utils.nms import non_max_suppression
from utils.predictions import write_labels
from utils.segmentation import MASK_THRESHOLD, index_to_binary, scale_masks

LOGGER = logging.getLogger("mobile_yolo")

LossFn = Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor]]  # (raw outputs, targets) -> (loss, items)


@dataclass(frozen=True)
class _Options:
    """Per-pass settings shared by the loop's helpers."""

    device: torch.device
    conf_thres: float
    iou_thres: float
    max_det: int
    half: bool
    augment: bool
    single_cls: bool
    compute_loss: LossFn | None
    head_kind: str | None
    plots: bool
    save_dir: Path
    save_txt: bool
    save_conf: bool
    save_json: bool
    names: list[str]
    quiet: bool
    segment: bool


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(evaluator: DetectionEvaluator, stage: str, device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), its wall time (device-synchronised) added to the evaluator's `stage`."""
    _synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _synchronize(device)
    evaluator.add_time(stage, time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def _eval_mode(model: Any, half: bool) -> Iterator[None]:
    """Every submodule in eval mode and the weights in the wanted float type for the pass; both restored exactly afterwards.

    The original weight tensors are kept and put back (not cast back), so a float32 EMA validated in fp16 loses no bits.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    wanted = torch.float16 if half else torch.float32
    cast = any(p.is_floating_point() and p.dtype != wanted for p in model.parameters())
    params = [(p, p.data) for p in model.parameters()] if cast else []
    buffers = [(m, k, b) for m in model.modules() for k, b in m._buffers.items() if b is not None] if cast else []
    try:
        if cast:
            model.to(wanted)
        model.eval()
        yield
    finally:
        for p, data in params:
            p.data = data
        for m, k, b in buffers:
            m._buffers[k] = b
        for m, training in modes:
            m.training = training


def _as_float(raw: Any) -> Any:
    """Raw head outputs (tensor, or list/tuple/dict of them) in float32 for the loss."""
    if isinstance(raw, torch.Tensor):
        return raw.float()
    if isinstance(raw, dict):
        return {k: _as_float(v) for k, v in raw.items()}
    if isinstance(raw, tuple) and hasattr(raw, "_fields"):  # a NamedTuple (RT-DETR's DETROutput) keeps its type
        return type(raw)(*(_as_float(x) for x in raw))
    if isinstance(raw, (list, tuple)):
        return [_as_float(x) for x in raw]
    return raw


def _nms(preds: Any, o: _Options, nm: int = 0) -> list[torch.Tensor]:
    """Per-image (n, 6 + nm) detections, decoded by the model's head kind (anchor-based when the model names none)."""
    return non_max_suppression(
        preds, o.conf_thres, o.iou_thres, multi_label=True, agnostic=o.single_cls, max_det=o.max_det, head=o.head_kind, nm=nm
    )


def _to_original(
    dets: list[torch.Tensor], targets: torch.Tensor, img_hw: tuple[int, int], shapes: Sequence[Any], single_cls: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Detections and (m, 5) [cls, xyxy] labels of each image mapped from letterboxed to original-image pixels."""
    preds, labels = [], []
    for si, det in enumerate(dets):
        if single_cls:
            det[:, 5] = 0
        predn = det.float().cpu().clone()
        scale_boxes(img_hw, predn[:, :4], shapes[si][0], shapes[si][1])
        lab = targets[targets[:, 0] == si, 1:].float().cpu()
        tbox = scale_boxes(img_hw, xywh2xyxy(lab[:, 1:5]), shapes[si][0], shapes[si][1])
        preds.append(predn)
        labels.append(torch.cat((lab[:, :1], tbox), 1))
    return preds, labels


def json_records(predn: torch.Tensor, image_id: int, masks: torch.Tensor | None = None) -> list[dict]:
    """COCO result records for one image (bbox as top-left x, y, w, h in pixels; with `masks`, RLE `segmentation`)."""
    box = xyxy2xywh(predn[:, :4])
    box[:, :2] -= box[:, 2:] / 2
    records = [
        {"image_id": image_id, "category_id": int(p[5]), "bbox": [round(x, 3) for x in b], "score": round(p[4], 5)}
        for p, b in zip(predn[:, :6].tolist(), box.tolist())
    ]
    if masks is not None:
        for record, mask in zip(records, masks.cpu().numpy()):
            record["segmentation"] = encode_rle(mask)
    return records


def _split_output(out: Any, segment: bool) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Model output -> (decoded predictions, prototypes or None, raw training-form output or None).

    A .pt model in eval returns (decoded, raw) or, segmenting, (decoded, protos, raw), whose loss input is (raw, protos);
    an inference backend returns the decoded tensor, or (decoded, protos)."""
    if not isinstance(out, (tuple, list)):
        return out, None, None
    if segment:
        raw = (out[2], out[1]) if len(out) > 2 else None
        return out[0], out[1], raw
    return out[0], None, out[1]


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


def _run_batches(model: Any, loader: Any, evaluator: DetectionEvaluator, o: _Options) -> list[dict]:
    """The loop over the loader; feeds the evaluator and returns the COCO json records (empty unless save_json)."""
    image_ids = {str(f): i for i, f in enumerate(getattr(loader.dataset, "im_files", []))}
    overlap = bool(getattr(loader.dataset, "overlap", True))  # how a segmentation loader encodes its ground-truth masks
    jdict: list[dict] = []
    seen = 0
    bar = tqdm(loader, desc=f"{'':>22}{'Images':>11}{'Instances':>11}", leave=False, disable=o.quiet)
    for bi, (im, targets, paths, shapes, *gt_masks) in enumerate(bar):  # segmentation batches end in ground-truth masks
        im = _timed(evaluator, "preprocess", o.device, _preprocess, im, o.device, o.half)
        targets, masks = targets.to(o.device), [m.to(o.device) for m in gt_masks]
        out = _timed(evaluator, "inference", o.device, model, im, **({"augment": True} if o.augment else {}))
        preds, protos, raw = _split_output(out, o.segment)
        if o.compute_loss is not None and raw is not None:
            evaluator.add_loss(o.compute_loss(_as_float(raw), targets, *masks)[1])
        height, width = im.shape[2:]
        targets[:, 2:] *= torch.tensor((width, height, width, height), device=o.device)
        dets = _timed(evaluator, "nms", o.device, _nms, preds, o, 0 if protos is None else protos.shape[1])
        predn, labelsn = _to_original(dets, targets, (height, width), shapes, o.single_cls)
        pmasks: list[torch.Tensor] = []
        if o.segment:
            if protos is None or not masks:
                raise ValueError("segmentation validation needs a model that returns prototypes and a loader that yields masks")
            pmasks, gmasks = _masks_to_original(dets, protos, masks[0], targets, (height, width), shapes, overlap)
            cast(Any, evaluator).update(predn, labelsn, pmasks, gmasks)
        else:
            evaluator.update(predn, labelsn)
        for si, p in enumerate(predn):
            if o.save_txt:
                write_labels(p, shapes[si][0], o.save_dir / "labels" / f"{safe_component(Path(paths[si]).stem)}.txt", o.save_conf)
            if o.save_json:
                jdict.extend(json_records(p, image_ids.get(str(paths[si]), seen + si), pmasks[si] if o.segment else None))
        seen += len(predn)
        if o.plots and bi < 3:
            plot_val_batch(im, targets, dets, paths, o.names, o.save_dir, bi)
    return jdict


def _preprocess(im: torch.Tensor, device: torch.device, half: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) batch -> [0, 1] float (half when asked) on the device."""
    im = im.to(device, non_blocking=True)
    return (im.half() if half else im.float()) / 255


@torch.no_grad()
def evaluate(
    model: Any,
    loader: Any,
    evaluator: DetectionEvaluator,
    *,
    device: Union[str, torch.device],
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    half: bool = False,
    augment: bool = False,
    single_cls: bool = False,
    compute_loss: LossFn | None = None,
    head_kind: str | None = None,
    plots: bool = False,
    save_dir: Union[str, Path, None] = None,
    save_txt: bool = False,
    save_conf: bool = False,
    save_json: bool = False,
    json_name: str = "predictions.json",
    names: Sequence[str] | None = None,
    quiet: bool = False,
) -> DetectionResult:
    """One validation pass of `model` over `loader` into `evaluator`; figures, txt labels and COCO json when asked."""
    device = torch.device(device)
    o = _Options(
        device=device, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, half=half and device.type == "cuda",
        augment=augment, single_cls=single_cls, compute_loss=compute_loss,
        head_kind=head_kind if head_kind is not None else getattr(model, "head_kind", None), plots=plots,
        save_dir=Path(save_dir) if save_dir is not None else Path("."), save_txt=save_txt, save_conf=save_conf, save_json=save_json,
        names=list(names) if names is not None else list(evaluator.names), quiet=quiet, segment=isinstance(evaluator, SegmentEvaluator),
    )
    with _eval_mode(model, o.half):
        jdict = _run_batches(model, loader, evaluator, o)
    result = evaluator.compute()
    if plots:
        plot_result(result, o.save_dir)
    if save_json:
        o.save_dir.mkdir(parents=True, exist_ok=True)
        (o.save_dir / json_name).write_text(json.dumps(jdict))
        LOGGER.info(f"Saved {len(jdict)} predictions to {o.save_dir / json_name}")
    return result
