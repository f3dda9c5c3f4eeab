"""Per-image Results (ultralytics 8's Boxes, Masks, Results) on synthetic images and detections: box formats, slicing,
numpy/cpu copies, tracking ids, mask outlines, drawing, label files, JSON/DataFrame summaries, saving and empty results."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.inference.image_results import Boxes, Masks, Results
from utils.plots import class_color, draw_detections, draw_masks
from utils.predictions import write_labels, write_polygon_labels

H, W = 100, 200
NAMES = ["circle", "square"]
DET = torch.tensor([[10, 20, 60, 80, 0.9, 0], [100, 10, 180, 50, 0.6, 1], [120, 60, 190, 95, 0.3, 0]], dtype=torch.float32)
IDS = [3, 7, 11]
F32 = {"rtol": 1e-6, "atol": 1e-6}  # float32 arithmetic on values below 200


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 120, size=(H, W, 3), dtype=np.uint8)


def _tracked() -> torch.Tensor:
    return torch.cat((DET[:, :4], torch.tensor(IDS, dtype=torch.float32)[:, None], DET[:, 4:]), 1)


def _masks() -> torch.Tensor:
    """One filled rectangle inside each box of DET."""
    masks = torch.zeros((3, H, W), dtype=torch.bool)
    masks[0, 30:70, 20:50] = True
    masks[1, 15:45, 110:170] = True
    masks[2, 70:90, 130:180] = True
    return masks


def _results(tracked: bool = False, masks: bool = False, path: str = "img.jpg") -> Results:
    return Results(_image(), path, NAMES, boxes=_tracked() if tracked else DET.clone(), masks=_masks() if masks else None,
                   speed={"preprocess": 1.0, "inference": 2.0, "postprocess": 3.0})


def test_box_formats_match_hand_computation() -> None:
    b = Boxes(DET.clone(), (H, W))
    assert len(b) == 3 and b.shape == (3, 6) and b.orig_shape == (H, W) and not b.is_track and b.id is None
    torch.testing.assert_close(b.xyxy, DET[:, :4])
    torch.testing.assert_close(b.conf, torch.tensor([0.9, 0.6, 0.3]))
    torch.testing.assert_close(b.cls, torch.tensor([0.0, 1.0, 0.0]))
    xywh = torch.tensor([[35, 50, 50, 60], [140, 30, 80, 40], [155, 77.5, 70, 35]], dtype=torch.float32)
    torch.testing.assert_close(b.xywh, xywh, **F32)
    gain = torch.tensor([W, H, W, H], dtype=torch.float32)
    torch.testing.assert_close(b.xyxyn, DET[:, :4] / gain, **F32)
    torch.testing.assert_close(b.xywhn, xywh / gain, **F32)
    torch.testing.assert_close(b.xyxyn[0], torch.tensor([0.05, 0.2, 0.3, 0.8]), **F32)
    assert torch.equal(b.data, DET)  # properties never write into the data


def test_tracked_boxes_carry_ids() -> None:
    b = Boxes(_tracked(), (H, W))
    assert b.is_track and b.shape == (3, 7)
    assert b.id is not None and b.id.tolist() == IDS
    torch.testing.assert_close(b.xyxy, DET[:, :4])
    torch.testing.assert_close(b.conf, DET[:, 4])
    torch.testing.assert_close(b.cls, DET[:, 5])
    assert b[1].id is not None and b[1].id.tolist() == [7]


def test_boxes_reject_bad_shapes_and_accept_empty() -> None:
    for bad in (torch.zeros(3, 5), torch.zeros(2, 3, 6)):
        with pytest.raises(ValueError, match="Boxes"):
            Boxes(bad, (H, W))
    for empty in (torch.zeros((0, 6)), torch.zeros(0)):
        b = Boxes(empty, (H, W))
        assert len(b) == 0 and b.shape == (0, 6) and b.xywh.shape == (0, 4) and b.xyxyn.shape == (0, 4)


def test_boxes_slicing() -> None:
    b = Boxes(DET.clone(), (H, W))
    one = b[1]
    assert isinstance(one, Boxes) and one.shape == (1, 6) and one.orig_shape == (H, W)
    torch.testing.assert_close(one.xyxy, DET[1:2, :4])
    assert b[1:].shape == (2, 6) and torch.equal(b[1:].data, DET[1:])
    assert torch.equal(b[b.conf > 0.5].data, DET[:2])
    assert torch.equal(b[[2, 0]].data, DET[[2, 0]])
    assert len(b[b.conf > 1.0]) == 0


def test_numpy_copies_and_cpu() -> None:
    b = Boxes(DET.clone(), (H, W))
    n = b.numpy()
    assert isinstance(n.data, np.ndarray) and isinstance(n.xywh, np.ndarray) and isinstance(n.xyxyn, np.ndarray)
    np.testing.assert_allclose(n.xywh, b.xywh.numpy(), **F32)
    np.testing.assert_allclose(n.xywhn, b.xywhn.numpy(), **F32)
    assert n.cls.tolist() == [0, 1, 0] and n.id is None
    n.data[0, 0] = 999  # a copy: the tensor is untouched
    assert b.data[0, 0].item() == 10
    assert n.cpu() is n and isinstance(n[0:2].data, np.ndarray)
    assert isinstance(b.cpu().data, torch.Tensor)
    assert b.to(torch.float64).data.dtype == torch.float64
    assert isinstance(n.to(torch.float32).data, torch.Tensor)


def test_mask_polygons_trace_a_drawn_rectangle() -> None:
    masks = torch.zeros((2, H, W), dtype=torch.bool)
    masks[0, 10:30, 20:50] = True
    m = Masks(masks, (H, W))
    assert len(m) == 2 and m.shape == (2, H, W)
    xy, xyn = m.xy, m.xyn
    assert {tuple(p) for p in xy[0].tolist()} == {(20.0, 10.0), (20.0, 29.0), (49.0, 29.0), (49.0, 10.0)}
    np.testing.assert_allclose(xyn[0], xy[0] / np.array([W, H], dtype=np.float32), **F32)
    assert xy[1].shape == (0, 2)  # empty mask: no outline
    assert m[0].shape == (1, H, W) and isinstance(m.numpy().data, np.ndarray)
    assert {tuple(p) for p in m.numpy().xy[0].tolist()} == {tuple(p) for p in xy[0].tolist()}


def test_results_attributes_and_names() -> None:
    r = _results(masks=True)
    assert r.names == {0: "circle", 1: "square"} and r.orig_shape == (H, W) and r.path == "img.jpg"
    assert len(r) == 3 and isinstance(r.boxes, Boxes) and isinstance(r.masks, Masks)
    assert r.speed == {"preprocess": 1.0, "inference": 2.0, "postprocess": 3.0}
    assert r.verbose() == "2 circles, 1 square, "
    assert "img.jpg" in repr(r) and "3 detections" in repr(r) and "masks" in repr(r)
    with pytest.raises(ValueError, match="3 boxes but 2 masks"):
        Results(_image(), "x.jpg", NAMES, boxes=DET, masks=_masks()[:2])
    unnamed = Results(_image(), "x.jpg", NAMES, boxes=torch.tensor([[1, 1, 5, 5, 0.5, 4.0]]))
    assert unnamed.summary()[0]["name"] == "4" and unnamed.verbose() == "1 4, "


def test_results_slicing_selects_boxes_and_masks_together() -> None:
    r = _results(masks=True)
    assert r.boxes is not None
    sub = r[r.boxes.conf > 0.5]
    assert isinstance(sub, Results) and len(sub) == 2 and sub.masks is not None and len(sub.masks) == 2
    assert torch.equal(sub.masks.data, _masks()[:2]) and sub.orig_img is r.orig_img and sub.names == r.names
    assert len(r[2]) == 1 and r[2].verbose() == "1 circle, "


def test_results_numpy_and_cpu_keep_behaviour() -> None:
    r = _results(tracked=True, masks=True)
    n = r.numpy()
    assert n.boxes is not None and n.masks is not None
    assert isinstance(n.boxes.data, np.ndarray) and isinstance(n.masks.data, np.ndarray)
    assert np.array_equal(n.plot(), r.plot()) and n.summary() == r.summary()
    c = r.cpu()
    assert c.boxes is not None and isinstance(c.boxes.data, torch.Tensor) and c.summary() == r.summary()


def test_plot_draws_in_boxes_and_leaves_input_alone() -> None:
    r = _results()
    img = r.orig_img.copy()
    out = r.plot(line_width=2)
    assert np.array_equal(r.orig_img, img) and out.shape == img.shape and out.dtype == np.uint8
    for x1, y1, x2, y2, _, c in DET.int().tolist():
        assert not np.array_equal(out[y1:y2 + 1, x1:x2 + 1], img[y1:y2 + 1, x1:x2 + 1])
        assert out[(y1 + y2) // 2, x1].tolist() == list(class_color(c))  # left edge in the class colour
    assert np.array_equal(out, draw_detections(img, DET, NAMES, 2))
    assert np.array_equal(r.plot(labels=False), draw_detections(img, DET, NAMES, hide_labels=True))
    assert np.array_equal(r.plot(conf=False), draw_detections(img, DET, NAMES, hide_conf=True))
    assert np.array_equal(r.plot(boxes=False), img)
    other = np.zeros_like(img)
    assert np.array_equal(r.plot(img=other), draw_detections(other, DET, NAMES))


def test_plot_with_masks_blends_them_under_the_boxes() -> None:
    r = _results(masks=True)
    img, masks = r.orig_img, _masks().numpy()
    blended = draw_masks(img, masks, [0, 1, 0])
    assert np.array_equal(r.plot(), draw_detections(blended, DET, NAMES))
    assert np.array_equal(r.plot(boxes=False), blended)
    assert np.array_equal(r.plot(masks=False), draw_detections(img, DET, NAMES))
    assert not np.array_equal(blended[50, 35], img[50, 35])  # inside mask 0


def test_plot_draws_track_ids() -> None:
    r = _results(tracked=True)
    img = r.orig_img
    out = r.plot()
    assert np.array_equal(out, draw_detections(img, DET, NAMES, ids=IDS))
    assert not np.array_equal(out, draw_detections(img, DET, NAMES))  # the 'id:N ' prefix changes the labels
    assert np.array_equal(r.plot(labels=False), draw_detections(img, DET, NAMES, hide_labels=True))


def test_draw_detections_ids_argument() -> None:
    im = np.zeros((H, W, 3), dtype=np.uint8)
    assert np.array_equal(draw_detections(im, DET, NAMES, ids=None), draw_detections(im, DET, NAMES))
    with pytest.raises(ValueError, match="2 track ids for 3 detections"):
        draw_detections(im, DET, NAMES, ids=[1, 2])
    assert np.array_equal(draw_detections(im, DET[:0], NAMES, ids=[]), im)


def test_save_txt_matches_detect_label_writer(tmp_path: Path) -> None:
    for save_conf in (False, True):
        ours, ref = tmp_path / f"ours{save_conf}.txt", tmp_path / f"ref{save_conf}.txt"
        assert _results(tracked=True).save_txt(ours, save_conf=save_conf) == str(ours)
        write_labels(DET, (H, W), ref, save_conf)
        assert ours.read_text() == ref.read_text() and len(ours.read_text().splitlines()) == 3
    seg, ref = tmp_path / "seg.txt", tmp_path / "seg_ref.txt"
    _results(masks=True).save_txt(seg, save_conf=True)
    write_polygon_labels(DET, _masks().numpy(), ref, True)
    assert seg.read_text() == ref.read_text() and len(seg.read_text().splitlines()) == 3


def test_to_json_round_trips(tmp_path: Path) -> None:
    rows = json.loads(_results(tracked=True, masks=True).to_json())
    assert len(rows) == 3
    assert list(rows[0]) == ["name", "class", "confidence", "box", "track_id", "segments"]
    assert rows[0]["name"] == "circle" and rows[0]["class"] == 0 and rows[1]["name"] == "square"
    assert rows[0]["box"] == {"x1": 10.0, "y1": 20.0, "x2": 60.0, "y2": 80.0}
    assert [row["confidence"] for row in rows] == [0.9, 0.6, 0.3]  # float32 values rounded to 5 decimals
    assert [row["track_id"] for row in rows] == IDS
    assert set(zip(rows[0]["segments"]["x"], rows[0]["segments"]["y"])) == {(20, 30), (20, 69), (49, 69), (49, 30)}
    plain = json.loads(_results().to_json())
    assert list(plain[0]) == ["name", "class", "confidence", "box"]


def test_summary_normalized_is_in_unit_range() -> None:
    rows = _results(masks=True).summary(normalize=True, decimals=4)
    assert rows[0]["box"] == {"x1": 0.05, "y1": 0.2, "x2": 0.3, "y2": 0.8}
    for row in rows:
        values = [*row["box"].values(), *row["segments"]["x"], *row["segments"]["y"]]
        assert values and all(0.0 <= v <= 1.0 for v in values)
        assert all(v == round(v, 4) for v in values)


def test_to_df_and_to_csv() -> None:
    df = _results(tracked=True).to_df()
    assert list(df.columns) == ["name", "class", "confidence", "box", "track_id"] and len(df) == 3
    assert df["name"].tolist() == ["circle", "square", "circle"] and df["track_id"].tolist() == IDS
    empty = Results(_image(), "e.jpg", NAMES, boxes=torch.zeros((0, 6))).to_df()
    assert list(empty.columns) == ["name", "class", "confidence", "box"] and len(empty) == 0
    lines = _results().to_csv().splitlines()
    assert lines[0] == "name,class,confidence,box" and len(lines) == 4


def test_save_writes_the_plot_and_refuses_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "pic.png"
    r = Results(_image(), str(src), NAMES, boxes=DET)
    assert cv2.imwrite(str(src), r.orig_img)
    before = src.read_bytes()
    os.link(src, tmp_path / "hard.png")
    for same in (src, tmp_path / "sub" / ".." / "pic.png", tmp_path / "hard.png"):
        with pytest.raises(ValueError, match="refusing to overwrite"):
            r.save(same)
    assert src.read_bytes() == before
    monkeypatch.chdir(tmp_path)
    out = r.save()
    assert out == "results_pic.png"
    assert np.array_equal(cv2.imread(str(tmp_path / out)), r.plot())  # png: lossless
    nested = r.save(tmp_path / "a" / "b.png", labels=False)
    assert np.array_equal(cv2.imread(nested), r.plot(labels=False))


def test_save_crop_writes_one_crop_per_box(tmp_path: Path) -> None:
    paths = _results().save_crop(tmp_path / "crops", "pic.jpg")
    assert sorted(p.relative_to(tmp_path / "crops").as_posix() for p in paths) == [
        "circle/pic_0.jpg", "circle/pic_2.jpg", "square/pic_1.jpg"]
    crop = cv2.imread(str(tmp_path / "crops" / "circle" / "pic_0.jpg"))
    assert crop.shape == (60, 50, 3)


def test_empty_results(tmp_path: Path) -> None:
    img = _image()
    for r in (Results(img, "e.jpg", NAMES, boxes=torch.zeros((0, 6))), Results(img, "e.jpg", NAMES)):
        assert len(r) == 0 and r.verbose() == "(no detections), " and r.summary() == [] and json.loads(r.to_json()) == []
        assert np.array_equal(r.plot(), img)
        assert r.save_txt(tmp_path / "e.txt") == str(tmp_path / "e.txt") and not (tmp_path / "e.txt").exists()
        assert r.save_crop(tmp_path / "crops") == [] and "0 detections" in repr(r)
    masked = Results(img, "e.jpg", NAMES, boxes=torch.zeros((0, 6)), masks=torch.zeros((0, H, W), dtype=torch.bool))
    assert len(masked) == 0 and np.array_equal(masked.plot(), img) and masked.summary() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the no-display check is Linux's DISPLAY variable")
def test_show_without_display_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        _results().show()
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no display" in warnings[0].getMessage()
