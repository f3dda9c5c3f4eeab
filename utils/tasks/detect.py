"""The detection task: its data, loaders, evaluator and validation loop (pre-process, timed inference, loss, NMS,
scaling to original pixels, scoring and optional outputs), shared by train.py, val.py and the Trainer.

`DetectionValidator` is the loop; a task whose model adds outputs to the boxes (segmentation) subclasses it and
overrides `split_output` and `score`. `evaluate` runs it with everything as explicit arguments.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from utils.boxes import scale_boxes, xywh2xyxy, xyxy2xywh
from utils.data.dataset_config import load_dataset_config
from utils.data.datasets import create_dataloader
from utils.evaluation.evaluator import DetectionEvaluator, DetectionResult
from utils.evaluation.masks import encode_rle
from utils.evaluation.report import plot_result, plot_val_batch
from utils.files import safe_component
from utils.nms import non_max_suppression
from utils.predictions import write_labels
from utils.tasks.base import Task, TrainBatch, register_task
from utils.tasks.loop import eval_mode, timed

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


class DetectionValidator:
    """The validation loop of a detector; subclasses add what their model predicts beyond boxes (see SegmentationValidator)."""

    def __init__(self, evaluator: DetectionEvaluator, options: _Options) -> None:
        self.evaluator, self.o = evaluator, options

    def split_output(self, out: Any) -> tuple[torch.Tensor, Any, Any]:
        """Model output -> (decoded predictions, what NMS carries along per box (None here), raw training-form output or None).

        A .pt model in eval returns (decoded, raw); an inference backend returns the decoded tensor."""
        if not isinstance(out, (tuple, list)):
            return out, None, None
        return out[0], None, out[1]

    def extra_columns(self, extra: Any) -> int:
        """Values per box after class and score that NMS must keep (mask coefficients for segmentation)."""
        return 0

    def score(self, dets: list[torch.Tensor], predn: list[torch.Tensor], labelsn: list[torch.Tensor], extra: Any, targets: torch.Tensor,
              gt: list[torch.Tensor], img_hw: tuple[int, int], shapes: Sequence[Any], dataset: Any) -> list[Any]:
        """Feed one batch to the evaluator; returns per-image extras for the json records (None each for boxes alone)."""
        self.evaluator.update(predn, labelsn)
        return [None] * len(predn)

    def run(self, model: Any, loader: Any) -> list[dict]:
        """The loop over the loader; feeds the evaluator and returns the COCO json records (empty unless save_json)."""
        o, evaluator = self.o, self.evaluator
        image_ids = {str(f): i for i, f in enumerate(getattr(loader.dataset, "im_files", []))}
        jdict: list[dict] = []
        seen = 0
        bar = tqdm(loader, desc=f"{'':>22}{'Images':>11}{'Instances':>11}", leave=False, disable=o.quiet)
        for bi, (im, targets, paths, shapes, *gt_extra) in enumerate(bar):  # a task's batches may end in more ground truth
            im = timed(evaluator, "preprocess", o.device, _preprocess, im, o.device, o.half)
            targets, gt = targets.to(o.device), [m.to(o.device) for m in gt_extra]
            out = timed(evaluator, "inference", o.device, model, im, **({"augment": True} if o.augment else {}))
            preds, extra, raw = self.split_output(out)
            if o.compute_loss is not None and raw is not None:
                evaluator.add_loss(o.compute_loss(_as_float(raw), targets, *gt)[1])
            height, width = im.shape[2:]
            targets[:, 2:] *= torch.tensor((width, height, width, height), device=o.device)
            dets = timed(evaluator, "nms", o.device, _nms, preds, o, self.extra_columns(extra))
            predn, labelsn = _to_original(dets, targets, (height, width), shapes, o.single_cls)
            per_image = self.score(dets, predn, labelsn, extra, targets, gt, (height, width), shapes, loader.dataset)
            for si, p in enumerate(predn):
                if o.save_txt:
                    write_labels(p, shapes[si][0], o.save_dir / "labels" / f"{safe_component(Path(paths[si]).stem)}.txt", o.save_conf)
                if o.save_json:
                    jdict.extend(json_records(p, image_ids.get(str(paths[si]), seen + si), per_image[si]))
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
    validator: type[DetectionValidator] = DetectionValidator,
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
    """One validation pass of `model` over `loader` into `evaluator` by `validator` (the task's loop); figures, txt labels and
    COCO json when asked."""
    device = torch.device(device)
    o = _Options(
        device=device, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, half=half and device.type == "cuda",
        augment=augment, single_cls=single_cls, compute_loss=compute_loss,
        head_kind=head_kind if head_kind is not None else getattr(model, "head_kind", None), plots=plots,
        save_dir=Path(save_dir) if save_dir is not None else Path("."), save_txt=save_txt, save_conf=save_conf, save_json=save_json,
        names=list(names) if names is not None else list(evaluator.names), quiet=quiet,
    )
    with eval_mode(model, o.half):
        jdict = validator(evaluator, o).run(model, loader)
    result = evaluator.compute()
    if plots:
        plot_result(result, o.save_dir)
    if save_json:
        o.save_dir.mkdir(parents=True, exist_ok=True)
        (o.save_dir / json_name).write_text(json.dumps(jdict))
        LOGGER.info(f"Saved {len(jdict)} predictions to {o.save_dir / json_name}")
    return result


@register_task
class DetectTask(Task):
    """Object detection: YOLO box labels, mosaic-augmented letterboxed batches, P/R/mAP, NMS."""

    name = "detect"
    what = "detector"
    train_script, val_script, predict_script = "train.py", "val.py", "detect.py"
    default_cfg = "models/yolov5_mobilenetv4.yaml"
    default_data: ClassVar[str | None] = None
    train_project, val_project, predict_project = "runs/train", "runs/val", "runs/detect"
    metric_columns: ClassVar[tuple[str, ...]] = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
    val_loss_width = 3
    postprocess_stage = "NMS"
    validator: type[DetectionValidator] = DetectionValidator
    make_loader: Callable[..., tuple[Any, Any]] = staticmethod(create_dataloader)

    polygons: ClassVar[bool] = False  # the embedded dataset's labels: boxes, or outlines (segmentation)

    def sample_data(self, root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
        """The embedded shapes dataset at a small size, with its dataset yaml (no generator key: it exists already)."""
        import yaml

        from utils.data.shapes_dataset import SHAPE_NAMES, generate_shapes

        generate_shapes(root / "shapes", n_train=n_train, n_val=n_val, seed=seed, polygons=self.polygons)
        names = dict(enumerate(SHAPE_NAMES))
        cfg = {"path": str(root / "shapes"), "train": "images/train", "val": "images/val", "names": names}
        (root / "shapes.yaml").write_text(yaml.safe_dump(cfg))
        return root / "shapes.yaml"

    def load_data(self, data: Any) -> dict:
        """A YOLOv5 dataset yaml (None: the embedded shapes dataset), generated or downloaded when missing."""
        return load_dataset_config(data)

    def loader_options(self, opt: Any, train: bool) -> dict[str, Any]:
        """Further loader keywords of this task (segmentation: mask resolution and encoding)."""
        return {}

    def train_loader(self, data: dict, opt: Any, hyp: dict, imgsz: int, batch: int, stride: int, rank: int) -> tuple[Any, Any]:
        """Mosaic-augmented, shuffled (unless --rect) training loader and its dataset."""
        return self.make_loader(
            data["train"], imgsz, batch, stride, single_cls=opt.single_cls, hyp=hyp, augment=True, cache=opt.cache, rect=opt.rect,
            workers=opt.workers, shuffle=not opt.rect, prefix="train: ", nc=int(data["nc"]), seed=opt.seed, rank=rank, quad=opt.quad,
            image_weights=opt.image_weights, **self.loader_options(opt, train=True),
        )

    def val_loader(self, data: dict, split: str, imgsz: int, batch: int, stride: int, *, rect: bool, single_cls: bool,
                   workers: int, cache: Any = None, pad: float = 0.5, **options: Any) -> Any:
        """Rectangular (when the model takes any shape), padded validation loader of `split`."""
        extra = {**self.loader_options(options.get("opt"), train=False)}
        return self.make_loader(
            data[split], imgsz, batch, stride, single_cls=single_cls, cache=cache, rect=rect, pad=pad, workers=workers,
            prefix=f"{split}: ", nc=int(data["nc"]), **extra,
        )[0]

    def train_batch(self, batch: Sequence[Any], device: torch.device) -> TrainBatch:
        """(uint8 images, targets, paths, shapes, *more ground truth) -> float 0-1 images on the device."""
        imgs, targets, paths, _, *extra = batch
        imgs = imgs.to(device, non_blocking=True).float() / 255
        return TrainBatch(imgs, targets, paths, [m.to(device, non_blocking=True) for m in extra])

    def evaluator(self, nc: int, names: Sequence[str]) -> DetectionEvaluator:
        """Box P, R, mAP50, mAP50-95 per class."""
        return DetectionEvaluator(nc, list(names))

    def validate(self, model: Any, loader: Any, evaluator: Any, **options: Any) -> DetectionResult:
        """This task's validation loop (`evaluate` with its validator)."""
        return evaluate(model, loader, evaluator, validator=self.validator, **options)

    def before_fit(self, trainer: Any) -> None:
        """Anchor-based heads: refit anchors that fit the labels badly (YOLOv5's AutoAnchor); label statistics plot."""
        opt, dataset = trainer.opt, trainer.dataset
        if not opt.noautoanchor and hasattr(trainer.model.head, "anchors"):
            from utils.tasks.autoanchor import check_anchors, label_wh_from_dataset

            wh = label_wh_from_dataset(dataset.img_shapes[:, ::-1], dataset.labels, trainer.imgsz)
            check_anchors(wh, trainer.model, thr=trainer.hyp.anchor_t, imgsz=trainer.imgsz)
        if not opt.noplots:
            from utils.plots import plot_labels

            labels = [lb[:, :5] for lb in dataset.labels if len(lb)]
            if labels:
                plot_labels(np.concatenate(labels, 0), trainer.names, trainer.save_dir / "labels.jpg")

    def warn_output_cap(self, model: Any, datasets: dict[str, Any]) -> None:
        """One warning line when images hold more labelled objects than the head's max_detections (RT-DETR: its queries)."""
        head = next((h for h in (getattr(m, "head", None) for m in (model, getattr(model, "model", None))) if h is not None), None)
        cap = getattr(head, "max_detections", None)  # a DetectionModel's head, or the one of the model a .pt backend holds
        if head is None or cap is None:
            return
        over = []
        for what, dataset in datasets.items():
            counts = [len(lb) for lb in getattr(dataset, "labels", None) or []]
            n = sum(c > cap for c in counts)
            if n:
                over.append(f"{n} image(s) of the {what} hold more (up to {max(counts)})")
        if over:
            LOGGER.warning(f"WARNING: this {head.policy.title} model outputs at most {cap} objects per image, but {'; '.join(over)}: "
                           f"the objects beyond {cap} can never be detected, which caps recall on those images")

    def plot_train_batch(self, batch: TrainBatch, file: Path, names: Sequence[str]) -> None:
        """The mosaic with its label boxes."""
        from utils.plots import plot_images

        plot_images((batch.imgs.detach() * 255).byte().cpu(), batch.targets.cpu(), list(batch.paths), file, list(names))
