"""YOLOv5's `python models/yolo.py --cfg ...` (layer table, summary, one forward pass) and `python -m models.info`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.info import describe_shapes, main, resolve_device

ROOT = Path(__file__).resolve().parents[1]
YOLO = ROOT / "models" / "yolo.py"
TABLE_HEADER = "from  n    params  module"
SUMMARY = "yolov5n summary: 270 layers, 1,872,157 parameters"
# yolov5n at 64 px: 3 anchors x (8x8 + 4x4 + 2x2) cells = 252 decoded rows of 5 + 80 values, then the 3 raw maps
OUTPUT = "input (1, 3, 64, 64) -> output ((1, 252, 85), [(1, 3, 8, 8, 85), (1, 3, 4, 4, 85), (1, 3, 2, 2, 85)])"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run python with args in cwd, without an inherited PYTHONPATH (the script must find the repo by itself)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_yolo_script_prints_table_summary_and_output_shapes(where: str, tmp_path: Path) -> None:
    if where == "repo_root":
        proc = _run(["models/yolo.py", "--cfg", "models/yolov5n.yaml", "--imgsz", "64"], ROOT)
    else:
        proc = _run([str(YOLO), "--cfg", str(ROOT / "models" / "yolov5n.yaml"), "--imgsz", "64"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert TABLE_HEADER in out and SUMMARY in out and OUTPUT in out
    assert " 24      [17, 20, 23]  1   115,005  Detect" in out  # the table's last row: the head
    assert "Traceback" not in out


def test_yolo_script_bad_cfg_is_one_error_line(tmp_path: Path) -> None:
    proc = _run([str(YOLO), "--cfg", "nope.yaml"], tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.yaml" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_models_info_module_still_works() -> None:
    proc = _run(["-m", "models.info", "--cfg", "models/yolov5n.yaml", "--imgsz", "64", "--batch-size", "2", "--device", "cpu"], ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert SUMMARY in out and TABLE_HEADER not in out  # the layer table only with --verbose (or via models/yolo.py)
    assert "forward pass on cpu: input (2, 3, 64, 64) -> output ((2, 252, 85)," in out


def test_info_rounds_imgsz_up_to_the_stride(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="mobile_yolo"):
        assert main(["--cfg", "yolov5n.yaml", "--imgsz", "40", "--device", "cpu"]) == 0
    assert "using 64" in caplog.text and "input (1, 3, 64, 64)" in caplog.text


@pytest.mark.parametrize("argv", [["--device", "nonsense"], ["--device", "cuda:99"], ["--batch-size", "0"], ["--cfg", "nope.yaml"]])
def test_info_bad_arguments_are_one_error_line(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--cfg", "yolov5n.yaml", "--imgsz", "64", *argv])
    msg = str(exc.value)
    assert msg.startswith("error: ") and "\n" not in msg


def test_resolve_device_and_describe_shapes() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("0") == resolve_device("cuda:0") == torch.device("cuda:0")
    assert describe_shapes((torch.zeros(1, 2), [torch.zeros(3), None])) == "((1, 2), [(3,), NoneType])"
