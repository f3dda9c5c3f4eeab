"""The classification task (YOLOv5's classify/): ImageFolder data, top-1/top-5 accuracy, its validation loop and plots.

Images reach the model as 0-1 RGB like a detector's (no ImageNet mean/std), so a classifier trained here is a backbone
checkpoint a detector fine-tunes from (`train.py --backbone-weights`) with the input statistics it was trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from tqdm import tqdm

from utils.data.classify_augment import classify_hyp
from utils.data.classify_dataset import create_classify_dataloader, load_classify_data
from utils.evaluation.classify import ClassifyEvaluator, ClassifyResult
from utils.paths import ROOT
from utils.tasks.base import Task, TrainBatch, register_task
from utils.tasks.loop import eval_mode, timed

TINY = 1e-12  # floor of a probability before its log (the validation loss)


def _preprocess(im: torch.Tensor, device: torch.device, half: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) batch -> [0, 1] float (half when asked) on the device."""
    im = im.to(device, non_blocking=True)
    return (im.half() if half else im.float()) / 255


def _probabilities(out: Any) -> torch.Tensor:
    """A classifier's eval output (probabilities), from a .pt model or an inference backend."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def classify_evaluate(
    model: Any, loader: Any, evaluator: ClassifyEvaluator, *, device: Union[str, torch.device], half: bool = False,
    compute_loss: Any = None, plots: bool = False, save_dir: Union[str, Path, None] = None, names: Sequence[str] | None = None,
    quiet: bool = False, **_detection_options: Any,
) -> ClassifyResult:
    """One validation pass of a classifier: accuracy, timings and (with compute_loss) the cross-entropy; val_batch plots.

    The detection options val.py passes to every task (thresholds, json, txt) do not apply and are ignored."""
    device = torch.device(device)
    half = half and device.type == "cuda"
    save = Path(save_dir) if save_dir is not None else Path(".")
    bar = tqdm(loader, desc=f"{'':>22}{'Images':>11}", leave=False, disable=quiet)
    with eval_mode(model, half):
        for bi, (im, labels) in enumerate(bar):
            x = timed(evaluator, "preprocess", device, _preprocess, im, device, half)
            probs = _probabilities(timed(evaluator, "inference", device, model, x)).float()
            if compute_loss is not None:
                evaluator.add_loss(compute_loss(probs.clamp_min(TINY).log(), labels.to(device))[1])
            timed(evaluator, "postprocess", device, evaluator.update, probs, labels)
            if plots and bi < 3:
                from utils.plots import plot_classified

                plot_classified(im, labels, list(names or evaluator.names), save / f"val_batch{bi}_pred.jpg", scores=probs.cpu())
    return evaluator.compute()


@register_task
class ClassifyTask(Task):
    """Image classification: class-folder datasets, YOLOv5's classification augmentation, top-1/top-5 accuracy."""

    name = "classify"
    what = "classifier"
    train_script, val_script, predict_script = "classify/train.py", "classify/val.py", "classify/predict.py"
    default_cfg = "models/mobilenetv4_conv_small-cls.yaml"
    default_data = str(ROOT / "data" / "shapes-cls.yaml")
    train_project, val_project, predict_project = "runs/train-cls", "runs/val-cls", "runs/predict-cls"
    metric_columns = ("metrics/accuracy_top1", "metrics/accuracy_top5")
    val_loss_width = 1
    detection_flags = ("rect", "quad", "image_weights", "close_mosaic", "single_cls", "multi_scale")

    def add_train_args(self, parser: argparse.ArgumentParser) -> None:
        """YOLOv5 classify/train.py's defaults and flags: --model, --lr0, --decay (the rest are train.py's)."""
        parser.set_defaults(epochs=10, batch_size=64, imgsz=96, optimizer="Adam", label_smoothing=0.1, cos_lr=False)
        parser.add_argument("--model", default="", help="model yaml or .pt checkpoint (YOLOv5's classify flag; --cfg/--weights too)")
        parser.add_argument("--lr0", type=float, default=None, help="initial learning rate (default: the hyp file's)")
        parser.add_argument("--decay", type=float, default=None, help="weight decay (default: the hyp file's)")

    def add_predict_args(self, parser: argparse.ArgumentParser) -> None:
        """classify/predict.py's size default (the embedded dataset's)."""
        parser.set_defaults(imgsz=[96])

    def resolve_train_options(self, config: Any) -> Any:
        """Detection-only flags are refused rather than silently ignored; --model (YOLOv5's) becomes --cfg or --weights."""
        for flag in self.detection_flags:
            if getattr(config, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} is a detection flag; {self.train_script} does not take it")
        for flag in ("lr0", "decay"):
            value = config.extra.get(flag)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"--{flag} {value!r}: must be a number >= 0")
        model = str(config.extra.get("model") or "")
        if not model:
            return config
        if config.cfg or config.weights:
            raise ValueError("give --model or --cfg/--weights, not both")
        return config.replace(model="", **({"weights": model} if model.endswith(".pt") else {"cfg": model}))

    def hyp_overrides(self, opt: Any) -> dict[str, float]:
        """--lr0 and --decay replace the hyp file's lr0 and weight_decay (YOLOv5's classify flags)."""
        pairs = (("lr0", opt.extra.get("lr0")), ("weight_decay", opt.extra.get("decay")))
        return {k: float(v) for k, v in pairs if v is not None}

    def sample_data(self, root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
        """The embedded shapes-cls dataset with n_train / n_val images per class; the folder is what --data takes."""
        from utils.data.shapes_classify import generate_shapes_classify

        return generate_shapes_classify(root / "shapes-cls", n_train=n_train, n_val=n_val, seed=seed)

    def load_data(self, data: Any) -> dict:
        """A class-folder dataset: a folder with train/ and val/, a dataset yaml, or None (the embedded shapes-cls)."""
        return load_classify_data(data)

    def train_loader(self, data: dict, opt: Any, hyp: dict, imgsz: int, batch: int, stride: int, rank: int) -> tuple[Any, Any]:
        """Randomly cropped, flipped and colour-jittered batches of (uint8 images, class indices)."""
        return create_classify_dataloader(data["train"], data["names"], imgsz, batch, augment=True, workers=opt.workers,
                                          shuffle=True, seed=opt.seed, rank=rank, hyp=hyp, prefix="train: ", normalize=False)

    def val_loader(self, data: dict, split: str, imgsz: int, batch: int, stride: int, *, rect: bool, single_cls: bool,
                   workers: int, cache: Any = None, pad: float = 0.5, **options: Any) -> Any:
        """Resized, centre-cropped batches of `split` (the test split when asked and present, else val)."""
        root = data.get(split) or data["val"]
        return create_classify_dataloader(root, data["names"], imgsz, batch, workers=workers, prefix=f"{split}: ", normalize=False)[0]

    def scale_augmentation(self, dataset: Any, schedule: Any, hyp: dict[str, float]) -> None:
        """The scaled hyp file read into crop, flip and jitter settings (scale 0.92 at strength 0.5: crops keep 54-100%)."""
        dataset.hyp = classify_hyp(schedule.augment_hyp(hyp))

    def train_batch(self, batch: Sequence[Any], device: torch.device) -> TrainBatch:
        """(uint8 images, labels) -> float 0-1 images and labels on the device."""
        imgs, labels = batch
        return TrainBatch(imgs.to(device, non_blocking=True).float() / 255, labels.to(device), [], [])

    def evaluator(self, nc: int, names: Sequence[str]) -> ClassifyEvaluator:
        """Top-1 and top-5 accuracy, per class too."""
        return ClassifyEvaluator(nc, names)

    def validate(self, model: Any, loader: Any, evaluator: Any, **options: Any) -> ClassifyResult:
        """The classification loop."""
        return classify_evaluate(model, loader, evaluator, **options)

    def plot_train_batch(self, batch: TrainBatch, file: Path, names: Sequence[str]) -> None:
        """The augmented images titled with their classes."""
        from utils.plots import plot_classified

        plot_classified(batch.imgs.detach().cpu(), batch.targets.cpu(), list(names), file)
