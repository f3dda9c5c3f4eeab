"""Flag combinations that cannot work under the DDP launcher (torchrun) are refused in one line naming the flags, in
every rank alike and before any rank joins the process group, creates a folder or starts a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import train
from tests.conftest import one_line_exit
from utils.cli import error_boundary
from utils.engine import launch
from utils.engine.options import check_launch_flags, device_ids, train_options
from utils.engine.trainer import DistInfo, TrainError

ROOT = Path(__file__).resolve().parents[1]
CFG = "models/yolov5n.yaml"


def _fail(what: str) -> Any:
    def called(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} was called: the launch was not refused first")

    return called


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Joining a process group, training and starting any process fail the test if reached."""
    monkeypatch.setattr(launch, "Trainer", _fail("Trainer"))
    monkeypatch.setattr(launch, "evolve", _fail("evolve"))
    monkeypatch.setattr(torch.distributed, "init_process_group", _fail("init_process_group"))
    monkeypatch.setattr(subprocess, "Popen", _fail("subprocess.Popen"))


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Pretend this machine has `count` CUDA devices (0: no CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("overrides", "gpus", "needles"),
    [
        (dict(device="0,1"), 0, ("--device 0,1 requested but CUDA is not available",)),
        (dict(device="0,1", sync_bn=True), 0, ("--device 0,1 requested but CUDA is not available",)),
    ],
)
def test_single_process_refusals(overrides: dict, gpus: int, needles: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 nothing_starts: None) -> None:
    """train.run (one process): a device list on a machine without CUDA (--sync-bn alone does nothing here, as in YOLOv5)."""
    _gpus(monkeypatch, gpus)
    with pytest.raises(SystemExit) as e, error_boundary("train"):
        train.run(cfg=CFG, project=str(tmp_path / "runs"), **overrides)
    one_line_exit(e, "train", *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("overrides", "world", "gpus", "needles"),
    [
        (dict(sync_bn=True, device="cpu"), 2, 0, ("--sync-bn needs CUDA", "--device cpu")),
        (dict(sync_bn=True, device=""), 2, 0, ("--sync-bn needs CUDA", "no CUDA device")),
        (dict(batch_size=-1, device="cpu"), 2, 0, ("--batch-size -1 (AutoBatch) is not supported with DDP (2 processes)",)),
        (dict(batch_size=15, device="cpu"), 2, 0, ("--batch-size 15 must be a multiple of the 2 DDP processes",)),
        (dict(device="mps"), 2, 0, ("--device mps is not supported with DDP (2 processes)",)),
        (dict(device="0,1"), 2, 0, ("--device 0,1 requested with DDP (2 processes) but CUDA is not available",)),
        (dict(device="0,3"), 2, 2, ("--device 0,3 requested with DDP (2 processes) but only 2 CUDA device(s) are visible",)),
        (dict(device="0,1"), 4, 2, ("--device 0,1 lists 2 GPU(s) but torchrun starts 4 DDP processes", "--nproc_per_node 2")),
        (dict(device="1,1"), 2, 2, ("--device 1,1 lists 1 GPU(s) but torchrun starts 2 DDP processes",)),
        (dict(device=""), 4, 2, ("this machine has 2 GPU(s) but torchrun starts 4 DDP processes",)),
        (dict(device="gpu"), 2, 2, ("--device gpu: expected 'cpu' or CUDA indices",)),
    ],
)
def test_ddp_refusals(overrides: dict, world: int, gpus: int, needles: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      nothing_starts: None) -> None:
    """train.main as rank 0 of `world` torchrun processes: refused before joining the group; no folder, no process."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "init_distributed", _fail("init_distributed"))  # under DDP: where a rank joins the group
    _gpus(monkeypatch, gpus)
    opt = train_options(cfg=CFG, project=str(tmp_path / "runs"), **overrides)
    with pytest.raises(SystemExit) as e, error_boundary("train"):
        train.main(opt, dist=DistInfo(rank=0, local_rank=0, world_size=world))
    one_line_exit(e, "train", *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("overrides", "world", "local", "gpus"),
    [
        (dict(device="cpu"), 2, None, 0),  # gloo DDP on the CPU
        (dict(device="", sync_bn=True), 2, None, 2),  # SyncBatchNorm on two GPUs
        (dict(device="0,1"), 4, 2, 2),  # two machines of two GPUs each
        (dict(device="", sync_bn=True), 1, None, 1),  # one process: --sync-bn does nothing, as in YOLOv5
        (dict(device="2,3"), 2, None, 4),
    ],
)
def test_workable_launches_pass(overrides: dict, world: int, local: int | None, gpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, gpus)
    check_launch_flags(train_options(cfg=CFG, **overrides), world, local)


def test_local_world_size_comes_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch.local_world_size(DistInfo(rank=3, local_rank=1, world_size=4)) == 2
    assert launch.local_world_size(DistInfo()) == 1  # not under torchrun: the variable is not ours
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert launch.local_world_size(DistInfo(rank=3, local_rank=1, world_size=4)) == 4


@pytest.mark.parametrize(("device", "expected"), [("0,1", [0, 1]), ("cuda:2", [2]), (" 3 , 1 ", [3, 1]), ("", None), ("cpu", None),
                                                  ("cuda", None), ("mps", None), ("0,x", None)])
def test_device_ids(device: str, expected: list[int] | None) -> None:
    assert device_ids(device) == expected


def test_each_rank_takes_its_own_listed_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device 2,3 under torchrun: local rank 1 uses cuda:3 with NCCL (not cuda:1, the rank's number)."""
    _gpus(monkeypatch, 4)
    joined: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: joined.append(d))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: joined.append(backend))
    device = launch.init_distributed(train_options(cfg=CFG, device="2,3"), DistInfo(rank=1, local_rank=1, world_size=2))
    assert device == torch.device("cuda", 3) and joined == [torch.device("cuda", 3), "nccl"]


def test_resumed_options_are_checked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nothing_starts: None) -> None:
    """--resume takes --device and --sync-bn from the checkpoint: those are checked before anything starts too."""
    _gpus(monkeypatch, 0)
    monkeypatch.setattr(launch, "resume_options", lambda opt: opt.replace(sync_bn=True, device="cpu", resume="last.pt"))
    with pytest.raises(TrainError, match=r"^--sync-bn needs CUDA"):
        launch.resolve_options(train_options(cfg=CFG, resume=True, project=str(tmp_path / "runs")),
                               DistInfo(rank=0, local_rank=0, world_size=2))


@pytest.mark.parametrize("device", ["cpu", ""])
def test_sync_bn_in_one_process_is_accepted(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One process: --sync-bn has no effect (no process group to sync over), so it is accepted as YOLOv5 accepts it."""
    _gpus(monkeypatch, 0)
    check_launch_flags(train_options(cfg=CFG, sync_bn=True, device=device), world_size=1)


def _train_subprocess(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), "--cfg", CFG, "--project", str(tmp_path / "runs"), *args]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**clean, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", **env})


def test_rank_process_refuses_sync_bn_on_cpu_in_one_line(tmp_path: Path) -> None:
    """A real rank process (torchrun's environment, no rendezvous address: joining the group would fail differently):
    rc != 0, stderr is the one line, no traceback, no folder."""
    r = _train_subprocess(["--sync-bn", "--device", "cpu"], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                                              "LOCAL_WORLD_SIZE": "2"}, tmp_path)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["train: error: --sync-bn needs CUDA (SyncBatchNorm runs on GPUs only) but --device cpu; "
                     "drop --sync-bn or train on GPUs"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_torchrun_refuses_in_every_rank(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes and --sync-bn: the ranks refuse in the one line before joining the group (torchrun
    stops the other rank when the first exits, so one or two of them print it; torchrun then reports the failure its way)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
           "--cfg", CFG, "--device", "cpu", "--sync-bn", "--project", str(tmp_path / "runs")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("train: error: --sync-bn needs CUDA") >= 1, r.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
