"""Classification data: the shapes-cls generator, resolving --data, hostile folders and yamls, transforms and loaders."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from utils.data import classify_dataset, shapes_classify
from utils.data.classify_augment import IMAGENET_MEAN, IMAGENET_STD, centre_crop, classify_hyp, colour_jitter, crop_box, train_transform
from utils.data.classify_dataset import ClassifyDataset, create_classify_dataloader, load_classify_data
from utils.data.dataset_config import GENERATORS, DatasetError, load_dataset_config
from utils.data.shapes_classify import CLS_SIDES, generate_shapes_classify
from utils.data.shapes_dataset import SHAPE_NAMES

REPO = Path(__file__).resolve().parents[1]


def write_img(path: Path, colour: tuple[int, int, int] = (40, 90, 160), w: int = 48, h: int = 40) -> Path:
    """A solid BGR image with a white square (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), colour, np.uint8)
    cv2.rectangle(img, (w // 4, h // 4), (w // 2, h // 2), (255, 255, 255), -1)
    assert cv2.imwrite(str(path), img)
    return path


def make_folder(root: Path, classes: dict[str, int], splits: tuple[str, ...] = ("train", "val")) -> Path:
    """An ImageFolder dataset: `classes` maps class name -> image count per split."""
    for split in splits:
        for i, (name, n) in enumerate(classes.items()):
            for j in range(n):
                write_img(root / split / name / f"{j}.jpg", (40 * i, 90, 160 - 30 * i))
    return root


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def files_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_cls(tmp_path_factory) -> Path:
    """A small generated shapes-cls dataset shared by the loader tests."""
    return generate_shapes_classify(tmp_path_factory.mktemp("cls") / "shapes-cls", n_train=4, n_val=2, seed=1)


# ---------- generator ----------

def test_generator_deterministic_with_imagefolder_layout(tmp_path):
    a = generate_shapes_classify(tmp_path / "a", n_train=3, n_val=1, seed=5)
    b = generate_shapes_classify(tmp_path / "b", n_train=3, n_val=1, seed=5)
    c = generate_shapes_classify(tmp_path / "c", n_train=3, n_val=1, seed=6)
    fa = files_bytes(a)
    assert fa == files_bytes(b) and fa != files_bytes(c)
    for split, n in (("train", 3), ("val", 1)):
        assert sorted(p.name for p in (a / split).iterdir()) == sorted(SHAPE_NAMES)
        for name in SHAPE_NAMES:
            jpgs = sorted((a / split / name).glob("*.jpg"))
            assert len(jpgs) == n
            h, w = cv2.imread(str(jpgs[0])).shape[:2]
            assert h == w and CLS_SIDES[0] <= h <= CLS_SIDES[1]
    assert generate_shapes_classify(a, n_train=9, n_val=9) == a.resolve() and files_bytes(a) == fa  # kept as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_generator_interrupted_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []

    def failing(rng, cls, side):
        calls.append(cls)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return np.zeros((side, side, 3), np.uint8)

    monkeypatch.setattr(shapes_classify, "draw_classify_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_classify(tmp_path / "ds", n_train=3, n_val=1)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="half"):
        generate_shapes_classify(tmp_path / "half", n_train=1, n_val=1)


@pytest.mark.parametrize("names", [["a", "b", "c", "d"], [], ["../x"], ["a", "a"]])
def test_generator_rejects_unusable_names(tmp_path, names):
    with pytest.raises(ValueError):
        generate_shapes_classify(tmp_path / "ds", n_train=1, n_val=1, names=names)
    assert not (tmp_path / "ds").exists()


# ---------- resolving --data ----------

def test_load_folder_and_test_split_fallback(tmp_path):
    root = make_folder(tmp_path / "ds", {"zebra": 2, "apple": 1})
    out = load_classify_data(root)
    assert out == {"path": root.resolve(), "train": root.resolve() / "train", "val": root.resolve() / "val", "test": None,
                   "names": ["apple", "zebra"], "nc": 2}
    (root / "val").rename(root / "test")
    out = load_classify_data(str(root))
    assert out["val"] == out["test"] == root.resolve() / "test"


def test_load_yaml_names_path_and_generator(tmp_path):
    make_folder(tmp_path / "ds", {"b": 1, "a": 1})
    f = write_yaml(tmp_path / "ds" / "cls.yaml", {"train": "train", "val": "val"})  # no path: the yaml's folder
    assert load_classify_data(f)["names"] == ["a", "b"]
    f = write_yaml(tmp_path / "named.yaml", {"path": str(tmp_path / "ds"), "train": "train", "val": "val", "names": {0: "a", 1: "b"}})
    out = load_classify_data(f)
    assert out["names"] == ["a", "b"] and out["nc"] == 2 and out["train"] == (tmp_path / "ds" / "train").resolve()
    cfg = {"path": str(tmp_path / "gen"), "train": "train", "val": "val", "generator": "shapes-cls", "n_train": 2, "n_val": 1}
    out = load_classify_data(write_yaml(tmp_path / "gen.yaml", cfg))  # generated on first use, names from its folders
    assert out["names"] == sorted(SHAPE_NAMES) and len(list((tmp_path / "gen" / "train").rglob("*.jpg"))) == 6
    assert "shapes-cls" in GENERATORS
    det_style = load_dataset_config({**cfg, "path": str(tmp_path / "gen2"), "names": list(SHAPE_NAMES)})
    assert files_bytes(Path(det_style["path"])) == files_bytes(tmp_path / "gen")  # same generator through load_dataset_config


def test_load_none_uses_embedded_yaml_under_root(tmp_path, monkeypatch):
    text = (REPO / "data" / "shapes-cls.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["path"] == "datasets/shapes-cls" and cfg["generator"] == "shapes-cls" and cfg["names"] == dict(enumerate(SHAPE_NAMES))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shapes-cls.yaml").write_text(text + "n_train: 2\nn_val: 1\n")
    monkeypatch.setattr(classify_dataset, "ROOT", tmp_path)  # never generate into the repository's datasets/
    out = load_classify_data(None)
    assert out["path"] == tmp_path / "datasets" / "shapes-cls" and out["names"] == list(SHAPE_NAMES)
    assert len(list(out["val"].rglob("*.jpg"))) == 3
    assert load_classify_data("shapes-cls.yaml")["train"] == out["train"]  # a bare yaml name is looked up in data/
    assert load_classify_data("shapes-cls")["train"] == out["train"]  # a bare folder name in datasets/


def _hostile(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Build one broken dataset -> (what to pass as --data, a path the error must name)."""
    ds = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    if case == "missing":
        return tmp_path / "nope", str(tmp_path / "nope")
    if case == "no_train":
        (ds / "train").rename(ds / "training")
        return ds, str(ds)
    if case == "no_val":
        (ds / "val").rename(ds / "valid")
        return ds, str(ds)
    if case == "no_class_folders":
        for f in (ds / "train").rglob("*.jpg"):
            f.rename(ds / "train" / f"{f.parent.name}{f.name}")
        for d in ("a", "b"):
            (ds / "train" / d).rmdir()
        return ds, str(ds / "train")
    if case == "empty_class":
        (ds / "train" / "c").mkdir()
        (ds / "train" / "c" / "notes.txt").write_text("no images here")
        return ds, str(ds / "train" / "c")
    if case == "val_extra_class":
        write_img(ds / "val" / "zz" / "0.jpg")
        return ds, str(ds / "val")
    cfg = {"path": str(ds), "train": "train", "val": "val"}
    if case == "yaml_escape":
        make_folder(tmp_path / "outside", {"a": 1})
        cfg["train"] = "../outside/train"
    elif case == "yaml_names_mismatch":
        cfg["names"] = ["a", "c"]
    elif case == "yaml_missing_val":
        cfg.pop("val")
    elif case == "yaml_list_split":
        cfg["train"] = ["train", "val"]
    elif case == "yaml_not_found":
        return tmp_path / "none.yaml", str(tmp_path / "none.yaml")
    elif case == "yaml_split_missing":
        cfg["val"] = "validation"
    return write_yaml(tmp_path / "bad.yaml", cfg), str(tmp_path / "bad.yaml")


@pytest.mark.parametrize("case", ["missing", "no_train", "no_val", "no_class_folders", "empty_class", "val_extra_class", "yaml_escape",
                                  "yaml_names_mismatch", "yaml_missing_val", "yaml_list_split", "yaml_not_found", "yaml_split_missing"])
def test_hostile_data_one_line_error_naming_the_path(tmp_path, case):
    data, where = _hostile(tmp_path, case)
    with pytest.raises(DatasetError) as e:
        load_classify_data(data)
    msg = str(e.value)
    assert "\n" not in msg and where in msg, msg
    assert not (tmp_path / "datasets").exists()


def test_corrupt_images_skipped_with_one_warning_each(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg at all")
    good = (root / "train" / "b" / "0.jpg").read_bytes()
    (root / "train" / "b" / "cut.jpg").write_bytes(good[: len(good) // 3])  # truncated
    info = load_classify_data(root)
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        loader, ds = create_classify_dataloader(info["train"], info["names"], 32, 8, workers=0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and any("bad.jpg" in m for m in warned) and any("cut.jpg" in m for m in warned)
    assert all("\n" not in m for m in warned)
    assert len(ds) == 4 and sum(len(y) for _, y in loader) == 4
    for f in (root / "val").rglob("*.jpg"):
        f.write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no usable images"):
        ClassifyDataset(root / "val", ["a", "b"], 32)


# ---------- transforms and loaders ----------

def test_batch_layout_and_normalisation_of_grey(tmp_path):
    (tmp_path / "ds" / "train" / "g").mkdir(parents=True)
    for i in range(3):  # lossless constant grey, non-square
        assert cv2.imwrite(str(tmp_path / "ds" / "train" / "g" / f"{i}.png"), np.full((50, 70, 3), 128, np.uint8))
    loader, ds = create_classify_dataloader(tmp_path / "ds" / "train", ["g"], 32, 2, workers=0)
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.tolist() == [0, 0]
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean((0, 2, 3)), expected, atol=1e-5, rtol=0)
    assert (x.amax((0, 2, 3)) - x.amin((0, 2, 3))).abs().max() < 1e-5
    for augment in (False, True):  # normalize=False: plain 0-255 RGB for models that take 0-1 input
        loader, _ = create_classify_dataloader(tmp_path / "ds" / "train", ["g"], 32, 3, augment=augment, workers=0, normalize=False)
        x, _ = next(iter(loader))
        assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last)
    assert (next(iter(create_classify_dataloader(tmp_path / "ds" / "train", ["g"], 32, 3, normalize=False)[0]))[0] == 128).all()


def test_train_augmentation_varies_and_eval_is_deterministic(shapes_cls):
    names = sorted(SHAPE_NAMES)
    ev, _ = create_classify_dataloader(shapes_cls / "val", names, 48, 6, workers=0)
    e1, e2 = next(iter(ev))[0], next(iter(ev))[0]
    assert torch.equal(e1, e2)
    np.random.seed(0)
    tr_ds = ClassifyDataset(shapes_cls / "val", names, 48, augment=True)
    a, b = tr_ds[0][0], tr_ds[0][0]
    assert a.shape == e1[0].shape and not torch.equal(a, b) and not torch.equal(a, e1[0])


def test_loader_reproducible_by_seed_with_workers(shapes_cls):
    names = sorted(SHAPE_NAMES)

    def first(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader, _ = create_classify_dataloader(shapes_cls / "train", names, 32, 4, augment=True, workers=2, shuffle=True, seed=seed)
        assert loader.num_workers == 2 and loader.persistent_workers
        return next(iter(loader))

    (x1, y1), (x2, y2), (x3, _) = first(3), first(3), first(4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)


def test_labels_follow_sorted_class_folders(tmp_path):
    colours = {"zebra": (255, 0, 0), "apple": (0, 0, 255), "mango": (0, 255, 0)}  # BGR: blue, red, green
    for name, c in colours.items():
        for i in range(2):
            write_img(tmp_path / "ds" / "train" / name / f"{i}.png", c)
            write_img(tmp_path / "ds" / "val" / name / f"{i}.png", c)
    info = load_classify_data(tmp_path / "ds")
    assert info["names"] == ["apple", "mango", "zebra"]
    loader, ds = create_classify_dataloader(info["val"], info["names"], 24, 6, workers=0, shuffle=True)
    x, y = next(iter(loader))
    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    dominant = rgb.mean((2, 3)).argmax(1)  # 0 red, 1 green, 2 blue
    assert dominant.tolist() == y.tolist() and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert [Path(f).parent.name for f, c in ds.samples] == [info["names"][c] for _, c in ds.samples]


def test_val_split_with_fewer_classes_keeps_train_indices(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1, "c": 1}, splits=("train",))
    write_img(root / "val" / "c" / "0.jpg")
    info = load_classify_data(root)
    _, ds = create_classify_dataloader(info["val"], info["names"], 16, 2, workers=0)
    assert ds.labels.tolist() == [2]


def test_distributed_sampler_when_rank_given(shapes_cls, tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader, ds = create_classify_dataloader(shapes_cls / "val", sorted(SHAPE_NAMES), 16, 4, workers=0, shuffle=True, rank=0)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler) and sum(len(y) for _, y in loader) == len(ds)
    finally:
        dist.destroy_process_group()


def test_crop_box_and_centre_crop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y, cw, ch = crop_box(60, 90, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert min(x, y) >= 0 and x + cw <= 90 and y + ch <= 60 and min(cw, ch) > 0
        assert 0.08 * 5400 * 0.9 <= cw * ch <= 5400
    assert crop_box(10, 200, (0.99, 1.0), (1.0, 1.0), rng) == (95, 0, 10, 10)  # no draw fits: the centre crop
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 200  # the central square
    out = centre_crop(img, 20)
    assert out.shape == (20, 20, 3) and (out == 200).all()


def test_flip_and_jitter_parameters():
    rng = np.random.default_rng(0)
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :4] = 255  # bright left edge (all channels)
    hyp = classify_hyp({"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "fliplr": 1.0, "hsv_h": 0, "hsv_s": 0, "hsv_v": 0, "mosaic": 1.0})
    out = train_transform(img, 16, hyp, rng, normalize=False)
    assert out.dtype == torch.uint8 and out[:, :, -4:].float().mean() == 255 and out[:, :, :12].max() == 0  # mirrored, no jitter
    f = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32) * 255
    assert np.array_equal(colour_jitter(f.copy(), 0.0, 0.0, 0.0, 0.0, rng), f)
    for i in range(4):  # each of brightness, contrast, saturation and hue alone changes the image
        strengths = [0.0] * 4
        strengths[i] = 0.4 if i < 3 else 0.2
        assert not np.allclose(colour_jitter(f.copy(), *strengths, rng), f, atol=1.0)


def test_classify_hyp_reads_hyp_file_keys():
    detection_style = {"lr0": 0.01, "scale": 0.5, "mosaic": 1.0, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "fliplr": 0.25}
    hyp = classify_hyp(detection_style)
    assert hyp["scale"] == (0.5, 1.0) and hyp["fliplr"] == 0.25 and hyp["hsv_s"] == 0.7 and "lr0" not in hyp
    assert classify_hyp()["scale"] == pytest.approx((0.08, 1.0)) and classify_hyp({"scale": [0.2, 0.6]})["scale"] == (0.2, 0.6)
    for bad in ({"scale": 1.0}, {"scale": (0.0, 1.0)}, {"scale": "big"}, {"ratio": (2.0, 1.0)}, {"fliplr": None}):
        with pytest.raises(ValueError, match="classify hyp"):
            classify_hyp(bad)
