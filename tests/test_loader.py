"""The fast training loader does the same work as the plain one: JPEG decoding, the mosaic built only where the warp
samples, channels-last batches, and persistent workers restarted when the dataset changes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from utils.boxes import xywhn2xyxy
from utils.data.augmentations import Warp
from utils.data.datasets import LoadImagesAndLabels, restarted, stack_channels_last
from utils.data.images import jpeg_reduction, load_image
from utils.data.shapes_dataset import generate_shapes

DEFAULT_HYP = {"degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0, "perspective": 0.0}
ROTATING_HYP = {"degrees": 10.0, "translate": 0.1, "scale": 0.5, "shear": 2.0, "perspective": 0.0}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sixteen photo-sized training images (JPEG, 200-320 px sides) with labels."""
    root = generate_shapes(tmp_path_factory.mktemp("loader") / "shapes", n_train=16, n_val=1, seed=5, sides=(200, 320))
    return root / "images" / "train"


def reference_mosaic(ds: LoadImagesAndLabels, index: int, seed: int) -> tuple[np.ndarray, np.ndarray, Warp]:
    """The plain mosaic: the whole 2s canvas built from resized images, then warped; same random draws as load_mosaic."""
    np.random.seed(seed)
    s, hyp = ds.img_size, ds.hyp
    yc, xc = (int(np.random.uniform(-b, 2 * s + b)) for b in ds.mosaic_border)
    indices = [index] + [int(np.random.randint(0, len(ds))) for _ in range(3)]
    warp = Warp.draw((2 * s, 2 * s), ds.mosaic_border, hyp["degrees"], hyp["translate"], hyp["scale"], hyp["shear"], hyp["perspective"])
    grid = warp.on_pixel_grid((2 * s, 2 * s))
    warp = grid[0] if grid is not None else warp
    canvas = np.full((2 * s, 2 * s, 3), 114, np.uint8)
    labels = []
    for k, idx in enumerate(indices):
        img = ds.load_image(idx)[0]  # decoding and resizing are tested on their own below
        h, w = img.shape[:2]
        x1, y1 = (xc - w if k in (0, 2) else xc), (yc - h if k in (0, 1) else yc)
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x1 + w, 2 * s), min(y1 + h, 2 * s)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
        lb = ds.labels[idx].copy()
        lb[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h, x1, y1)
        labels.append(lb)
    all_labels = np.concatenate(labels, 0)
    all_labels[:, 1:] = all_labels[:, 1:].clip(0, 2 * s)
    return warp.apply_image(canvas), warp.apply_labels(all_labels), warp


def test_rotating_mosaic_matches_the_whole_canvas_warp(photo_dir: Path) -> None:
    """Rotation/shear: the canvas is built only where the warp samples; same pixels and boxes as warping all of it."""
    ds = LoadImagesAndLabels(photo_dir, 128, 4, augment=True, hyp=ROTATING_HYP)
    for seed in range(12):
        ref_img, ref_labels, _ = reference_mosaic(ds, seed % len(ds), seed)
        np.random.seed(seed)
        img, labels = ds.load_mosaic(seed % len(ds))
        np.testing.assert_allclose(labels, ref_labels, atol=1e-3)
        diff = np.abs(img.astype(np.int16) - ref_img.astype(np.int16))
        # the same warpAffine from a shifted origin: its fixed-point coordinates round a level or two differently
        assert diff.max() <= 3 and diff.mean() < 0.5, (seed, diff.max(), diff.mean())


def _matched(a: np.ndarray, b: np.ndarray, tol: float) -> int:
    """How many boxes of `a` have a box of the same class in `b` with every side within tol pixels."""
    return sum(bool(((b[:, 0] == row[0]) & (np.abs(b[:, 1:] - row[1:]).max(1) <= tol)).any()) for row in a)


def test_zoom_shift_mosaic_matches_the_whole_canvas_warp(photo_dir: Path) -> None:
    """Zoom and shift (the default hyps): each tile is resized once, straight from the decoded file. Against resizing
    to img_size, tiling and zooming the whole canvas (two interpolations), boxes agree to a pixel and the images are
    registered: they differ least at zero offset, by a few grey levels on average (one interpolation blurs less)."""
    ds = LoadImagesAndLabels(photo_dir, 128, 4, augment=True, hyp=DEFAULT_HYP)
    for seed in range(12):
        ref_img, ref_labels, _ = reference_mosaic(ds, seed % len(ds), seed)
        np.random.seed(seed)
        img, labels = ds.load_mosaic(seed % len(ds))
        # each tile's crop is whole source pixels: boxes move by under one; one box may sit on the 10%-visible threshold
        assert abs(len(labels) - len(ref_labels)) <= 1
        assert _matched(labels, ref_labels, 1.0) >= min(len(labels), len(ref_labels)) - 1
        a = img[2:-2, 2:-2].astype(np.int16)
        offsets = {(dy, dx): float(np.abs(a - ref_img[2 + dy:126 + dy, 2 + dx:126 + dx]).mean()) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        # the images carry Gaussian noise of std 8 levels (shapes_dataset); interpolating it once rather than twice
        # smooths it differently: the mean difference stays well under that std (3.7 at most over 60 seeds here)
        assert min(offsets, key=offsets.__getitem__) == (0, 0) and offsets[(0, 0)] < 0.6 * 8.0, (seed, offsets)


def test_mosaic_skips_images_out_of_sight(photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zoomed in, the output shows a small part of the canvas: images wholly outside it are never decoded."""
    ds = LoadImagesAndLabels(photo_dir, 128, 4, augment=True, hyp=DEFAULT_HYP)
    decoded: list[str] = []
    original = ds._decode
    monkeypatch.setattr(ds, "_decode", lambda f, reduce=1: decoded.append(f) or original(f, reduce))
    n = 0
    for seed in range(40):
        np.random.seed(seed)
        ds.load_mosaic(seed % len(ds))
        n += 4
    assert 0.5 * n < len(decoded) < n  # about one image in ten is out of sight with scale 0.5


def test_pixel_grid_warp_moves_less_than_a_pixel() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        warp = Warp.draw((256, 256), (-64, -64), 0.0, 0.1, 0.5, 0.0, 0.0, rng)
        grid = warp.on_pixel_grid((256, 256))
        assert grid is not None
        snapped, (x1, y1, x2, y2) = grid
        seen = np.array([[0, 0, 1], [128, 0, 1], [0, 128, 1], [128, 128, 1], [97.5, 31.25, 1]]) @ np.linalg.inv(warp.matrix).T
        moved = np.abs(seen @ snapped.matrix.T - seen @ warp.matrix.T)[:, :2]
        assert moved.max() < snapped.matrix[0, 0]  # every output pixel moves by less than one input pixel
        assert isinstance(x1, int) and x2 - x1 == y2 - y1 > 0
    assert Warp.draw((256, 256), (-64, -64), 10.0, 0.1, 0.5, 0.0, 0.0, rng).on_pixel_grid((256, 256)) is None


def test_source_region_covers_what_the_output_samples() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        warp = Warp.draw((256, 256), (-64, -64), 15.0, 0.1, 0.5, 5.0, 0.0, rng)
        x1, y1, x2, y2 = warp.source_region((256, 256))
        inv = np.linalg.inv(warp.matrix)
        xs, ys = np.meshgrid(np.linspace(0, warp.out_w, 9), np.linspace(0, warp.out_h, 9))
        src = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 1) @ inv.T
        inside = (src[:, 0] >= 0) & (src[:, 0] < 256) & (src[:, 1] >= 0) & (src[:, 1] < 256)
        assert (src[inside, 0] >= x1).all() and (src[inside, 0] <= x2).all()
        assert (src[inside, 1] >= y1).all() and (src[inside, 1] <= y2).all()


def test_jpeg_reduction_and_reduced_decode(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    assert cv2.imwrite(str(big), np.full((1000, 1300, 3), 90, np.uint8))
    assert [jpeg_reduction(big, (1000, 1300), s) for s in (1300, 650, 640, 320, 100)] == [1, 2, 2, 4, 8]
    assert jpeg_reduction(tmp_path / "x.png", (1000, 1300), 100) == 1  # only JPEG decodes in the DCT
    assert load_image(big, 4).shape == (250, 325, 3)
    png = tmp_path / "big.png"
    assert cv2.imwrite(str(png), np.full((100, 130, 3), 90, np.uint8))
    assert load_image(png, 4).shape == (100, 130, 3)  # other formats ignore it


def test_training_decodes_big_jpegs_reduced_to_the_same_size(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "big", n_train=2, n_val=1, seed=2, sides=(700, 760))
    train = LoadImagesAndLabels(root / "images" / "train", 160, 2, augment=True)  # 700+ px at 160: decoded at 1/4
    plain = LoadImagesAndLabels(root / "images" / "train", 160, 2, augment=False)
    for i in range(2):
        img, hw0, hw = train.load_image(i)
        assert hw0 == plain.load_image(i)[1] and abs(hw[0] - plain.load_image(i)[2][0]) <= 1 and max(hw) == 160


def test_items_and_batches_are_channels_last(photo_dir: Path) -> None:
    ds = LoadImagesAndLabels(photo_dir, 96, 4, augment=True)
    items = [ds[i] for i in range(4)]
    assert items[0][0].shape == (3, 96, 96) and items[0][0].dtype == torch.uint8
    imgs, targets, _, _ = LoadImagesAndLabels.collate_fn(items)
    assert imgs.shape == (4, 3, 96, 96) and imgs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(imgs, torch.stack([it[0] for it in items]))
    assert targets[:, 0].tolist() == [i for i, it in enumerate(items) for _ in range(len(it[1]))]
    plain = [torch.arange(24, dtype=torch.uint8).view(3, 2, 4), torch.zeros(3, 2, 4, dtype=torch.uint8)]
    assert torch.equal(stack_channels_last(plain), torch.stack(plain))  # contiguous CHW items too


class _Flag(Dataset):
    """Returns its flag: shows which copy of the dataset a worker holds."""

    def __init__(self) -> None:
        self.flag = 1

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return self.flag


def test_restarted_loader_sees_dataset_changes() -> None:
    ds = _Flag()
    loader = DataLoader(ds, batch_size=2, num_workers=1, persistent_workers=True)
    assert next(iter(loader)).tolist() == [1, 1]
    ds.flag = 0  # what close_mosaic does
    assert next(iter(loader)).tolist() == [1, 1]  # the persistent worker still holds the old copy
    fresh = restarted(loader)
    assert next(iter(fresh)).tolist() == [0, 0] and fresh.batch_sampler is loader.batch_sampler
