"""scripts/gpu_report.py without a GPU: its one-line refusal when CUDA is missing, and its report on hand-made numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from scripts.gpu_report import TENSORRT_MISSING, not_measured, write_report

ROOT = Path(__file__).resolve().parents[1]


def test_refuses_in_one_line_without_cuda(tmp_path: Path) -> None:
    """No CUDA and no --allow-cpu: exit code 2, one stderr line naming CUDA and --allow-cpu, nothing written."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "scripts/gpu_report.py", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu_report: error: CUDA is not available"), proc.stderr
    assert "--allow-cpu" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def _stats(median: float, ratio: float = 1.0) -> dict[str, Any]:
    """A LatencyStats as asdict() gives it."""
    return {"median": median, "q1": median * 0.9, "q3": median * 1.1, "lo": median * 0.8, "hi": median * 1.2, "ratio": ratio,
            "ratio_lo": ratio, "ratio_hi": ratio, "rounds": 5, "runs": 100}


def _train(cfg: str, precision: str, img_s: float, peak: float) -> dict[str, Any]:
    """One training record as the child process prints it."""
    return {"step": "train", "cfg": cfg, "precision": precision, "command": f"python train.py --cfg {cfg}", "img_s_last": img_s,
            "img_s_all": img_s * 0.9, "peak_mib": peak, "finite": True,
            "amp": "float32" if precision == "float32" else "AMP float16 with loss scaling"}


def _results() -> dict[str, Any]:
    """Hand-made results: one config measured fully, one whose float32 run failed, one whose inference failed."""
    a, b = "models/yolov5s.yaml", "models/yolov5_mobilenetv4-seg.yaml"
    results: dict[str, Any] = {
        "command": "python scripts/gpu_report.py --out x",
        "env": {"card": "NVIDIA H100 80GB HBM3", "torch": "2.5.0", "cuda": "12.4", "onnxruntime": "1.20.0", "dry_run": False},
        "settings": {"imgsz": 640, "epochs": 2, "batch": 32, "big_batch": 32, "rounds": 5, "block": 20, "block_big": 5, "warmup": 5},
        "tasks": {a: "detect", b: "segment"},
        "datasets": {"detect": {"yaml": "d.yaml", "train": 384, "val": 48, "sides": [480, 640], "polygons": False, "seconds": 3.0},
                     "segment": {"error": "OSError: disk full"}},
        "train": [_train(a, "amp", 800.0, 3000.0), _train(a, "float32", 400.0, 6000.0),
                  _train(b, "amp", 500.0, 4000.0), {"step": "train", "cfg": b, "precision": "float32", "error": "RuntimeError: boom"}],
        "infer": [{"step": "infer", "cfg": a, "dtype": "float16", "ort_provider": "CUDAExecutionProvider", "ort_skipped": None,
                   "rows": [{"batch": 1, "pytorch": _stats(2.0), "onnxruntime": _stats(1.5, 0.75)},
                            {"batch": 32, "pytorch": _stats(16.0), "onnxruntime": _stats(32.0, 2.0)}]},
                  {"step": "infer", "cfg": b, "error": "child process timed out after 300s"}],
        "tensorrt": TENSORRT_MISSING,
        "pytest": {"command": "python -m pytest -m gpu -q", "rc": 0, "summary": "3 passed in 4.2s", "log": "p.txt"},
    }
    results["not_measured"] = not_measured(results)
    return results


def test_report_tables_from_hand_made_numbers(tmp_path: Path) -> None:
    """Ratios side by side, one-line failure rows, TensorRT and pytest lines, and the JSON holding the same numbers."""
    results = _results()
    md_path, json_path = write_report(results, tmp_path)
    md = md_path.read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "torch 2.5.0, CUDA 12.4" in md and "onnxruntime 1.20.0" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| yolov5s | detect |"))
    assert "| 800.0 | 400.0 | 2.00x | 3,000 | 6,000 | 0.50x | yes / yes | AMP float16 with loss scaling / float32 |" in row
    seg = next(ln for ln in md.splitlines() if ln.startswith("| yolov5_mobilenetv4-seg | segment |"))
    assert "float32: RuntimeError: boom" in seg and "| 500.0 | - | - |" in seg
    inf = next(ln for ln in md.splitlines() if ln.startswith("| yolov5s | 2.00"))
    assert "| 1.50 (1.35-1.65) | 0.75x | 2,000 | 1,000 |" in inf
    assert "| yolov5_mobilenetv4-seg | failed: child process timed out after 300s |" in md
    assert "| segment | failed: OSError: disk full |" in md
    assert TENSORRT_MISSING in md and "exit code 0, 3 passed in 4.2s" in md
    assert "Dry run" not in md and any("TensorRT export" in n for n in results["not_measured"])
    assert json.loads(json_path.read_text())["train"][0]["img_s_last"] == 800.0
