"""benchmarks.py: interleaved round-robin timing, its statistics and ratios, headers, docs regeneration and --formats."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
import torch
from test_export import make_checkpoint

import benchmarks
from tests.conftest import tiny_shapes_yaml
from utils.export.formats import ExportError
from utils.timing import LatencyStats, interleaved_times, summarize, system_info

FAST = ["--rounds", "1", "--block", "1", "--warmup", "0"]


def test_interleaved_times_runs_warmup_then_block_per_model_round_robin() -> None:
    log: list[str] = []
    ticks = itertools.count()

    def clock() -> float:
        log.append("t")
        return next(ticks) / 1e3  # every clock read advances one ms

    runners = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    times = interleaved_times(runners, rounds=2, block=3, warmup=2, clock=clock)
    one_model = lambda n: [n, n] + ["t", n, "t"] * 3  # noqa: E731  2 warm-up calls, then 3 timed ones
    assert log == [x for _ in range(2) for n in ("a", "b", "c") for x in one_model(n)]
    assert {k: [len(b) for b in v] for k, v in times.items()} == {"a": [3, 3], "b": [3, 3], "c": [3, 3]}
    assert all(ms == pytest.approx(1.0) for v in times.values() for b in v for ms in b)


def test_summarize_takes_medians_over_rounds_and_per_round_ratios() -> None:
    base = [[10.0, 11.0, 30.0], [20.0, 21.0, 22.0], [40.0, 41.0, 42.0]]  # round medians 11, 21, 41: the machine got slower
    times = {"base": base, "twice": [[2 * x for x in b] for b in base], "odd": [[5.0], [21.0], [82.0]]}
    stats = summarize(times, "base")
    assert stats["base"] == LatencyStats(21.0, 16.0, 31.0, 11.0, 41.0, 1.0, 1.0, 1.0, 3, 9)
    assert stats["twice"].median == 42.0 and stats["twice"].ratio == pytest.approx(2.0)
    assert (stats["twice"].ratio_lo, stats["twice"].ratio_hi) == pytest.approx((2.0, 2.0))  # the drift cancels in every round
    assert stats["odd"].ratio == pytest.approx(1.0) and stats["odd"].ratio_lo == pytest.approx(5 / 11)
    assert stats["odd"].ratio_hi == pytest.approx(2.0) and stats["odd"].runs == 3
    one = summarize({"x": [[3.0, 1.0, 2.0]]}, "x")["x"]
    assert (one.median, one.q1, one.q3, one.rounds) == (2.0, 2.0, 2.0, 1)
    with pytest.raises(ValueError, match="baseline"):
        summarize(times, "missing")


def test_header_names_machine_threads_and_versions() -> None:
    info = system_info(3)
    assert info["threads"] == 3 and info["cpu"] and info["cores"]
    assert {"date", "torch", "onnxruntime", "openvino", "gpu", "load_1min"} <= set(info)
    opt = benchmarks.parse_opt(["--cfg", "models/yolov5n.yaml", "--rounds", "4", "--block", "6", "--warmup", "2"])
    text = "\n".join(benchmarks.header_lines(info, opt, "Latency"))
    for needle in ("Date:", "CPU:", "threads: 3", "torch ", "onnxruntime ", "openvino ", "4 round(s)", "2 warm-up + 6 timed"):
        assert needle in text
    seq = benchmarks.parse_opt(["--cfg", "models/yolov5n.yaml", "--rounds", "4", "--block", "6", "--sequential"])
    assert benchmarks.rounds_plan(seq) == (1, 24) and benchmarks.rounds_plan(opt) == (4, 6)


def test_config_run_is_interleaved_and_regenerates_the_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, str]] = []
    real = benchmarks.interleaved_times

    def spy(runners, *args, **kwargs):  # type: ignore[no-untyped-def]
        order.extend(runners)
        return real(runners, *args, **kwargs)

    monkeypatch.setattr(benchmarks, "interleaved_times", spy)
    argv = ["--cfg", "models/yolov5n.yaml", "models/yolov8n.yaml", "--img", "32", *FAST, "--threads", "1", "--baseline", "yolov8n",
            "--out", str(tmp_path / "b"), "--write-docs", str(tmp_path / "docs.md")]  # fmt: skip
    threads = torch.get_num_threads()
    rows = benchmarks.main(argv)
    assert torch.get_num_threads() == threads  # --threads 1 held for the run only: the caller's count is back
    assert order == [(m, b) for m in ("yolov5n", "yolov8n") for b in ("pytorch", "onnx")]  # one run, every pair
    assert [r["model"] for r in rows] == ["yolov5n", "yolov8n"] and rows[1]["onnx_x"] == 1.0 and rows[0]["gflops"] > 0
    docs = (tmp_path / "docs.md").read_text()
    assert "python benchmarks.py " + " ".join(argv) in docs.splitlines()[5]  # the command sits at the top, in a code block
    assert "## 32x32" in docs and "× yolov8n (range)" in docs and "| yolov5n | 1.87M |" in docs
    assert "threads: 1" in docs and "onnxruntime" in docs
    assert (tmp_path / "b.csv").read_text().startswith("model,imgsz,params,params_fused,gflops,pytorch_ms")


def test_bad_option_combinations_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--cfg", "models/yolov5n.yaml", "--hard-fail", "0.3"],
                 ["--weights", "a.pt", "b.pt", "--formats"],
                 ["--weights", "a.pt", "--formats", "--write-docs"],
                 ["--cfg", "models/yolov5n.yaml", "--rounds", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            benchmarks.parse_opt(argv)
        assert e.value.code == 2
    assert capsys.readouterr().err.count("error:") == 4


def test_export_of_a_missing_package_is_skipped_and_other_errors_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import utils.export.exporter as exporter

    def missing(**kwargs):  # type: ignore[no-untyped-def]
        raise ExportError("OpenVINO export/inference needs the openvino package: pip install openvino")

    monkeypatch.setattr(exporter, "export_model", missing)
    res = benchmarks.export_format(tmp_path / "best.pt", "openvino", (64, 64), tmp_path, "cpu")
    assert res.status == "skipped" and "pip install openvino" in res.note and benchmarks.hard_fail_message([res], 0.5) is None

    def broken(**kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("tracer exploded\nsecond line")

    monkeypatch.setattr(exporter, "export_model", broken)
    res = benchmarks.export_format(tmp_path / "best.pt", "onnx", (64, 64), tmp_path, "cpu")
    assert res.status == "failed" and res.note == "export: tracer exploded"
    assert benchmarks.hard_fail_message([res], 0.0) == "hard-fail: onnx export: tracer exploded"
    assert benchmarks.hard_fail_message([res], None) is None  # without --hard-fail nothing exits


def test_coreml_has_no_runtime_off_macos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmarks.sys, "platform", "linux")
    res = benchmarks.FormatResult("coreml", path=tmp_path)
    benchmarks.open_format(res, (64, 64), benchmarks.torch.device("cpu"), 0)
    assert res.status == "exported" and res.backend is None and "-" in benchmarks.formats_table([res])[2]


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[benchmarks.FormatResult], Path, Path, Path]:
    """One --formats run of a tiny checkpoint (onnx + torchscript, 64 px, one round) with the temp dir redirected."""
    root = tmp_path_factory.mktemp("formats")
    weights = make_checkpoint(root / "w" / "best.pt")
    data = tiny_shapes_yaml(root, n_train=2, n_val=4, seed=5)
    (root / "tmp").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(root / "tmp"))
        results = benchmarks.main(["--weights", str(weights), "--formats", "onnx", "torchscript", "--img", "64", "--data", str(data),
                                   *FAST, "--out", str(root / "out" / "b")])  # fmt: skip
    return results, weights, data, root


def test_formats_times_and_validates_every_format_side_by_side(formats_run: tuple) -> None:
    results, weights, _, root = formats_run
    assert [(r.fmt, r.status) for r in results] == [("pytorch", "ok"), ("onnx", "ok"), ("torchscript", "ok")]
    assert all(r.stats is not None and r.stats.median > 0 and r.map50_95 is not None for r in results)
    assert results[0].stats.ratio == 1.0
    maps = [r.map50_95 for r in results]
    assert max(maps) - min(maps) <= 0.01  # the same model in every format
    assert sorted(p.name for p in weights.parent.iterdir()) == ["best.pt"]  # nothing written next to the weights
    assert not any((root / "tmp").iterdir())  # the exports were deleted
    table = (root / "out" / "b_formats.md").read_text()
    assert "| ONNX | ok |" in table and "× PyTorch (range)" in table and "Command: `python benchmarks.py --weights" in table


def test_formats_hard_fail_exits_with_one_line(formats_run: tuple) -> None:
    results, weights, data, root = formats_run
    assert benchmarks.hard_fail_message(results, 0.0) is None
    with pytest.raises(SystemExit) as e:
        benchmarks.main(["--weights", str(weights), "--formats", "onnx", "--img", "64", "--data", str(data), *FAST,
                         "--out", str(root / "out" / "hf"), "--hard-fail", "1.0"])  # fmt: skip
    message = str(e.value.code)
    assert message.startswith("benchmarks: error: hard-fail: pytorch mAP50-95 ") and "onnx mAP50-95" in message
    assert "\n" not in message
