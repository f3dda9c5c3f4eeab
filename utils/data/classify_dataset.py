"""Classification data (YOLOv5's classify/ ImageFolder datasets): resolving --data, class-folder datasets and loaders.

A dataset is a folder with train/ and val/ (or test/) splits, each holding one sub-folder of images per class; the
class names are the train split's sub-folder names, sorted, and a class's index is its place in that list.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.data.classify_augment import classify_hyp, eval_transform, train_transform
from utils.data.dataset_config import DatasetError, _make_available, _names_list
from utils.data.datasets import collect_image_files, seed_worker, stack_channels_last, verify_image
from utils.data.images import IMG_FORMATS, ImageError, load_image
from utils.data.shapes_dataset import SHAPE_NAMES
from utils.files import read_yaml_mapping, resolve_path
from utils.paths import ROOT

LOGGER = logging.getLogger("mobile_yolo")
PathLike = Union[str, Path]


def default_classify_data() -> Path:
    """The embedded dataset YAML used when no --data is given (looked up at call time, so tests can move ROOT)."""
    return ROOT / "data" / "shapes-cls.yaml"


def _context(where: str) -> str:
    """Message prefix naming the dataset yaml or folder a problem was found through ('' when the path says it all)."""
    return f"{where}: " if where else ""


def class_folders(split: Path, where: str = "") -> dict[str, Path]:
    """Class name -> folder for the sub-folders of a split folder (hidden ones skipped); DatasetError when there are none."""
    if not split.is_dir():
        raise DatasetError(f"{_context(where)}split folder {split} does not exist")
    folders = {d.name: d for d in sorted(split.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not folders:
        raise DatasetError(f"{_context(where)}{split} has no class folders (expected {split}{os.sep}<class>{os.sep}<images>)")
    return folders


def _has_image(folder: Path) -> bool:
    """True if folder holds (at any depth) at least one file with an image suffix."""
    return any(f.is_file() and f.suffix[1:].lower() in IMG_FORMATS for f in folder.rglob("*"))


def _check_split(split: Path, train_names: list[str], where: str = "") -> None:
    """A split's classes must be train classes and every class folder must hold images; one-line DatasetError if not."""
    folders = class_folders(split, where)
    extra = sorted(set(folders) - set(train_names))
    if extra:
        raise DatasetError(f"{_context(where)}{split} has class folders {extra} that the train split lacks (train classes: {train_names})")
    for folder in folders.values():
        if not _has_image(folder):
            raise DatasetError(f"{_context(where)}class folder {folder} has no images (supported formats: {', '.join(IMG_FORMATS)})")


def _split_folder(value: Any, root: Path, key: str, where: str) -> Path | None:
    """One yaml split entry -> its folder: relative entries resolve against root and may not climb out of it with '..'."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DatasetError(f"{where}: '{key}' must be one folder path (class folders inside), got {value!r}")
    p = Path(value).expanduser()
    if p.is_absolute():
        return resolve_path(p, DatasetError, where, f"'{key}'")
    joined = Path(os.path.normpath(root / p))
    if joined != root and not joined.is_relative_to(root):
        raise DatasetError(f"{where}: '{key}: {value}' escapes the dataset root {root} via '..'")
    return resolve_path(joined, DatasetError, where, f"'{key}'")


def _from_folder(folder: Path) -> dict[str, Any]:
    """The splits of a dataset folder: train/ and val/, with test/ standing in for a missing val/ (as YOLOv5 does)."""
    test = folder / "test" if (folder / "test").is_dir() else None
    val = folder / "val" if (folder / "val").is_dir() else test
    if not (folder / "train").is_dir():
        raise DatasetError(f"{folder}: no train/ folder (expected {folder}{os.sep}train{os.sep}<class>{os.sep}<images>)")
    if val is None:
        raise DatasetError(f"{folder}: no val/ or test/ folder next to train/")
    return {"path": folder, "train": folder / "train", "val": val, "test": test, "names": None, "where": str(folder)}


def _from_yaml(cfg: dict, where: str, base: Path, autodownload: bool) -> dict[str, Any]:
    """The splits of a dataset yaml (relative `path` from the repo root, else the yaml's folder), prepared when missing."""
    for key in ("train", "val"):
        if not cfg.get(key):
            raise DatasetError(f"{where}: missing required key '{key}'")
    names = _names_list(cfg["names"], cfg.get("nc"), where) if cfg.get("names") is not None else None
    root = Path(str(cfg["path"])).expanduser() if cfg.get("path") else base
    root = Path(os.path.normpath(root if root.is_absolute() else ROOT / root))
    splits = {k: _split_folder(cfg.get(k), root, k, where) for k in ("train", "val", "test")}
    missing = not all(p is not None and p.is_dir() for p in (splits["train"], splits["val"]))
    if missing and (cfg.get("generator") or cfg.get("download")):  # otherwise load_classify_data names the missing folder
        fallback = list(SHAPE_NAMES) if cfg.get("generator") == "shapes-cls" else []
        _make_available({**cfg, "path": str(root), "names": names or fallback}, where, autodownload)
    return {"path": resolve_path(root, DatasetError, where, "'path'"), **splits, "names": names, "where": where}


def _resolve(data: Union[PathLike, dict, None], autodownload: bool) -> dict[str, Any]:
    """Dispatch --data: None (embedded yaml), a config dict, a yaml file, a dataset folder (or datasets/<name>)."""
    if isinstance(data, dict):
        return _from_yaml(dict(data), "<dataset dict>", Path.cwd(), autodownload)
    p = Path(data).expanduser() if data is not None else default_classify_data()
    if p.suffix.lower() in (".yaml", ".yml"):
        if not p.is_file() and not p.is_absolute() and (ROOT / "data" / p).is_file():
            p = ROOT / "data" / p
        if not p.is_file():
            raise DatasetError(f"{p}: dataset YAML not found")
        cfg = read_yaml_mapping(p, DatasetError, "keys (path, train, val, names)")
        return _from_yaml(cfg, str(p), resolve_path(p, DatasetError, str(p), "dataset YAML").parent, autodownload)
    if not p.is_dir() and not p.is_absolute() and (ROOT / "datasets" / p).is_dir():
        p = ROOT / "datasets" / p
    if not p.is_dir():
        raise DatasetError(f"{p}: classification dataset not found (expected a folder with train/ and val/, or a dataset YAML)")
    return _from_folder(resolve_path(p, DatasetError, str(p), "dataset folder"))


def load_classify_data(data: Union[PathLike, dict, None] = None, autodownload: bool = True) -> dict[str, Any]:
    """Resolve classify --data to {path, train, val, test, names, nc}, checking the class folders of every split."""
    info = _resolve(data, autodownload)
    where = info.pop("where")
    for key in ("train", "val"):
        if not info[key].is_dir():
            raise DatasetError(f"{where}: {key} folder {info[key]} does not exist")
    names = sorted(class_folders(info["train"], where))
    if info["names"] is not None and info["names"] != names:
        raise DatasetError(f"{where}: 'names' {info['names']} do not match the class folders {names} of {info['train']}")
    for key in ("train", "val", "test"):
        if info[key] is not None:
            _check_split(info[key], names, where)
    return {**info, "names": names, "nc": len(names)}


class ClassifyDataset(Dataset):
    """Class-folder images: item -> ((3, imgsz, imgsz) RGB tensor, class index); the tensor is ImageNet-normalised
    float32, or uint8 0-255 with normalize=False.

    Scanning verifies every image (utils.data.datasets.verify_image); unreadable ones are skipped with one warning each.
    hyp: augmentation keys of a hyp file (utils.data.classify_augment.classify_hyp), used when augment.
    """

    def __init__(self, root: PathLike, names: list[str], imgsz: int = 224, augment: bool = False, hyp: dict | None = None,
                 workers: int = 8, prefix: str = "", normalize: bool = True) -> None:
        self.root, self.names, self.imgsz, self.augment, self.normalize = Path(root), list(names), int(imgsz), augment, normalize
        self.hyp = classify_hyp(hyp)
        if self.imgsz <= 0:
            raise DatasetError(f"{prefix}imgsz must be positive, got {imgsz}")
        _check_split(self.root, self.names)
        folders = class_folders(self.root)
        files = [(f, self.names.index(n)) for n, d in folders.items() for f in collect_image_files(d, prefix)]
        with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
            checks = list(pool.map(verify_image, [f for f, _ in files]))
        for _, msg in checks:
            if msg:
                LOGGER.warning(f"{prefix}WARNING: {msg}")
        self.samples = [s for s, (shape, _) in zip(files, checks) if shape is not None]
        if not self.samples:
            raise DatasetError(f"{prefix}{self.root}: no usable images (all {len(files)} corrupt)")
        self.im_files = [f for f, _ in self.samples]
        self.labels = np.array([c for _, c in self.samples], dtype=np.int64)
        LOGGER.info(f"{prefix}Scanning {self.root}: {len(self.samples)} images in {len(folders)} classes, "
                    f"{len(files) - len(self.samples)} corrupt")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        im_file, cls = self.samples[index]
        try:
            img = load_image(im_file)
        except ImageError as e:  # changed on disk since the scan
            raise DatasetError(str(e)) from None
        if self.augment:  # drawn from numpy's global state, which seed_worker seeds in each loader worker
            rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
            return train_transform(img, self.imgsz, self.hyp, rng, self.normalize), cls
        return eval_transform(img, self.imgsz, self.normalize), cls

    @staticmethod
    def collate_fn(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack images into one channels-last batch and labels into an int64 vector."""
        imgs, labels = zip(*batch)
        return stack_channels_last(imgs), torch.tensor(labels, dtype=torch.int64)


def create_classify_dataloader(root: PathLike, names: list[str], imgsz: int, batch_size: int, augment: bool = False,
                               workers: int = 8, shuffle: bool = False, seed: int = 0, rank: int = -1, hyp: dict | None = None,
                               prefix: str = "", normalize: bool = True) -> tuple[DataLoader, ClassifyDataset]:
    """Build a ClassifyDataset and a seeded DataLoader over it (DistributedSampler when rank != -1); batches are
    (images (B, 3, imgsz, imgsz) channels-last, normalised float32 or uint8 with normalize=False, int64 labels (B,))."""
    dataset = ClassifyDataset(root, names, imgsz, augment=augment, hyp=hyp, workers=workers, prefix=prefix, normalize=normalize)
    batch_size = min(batch_size, len(dataset))
    nw = max(0, min(os.cpu_count() or 1, batch_size if batch_size > 1 else 0, workers))
    sampler: DistributedSampler | None = DistributedSampler(dataset, shuffle=shuffle, seed=seed) if rank != -1 else None
    generator = torch.Generator()
    generator.manual_seed(seed)
    # a training batch of one image cannot normalise a pooled map (BatchNorm after pooling sees one value per channel)
    lone = augment and batch_size > 1 and len(dataset) % batch_size == 1
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=nw, sampler=sampler,
                        pin_memory=torch.cuda.is_available(), collate_fn=ClassifyDataset.collate_fn, worker_init_fn=seed_worker,
                        generator=generator, persistent_workers=nw > 0, drop_last=lone)
    return loader, dataset
