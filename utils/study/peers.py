"""The study's optional peer rows: Ultralytics YOLOv8n, YOLO11n and YOLO26n trained by the `ultralytics` package itself
(its own default recipe, architecture from its yaml, no pretrained weights) and exported by it to ONNX.

Everything that touches ultralytics is in `import_ultralytics` and `UltralyticsTrainer`. Nothing is downloaded and
nothing is written outside the study folder: its settings directory (YOLO_CONFIG_DIR) is in the study folder, offline
mode and no auto-install are set before the import, its settings are changed in memory only, the font its dataset
check looks for is provided locally (matplotlib's DejaVu Sans), plots and AMP (whose check fetches weights) are off, and
it reads the dataset through a symlinked copy in the study folder, so the label caches it writes stay out of the dataset.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from models.flops import count_gflops
from utils.data.datasets import collect_image_files
from utils.data.labels import img2label_paths
from utils.files import atomic_write_text, first_line, safe_component

PEERS = ("yolov8n", "yolo11n", "yolo26n")
NOT_INSTALLED = "peers skipped: the ultralytics package is not installed (pip install -r requirements-peers.txt)"
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")  # what ultralytics' dataset check looks for in its settings directory


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def import_ultralytics(config_dir: Path) -> tuple[Any, str]:
    """(the ultralytics module, "") imported offline with its settings under config_dir; (None, one line why) otherwise."""
    env = {"YOLO_CONFIG_DIR": str(config_dir), "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}
    with _environment(env):
        try:
            import ultralytics
            import ultralytics.utils
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] == "ultralytics":
                return None, NOT_INSTALLED
            return None, f"peers skipped: ultralytics cannot be imported ({first_line(e)})"
        except ImportError as e:
            return None, f"peers skipped: ultralytics cannot be imported ({first_line(e)})"
    return ultralytics, ""


def mirror_dataset(data: dict[str, Any], root: Path) -> Path:
    """A data yaml for ultralytics over symlinks to the dataset's train/val images and labels, under root."""
    for split in ("train", "val"):
        images = collect_image_files(data[split])
        for i, (image, label) in enumerate(zip(images, img2label_paths(images))):
            name = f"{i:06d}_{safe_component(Path(image).name)}"
            _link(root / "images" / split / name, Path(image))
            if Path(label).is_file():
                _link(root / "labels" / split / f"{Path(name).stem}.txt", Path(label))
    cfg = {"path": str(root.resolve()), "train": "images/train", "val": "images/val", "names": dict(enumerate(data["names"]))}
    return atomic_write_text(root / "data.yaml", yaml.safe_dump(cfg, sort_keys=False))


def _link(link: Path, target: Path) -> None:
    """A symlink at `link` to `target` (kept when it already points there; a stale link of ours is replaced)."""
    target = target.resolve()
    if link.is_symlink():
        if link.resolve() == target:
            return
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def tag_output_layout(onnx_path: Path, nc: int) -> str:
    """Record a foreign detector ONNX's output layout in its metadata, the keys DetectBackend reads: (B, 4+nc, N) boxes
    and class scores is the anchor-free head's layout, (B, K, 6) rows x1 y1 x2 y2 score class are final detections."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    if len(dims) == 3 and dims[1] == 4 + nc:
        layout, keys = "anchor_free", {"head": "anchor_free"}
    elif len(dims) == 3 and dims[2] == 6:
        layout, keys = "end2end", {"head": "anchor_free", "nms": json.dumps({"in_graph": True})}
    else:
        raise ValueError(f"{onnx_path}: output shape {dims} is neither (B, 4+{nc}, N) nor (B, K, 6)")
    set_metadata(onnx_path, keys)
    return layout


def onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata props of an ONNX file."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Add (or replace) metadata props of the ONNX file at `path`, keeping the others."""
    import onnx

    proto = onnx.load(str(path))
    merged = {**{p.key: p.value for p in proto.metadata_props}, **props}
    del proto.metadata_props[:]
    for k, v in merged.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))


@dataclass(frozen=True)
class PeerModel:
    """What ultralytics produced for one peer: its best weights, their ONNX export, size figures and its own val mAP."""

    best: Path
    onnx: Path
    params: int | None
    gflops: float | None
    own_map50_95: float | None


class UltralyticsTrainer:
    """Train and export Ultralytics models with the ultralytics package, downloads off and files inside the study folder."""

    def __init__(self, ultralytics: Any, study_dir: Path) -> None:
        """Point ultralytics' folders into study_dir and turn its network features off (in memory: its settings file is
        never rewritten by this), and provide its font; settings of the user's own (ultralytics imported earlier with
        them) are left as they are."""
        self.yolo = ultralytics.YOLO
        config_dir = Path(ultralytics.utils.USER_CONFIG_DIR)
        if not config_dir.resolve().is_relative_to(study_dir.resolve()):
            return
        folders = {"datasets_dir": "ultralytics-data", "weights_dir": "ultralytics-weights", "runs_dir": "ultralytics-runs"}
        off = dict.fromkeys(("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb"), False)
        dict.update(ultralytics.utils.SETTINGS, {**{k: str(study_dir / v) for k, v in folders.items()}, **off})
        self._provide_fonts(config_dir)

    @staticmethod
    def _provide_fonts(config_dir: Path) -> None:
        """Matplotlib's DejaVu Sans under the names ultralytics would otherwise download (plots are off: never drawn)."""
        import matplotlib

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        for name in FONTS:
            if not (config_dir / name).exists() and font.is_file():
                shutil.copyfile(font, config_dir / name)

    def train_export(self, name: str, data_yaml: Path, folder: Path, opt: Any) -> PeerModel:
        """Train `name` from its yaml with ultralytics' default recipe into `folder`, export best.pt to a static ONNX."""
        model = self.yolo(f"{name}.yaml")  # the architecture only: no weights file, nothing fetched
        metrics = model.train(data=str(data_yaml), epochs=opt.epochs, imgsz=opt.imgsz, batch=opt.batch_size, seed=opt.seed,
                              workers=opt.workers, device=opt.device or None, project=str(folder.parent), name=folder.name,
                              exist_ok=True, pretrained=False, plots=False, amp=False, verbose=False)  # fmt: skip
        best = Path(model.trainer.best if model.trainer.best.exists() else model.trainer.last)
        onnx = self.export(best, opt.imgsz, best.parent)
        own = getattr(getattr(metrics, "box", None), "map", None)
        params, gflops = self._size(model.model, opt.time_size)
        return PeerModel(best, onnx, params, gflops, float(own) if own is not None else None)

    def export(self, weights: Path, imgsz: int, out_dir: Path) -> Path:
        """A static batch-1 ONNX of a trained peer at imgsz in out_dir; nms=False keeps YOLO26's NMS-free (end-to-end) output."""
        out_dir.mkdir(parents=True, exist_ok=True)
        src = out_dir / weights.name
        if src.resolve() != weights.resolve():
            shutil.copyfile(weights, src)  # ultralytics writes the ONNX next to the weights it loads
        return Path(self.yolo(str(src)).export(format="onnx", imgsz=imgsz, batch=1, opset=17, simplify=False, dynamic=False,
                                               device="cpu", nms=False))  # fmt: skip

    @staticmethod
    def _size(net: Any, imgsz: int) -> tuple[int | None, float | None]:
        """Parameters and GFLOPs of the fused inference model at imgsz (None where a count fails)."""
        try:
            fused = copy.deepcopy(net).float().eval()
            fused = fused.fuse() if hasattr(fused, "fuse") else fused
            params = int(sum(p.numel() for p in fused.parameters()))
        except Exception:  # a model this project cannot inspect keeps its row, without the figure
            return None, None
        try:
            gflops: float | None = count_gflops(fused, imgsz, ch=3)
        except Exception:  # ultralytics' forward reads tensor values (.item()), which the meta device has not
            gflops = _counted_gflops(fused, imgsz)
        return params, gflops if gflops is not None and math.isfinite(gflops) else None


def _counted_gflops(model: Any, imgsz: int) -> float | None:
    """GFLOPs of one real forward pass on a zero image (the counter count_gflops uses, on the CPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model.cpu()(torch.zeros(1, 3, imgsz, imgsz))
    except Exception:
        return None
    return counter.get_total_flops() / 1e9
