"""DDP on CPU: two gloo processes train one tiny epoch and end with identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from utils.data.shapes_dataset import generate_shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cfg", ["models/yolov5n.yaml", "models/yolov8n.yaml"])  # one per head kind
def test_two_process_gloo_training_keeps_ranks_identical(cfg: str, tmp_path: Path) -> None:
    generate_shapes(tmp_path / "ds", n_train=16, n_val=4, seed=2)
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "ds"), "train": "images/train", "val": "images/val",
                                    "names": ["circle", "rectangle", "triangle"]}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/ddp_worker.py"), str(data), str(tmp_path), cfg]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 100
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert (tmp_path / "ddp/weights/last.pt").exists() and not list(tmp_path.glob("ddp*/weights/*rank1*"))
