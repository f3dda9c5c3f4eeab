"""Training helpers: devices, optimizer groups, schedules, warm-up, EMA, freezing, seeding, loss checks."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from models.model import DetectionModel
from tests.conftest import EPS32
from utils.device import select_device
from utils.engine.torch_utils import (
    ModelEMA,
    NonFiniteLossError,
    auto_batch_size,
    build_scheduler,
    check_finite_loss,
    de_parallel,
    freeze_layers,
    init_seeds,
    linear_lr,
    model_param_count,
    one_cycle,
    smart_optimizer,
    time_sync,
    warmup_step,
)

HYP = {"lr0": 0.01, "momentum": 0.937, "warmup_momentum": 0.8, "warmup_bias_lr": 0.1}


class Scaled(nn.Module):
    """Conv + BN + LayerNorm + a 1-D LayerScale-like gain + Linear, to check grouping."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.ones(4))
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)


@pytest.fixture(scope="module")
def tiny() -> DetectionModel:
    return DetectionModel("yolov5n.yaml", nc=3)


def test_select_device_cpu():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert select_device("") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("spec", ["0", "0,1", "cuda:0"])
def test_select_device_cuda_missing(spec):
    with pytest.raises(ValueError, match=rf"--device {spec} requested but CUDA is not available"):
        select_device(spec)


def test_select_device_bad_spec():
    with pytest.raises(ValueError, match="expected 'cpu', 'mps'"):
        select_device("gpu7")


def test_optimizer_groups(tiny):
    opt = smart_optimizer(tiny, "SGD", lr=0.02, momentum=0.9, decay=5e-4)
    assert len(opt.param_groups) == 3
    bn = [m for m in tiny.modules() if isinstance(m, nn.BatchNorm2d)]
    biases = [p for n, p in tiny.named_parameters() if n.endswith(".bias")]
    weights = [p for p in tiny.parameters() if p.ndim > 1]
    g0, g1, g2 = (g["params"] for g in opt.param_groups)  # YOLOv5's order: biases, weights, norm weights
    assert len(g2) == len(bn) and len(g1) == len(weights) and len(g0) == len(biases)
    assert {id(p) for p in g2} == {id(m.weight) for m in bn}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4, 0.0]
    assert sum(len(g) for g in (g0, g1, g2)) == len(list(tiny.parameters()))
    assert opt.param_groups[1]["nesterov"] and opt.param_groups[1]["momentum"] == 0.9
    assert all(g["lr"] == 0.02 for g in opt.param_groups)


def test_optimizer_slow_prefix_groups(tiny):
    """RT-DETR's backbone LR: parameters under the prefixes form three more groups, same order, at lr * factor."""
    first = next(n for n, _ in tiny.named_children())
    opt = smart_optimizer(tiny, "AdamW", lr=1e-4, momentum=0.9, decay=1e-4, slow_prefixes=(f"{first}.",), slow_factor=0.1)
    assert len(opt.param_groups) == 6
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4] * 3 + [1e-5] * 3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-4, 0.0] * 2
    slow = {id(p) for g in opt.param_groups[3:] for p in g["params"]}
    assert slow == {id(p) for n, p in tiny.named_parameters() if n.startswith(f"{first}.")} and slow
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in tiny.parameters())  # every parameter exactly once
    assert len(smart_optimizer(tiny, "SGD", slow_prefixes=("nothing.",), slow_factor=0.1).param_groups) == 3


def test_optimizer_layerscale_and_norms_without_decay():
    m = Scaled()
    opt = smart_optimizer(m, "AdamW", lr=1e-3, momentum=0.9, decay=0.05)
    g0, g1, g2 = (g["params"] for g in opt.param_groups)
    assert {id(p) for p in g2} == {id(m.bn.weight), id(m.gamma), id(m.norm.weight)}
    assert {id(p) for p in g1} == {id(m.conv.weight), id(m.fc.weight)}
    assert {id(p) for p in g0} == {id(m.bn.bias), id(m.norm.bias), id(m.fc.bias)}
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 0.05
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert isinstance(smart_optimizer(m, "Adam"), torch.optim.Adam)


def test_optimizer_unknown_name():
    with pytest.raises(ValueError, match="SGD, Adam, AdamW"):
        smart_optimizer(Scaled(), "RMSprop")


@pytest.mark.parametrize("cos", [False, True])
def test_scheduler_endpoints(cos):
    opt = smart_optimizer(Scaled(), lr=0.01)
    sched, lf = build_scheduler(opt, epochs=10, lrf=0.01, cos_lr=cos)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert lf(0) == pytest.approx(1.0) and lf(10) == pytest.approx(0.01)
    assert 0.01 < lf(5) < 1.0
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # decreasing every epoch
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.01)


def test_schedule_shapes():
    assert one_cycle(0.0, 1.0, 100)(50) == pytest.approx(0.5)
    assert one_cycle(1.0, 0.1, 100)(100) == pytest.approx(0.1)
    assert linear_lr(0.1, 10)(5) == pytest.approx(0.55)


def test_warmup_start_and_end():
    opt = smart_optimizer(Scaled(), lr=HYP["lr0"], momentum=HYP["momentum"])
    _, lf = build_scheduler(opt, epochs=10, lrf=0.01)
    warmup_step(opt, ni=0, nw=100, epoch=0, lr_lambda=lf, hyp=HYP)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.0, 0.0])  # the bias group (x/lr0) starts high
    assert all(g["momentum"] == pytest.approx(0.8) for g in opt.param_groups)
    warmup_step(opt, ni=50, nw=100, epoch=0, lr_lambda=lf, hyp=HYP)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.055, 0.005, 0.005])
    warmup_step(opt, ni=100, nw=100, epoch=1, lr_lambda=lf, hyp=HYP)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * lf(1)] * 3)
    assert all(g["momentum"] == pytest.approx(0.937) for g in opt.param_groups)


def test_ema_decay_ramp_and_tracking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = ModelEMA(model, decay=0.9, tau=10)
    assert not ema.ema.training and all(not p.requires_grad for p in ema.ema.parameters())
    assert ema.decay(0) == 0.0
    assert ema.decay(10) == pytest.approx(0.9 * (1 - math.exp(-1)))
    start = ema.ema[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    d = ema.decay(1)
    assert ema.updates == 1
    torch.testing.assert_close(ema.ema[0].weight, d * start + (1 - d) * model[0].weight)
    for _ in range(200):
        ema.update(model)
    # converged: the start offset has shrunk by <= 0.9**200; each update rounds by ~EPS32*|w| and the recurrence
    # contracts by <= 0.9, so the float32 fixed point is within ~EPS32*|w| / (1 - 0.9) of the weights
    w = model[0].weight
    torch.testing.assert_close(ema.ema[0].weight, w, atol=4 * EPS32 * w.abs().max().item() / (1 - 0.9), rtol=0)
    assert ema.ema[1].num_batches_tracked.dtype == torch.long  # integer state is left alone


def test_ema_handles_wrapped_model():
    model = nn.Linear(3, 3)
    wrapped = nn.DataParallel(model)
    assert de_parallel(wrapped) is model
    ema = ModelEMA(wrapped)
    assert isinstance(ema.ema, nn.Linear)
    with torch.no_grad():
        model.weight.zero_()
    ema.update(wrapped)
    assert ema.updates == 1


def test_freeze_layers(tiny):
    frozen = freeze_layers(tiny, [0, 1])
    assert frozen and all(n.startswith(("model.0.", "model.1.")) for n in frozen)
    by_name = dict(tiny.named_parameters())
    assert all(not by_name[n].requires_grad for n in frozen)
    assert all(p.requires_grad for n, p in by_name.items() if n not in frozen)
    assert model_param_count(tiny, trainable_only=True) == model_param_count(tiny) - sum(by_name[n].numel() for n in frozen)
    assert freeze_layers(tiny, []) == []
    for p in tiny.parameters():  # restore: the fixture is shared
        p.requires_grad_(True)


def test_freeze_layers_keeps_fixed_parameters_fixed():
    from models.model import DetectionModel

    model = DetectionModel("models/yolov8n.yaml", nc=2)
    assert freeze_layers(model, [0]) == [n for n, _ in model.named_parameters() if n.startswith("model.0.")]
    fixed = [n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("model.0.")]
    assert fixed == ["model.22.dfl.conv.weight"]  # the DFL projection (bin values 0..15) never trains


def test_init_seeds_reproducible():
    init_seeds(7)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    init_seeds(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_check_finite_loss():
    check_finite_loss(torch.tensor(1.5), 0, 0)
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 3 batch 7; lower --lr0"):
        check_finite_loss(torch.tensor(float("nan")), 3, 7)
    with pytest.raises(NonFiniteLossError, match="loss became inf"):
        check_finite_loss(torch.tensor([float("inf")]), 0, 1)


def test_time_sync_monotonic():
    t0 = time_sync()
    assert time_sync() >= t0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_auto_batch_size_without_cuda(tiny, caplog):
    assert auto_batch_size(tiny, imgsz=64, default=16) == 16
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        assert auto_batch_size(tiny, imgsz=64, default=12) == 12
    assert "CUDA not available" in caplog.text


def test_optimizer_state_saved_in_the_old_group_order_resumes():
    """Checkpoints written before the groups took YOLOv5's order (norm, weight, bias) load with each buffer on its parameter."""
    from utils.engine.torch_utils import GROUP_ORDER, optimizer_state_in_current_order

    m = Scaled()
    new = smart_optimizer(m, "SGD", lr=0.01, momentum=0.9, decay=1e-4)
    groups = [dict(g) for g in reversed(new.param_groups)]  # the old order, same parameters within each group
    old = torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True)
    for i, p in enumerate(m.parameters()):
        p.grad = torch.full_like(p, float(i + 1))  # a different momentum buffer for every parameter
    old.step()
    new.load_state_dict(old.state_dict())  # loads without complaint (equal group sizes here), onto the wrong parameters
    assert not all(torch.equal(new.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"]) for p in m.parameters())
    new.load_state_dict(optimizer_state_in_current_order(old.state_dict(), None))
    for p in m.parameters():
        assert torch.equal(new.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"])
    assert optimizer_state_in_current_order(new.state_dict(), GROUP_ORDER)["param_groups"] == new.state_dict()["param_groups"]
