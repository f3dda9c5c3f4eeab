"""The training engine: typed hyperparameters, callbacks, DistInfo, and a Trainer run driven from Python for each head kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_shapes_yaml
from utils.engine.callbacks import EVENTS, Callbacks
from utils.engine.hyp import HYP_DIR, Hyp, HypError, default_hyp_file, load_hyp
from utils.engine.options import train_options
from utils.engine.trainer import DistInfo, Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(HYP_DIR.glob("hyp.*.yaml")), ids=lambda p: p.name)
def test_shipped_hyp_files_load(path: Path) -> None:
    hyp = load_hyp(path)
    assert hyp.as_dict() == {**Hyp.from_dict(yaml.safe_load(path.read_text())).as_dict()}
    assert 0 < hyp.lr0 < 1


def test_anchor_free_hyp_has_yolov8_gains() -> None:
    hyp = load_hyp(default_hyp_file("anchor_free"))
    assert (hyp.box, hyp.cls, hyp.dfl) == (7.5, 0.5, 1.5)
    assert default_hyp_file("anchor_based").name == "hyp.scratch-low.yaml"


def _write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_hyp_rejects_unknown_missing_and_bad_values(tmp_path: Path) -> None:
    base = yaml.safe_load((HYP_DIR / "hyp.scratch-low.yaml").read_text())
    with pytest.raises(HypError, match=r"hyp\.yaml: unknown key\(s\) lr_0"):
        load_hyp(_write(tmp_path, {**base, "lr_0": 0.1}))
    missing = dict(base)
    missing.pop("mosaic")
    with pytest.raises(HypError, match=r"missing key\(s\) mosaic"):
        load_hyp(_write(tmp_path, missing))
    with pytest.raises(HypError, match="lr0 must be a finite number"):
        load_hyp(_write(tmp_path, {**base, "lr0": "fast"}))
    with pytest.raises(HypError, match="must not be negative"):
        load_hyp(_write(tmp_path, {**base, "mixup": -1}))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(HypError, match="mapping"):
        load_hyp(tmp_path / "list.yaml")
    with pytest.raises(HypError, match="not found"):
        load_hyp(tmp_path / "nope.yaml")
    assert load_hyp(base).dfl == 1.5  # YOLOv5 files have no dfl: the anchor-free default applies


def test_bad_hyp_is_one_line_from_the_command_line(tmp_path: Path) -> None:
    hyp = _write(tmp_path, {"lr0": 0.01})
    proc = subprocess.run(
        [sys.executable, "train.py", "--hyp", str(hyp), "--epochs", "1", "--img", "64", "--project", str(tmp_path / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("train: error:") and "missing key(s)" in lines[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made


def test_callbacks_order_and_unknown_event() -> None:
    cb, seen = Callbacks(), []
    cb.register("on_train_start", lambda **kw: seen.append(("a", kw["x"])))
    cb.register("on_train_start", lambda **kw: seen.append(("b", kw["x"])))
    cb.run("on_train_start", x=1)
    assert seen == [("a", 1), ("b", 1)]
    with pytest.raises(ValueError, match="unknown callback event 'on_epoch'; known: on_train_start"):
        cb.register("on_epoch", print)
    assert "on_model_save" in EVENTS


def test_dist_info_is_read_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import train

    assert not hasattr(train, "RANK") and not hasattr(train, "LOCAL_RANK")  # nothing read at import
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert DistInfo.from_env() == DistInfo(1, 1, 2) and not DistInfo.from_env().main
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert DistInfo.from_env() == DistInfo() and DistInfo().main


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shapes_yaml(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=4, seed=3)


@pytest.mark.parametrize(
    ("cfg", "losses"),
    [("models/yolov5n.yaml", ("box_loss", "obj_loss", "cls_loss")), ("models/yolov8n.yaml", ("box_loss", "cls_loss", "dfl_loss"))],
)
def test_trainer_fires_callbacks_and_writes_head_columns(cfg: str, losses: tuple, tiny_data: Path, tmp_path: Path) -> None:
    events: list[str] = []
    cb = Callbacks()
    for event in EVENTS:
        cb.register(event, lambda event=event, **kw: events.append(event))
    opt = train_options(cfg=cfg, data=str(tiny_data), epochs=1, imgsz=64, batch_size=8, workers=0, noplots=True,
                        noautoanchor=True, save_dir=str(tmp_path / "run"))
    trainer = Trainer(opt, torch.device("cpu"), DistInfo(), cb)
    assert trainer.loss.names == losses
    best = trainer.fit()
    assert best.exists() and events[0] == "on_train_start" and events[-1] == "on_train_end"
    assert events.count("on_train_batch_end") == 2 and events.count("on_fit_epoch_end") == 1 and "on_model_save" in events
    header = [c.strip() for c in (tmp_path / "run" / "results.csv").read_text().splitlines()[0].split(",")]
    assert header[1:4] == [f"train/{n}" for n in losses] and header[8:11] == [f"val/{n}" for n in losses]
    saved = yaml.safe_load((tmp_path / "run" / "hyp.yaml").read_text())
    assert ("dfl" in saved) and trainer.hyp_file == default_hyp_file(trainer.model.head_kind)
    recorded = yaml.safe_load((tmp_path / "run" / "opt.yaml").read_text())  # what the run used; the options stay as given
    assert recorded["hyp"] == str(trainer.hyp_file) and recorded["imgsz"] == 64 and opt.hyp == "" and trainer.opt is opt


def test_benchmarks_train_throughput_times_the_trainer_step(tiny_data: Path) -> None:
    import benchmarks

    opt = benchmarks.parse_opt(["--train-throughput", "--cfg", "models/yolov8n.yaml", "--img", "64", "--data", str(tiny_data),
                                "--train-batch", "8", "--train-batches", "2", "--workers", "0", "--device", "cpu"])
    row = benchmarks.train_throughput("models/yolov8n.yaml", opt)
    assert row["model"] == "yolov8n" and row["train_img_s"] > 0 and row["loader_only_img_s"] > 0


def test_trainer_refuses_options_without_a_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.engine.trainer import TrainError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainError, match="save_dir"):
        Trainer(train_options(cfg="models/yolov5n.yaml", epochs=1, imgsz=64), torch.device("cpu"))
    assert not any(tmp_path.iterdir())  # nothing written into the working directory


def test_trainer_model_is_channels_last_and_steps_like_the_plain_layout(tiny_data: Path, tmp_path: Path) -> None:
    """The Trainer trains in channels-last memory; the loss of one step matches the contiguous layout's."""
    opt = train_options(cfg="models/yolov8n.yaml", data=str(tiny_data), epochs=1, imgsz=64, batch_size=8, workers=0, noplots=True,
                        noautoanchor=True, save_dir=str(tmp_path / "run"))
    trainer = Trainer(opt, torch.device("cpu"), DistInfo())
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    imgs, targets, _, _ = next(iter(trainer.train_loader))
    assert imgs.is_contiguous(memory_format=torch.channels_last)
    x = imgs.float() / 255
    trainer.model.train()
    with torch.no_grad():
        a = trainer.loss(trainer.model(x), targets)[1]
        b = trainer.loss(trainer.model.to(memory_format=torch.contiguous_format)(x.contiguous()), targets)[1]
    # same sums in another order: float32 rounding grows with the depth of the network, a few ulps per layer
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_flag_trains(tiny_data: Path, tmp_path: Path) -> None:
    """--compile: the training forward runs through torch.compile (needs a C++ compiler on the CPU; minutes on 2 cores)."""
    opt = train_options(cfg="models/yolov8n.yaml", data=str(tiny_data), epochs=1, imgsz=64, batch_size=8, workers=0, noplots=True,
                        noautoanchor=True, compile=True, save_dir=str(tmp_path / "run"))
    trainer = Trainer(opt, torch.device("cpu"), DistInfo())
    assert trainer.forward is not trainer.model
    assert trainer.fit().exists()
