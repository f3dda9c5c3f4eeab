"""study.py: the comparison study end to end on a tiny dataset (train, validate, export, one interleaved timing run,
report), its rerun (nothing retrained), resume decisions, refusals, the Pareto front and the missing-ultralytics line."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import study
from tests.conftest import one_line_exit, tiny_shapes_yaml
from utils.study import pipeline
from utils.study.peers import NOT_INSTALLED, tag_output_layout
from utils.study.pipeline import StudyError, StudyOptions, read_state, train_config
from utils.study.report import COLUMNS, StudyRow, mark_pareto, pareto_front

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["models/yolov5n.yaml", "models/yolov5n_mobilenetv4_conv_small.yaml"]
FAST = ["--epochs", "1", "--img", "64", "--batch-size", "4", "--workers", "0", "--rounds", "2", "--block", "1", "--warmup", "1",
        "--threads", "1", "--no-int8"]  # fmt: skip


def _run(argv: list[str]) -> tuple[Path, str]:
    """study.main(argv) with ultralytics made unimportable; (study.md, what the study printed)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setitem(sys.modules, "ultralytics", None)  # `import ultralytics` raises ModuleNotFoundError, installed or not
        md = study.main(argv)
    return md, out.getvalue()


@pytest.fixture(scope="module")
def studied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One study of two configs and a broken one (plus a peer, with ultralytics missing), then the same command again."""
    root = tmp_path_factory.mktemp("study")
    data = tiny_shapes_yaml(root, n_train=4, n_val=2, seed=7)
    broken = root / "broken.yaml"
    broken.write_text((ROOT / "models/yolov5n.yaml").read_text().replace("C3,", "NoSuchBlock,", 1))
    argv = ["--cfg", *CONFIGS, str(broken), "--data", str(data), "--project", str(root / "runs"), *FAST, "--peers", "yolo26n",
            "--time-img", "96"]  # trained and validated at 64 px, timed on exports at 96 px
    md, first = _run(argv)
    weights = {Path(c).stem: md.parent / Path(c).stem / "weights" / "best.pt" for c in CONFIGS}
    mtimes = {k: w.stat().st_mtime_ns for k, w in weights.items()}
    md2, second = _run(argv)
    return {"md": md, "md2": md2, "first": first, "second": second, "weights": weights, "mtimes": mtimes, "root": root, "data": data}


def _csv_rows(md: Path) -> list[dict[str, str]]:
    with (md.parent / "study.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_study_writes_one_row_per_config_with_finite_figures(studied: dict[str, Any]) -> None:
    md: Path = studied["md"]
    assert md == studied["root"] / "runs" / "exp" / "study.md"
    rows = _csv_rows(md)
    assert [r["model"] for r in rows] == ["yolov5n", "yolov5n_mobilenetv4_conv_small", "broken"]  # no peer row without ultralytics
    assert list(rows[0]) == list(COLUMNS)
    for r in rows[:2]:
        assert r["status"] == "ok" and r["head"]
        assert int(r["params"]) > 100_000 and float(r["GFLOPs"]) > 0
        assert math.isfinite(float(r["float ms"])) and float(r["float ms"]) > 0
        for key in ("P", "R", "mAP50", "mAP50-95"):
            assert 0.0 <= float(r[key]) <= 1.0, (r["model"], key)
        assert r["INT8 ms"] == "" and r["Pareto"] in ("yes", "no")  # --no-int8
    assert "yes" in {r["Pareto"] for r in rows[:2]}  # two timed models: at least one is on the front
    assert rows[2]["status"].startswith("failed: ") and "NoSuchBlock" in rows[2]["status"] and rows[2]["Pareto"] == ""
    text = md.read_text()
    assert text.startswith("# Comparison study") and "python study.py --cfg models/yolov5n.yaml" in text
    for needle in ("onnxruntime ", "torch ", "CPU: ", "intra-op threads: 1", "| yolov5n_mobilenetv4_conv_small | ", "| broken | "):
        assert needle in text
    assert (md.parent / "study.png").stat().st_size > 1000  # matplotlib is a requirement: the plot is there


def test_study_prints_progress_and_the_one_missing_ultralytics_line(studied: dict[str, Any]) -> None:
    lines = studied["first"].splitlines()
    assert lines.count(NOT_INSTALLED) == 1 and not [ln for ln in lines if "ultralytics" in ln and ln != NOT_INSTALLED]
    for step, n in (("train", 3), ("val", 2), ("export", 4)):  # per model as far as it got (broken: training); --img, --time-img
        assert sum(ln.startswith(f"study: {step:<6} ") for ln in lines) == n, step
    assert any(ln.startswith("study: failed broken:") for ln in lines)
    assert not (studied["md"].parent / "ultralytics-settings").exists()  # nothing of ultralytics' made without it


def test_second_run_skips_training_and_keeps_the_weights(studied: dict[str, Any]) -> None:
    lines = studied["second"].splitlines()
    for name, best in studied["weights"].items():
        assert best.stat().st_mtime_ns == studied["mtimes"][name]
        assert any(ln.startswith(f"study: skip   {name}: ") for ln in lines)
        assert not any(ln.startswith(f"study: train  {name}:") for ln in lines)
    assert studied["md2"] == studied["md"]
    assert [r["model"] for r in _csv_rows(studied["md2"])] == ["yolov5n", "yolov5n_mobilenetv4_conv_small", "broken"]
    state = json.loads((studied["md"].parent / "yolov5n" / "study_row.json").read_text())
    assert state["trained"] and state["recipe"]["epochs"] == 1 and state["row"]["float_onnx"] == "time96/best.onnx"


def test_time_img_times_files_exported_at_that_size(studied: dict[str, Any]) -> None:
    """--time-img: trained and validated at --img (that export is kept), timed on a float export made at the --time-img size."""
    import onnx

    folder = studied["md"].parent / "yolov5n"
    state = json.loads((folder / "study_row.json").read_text())
    assert state["time_size"] == 96 and state["row"]["float_onnx"] == "time96/best.onnx"
    for file, size in (("time96/best.onnx", 96), ("weights/best.onnx", 64)):
        graph_input = onnx.load(folder / file).graph.input[0]
        assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 3, size, size], file
    assert "static 96x96 input" in studied["md"].read_text()


def test_a_study_folder_of_another_recipe_or_owner_is_refused(studied: dict[str, Any], tmp_path: Path) -> None:
    folder = studied["md"].parent / "yolov5n"
    recipe = {"cfg": "models/yolov5n.yaml", **StudyOptions(data=json.loads((folder / "study_row.json").read_text())["recipe"]["data"],
                                                          epochs=1, imgsz=64, batch_size=4).recipe()}  # fmt: skip
    assert read_state(folder, recipe)["trained"]
    with pytest.raises(StudyError, match=r"trained with other settings \(epochs 1, not 5\)"):
        read_state(folder, {**recipe, "epochs": 5})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(StudyError, match="not a study folder"):
        read_state(tmp_path / "mine", recipe)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def _checkpoint(path: Path, epoch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "cfg": {}, "epoch": epoch}, path)


def test_train_config_resumes_an_interrupted_run_and_keeps_a_finished_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fake_train(opt: Any) -> Path:
        calls.append(opt)
        return tmp_path / "m" / "weights" / "best.pt"

    monkeypatch.setattr(pipeline, "train_main", fake_train)
    opt = StudyOptions(cfg=("models/yolov5n.yaml",), epochs=3, project=str(tmp_path))
    assert train_config("models/yolov5n.yaml", tmp_path / "m", opt) == {"best": "weights/best.pt"}
    assert calls[-1].cfg == "models/yolov5n.yaml" and calls[-1].resume is False and calls[-1].hyp == ""  # the head's default hyp
    assert (calls[-1].project, calls[-1].name, calls[-1].exist_ok, calls[-1].epochs) == (str(tmp_path), "m", True, 3)
    last = tmp_path / "m" / "weights" / "last.pt"
    _checkpoint(last, epoch=0)  # one of three epochs done
    train_config("models/yolov5n.yaml", tmp_path / "m", opt)
    assert calls[-1].resume == str(last) and len(calls) == 2
    _checkpoint(last, epoch=2)  # all three done, the study row not yet written
    assert train_config("models/yolov5n.yaml", tmp_path / "m", opt) == {"best": "weights/last.pt"} and len(calls) == 2


def test_pareto_front_of_a_hand_built_example() -> None:
    points = [(10.0, 0.50), (5.0, 0.30), (12.0, 0.45), (5.0, 0.20), (20.0, 0.60), (10.0, 0.50), (25.0, 0.60), (4.0, 0.10)]
    #         on the front   on           dominated by 0  dominated by 1  on        tie with 0: on  slower, same mAP  fastest
    assert pareto_front(points) == [True, True, False, False, True, True, False, True]
    assert pareto_front([]) == [] and pareto_front([(1.0, 0.0)]) == [True]
    rows = [StudyRow("a", float_ms=5.0, map50_95=0.3), StudyRow("b", float_ms=9.0, map50_95=0.2),
            StudyRow("c", status="failed: boom"), StudyRow("d", float_ms=math.nan, map50_95=0.9)]  # fmt: skip
    mark_pareto(rows)
    assert [r.pareto for r in rows] == [True, False, None, None]


def test_missing_ultralytics_is_one_line_and_no_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    before = os.environ.get("YOLO_CONFIG_DIR")
    opt = StudyOptions(cfg=("models/yolov5n.yaml",), peers=("yolov8n", "yolo26n"), project=str(tmp_path))
    assert pipeline.peer_rows(opt, {"nc": 3}) == []
    assert capsys.readouterr().out == NOT_INSTALLED + "\n"
    assert os.environ.get("YOLO_CONFIG_DIR") == before and not any(tmp_path.iterdir())


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        study.main(["--cfg", str(tmp_path / "nope.yaml"), "--project", str(tmp_path)])
    one_line_exit(e, "study", "--cfg", "nope.yaml")
    with pytest.raises(SystemExit) as e:
        study.main(["--cfg", "models/yolov5n.yaml", "--name", "../escape", "--project", str(tmp_path)])
    one_line_exit(e, "study", "--name")
    with pytest.raises(SystemExit) as e:
        study.main(["--cfg", "models/yolov5n.yaml", "models/yolov5n.yaml", "--project", str(tmp_path)])
    one_line_exit(e, "study", "two models named 'yolov5n'")
    with pytest.raises(SystemExit) as e:
        study.main(["--cfg", "models/yolov5n.yaml", "--rounds", "0", "--project", str(tmp_path)])
    one_line_exit(e, "study", "--rounds")
    with pytest.raises(StudyError, match="unknown study option 'epoch'"):
        study.run(cfg="models/yolov5n.yaml", epoch=3)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_study_md_of_the_users_is_never_replaced(tmp_path: Path) -> None:
    data = tiny_shapes_yaml(tmp_path, n_train=1, n_val=1, seed=1)
    folder = tmp_path / "runs" / "exp"
    folder.mkdir(parents=True)
    (folder / "study.md").write_text("my notes\n")
    with pytest.raises(SystemExit) as e:
        study.main(["--cfg", "models/yolov5n.yaml", "--data", str(data), "--project", str(tmp_path / "runs"), *FAST])
    one_line_exit(e, "study", "study.md", "not written by study.py")
    assert (folder / "study.md").read_text() == "my notes\n" and sorted(p.name for p in folder.iterdir()) == ["study.md"]


class _Raw(torch.nn.Module):
    """A stand-in for a foreign detector export: (B, 4+nc, N) boxes and scores, or (B, K, 6) final rows."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean() * torch.zeros(self.shape)


def _foreign_onnx(tmp_path: Path, shape: tuple[int, ...]) -> Path:
    path = tmp_path / f"peer_{'x'.join(map(str, shape))}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(_Raw(shape), (torch.zeros(1, 3, 64, 64),), str(path), opset_version=17, dynamo=False)
    return path


@pytest.mark.parametrize(("shape", "layout"), [((1, 7, 84), "anchor_free"), ((1, 300, 6), "end2end")])
def test_foreign_onnx_layout_is_recorded_for_the_evaluator(tmp_path: Path, shape: tuple[int, ...], layout: str) -> None:
    from utils.runtime.backend import DetectBackend

    path = _foreign_onnx(tmp_path, shape)
    assert DetectBackend(path).head_kind == "anchor_based"  # untagged: read as YOLOv5's layout, which it is not
    assert tag_output_layout(path, nc=3) == layout
    backend = DetectBackend(path)
    assert backend.head_kind == layout and backend.task == "detect" and tuple(backend(torch.zeros(1, 3, 64, 64)).shape) == shape


def test_foreign_onnx_of_an_unknown_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"neither \(B, 4\+3, N\) nor \(B, K, 6\)"):
        tag_output_layout(_foreign_onnx(tmp_path, (1, 5, 9)), nc=3)
