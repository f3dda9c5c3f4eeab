"""--evolve, --image-weights and --quad: mutation and parent selection, an evolution run and its continuation, the
image-weight maths and sampler, the quad collate, and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import train
from tests.conftest import one_line_exit, tiny_shapes_yaml
from utils.cli import error_boundary
from utils.data.datasets import create_dataloader
from utils.data.image_weights import EpochWeightedSampler, class_weights, epoch_class_weights, epoch_image_weights, image_weights
from utils.data.quad import PAD_VALUE, collate_quad
from utils.engine.callbacks import Callbacks
from utils.engine.evolve import (
    ANCHOR_BASED_META,
    ANCHOR_FREE_META,
    HYP_KEYS,
    EvolveTable,
    _remove_own_files,
    evolve_columns,
    mutate,
    read_evolve_csv,
    select_parent,
    write_evolve_csv,
)
from utils.engine.hyp import default_hyp_file, load_hyp
from utils.engine.options import train_options
from utils.engine.trainer import DistInfo, Trainer, TrainError

TINY_CFG = "models/yolov5n.yaml"
V5_LOSSES = ("box_loss", "obj_loss", "cls_loss")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shapes_yaml(tmp_path_factory.mktemp("flags_shapes"), n_train=16, n_val=4, seed=3)


# ---- evolution: mutation and parent selection ----------------------------------------------------------------------


@pytest.mark.parametrize(("meta", "kind"), [(ANCHOR_BASED_META, "anchor_based"), (ANCHOR_FREE_META, "anchor_free")])
def test_meta_tables_cover_every_key_and_the_default_hyps(meta: dict, kind: str) -> None:
    assert set(meta) == set(HYP_KEYS)
    base = load_hyp(default_hyp_file(kind)).as_dict()
    for k, (scale, lo, hi) in meta.items():
        assert scale >= 0 and 0 <= lo <= hi, k
        if scale > 0:
            assert lo <= base[k] <= hi, (k, base[k])  # the first mutation does not jump to a bound


def test_mutation_respects_bounds_and_leaves_frozen_keys() -> None:
    parent = load_hyp(default_hyp_file("anchor_based")).as_dict()
    parent["fl_gamma"] = 7.0  # frozen (scale 0) and outside its bounds: kept exactly as it is
    rng = np.random.default_rng(0)
    changed = set()
    for _ in range(200):
        child = mutate(parent, ANCHOR_BASED_META, rng)
        assert list(child) == list(parent) and child != parent
        for k, (scale, lo, hi) in ANCHOR_BASED_META.items():
            if scale == 0:
                assert child[k] == parent[k], k
            else:
                assert lo <= child[k] <= hi, (k, child[k])
                assert child[k] == float(f"{child[k]:.5g}")
        changed |= {k for k in parent if child[k] != parent[k]}
    assert "lr0" in changed and "dfl" not in changed and "perspective" not in changed
    a = mutate(parent, ANCHOR_BASED_META, np.random.default_rng(42))
    assert a == mutate(parent, ANCHOR_BASED_META, np.random.default_rng(42)) != mutate(parent, ANCHOR_BASED_META, np.random.default_rng(43))


def _table(fitness_map: list[float]) -> EvolveTable:
    """Rows with mAP50-95 set so that fitness follows `fitness_map`; lr0 holds the row number as a marker."""
    base = load_hyp(default_hyp_file("anchor_based")).as_dict()
    rows = []
    for i, m in enumerate(fitness_map):
        results = [0.5, 0.5, 0.0, m / 0.9, 0.1, 0.1, 0.1]
        rows.append([*results, *({**base, "lr0": float(i + 1)}[k] for k in HYP_KEYS)])
    return EvolveTable(V5_LOSSES, np.array(rows))


def test_parent_selection_draws_from_the_five_fittest() -> None:
    table = _table([0.1, 0.9, 0.3, 0.05, 0.7, 0.5, 0.0, 0.6])  # the top five: rows 2, 5, 8, 6, 3 (1-based)
    rng = np.random.default_rng(0)
    drawn = {select_parent(table, rng)["lr0"] for _ in range(300)}
    assert drawn <= {2.0, 5.0, 8.0, 6.0, 3.0} and {2.0, 5.0} <= drawn
    mean = select_parent(table, rng, mode="weighted")["lr0"]
    w = np.array([0.9, 0.7, 0.6, 0.5, 0.3]) - 0.3 + 1e-6
    assert mean == pytest.approx((w * [2, 5, 8, 6, 3]).sum() / w.sum())
    assert select_parent(_table([0.2]), rng)["lr0"] == 1.0
    with pytest.raises(ValueError, match="single"):
        select_parent(table, rng, mode="best")


# ---- evolution: a run, its continuation, and what it refuses -------------------------------------------------------


def test_evolve_writes_csv_and_best_hyp_then_continues(tiny_data: Path, tmp_path: Path) -> None:
    kw = dict(cfg=TINY_CFG, data=str(tiny_data), epochs=1, imgsz=64, batch_size=8, workers=0, noautoanchor=True, device="cpu",
              project=str(tmp_path / "runs" / "train"))
    best = train.run(evolve=2, **kw)
    folder = tmp_path / "runs" / "evolve" / "exp"
    assert best == folder / "hyp_evolve.yaml" and not (tmp_path / "runs" / "train").exists()
    lines = (folder / "evolve.csv").read_text().splitlines()
    assert tuple(c.strip() for c in lines[0].split(",")) == evolve_columns(V5_LOSSES) and len(lines) == 3
    table = read_evolve_csv(folder / "evolve.csv")
    evolved = {k: v for k, v in load_hyp(best).as_dict().items() if k in HYP_KEYS}  # RT-DETR's keys are not evolved
    assert evolved == pytest.approx(table.best_hyp())
    assert table.rows[0, 7:].tolist() == pytest.approx([load_hyp(default_hyp_file("anchor_based")).as_dict()[k] for k in HYP_KEYS])
    assert not list(folder.rglob("*.pt")) and not (folder / "gen000" / "weights").exists()  # generations keep no weights
    assert (folder / "evolve.png").exists()

    best2 = train.run(evolve=3, name="exp", exist_ok=True, **kw)
    lines3 = (folder / "evolve.csv").read_text().splitlines()
    assert best2 == best and len(lines3) == 4 and lines3[:3] == lines  # continued: the two rows kept, one added
    assert sorted(p.name for p in folder.glob("gen*")) == ["gen000", "gen001", "gen002"]


def test_evolve_refuses_a_continuation_for_another_head(tiny_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "evolve" / "exp"
    write_evolve_csv(folder / "evolve.csv", _table([0.2]))
    before = (folder / "evolve.csv").read_text()
    with pytest.raises(TrainError, match="written for losses box_loss, obj_loss, cls_loss"):
        train.run(cfg="models/yolov8n.yaml", data=str(tiny_data), epochs=1, imgsz=64, batch_size=8, workers=0, device="cpu",
                  project=str(tmp_path / "runs" / "train"), evolve=2, exist_ok=True, noplots=True)
    assert (folder / "evolve.csv").read_text() == before and sorted(p.name for p in folder.iterdir()) == ["evolve.csv"]


GOOD_HEADER = ",".join(evolve_columns(V5_LOSSES))
GOOD_ROW = ",".join(["0.1"] * 7 + [str(load_hyp(default_hyp_file("anchor_based")).as_dict()[k]) for k in HYP_KEYS])


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"epoch,loss\n1,2\n", "header starts"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"", "empty"),
        (GOOD_HEADER.replace(",dfl", ",anchors").encode(), "hyperparameter columns"),
        (f"{GOOD_HEADER}\n{GOOD_ROW}\n0.1,0.2\n".encode(), "line 3 has 2 values"),
        (f"{GOOD_HEADER}\n{GOOD_ROW.replace('0.1', 'abc', 1)}\n".encode(), "not a number"),
        (f"{GOOD_HEADER}\n{GOOD_ROW.replace('0.1', 'nan', 1)}\n".encode(), "not finite"),
        (f"{GOOD_HEADER}\n{GOOD_ROW.rsplit(',', 1)[0]},-1\n".encode(), "dfl must not be negative"),
    ],
)
def test_foreign_evolve_csv_is_one_line_and_untouched(content: bytes, needle: str, tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "evolve" / "exp"
    folder.mkdir(parents=True)
    (folder / "evolve.csv").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        train.cli(["--evolve", "2", "--cfg", TINY_CFG, "--img", "64", "--epochs", "1", "--device", "cpu", "--exist-ok",
                   "--project", str(tmp_path / "runs" / "train")])
    one_line_exit(e, "train", str(folder / "evolve.csv"), needle)
    assert (folder / "evolve.csv").read_bytes() == content and [p.name for p in folder.iterdir()] == ["evolve.csv"]


def test_evolve_refuses_outputs_without_their_csv(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "evolve" / "exp"
    folder.mkdir(parents=True)
    (folder / "hyp_evolve.yaml").write_text("mine: 1\n")
    with pytest.raises(SystemExit) as e:
        train.cli(["--evolve", "--cfg", TINY_CFG, "--device", "cpu", "--exist-ok", "--project", str(tmp_path / "runs" / "train")])
    one_line_exit(e, "train", "hyp_evolve.yaml", "choose another --name")
    assert (folder / "hyp_evolve.yaml").read_text() == "mine: 1\n"


def test_generation_clean_up_deletes_only_its_own_files(tmp_path: Path) -> None:
    gen = tmp_path / "gen000"
    (gen / "weights").mkdir(parents=True)
    for name in ("last.pt", "best.pt", "notes.txt"):
        (gen / "weights" / name).write_text(name)
    outside = tmp_path / "last.pt"
    outside.write_text("user")
    _remove_own_files(gen, [gen / "weights" / "last.pt", gen / "weights" / "best.pt", outside])
    assert sorted(p.name for p in (gen / "weights").iterdir()) == ["notes.txt"] and outside.exists()
    (gen / "weights" / "notes.txt").unlink()
    _remove_own_files(gen, [])
    assert not gen.exists()  # empty folders it made go too


# ---- image weights -------------------------------------------------------------------------------------------------


def _labels(*classes: list[int]) -> list[np.ndarray]:
    return [np.array([[c, 0.5, 0.5, 0.1, 0.1] for c in cls], dtype=np.float32).reshape(-1, 5) for cls in classes]


def test_image_weight_maths_by_hand() -> None:
    labels = _labels([0, 0, 1], [0], [2], [])  # class counts 3, 1, 1; the last image is a background
    cw = class_weights(labels, 3)
    assert cw == pytest.approx([1 / 7, 3 / 7, 3 / 7])  # 1/count normalised: (1/3, 1, 1) / (7/3)
    assert class_weights(labels, 4) == pytest.approx([1 / 7, 3 / 7, 3 / 7, 0])  # a class without labels weighs nothing
    maps = np.array([0.5, 0.0, 0.8])
    assert epoch_class_weights(cw, maps, 3) == pytest.approx([1 / 84, 1 / 7, 1 / 175])  # cw * (1 - maps)^2 / nc
    # image: sum over its labels; background: the smallest labelled-image weight
    assert epoch_image_weights(labels, 3, maps) == pytest.approx([2 / 84 + 1 / 7, 1 / 84, 1 / 175, 1 / 175])
    assert epoch_image_weights(labels, 3) == pytest.approx([5 / 21, 1 / 21, 3 / 21, 1 / 21])  # before any validation
    assert image_weights(_labels([], []), np.ones(2)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="expected"):
        epoch_class_weights(cw, np.zeros(2), 3)


def test_sampler_is_reproducible_and_favours_rare_classes() -> None:
    labels = _labels(*([[0]] * 9), [1])  # image 9 holds the only instance of class 1
    weights = epoch_image_weights(labels, 2)
    assert weights[9] == pytest.approx(9 * weights[0])
    a, b = EpochWeightedSampler(10, seed=5), EpochWeightedSampler(10, seed=5)
    for s in (a, b):
        s.set_weights(weights)
        s.set_epoch(3)
    assert list(a) == list(b) and len(list(a)) == len(a) == 10
    a.set_epoch(4)
    assert list(a) != list(b)
    rare = []
    for epoch in range(40):
        a.set_epoch(epoch)
        rare.append(np.count_nonzero(a.indices() == 9))
    assert np.mean(rare) == pytest.approx(5.0, abs=1.0)  # half of all draws (9/18), against 1 in 10 uniformly
    a.set_weights(np.zeros(10))  # nothing left to favour (every class perfect): uniform, not a failure
    assert a.weights.tolist() == [0.1] * 10
    with pytest.raises(ValueError, match="10 finite non-negative"):
        a.set_weights(np.ones(3))


def test_loader_draws_by_the_weights_set_after_it_started(tiny_data: Path) -> None:
    root = tiny_data.parent / "shapes"
    loader, dataset = create_dataloader(str(root / "images" / "train"), 64, 4, 32, workers=2, shuffle=True, image_weights=True, seed=1)
    assert isinstance(loader.sampler, EpochWeightedSampler)
    loader.sampler.set_weights(np.eye(len(dataset))[5])
    paths = [p for _, _, batch_paths, _ in loader for p in batch_paths]
    assert paths == [dataset.im_files[5]] * len(dataset)  # drawn in the main process: worker processes follow the new weights


# ---- quad collate --------------------------------------------------------------------------------------------------


def _batch(n: int, size: int = 8) -> list[tuple]:
    """n images of distinct constant colour (channels-last views, not contiguous), one label each at (0.25, 0.75)."""
    out = []
    for i in range(n):
        img = torch.full((size, size, 3), 10 * (i + 1), dtype=torch.uint8).permute(2, 0, 1)
        assert not img.is_contiguous()
        lb = torch.tensor([[0.0, float(i), 0.25, 0.75, 0.2, 0.4]])
        out.append((img, lb, f"im{i}.jpg", ((size, size), ((1.0, 1.0), (0.0, 0.0)))))
    return out


def test_quad_tiles_four_images_with_labels_in_their_quadrant() -> None:
    batch = _batch(8)
    imgs, targets, paths, shapes = collate_quad(batch, draw=lambda: 0.9)
    assert imgs.shape == (2, 3, 16, 16) and imgs.dtype == torch.uint8 and paths == ("im0.jpg", "im4.jpg") and len(shapes) == 2
    for g in range(2):
        tl, bl, tr, br = (10 * (4 * g + k + 1) for k in range(4))  # YOLOv5's order: down first, then right
        assert (imgs[g, :, :8, :8] == tl).all() and (imgs[g, :, 8:, :8] == bl).all()
        assert (imgs[g, :, :8, 8:] == tr).all() and (imgs[g, :, 8:, 8:] == br).all()
    expected_centres = [[0.125, 0.375], [0.125, 0.875], [0.625, 0.375], [0.625, 0.875]] * 2
    assert targets[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and targets[:, 1].tolist() == list(range(8))
    assert targets[:, 2:4].tolist() == expected_centres and targets[:, 4:].flatten().tolist() == pytest.approx([0.1, 0.2] * 8)
    assert all(lb[0, 0] == 0 for _, lb, _, _ in batch)  # the inputs are left as they were


def test_quad_upsampled_branch_keeps_the_first_images_labels() -> None:
    imgs, targets, paths, _ = collate_quad(_batch(8), draw=lambda: 0.1)
    assert imgs.shape == (2, 3, 16, 16) and (imgs[0] == 10).all() and (imgs[1] == 50).all()
    assert targets.flatten().tolist() == pytest.approx([0.0, 0.0, 0.25, 0.75, 0.2, 0.4, 1.0, 4.0, 0.25, 0.75, 0.2, 0.4])


def test_quad_keeps_a_partial_last_group_padded_grey() -> None:
    imgs, targets, paths, _ = collate_quad(_batch(6), draw=lambda: 0.9)
    assert imgs.shape == (2, 3, 16, 16) and paths == ("im0.jpg", "im4.jpg")
    assert (imgs[1, :, :8, :8] == 50).all() and (imgs[1, :, 8:, :8] == 60).all() and (imgs[1, :, :, 8:] == PAD_VALUE).all()
    assert targets[:, 1].tolist() == [0, 1, 2, 3, 4, 5] and targets[4:, 0].tolist() == [1, 1]
    one, lb, _, _ = collate_quad(_batch(1), draw=lambda: 0.9)
    assert one.shape == (1, 3, 16, 16) and lb[:, 2:4].tolist() == [[0.125, 0.375]]
    np.random.seed(0)
    first = collate_quad(_batch(16))[0]
    np.random.seed(0)
    assert torch.equal(first, collate_quad(_batch(16))[0])  # the default draw follows numpy's (per-worker seeded) state


def test_trainer_with_quad_and_image_weights(tiny_data: Path, tmp_path: Path) -> None:
    shapes: list[tuple] = []
    cb = Callbacks()
    cb.register("on_train_batch_end", lambda imgs, **_: shapes.append(tuple(imgs.shape)))
    opt = train_options(cfg=TINY_CFG, data=str(tiny_data), epochs=1, imgsz=64, batch_size=8, workers=0, noplots=True,
                        noautoanchor=True, save_dir=str(tmp_path / "run"), quad=True, image_weights=True)
    trainer = Trainer(opt, torch.device("cpu"), DistInfo(), cb)
    assert isinstance(trainer.image_sampler, EpochWeightedSampler)
    imgs, targets, _, _ = next(iter(trainer.train_loader))
    imgs = imgs.float() / 255
    trainer.model.train()
    expected = trainer.loss(trainer.model(imgs), targets)[0] * 4  # YOLOv5's quad factor
    seen: list[torch.Tensor] = []
    scale = trainer.scaler.scale
    trainer.scaler.scale = lambda loss: seen.append(loss.detach()) or scale(loss)  # type: ignore[method-assign]
    trainer.warmup_iters = -1  # fit() sets it; this lone step needs no warm-up
    trainer.train_step(imgs, targets, ni=0, epoch=0)
    assert seen[0].item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.scaler.scale = scale  # type: ignore[method-assign]
    trainer.fit()
    assert shapes == [(2, 3, 128, 128)] * 2  # 8 images -> 2 of twice the size
    assert trainer.maps.shape == (trainer.nc,)
    assert trainer.image_sampler.weights.tolist() != [1 / 16] * 16  # set from the labels for the epoch


# ---- options -------------------------------------------------------------------------------------------------------


def test_flag_defaults_and_bare_evolve() -> None:
    opt = train.parse_opt([])
    assert (opt.evolve, opt.image_weights, opt.quad) == (None, False, False)
    assert train.parse_opt(["--evolve"]).evolve == 300 and train.parse_opt(["--evolve", "7"]).evolve == 7


@pytest.mark.parametrize(
    ("overrides", "world_size", "needles"),
    [
        (dict(evolve=3, resume=True), 1, ("--evolve", "--resume")),
        (dict(evolve=0), 1, ("--evolve must be an integer >= 1",)),
        (dict(evolve=3), 2, ("--evolve", "DDP")),
        (dict(image_weights=True), 2, ("--image-weights", "DDP")),
        (dict(image_weights=True, rect=True), 1, ("--image-weights", "--rect")),
    ],
)
def test_refusals_are_one_line(overrides: dict, world_size: int, needles: tuple, tmp_path: Path) -> None:
    opt = train_options(cfg=TINY_CFG, device="cpu", project=str(tmp_path / "runs" / "train"), **overrides)
    with pytest.raises(SystemExit) as e, error_boundary("train"):
        train.main(opt, dist=DistInfo(rank=0, local_rank=0, world_size=world_size))
    one_line_exit(e, "train", *needles)
    assert not (tmp_path / "runs").exists()


def test_cli_evolve_with_resume_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        train.cli(["--evolve", "--resume", "--project", str(tmp_path / "p")])
    one_line_exit(e, "train", "--evolve cannot be combined with --resume")


def test_trainer_refuses_image_weights_under_ddp(tiny_data: Path, tmp_path: Path) -> None:
    opt = train_options(cfg=TINY_CFG, data=str(tiny_data), image_weights=True, save_dir=str(tmp_path / "run"))
    with pytest.raises(TrainError, match="--image-weights is not supported with DDP"):
        Trainer(opt, torch.device("cpu"), DistInfo(rank=0, local_rank=0, world_size=2))
    assert not (tmp_path / "run").exists()
