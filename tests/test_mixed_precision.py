"""Mixed precision on the CPU for every registered head: one real training step under float16 and under bfloat16
autocast, the loss it computes, and eval-mode inference in both, each against float32.

The training step is the Trainer's own (`Trainer.train_step` and `_optimizer_step`: its loss from build_loss with the
head's default hyp file, its optimizer, its channels-last layout and its GradScaler), switched to AMP through
utils.engine.amp's policy, the object that makes the same decision on CUDA (float16 with loss scaling). Each head runs
its smallest shipped config (by parameter count), so a new head is covered without editing this file. The half-precision
kernels run in a subprocess (tests/amp_worker.py): a crash in one fails these tests instead of ending the test run.

Tolerances:
- training loss: under autocast every conv and linear layer rounds its inputs and weights to the half type and
  accumulates in float32; with BN-normalised activations the relative error of the outputs grows like a random walk over
  the L conv/linear layers, ~eps * sqrt(L), and a loss (a mean over many outputs, of bounded relative sensitivity to
  them) moves by no more. GROWTH covers the constant: measured at most 0.6 eps * sqrt(L) (yolov5n-seg, bfloat16).
- loss precision: the loss must run in float32 whatever autocast is on (the guards in utils/loss: autocast off and
  float32 predictions), so the step's loss equals the float32 loss of the same predictions up to summation order
  (measured: equal). With one of those guards removed it moves by 10 to 5e6 float32 ulps, LOSS_ULPS = 4 allows 4.
- inference: the detections' error is compared with a yardstick, the error that rounding the weights and the input to
  the half type causes in float32 inference of the same model (tests/amp_worker.py:yardstick_error). It carries what
  an eps-based bound cannot: the model's conditioning (untrained feature maps of large mean and small spread) and its
  decode's gains (YOLOv5's (2 sigmoid)^2 * anchor box sizes). Autocast rounds each layer's input besides its weights, ~2
  independent roundings where the yardstick has ~1: sqrt(2) to 2 times its error; measured 0.6 to 2.7 times (the ratio
  of two rounding errors varies with the draw), hence YARDSTICK_GROWTH = 8; a yardstick below one ulp at 1 (a classifier's
  near-uniform probabilities at initialisation) counts as one. What the test is for, an overflow, a NaN or an error that
  is not a rounding's, lies far beyond.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import models  # noqa: F401  (registers the built-in modules)
from models.heads.base import known_heads
from models.limits import ModelLimits
from models.mobilenetv4 import MultiQueryAttention
from models.model import load_model_config
from models.parse import check_model_size, config_head
from models.registry import get_module, registered
from utils.engine.amp import AmpPolicy, amp_policy

ROOT = Path(__file__).resolve().parents[1]
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
GROWTH = 4.0  # over the ~eps * sqrt(L) growth of the loss's error (measured <= 0.6), see the module docstring
LOSS_ULPS = 4.0  # the same float32 loss of the same values: equal but for summation order
YARDSTICK_GROWTH = 8.0  # over the weight-and-input rounding yardstick of inference (measured <= 2.7), see the docstring
ATTENTION = "attention_backbone"  # the case of a backbone with attention blocks (MobileNetV4-Hybrid's Mobile MQA)
CASES = (*known_heads(), ATTENTION)


@functools.cache
def backbone_has_attention(name: str) -> bool:
    """Whether the registered backbone `name` (built on the meta device) contains an attention module."""
    with torch.device("meta"):
        backbone = get_module(name).cls()
    return any(isinstance(m, (nn.MultiheadAttention, MultiQueryAttention)) for m in backbone.modules())


@functools.cache
def case_configs() -> dict[str, tuple[str, Path]]:
    """Case -> (head kind, config): per head kind the shipped config (models/*.yaml) with the fewest parameters (counted on
    the meta device), and for ATTENTION the smallest whose backbone has attention blocks (the heads' own lack them)."""
    found: dict[str, tuple[int, str, Path]] = {}
    backbones = {spec.name for spec in registered("backbone")}
    for path in sorted((ROOT / "models").glob("*.yaml")):
        cfg = load_model_config(path)
        kind = config_head(cfg).kind
        params, _ = check_model_size(cfg, 3, ModelLimits())
        row0 = str(cfg["backbone"][0][2])
        for case in (kind, ATTENTION) if row0 in backbones and backbone_has_attention(row0) else (kind,):
            if case not in found or params < found[case][0]:
                found[case] = (params, kind, path)
    return {case: (kind, path) for case, (_, kind, path) in found.items()}


class AmpRuns:
    """The worker's records per case, from one subprocess run on first use; a crash is reported for every case it left
    without a record."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.records: dict[str, dict[str, Any]] | None = None
        self.crash = ""

    def __call__(self, case: str) -> dict[str, Any]:
        if self.records is None:
            jobs = [f"{name}={kind}={path}" for name, (kind, path) in case_configs().items() if name in CASES]
            proc = subprocess.run([sys.executable, "-m", "tests.amp_worker", str(self.out), *jobs], cwd=ROOT, capture_output=True,
                                  text=True, timeout=1800)
            lines = proc.stdout.splitlines()
            self.records = {r["case"]: r for r in (json.loads(ln.split(" ", 1)[1]) for ln in lines if ln.startswith("RESULT "))}
            started = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("running ")]
            self.crash = f"exit {proc.returncode} while running {started[-1:]}: {proc.stderr[-3000:]}" if proc.returncode else ""
        if case == ATTENTION and case not in case_configs():
            pytest.skip("no shipped config has a backbone with attention blocks")
        if case not in self.records:
            pytest.fail(self.crash or f"no record for {case!r} (no shipped config?)")
        record = self.records[case]
        if "error" in record:
            pytest.fail(f"{case} ({case_configs()[case][1].name}) raised:\n{record['error']}")
        return record


@pytest.fixture(scope="module")
def amp_runs(tmp_path_factory: pytest.TempPathFactory) -> AmpRuns:
    return AmpRuns(tmp_path_factory.mktemp("amp"))


def test_every_head_has_a_shipped_config() -> None:
    assert set(known_heads()) <= set(case_configs()), "a registered head without a shipped config is not covered"


def test_amp_policy_decides_dtype_and_loss_scaling_by_device() -> None:
    assert amp_policy("cuda") == AmpPolicy("cuda", torch.float16) and amp_policy("cuda").scaled  # YOLOv5's AMP
    assert not amp_policy("cpu").enabled and not amp_policy(torch.device("mps")).enabled  # float32 where half kernels are slow
    assert amp_policy("cpu", torch.float16).scaled and not amp_policy("cpu", torch.bfloat16).scaled  # bfloat16 has float32's range
    assert not amp_policy("cuda", torch.float32).enabled
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        amp_policy("cpu", torch.float64)
    assert amp_policy("cpu").describe() == "float32" and amp_policy("cuda").describe() == "AMP float16 with loss scaling"


@pytest.mark.parametrize("name", list(HALF))
def test_amp_policy_autocast_and_scaler_on_the_cpu(name: str) -> None:
    """The policy's autocast computes matmuls in its dtype; its GradScaler (torch.amp.GradScaler("cpu")) scales, unscales
    and skips a step whose gradients overflowed, on the CPU as on CUDA."""
    policy = amp_policy("cpu", HALF[name])
    w = torch.nn.Parameter(torch.ones(2, 2))
    with policy.autocast():
        y = w @ torch.ones(2, 2)
    assert y.dtype == HALF[name]
    with amp_policy("cpu").autocast():
        assert (w @ torch.ones(2, 2)).dtype == torch.float32
    scaler, opt = policy.grad_scaler(), torch.optim.SGD([w], lr=4.0)
    assert scaler.is_enabled() == policy.scaled
    scaler.scale(y.float().mean()).backward()  # gradient 0.5 per weight: 2^15 at the default scale 2^16, below float16's max
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.full((2, 2), -1.0))  # 1 - 4 * 0.5: the step saw the unscaled gradient
    if policy.scaled:
        scale = scaler.get_scale()
        w.grad = torch.full((2, 2), float("inf"))
        scaler.step(opt)
        scaler.update()
        assert torch.equal(w.detach(), torch.full((2, 2), -1.0)) and scaler.get_scale() == scale / 2


@pytest.mark.parametrize("name", list(HALF))
@pytest.mark.parametrize("case", CASES)
def test_training_step_in_half_precision(case: str, name: str, amp_runs: AmpRuns) -> None:
    """The Trainer's step under autocast: finite loss and gradients, the float32 step's loss within GROWTH * eps * sqrt(L),
    and an optimizer step that moves every weight the float32 step moves; the Trainer's own default on the CPU is float32."""
    record = amp_runs(case)
    step = record["steps"][name]
    assert record["default_amp"] == ["float32", False], "CPU training must stay float32 unless asked"
    assert step["items_finite"], step
    assert not step["bad_grads"], f"non-finite gradients at loss scale {step['scale']}: {step['bad_grads']}"
    assert step["grad_names_match"] and not step["same_as_float32"]  # the same parameters learn; autocast did change the sums
    tol = GROWTH * torch.finfo(HALF[name]).eps * math.sqrt(record["layers"])
    assert abs(step["loss"] - step["ref_loss"]) <= tol * abs(step["ref_loss"]), (step["loss"], step["ref_loss"], tol)
    assert step["ref_moved"] > 0 and not step["not_moved"], f"weights the step left unchanged: {step['not_moved']}"
    assert step["scale"] >= 1.0 if HALF[name] == torch.float16 else step["scale"] == 1.0  # only float16 scales the loss


@pytest.mark.parametrize("name", list(HALF))
@pytest.mark.parametrize("case", CASES)
def test_loss_runs_in_float32_under_autocast(case: str, name: str, amp_runs: AmpRuns) -> None:
    """The loss the half-precision step computed equals the float32 loss, outside autocast, of the same predictions."""
    step = amp_runs(case)["steps"][name]
    assert step["loss_ulps"] <= LOSS_ULPS, f"the loss moved by {step['loss_ulps']:.3g} float32 ulps under {name} autocast"


@pytest.mark.parametrize("name", list(HALF))
@pytest.mark.parametrize("case", CASES)
def test_inference_in_half_precision(case: str, name: str, amp_runs: AmpRuns) -> None:
    """Eval-mode detections of the fused model under autocast: each of the best per image has a float32 detection within
    YARDSTICK_GROWTH yardsticks (box corners clipped to the image, over its size; class scores), and the other way round."""
    result = amp_runs(case)["inference"][name]
    tol = YARDSTICK_GROWTH * max(result["yardstick"], torch.finfo(HALF[name]).eps)  # one ulp at 1: a floor for a tiny yardstick
    assert result["finite"] and result["err"] <= tol, result
