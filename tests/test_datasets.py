"""Data pipeline: dataset YAMLs, the shapes generator, image/label reading, scanning, caching, loaders and sources."""

from __future__ import annotations

import io
import logging
import urllib.error
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from utils.boxes import scale_boxes, xywh2xyxy
from utils.data import dataset_config
from utils.data.dataset_config import DatasetError, convert_voc, load_dataset_config
from utils.data.datasets import LoadImagesAndLabels, collect_image_files, create_dataloader, rect_batch_shapes, verify_image
from utils.data.images import ImageError, letterbox, load_image
from utils.data.labels import img2label_paths, read_label_file
from utils.data.shapes_dataset import generate_shapes
from utils.data.sources import LoadImages


def write_img(path: Path, w: int = 64, h: int = 48, colour=(40, 90, 160)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), colour, np.uint8)
    cv2.rectangle(img, (w // 4, h // 4), (w // 2, h // 2), (255, 255, 255), -1)
    assert cv2.imwrite(str(path), img)
    return path


def write_label(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_dataset(root: Path, n: int = 6, label: str = "0 0.5 0.5 0.25 0.25\n") -> Path:
    for i in range(n):
        write_img(root / "images" / f"im{i}.jpg", 64 + 16 * (i % 3), 48 + 8 * i)
        write_label(root / "labels" / f"im{i}.txt", label)
    return root / "images"


# ---------- labels ----------

def test_img2label_paths_uses_last_images_folder():
    got = img2label_paths(["/d/images/x/images/a.b.jpg", "/d/imgs/c.png"])
    assert got == ["/d/images/x/labels/a.b.txt", "/d/imgs/c.txt"]


@pytest.mark.parametrize("text,status,n", [
    ("0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n", "ok", 2),
    ("", "background", 0),
    ("\n  \n", "background", 0),
    ("0 0.5 0.5 0.2\n", "corrupt", 0),
    ("0 0.5 nan 0.2 0.2\n", "corrupt", 0),
    ("0 0.5 inf 0.2 0.2\n", "corrupt", 0),
    ("zero 0.5 0.5 0.2 0.2\n", "corrupt", 0),
    ("5 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n", "repaired", 1),
    ("-1 0.5 0.5 0.2 0.2\n0.5 0.5 0.5 0.2 0.2\n", "repaired", 0),
    ("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n", "repaired", 1),
    ("0 0.95 0.5 0.2 0.2\n", "repaired", 1),
    ("0 1.5 0.5 0.2 0.2\n", "repaired", 0),
])
def test_read_label_file_cases(tmp_path, text, status, n):
    lb, msg, st = read_label_file(write_label(tmp_path / "a.txt", text), nc=3)
    assert st == status and lb.shape == (n, 5) and lb.dtype == np.float32
    assert (msg is None) == (status in ("ok", "background"))
    if msg:
        assert "\n" not in msg and str(tmp_path / "a.txt") in msg


def test_read_label_file_clips_and_converts_polygons(tmp_path):
    lb, _, st = read_label_file(write_label(tmp_path / "a.txt", "0 0.95 0.5 0.2 0.2\n"))
    assert st == "repaired"
    np.testing.assert_allclose(lb[0], [0, 0.925, 0.5, 0.15, 0.2], atol=1e-6)
    lb, _, st = read_label_file(write_label(tmp_path / "b.txt", "2 0.1 0.2 0.5 0.2 0.3 0.6\n"))  # triangle polygon
    assert st == "ok"
    np.testing.assert_allclose(lb[0], [2, 0.3, 0.4, 0.4, 0.4], atol=1e-6)
    lb, msg, st = read_label_file(tmp_path / "missing.txt")
    assert (lb.shape, msg, st) == ((0, 5), None, "background")


# ---------- images ----------

def test_load_image_grayscale_rgba_16bit(tmp_path):
    Image.fromarray(np.full((20, 30), 77, np.uint8), "L").save(tmp_path / "g.png")
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10  # red, nearly transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    cv2.imwrite(str(tmp_path / "d.png"), np.full((20, 30), 65535, np.uint16))
    g, a, d = (load_image(tmp_path / f) for f in ("g.png", "a.png", "d.png"))
    assert g.shape == a.shape == d.shape == (20, 30, 3) and g.dtype == a.dtype == d.dtype == np.uint8
    assert (g == 77).all() and (d == 255).all()
    assert a[0, 0].tolist() == [0, 0, 200]  # BGR order, alpha dropped


def test_load_image_applies_exif_rotation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red (RGB)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:20, :, 2].mean() > 200 and out[20:, :, 2].mean() < 50  # left half moved to the top
    assert verify_image(str(tmp_path / "r.jpg"))[0] == (40, 20)


def test_load_image_errors(tmp_path):
    (tmp_path / "x.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="x.jpg"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_letterbox_shapes():
    img = np.zeros((60, 100, 3), np.uint8)
    out, ratio, pad = letterbox(img, 128, auto=False)
    assert out.shape == (128, 128, 3) and ratio == (1.28, 77 / 60) and pad == (0.0, 25.5)
    out, _, pad = letterbox(img, 128, auto=True, stride=32)
    assert out.shape == (96, 128, 3) and pad == (0.0, 9.5)
    out, ratio, _ = letterbox(img, (128, 256), auto=False, scaleup=False)
    assert out.shape == (128, 256, 3) and ratio == (1.0, 1.0)
    assert (out[0, 0] == 114).all()


# ---------- scanning, cache ----------

def test_collect_folder_txt_and_list(tmp_path):
    images = make_dataset(tmp_path / "ds", n=3)
    (images / "notes.md").write_text("x")
    (tmp_path / "ds" / "list.txt").write_text("images/im0.jpg\n./images/im2.jpg\n\n")
    assert len(collect_image_files(images)) == 3
    assert [Path(f).name for f in collect_image_files(tmp_path / "ds" / "list.txt")] == ["im0.jpg", "im2.jpg"]
    assert len(collect_image_files([tmp_path / "ds" / "list.txt", images])) == 3
    with pytest.raises(DatasetError, match="does not exist"):
        collect_image_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        LoadImagesAndLabels(tmp_path / "empty", img_size=64)


def test_bad_data_counted_not_fatal(tmp_path, caplog):
    root = tmp_path / "bad"
    images = make_dataset(root, n=1)  # im0: ok
    good = (images / "im0.jpg").read_bytes()
    (images / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (images / "fake.jpg").write_text("hello")
    write_img(images / "nolabel.jpg")
    cases = {"empty": "", "cols": "0 0.5 0.5\n", "nan": "0 nan 0.5 0.2 0.2\n", "cls": "7 0.5 0.5 0.2 0.2\n",
             "range": "0 1.4 0.5 0.3 0.3\n1 0.5 0.5 0.2 0.2\n", "dup": "1 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n"}
    for name, text in cases.items():
        write_img(images / f"{name}.jpg")
        write_label(root / "labels" / f"{name}.txt", text)
    write_img(images / "tiny.png", 8, 8)
    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        ds = LoadImagesAndLabels(images, img_size=64, nc=3)
    assert ds.stats == {"ok": 1, "background": 2, "repaired": 3, "corrupt": 5, "missing": 1, "images": 6}
    assert len(ds) == 6
    names = {Path(f).stem for f in ds.im_files}
    assert names == {"im0", "nolabel", "empty", "cls", "range", "dup"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for bad in ("trunc.jpg", "fake.jpg", "tiny.png", "cols.txt", "nan.txt", "cls.txt", "range.txt", "dup.txt"):
        assert sum(bad in m for m in warned) == 1, bad
    assert any("6 images, 2 backgrounds (1 without label file), 5 corrupt, 3 repaired" in r.getMessage() for r in caplog.records)
    labels = {Path(f).stem: lb for f, lb in zip(ds.im_files, ds.labels)}
    assert labels["dup"].shape == (1, 5) and labels["cls"].shape == (0, 5) and labels["range"].shape == (1, 5)
    for i in range(len(ds)):
        img, lb, _, _ = ds[i]
        assert img.shape == (3, 64, 64)


def test_cache_reused_and_invalidated(tmp_path, caplog):
    images = make_dataset(tmp_path / "c", n=3)
    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        LoadImagesAndLabels(images, img_size=64)
        cache = tmp_path / "c" / "labels.cache"
        assert cache.is_file()
        caplog.clear()
        LoadImagesAndLabels(images, img_size=64)
        assert any("(cached)" in r.getMessage() for r in caplog.records)
        caplog.clear()
        write_label(tmp_path / "c" / "labels" / "im1.txt", "2 0.5 0.5 0.5 0.5\n1 0.2 0.2 0.1 0.1\n")
        ds = LoadImagesAndLabels(images, img_size=64)
        assert not any("(cached)" in r.getMessage() for r in caplog.records)
        assert ds.labels[1].shape == (2, 5) and ds.labels[1][0, 0] == 2
        cache.write_text("{broken")
        ds = LoadImagesAndLabels(images, img_size=64)
        assert len(ds) == 3 and cache.read_text().startswith("{")


def test_rect_batch_shapes():
    shapes = np.array([[100, 200], [200, 100], [150, 150], [90, 300], [300, 120]], float)
    order, bs = rect_batch_shapes(shapes, batch_size=2, img_size=128, stride=32, pad=0.5)
    ar = shapes[order, 0] / shapes[order, 1]
    assert (np.diff(ar) >= 0).all()
    assert bs.shape == (3, 2) and (bs % 32 == 0).all() and bs.max() <= 128 + 32
    assert bs[0][0] < bs[0][1] and bs[-1][0] > bs[-1][1]


def test_rect_dataset_items_match_batch_shapes(tmp_path):
    images = make_dataset(tmp_path / "r", n=5)
    ds = LoadImagesAndLabels(images, img_size=96, batch_size=2, rect=True, pad=0.0)
    for i in range(len(ds)):
        img, lb, _, shapes = ds[i]
        assert tuple(img.shape[1:]) == tuple(ds.batch_shapes[ds.batch[i]])
        assert img.shape[1] % 32 == 0 and img.shape[2] % 32 == 0
        assert ((lb[:, 2:] >= 0) & (lb[:, 2:] <= 1)).all()


def test_getitem_contract_maps_back_to_original(tmp_path):
    img = np.full((50, 100, 3), 30, np.uint8)
    img[10:30, 20:60] = 250
    (tmp_path / "v" / "images").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "v" / "images" / "a.png"), img)
    write_label(tmp_path / "v" / "labels" / "a.txt", "1 0.4 0.4 0.4 0.4\n")
    ds = LoadImagesAndLabels(tmp_path / "v" / "images", img_size=128)
    im, lb, path, shapes = ds[0]
    assert im.dtype == torch.uint8 and im.shape == (3, 128, 128) and path.endswith("a.png")
    assert shapes[0] == (50, 100) and shapes[1][0] == (1.28, 1.28) and shapes[1][1] == (0.0, 32.0)
    box = xywh2xyxy(lb[:, 2:] * 128)
    back = scale_boxes((128, 128), box.clone(), shapes[0], shapes[1])
    torch.testing.assert_close(back, torch.tensor([[20.0, 10.0, 60.0, 30.0]]), atol=0.5, rtol=0)
    x1, y1, x2, y2 = box[0].round().int().tolist()
    assert im[:, y1 + 2:y2 - 2, x1 + 2:x2 - 2].float().mean() > 240


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_image_cache_modes(tmp_path, cache):
    images = make_dataset(tmp_path / cache, n=3)
    plain = LoadImagesAndLabels(images, img_size=64)
    cached = LoadImagesAndLabels(images, img_size=64, cache=cache, workers=2)
    if cache == "disk":
        assert len(list(cached.disk_cache_dir.glob("*.npy"))) == 3 and not list(images.glob("*.npy"))
    else:
        assert all(im is not None for im in cached.ims)
    for i in range(3):
        assert torch.equal(plain[i][0], cached[i][0])


def test_single_cls(tmp_path):
    images = make_dataset(tmp_path / "s", n=2, label="2 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n")
    ds = LoadImagesAndLabels(images, img_size=64, single_cls=True)
    assert all((lb[:, 0] == 0).all() for lb in ds.labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_iterates_with_batch_indices(tmp_path, workers):
    images = make_dataset(tmp_path / f"w{workers}", n=5, label="0 0.5 0.5 0.25 0.25\n1 0.2 0.2 0.1 0.1\n")
    loader, ds = create_dataloader(images, 64, 2, 32, augment=True, hyp={"mosaic": 0.5, "mixup": 0.3}, workers=workers,
                                   shuffle=True, seed=1)
    assert loader.num_workers == workers
    seen = 0
    for imgs, labels, paths, shapes in loader:
        assert imgs.shape[1:] == (3, 64, 64) and imgs.dtype == torch.uint8
        assert labels.shape[1] == 6 and len(paths) == len(shapes) == imgs.shape[0]
        assert set(labels[:, 0].long().tolist()) <= set(range(imgs.shape[0]))
        assert ((labels[:, 2:] >= 0) & (labels[:, 2:] <= 1)).all()
        seen += imgs.shape[0]
    assert seen == len(ds) == 5


def test_collate_fn_sets_batch_index():
    items = [(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.ones(n, 6), f"p{n}", None) for n in (2, 0, 3)]
    imgs, labels, paths, shapes = LoadImagesAndLabels.collate_fn(items)
    assert imgs.shape == (3, 3, 8, 8) and paths == ("p2", "p0", "p3")
    assert labels[:, 0].tolist() == [0, 0, 2, 2, 2]


# ---------- shapes generator ----------

def test_generate_shapes_deterministic_and_valid(tmp_path):
    a = generate_shapes(tmp_path / "a", n_train=10, n_val=4, seed=3)
    b = generate_shapes(tmp_path / "b", n_train=10, n_val=4, seed=3)
    c = generate_shapes(tmp_path / "c", n_train=10, n_val=4, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 28 and not list(tmp_path.glob(".*tmp*"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    for f in (a / "labels").rglob("*.txt"):
        lb, msg, status = read_label_file(f, nc=3)
        assert status in ("ok", "background") and msg is None
        assert ((lb[:, 1:] >= 0) & (lb[:, 1:] <= 1)).all() and (lb[:, 3:] > 0).all()
        h, w = cv2.imread(str(a / "images" / f.parent.name / f"{f.stem}.jpg")).shape[:2]
        assert 96 <= h <= 192 and 96 <= w <= 192
    assert generate_shapes(a, n_train=10, n_val=4) == a.resolve()  # existing dataset kept


def test_generate_shapes_has_backgrounds_and_all_classes(tmp_path):
    root = generate_shapes(tmp_path / "s", n_train=64, n_val=8, seed=0)
    labels = [read_label_file(f)[0] for f in (root / "labels" / "train").glob("*.txt")]
    assert any(len(lb) == 0 for lb in labels)
    assert set(np.concatenate(labels)[:, 0].astype(int).tolist()) == {0, 1, 2}


# ---------- dataset yaml ----------

def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_names_and_paths(tmp_path):
    images = make_dataset(tmp_path / "d", n=1)
    f = write_yaml(tmp_path / "d.yaml", {"path": str(tmp_path / "d"), "train": "images", "val": ["images"], "names": {0: "a", 1: "b"}})
    cfg = load_dataset_config(f)
    assert cfg["names"] == ["a", "b"] and cfg["nc"] == 2
    assert cfg["train"] == str(images) and cfg["val"] == [str(images)] and cfg["test"] is None
    cfg = load_dataset_config({"path": str(tmp_path / "d"), "train": "images", "val": "images", "names": ["x"], "nc": 1})
    assert cfg["names"] == ["x"]
    nopath = write_yaml(tmp_path / "d" / "n.yaml", {"train": "images", "val": "images", "names": ["x"]})
    assert load_dataset_config(nopath)["path"] == str((tmp_path / "d").resolve())


@pytest.mark.parametrize("cfg,match", [
    ({"train": "images", "val": "images", "names": ["a", "b"], "nc": 3}, "nc=3 does not match"),
    ({"train": "images", "val": "images", "names": {0: "a", 2: "b"}}, "dict keys"),
    ({"train": "images", "names": ["a"]}, "missing required key 'val'"),
    ({"train": "nope", "val": "images", "names": ["a"]}, "no 'download' source"),
])
def test_config_errors(tmp_path, cfg, match):
    make_dataset(tmp_path / "d", n=1)
    f = write_yaml(tmp_path / "bad.yaml", {"path": str(tmp_path / "d"), **cfg})
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset_config(f)
    assert "\n" not in str(e.value) and "bad.yaml" in str(e.value)


def test_config_bare_name_and_missing_file():
    assert load_dataset_config.__module__ == "utils.data.dataset_config"
    with pytest.raises(DatasetError, match="not found"):
        load_dataset_config("no_such_dataset.yaml")
    cfg, where, file = dataset_config._read_yaml("coco128.yaml")
    assert file == dataset_config.ROOT / "data" / "coco128.yaml" and len(cfg["names"]) == 80


def test_config_offline_download_fails_with_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(dataset_config.urllib.request, "urlopen", offline)
    url = "https://example.invalid/ds.zip"
    f = write_yaml(tmp_path / "dl.yaml", {"path": str(tmp_path / "dl"), "train": "images", "val": "images", "names": ["a"],
                                          "download": url})
    with pytest.raises(DatasetError) as e:
        load_dataset_config(f)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "dl.yaml" in msg and "name resolution" in msg and "manually" in msg
    with pytest.raises(DatasetError, match="autodownload"):
        load_dataset_config(f, autodownload=False)


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_config_download_unzips(tmp_path, monkeypatch):
    ok, jpg = cv2.imencode(".jpg", np.full((32, 32, 3), 90, np.uint8))
    payload = _zip_bytes({"dl/images/a.jpg": jpg.tobytes(), "dl/labels/a.txt": b"0 0.5 0.5 0.5 0.5\n"})
    monkeypatch.setattr(dataset_config.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    f = write_yaml(tmp_path / "dl.yaml", {"path": str(tmp_path / "dl"), "train": "images", "val": "images", "names": ["a"],
                                          "download": "https://example.invalid/dl.zip"})
    cfg = load_dataset_config(f)
    assert (Path(cfg["train"]) / "a.jpg").is_file() and not (tmp_path / "dl.zip").exists()
    evil = _zip_bytes({"../../evil.txt": b"x"})
    monkeypatch.setattr(dataset_config.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(evil))
    with pytest.raises(DatasetError, match="unsafe path"):
        dataset_config.download_and_unzip("https://example.invalid/e.zip", tmp_path / "e" / "f")
    assert not (tmp_path / "evil.txt").exists()


def test_config_generator_creates_dataset(tmp_path):
    f = write_yaml(tmp_path / "s.yaml", {"path": str(tmp_path / "shapes"), "train": "images/train", "val": "images/val",
                                         "names": ["circle", "rectangle", "triangle"], "generator": "shapes",
                                         "n_train": 6, "n_val": 3})
    cfg = load_dataset_config(f)
    assert len(list(Path(cfg["train"]).glob("*.jpg"))) == 6 and len(list(Path(cfg["val"]).glob("*.jpg"))) == 3


def test_repo_yamls_parse():
    for name in ("shapes.yaml", "coco128.yaml", "coco.yaml", "VOC.yaml"):
        cfg, _, _ = dataset_config._read_yaml(name)
        n = {"shapes.yaml": 3, "VOC.yaml": 20}.get(name, 80)
        assert len(dataset_config._names_list(cfg["names"], cfg.get("nc"), name)) == n
    assert load_dataset_config(None)["names"] == ["circle", "rectangle", "triangle"]
    for level in ("low", "med", "high"):
        hyp = yaml.safe_load((dataset_config.ROOT / "data" / "hyps" / f"hyp.scratch-{level}.yaml").read_text())
        assert len(hyp) == 28 and hyp["lr0"] == 0.01 and hyp["mosaic"] == 1.0
        assert hyp["mixup"] == (0.0 if level == "low" else 0.1)


def test_convert_voc(tmp_path):
    year = tmp_path / "VOC" / "images" / "VOCdevkit" / "VOC2007"
    write_img(year / "JPEGImages" / "000001.jpg", 100, 50)
    write_label(year / "ImageSets" / "Main" / "test.txt", "000001\n")
    write_label(year / "Annotations" / "000001.xml", """<annotation><size><width>100</width><height>50</height><depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>6</ymin><xmax>51</xmax><ymax>26</ymax></bndbox></object>
<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
<object><name>car</name><bndbox><xmin>61</xmin><ymin>11</ymin><xmax>81</xmax><ymax>41</ymax></bndbox></object>
</annotation>""")
    names = ["car", "cat", "dog"]
    assert convert_voc(tmp_path / "VOC", names) == 1
    lb, _, status = read_label_file(tmp_path / "VOC" / "labels" / "test2007" / "000001.txt", nc=3)
    assert status == "ok"
    np.testing.assert_allclose(lb, [[2, 0.3, 0.3, 0.4, 0.4], [0, 0.7, 0.5, 0.2, 0.6]], atol=1e-6)
    assert (tmp_path / "VOC" / "images" / "test2007" / "000001.jpg").is_file()
    with pytest.raises(DatasetError, match="VOCdevkit"):
        convert_voc(tmp_path / "empty", names)


# ---------- inference sources ----------

def test_load_images_sources(tmp_path, caplog):
    write_img(tmp_path / "src" / "a.jpg", 100, 60)
    write_img(tmp_path / "src" / "b.png", 40, 80)
    (tmp_path / "src" / "c.jpg").write_text("broken")
    (tmp_path / "src" / "readme.md").write_text("skip me")
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        items = list(LoadImages(tmp_path / "src", img_size=64, stride=32))
    assert [Path(p).name for p, *_ in items] == ["a.jpg", "b.png"]
    path, im, im0, desc = items[0]
    assert im.shape == (3, 64, 64) and im0.shape == (60, 100, 3) and "image 1/3" in desc  # 38 rows + 26 auto pad (< 32)
    assert im.flags["C_CONTIGUOUS"] and (im[:, 0, 0] == 114).all()
    assert np.abs(im[:, 45, 2].astype(int) - [160, 90, 40]).max() <= 4  # RGB of the BGR (40, 90, 160) background
    assert any("c.jpg" in r.getMessage() for r in caplog.records)
    assert len(list(LoadImages(str(tmp_path / "src" / "*.png"), img_size=64))) == 1
    (tmp_path / "list.txt").write_text("src/a.jpg\n")
    assert len(list(LoadImages(tmp_path / "list.txt", img_size=64))) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoadImages(tmp_path / "nothing.jpg")
    with pytest.raises(DatasetError, match="no images"):
        LoadImages(str(tmp_path / "*.bmp"))


def test_load_images_video(tmp_path):
    path = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    if not writer.isOpened():
        pytest.skip("OpenCV build cannot write MJPG video")
    for i in range(3):
        writer.write(np.full((48, 64, 3), 60 * i, np.uint8))
    writer.release()
    src = LoadImages(path, img_size=64, stride=32)
    frames = list(src)
    assert len(frames) == 3 and src.frames == 3
    assert all(im.shape == (3, 64, 64) and im0.shape == (48, 64, 3) for _, im, im0, _ in frames)
    assert "video 1/1 (3/3)" in frames[-1][3]
