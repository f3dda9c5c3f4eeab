"""AnchorFreeLoss and its DFL pieces on a stand-in head (no dependence on the model code)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.conftest import EPS32
from utils.loss.anchor_free import AnchorFreeLoss, dfl_expectation, dfl_loss, preprocess_targets

HYP = {"box": 7.5, "cls": 0.5, "dfl": 1.5}
REG_MAX = 16
STRIDES = (8.0, 16.0)
IMG = 64
LOGIT = 8.0  # "confident" class logit: BCE(+-LOGIT) = softplus(-LOGIT) ~ 3.4e-4
# Logit of an empty bin: a network's logits are finite, and with -inf a zero-weight CE term would give inf * 0 = nan.
# exp(-50) ~ 2e-22 moves neither an expectation nor an entropy by a float32 ulp.
EMPTY_BIN = -50.0
# Non-overlapping boxes, each small enough to contain at most 10 cell centres over both levels (checked in
# test_perfect_predictions), so that every point inside a box is a positive of it; no edge lies on a multiple of 8 px,
# which would put a DFL target on a bin boundary (float32 rounding could move it into the neighbouring bin pair):
# [image, class, cx, cy, w, h], normalised.
TARGETS = torch.tensor(
    [
        [0, 1, 0.30, 0.30, 0.30, 0.25],
        [0, 2, 0.75, 0.70, 0.20, 0.34],
        [1, 0, 0.45, 0.55, 0.36, 0.30],
    ]
)


class StandInHead(nn.Module):
    """Only the attributes the loss reads: nc, reg_max, no and the per-level stride."""

    def __init__(self, nc: int, strides: tuple[float, ...] = STRIDES) -> None:
        super().__init__()
        self.nc, self.reg_max, self.no = nc, REG_MAX, 4 * REG_MAX + nc
        self.register_buffer("stride", torch.tensor(strides))


class StandInModel(nn.Module):
    def __init__(self, nc: int = 3, attr: str = "head") -> None:
        super().__init__()
        setattr(self, attr, StandInHead(nc))


class Wrapper(nn.Module):
    """Like DDP: the real model under `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _loss(nc: int = 3) -> AnchorFreeLoss:
    return AnchorFreeLoss(StandInModel(nc), HYP)


def _random_preds(bs: int = 2, nc: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 4 * REG_MAX + nc, IMG // int(s), IMG // int(s), generator=g).requires_grad_() for s in STRIDES]


def two_bin_logits(t: torch.Tensor, reg_max: int = REG_MAX) -> torch.Tensor:
    """Logits (..., reg_max) whose softmax is the DFL target of distances t: weights tr - t and t - tl on bins tl, tr."""
    left = t.floor().long()
    w_left = (left + 1) - t
    probs = torch.zeros(*t.shape, reg_max + 1, dtype=t.dtype)
    probs.scatter_(-1, left[..., None], w_left[..., None])
    probs.scatter_add_(-1, left[..., None] + 1, (1 - w_left)[..., None])
    return probs[..., :reg_max].log().clamp(min=EMPTY_BIN)  # bin reg_max only ever holds weight 0 (t < reg_max - 1)


def entropy2(t: torch.Tensor) -> torch.Tensor:
    """Entropy of the two-bin distribution of distances t, float64."""
    w = (t.double().floor() + 1) - t.double()
    return -(torch.xlogy(w, w) + torch.xlogy(1 - w, 1 - w))


def _distance_grid() -> torch.Tensor:
    """Distances over [0, reg_max - 1 - 0.01]: integers, just off integers and random values."""
    g = torch.Generator().manual_seed(0)
    ints = torch.arange(REG_MAX - 1, dtype=torch.float32)
    return torch.cat((ints, ints + 1e-3, ints + 0.99, ints + 0.5, torch.rand(200, generator=g) * (REG_MAX - 1.01)))


def test_dfl_round_trip():
    t = _distance_grid()
    decoded = dfl_expectation(two_bin_logits(t).repeat(1, 4), REG_MAX)
    assert decoded.shape == (t.shape[0], 4)
    # two non-zero terms bin * p, each p off by a few roundings (log, exp, normalisation): a few ulps of reg_max
    assert (decoded - t[:, None]).abs().max().item() <= 4 * REG_MAX * EPS32
    assert dfl_expectation(torch.zeros(1, 4 * REG_MAX), REG_MAX).tolist() == [[(REG_MAX - 1) / 2] * 4]


def test_dfl_loss_minimum_is_the_two_bin_entropy():
    t = _distance_grid()
    logits = two_bin_logits(t).requires_grad_()
    loss = dfl_loss(logits, t)
    # -(w log w + (1 - w) log(1 - w)) with log-softmax of log w: a few roundings of terms <= 1/e each, plus the
    # log-sum-exp of two weights summing to 1 (a few ulps of 0)
    assert (loss.double() - entropy2(t)).abs().max().item() <= 8 * EPS32
    loss.sum().backward()
    assert logits.grad is not None and logits.grad.abs().max().item() <= 8 * EPS32  # softmax - target: stationary point
    tol = 8 * EPS32
    floor = entropy2(t).float() - tol
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # no perturbation gets below the minimum (within rounding)
        assert (dfl_loss(logits.detach() + 0.1 * torch.randn(logits.shape, generator=g), t) >= floor).all()
    # shifting weight between the two bins raises the loss by ~ w (1 - w) 0.1^2 / 2 >= 5e-5 when both weights >= 1e-2
    mixed = entropy2(t) > 0.06
    left = t.long()[:, None]
    for step in (0.1, -0.1):
        moved = dfl_loss(logits.detach().scatter_add(1, left, torch.full_like(t, step)[:, None]), t)
        assert (moved > loss.detach() + tol)[mixed].all()


def _perfect_preds(
    targets: torch.Tensor, bs: int, nc: int, shift: float = 0.0, size: tuple[int, int] = (IMG, IMG)
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Level outputs reproducing every target at every point inside it (left distance + shift), and the inside distances.

    Points outside the targets predict a small box and -LOGIT for all classes; inside points +LOGIT for the target class.
    `size` is the input's (height, width).
    """
    preds, inside_dist = [], []
    boxes = targets[:, 2:].double() * torch.tensor([size[1], size[0], size[1], size[0]])
    boxes = torch.cat((boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2), 1)
    for s in STRIDES:
        ny, nx = size[0] // int(s), size[1] // int(s)
        box_logits = two_bin_logits(torch.full((bs, ny, nx, 4), 0.5)).flatten(3)
        cls_logits = torch.full((bs, ny, nx, nc), -LOGIT)
        for (img, cls), box in zip(targets[:, :2].long().tolist(), (boxes / s).tolist()):
            for y in range(ny):
                for x in range(nx):
                    d = torch.tensor((x + 0.5 - box[0], y + 0.5 - box[1], box[2] - x - 0.5, box[3] - y - 0.5))
                    if d.min() > 0:
                        d[0] += shift
                        box_logits[img, y, x] = two_bin_logits(d.float()).flatten()
                        cls_logits[img, y, x, cls] = LOGIT
                        inside_dist.append(d)
        preds.append(torch.cat((box_logits, cls_logits), -1).permute(0, 3, 1, 2).contiguous())
    return preds, torch.stack(inside_dist)


def test_perfect_predictions():
    preds, dist = _perfect_preds(TARGETS, 2, 3)
    assert len(dist) <= 10 * len(TARGETS)  # every inside point is a positive (<= topk per target, no overlaps)
    loss, items = _loss()(preds, TARGETS)
    box, cls, dfl = (items / torch.tensor([HYP["box"], HYP["cls"], HYP["dfl"]])).tolist()
    # 1 - IoU ~ relative side errors: each decoded side is off by a few ulps of reg_max (see the round trip) and the
    # sides are >= 1 grid unit, so 1 - CIoU <= 4 sides * 4 ulps * reg_max; the target scores are 1 - O(that) too
    box_bound = 4 * 4 * REG_MAX * EPS32
    assert box <= box_bound
    # DFL at its minimum: the score-weighted mean of the two-bin entropies (see the DFL test for the 8 ulps)
    assert dfl == pytest.approx(entropy2(dist).mean().item(), rel=box_bound + 8 * EPS32 / entropy2(dist).mean().item())
    # every class output is a confident right answer, softplus(-LOGIT) each, over a score sum of n_fg; a target score
    # 1 - d adds d * LOGIT to its term, d <= box_bound
    n_terms, softplus = 2 * sum((IMG // int(s)) ** 2 for s in STRIDES) * 3, F.softplus(torch.tensor(-LOGIT)).item()
    assert cls == pytest.approx(n_terms * softplus / len(dist), rel=box_bound * LOGIT * len(dist) / (n_terms * softplus))
    assert loss.item() == pytest.approx(items.sum().item() * 2, rel=4 * EPS32)


def test_shifted_prediction_costs_more():
    _, perfect = _loss()(_perfect_preds(TARGETS, 2, 3)[0], TARGETS)
    _, shifted = _loss()(_perfect_preds(TARGETS, 2, 3, shift=0.75)[0], TARGETS)
    assert shifted[0] > perfect[0] + 0.01 * HYP["box"]  # 0.75 grid units on boxes of a few units: IoU drops by > 1%
    assert shifted[2] > perfect[2]


def test_empty_targets_only_classification():
    preds = _random_preds()
    loss, items = _loss()(preds, torch.zeros(0, 6))
    assert items[0].item() == 0 and items[2].item() == 0 and items[1].item() > 0
    loss.backward()
    for p in preds:
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert (p.grad[:, : 4 * REG_MAX] == 0).all()  # connected (DDP sees every parameter used) but zero
        assert (p.grad[:, 4 * REG_MAX :] > 0).all()  # every class logit is pushed down


def test_image_without_targets_in_batch():
    preds = _random_preds()
    loss, items = _loss()(preds, TARGETS[TARGETS[:, 0] == 1])
    assert torch.isfinite(items).all() and (items > 0).all()
    loss.backward()
    for p in preds:
        assert p.grad is not None
        assert (p.grad[0, : 4 * REG_MAX] == 0).all() and (p.grad[0, 4 * REG_MAX :] > 0).all()  # image 0: background only


@pytest.mark.parametrize("nc", [1, 3])
def test_gradients_reach_box_and_class_channels(nc):
    preds = _random_preds(nc=nc)
    targets = TARGETS.clone()
    targets[:, 1] = targets[:, 1] % nc
    loss, items = _loss(nc)(preds, targets)
    assert loss.shape == () and loss.requires_grad and not items.requires_grad and items.shape == (3,)
    loss.backward()
    grads = torch.cat([p.grad.flatten(2) for p in preds if p.grad is not None], 2)
    assert torch.isfinite(grads).all()
    assert grads[:, : 4 * REG_MAX].abs().sum() > 0 and grads[:, 4 * REG_MAX :].abs().sum() > 0


def test_invariant_to_target_order():
    mixed = _informative_preds(3)
    loss, items = _loss()(mixed, TARGETS)
    loss_p, items_p = _loss()(mixed, TARGETS[[2, 1, 0]])
    # same per-point terms, summed in at most another order: <= (number of terms) ulps, N * nc terms at most
    tol = 2 * sum((IMG // int(s)) ** 2 for s in STRIDES) * 3 * EPS32
    assert torch.allclose(items, items_p, rtol=tol, atol=0) and loss.item() == pytest.approx(loss_p.item(), rel=tol)


def _informative_preds(seed: int) -> list[torch.Tensor]:
    """Perfect predictions plus noise: the target scores sum to well over 1 (random ones may not, see the clamp)."""
    perfect, _ = _perfect_preds(TARGETS, 2, 3)
    return [(p + 0.5 * q).detach().requires_grad_() for p, q in zip(perfect, _random_preds(seed=seed))]


def test_loss_scales_with_batch_size():
    preds = _informative_preds(4)
    loss, items = _loss()(preds, TARGETS)
    doubled = [torch.cat((p, p)) for p in preds]
    again = TARGETS.clone()
    again[:, 0] += 2
    loss2, items2 = _loss()(doubled, torch.cat((TARGETS, again)))
    # the same terms twice over: numerators and denominators both double; sums of <= 2 N nc terms
    tol = 4 * sum((IMG // int(s)) ** 2 for s in STRIDES) * 3 * EPS32
    assert torch.allclose(items2, items, rtol=tol, atol=0)
    assert loss2.item() == pytest.approx(2 * loss.item(), rel=tol)
    assert loss.item() == pytest.approx(2 * items.sum().item(), rel=4 * EPS32)


def test_autocast_computes_in_float32():
    preds = [p.detach() for p in _random_preds(seed=5)]
    half = [p.bfloat16() for p in preds]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, items = _loss()(half, TARGETS)
    ref_loss, ref_items = _loss()([p.float() for p in half], TARGETS)
    assert loss.dtype == torch.float32 and items.dtype == torch.float32
    assert torch.equal(items, ref_items) and torch.equal(loss, ref_loss)


def test_head_lookup_and_hyp_validation():
    preds = _random_preds(seed=6)
    ref = _loss()(preds, TARGETS)[1]
    for model in (StandInModel(3, "detect"), Wrapper(StandInModel(3))):
        assert torch.equal(AnchorFreeLoss(model, HYP)(preds, TARGETS)[1], ref)
    assert AnchorFreeLoss.names == ("box_loss", "cls_loss", "dfl_loss")
    with pytest.raises(KeyError, match="dfl"):
        AnchorFreeLoss(StandInModel(), {"box": 7.5, "cls": 0.5})
    with pytest.raises(ValueError, match="expected"):
        _loss(nc=2)(preds, TARGETS)
    no_strides = StandInModel(3)
    no_strides.head.stride = torch.zeros(0)
    with pytest.raises(ValueError, match="strides"):
        AnchorFreeLoss(no_strides, HYP)
    with pytest.raises(AttributeError, match="neither"):
        AnchorFreeLoss(nn.Linear(1, 1), HYP)
    with pytest.raises(ValueError, match="image indices"):
        _loss()(preds, torch.tensor([[2.0, 0, 0.5, 0.5, 0.1, 0.1]]))


def test_preprocess_targets_pads_and_scales():
    targets = torch.tensor([[1, 2, 0.5, 0.5, 0.5, 0.25], [0, 1, 0.25, 0.5, 0.5, 0.5], [1, 0, 0.5, 0.5, 1.0, 1.0]])
    gt, mask = preprocess_targets(targets, 3, img_w=32.0, img_h=64.0)
    assert gt.shape == (3, 2, 5) and mask.shape == (3, 2, 1)
    assert mask.squeeze(-1).tolist() == [[True, False], [True, True], [False, False]]
    assert gt[0, 0].tolist() == [1, 0, 16, 16, 48]
    assert gt[1].tolist() == [[2, 8, 24, 24, 40], [0, 0, 0, 32, 64]]  # input order kept within an image
    assert (gt[~mask.squeeze(-1)] == 0).all()
    gt0, mask0 = preprocess_targets(torch.zeros(0, 6), 2, 32.0, 64.0)
    assert gt0.shape == (2, 0, 5) and mask0.shape == (2, 0, 1)


def test_image_size_from_feature_maps():
    # a 64 x 128 (h x w) input: the normalised targets scale by (w, h) = (128, 64), where predictions made for that
    # size are perfect (a square or transposed size would misplace every box by tens of pixels)
    targets = TARGETS.clone()
    targets[:, 4] /= 2  # keep <= 10 points inside each box at the doubled width
    wide, dist = _perfect_preds(targets, 2, 3, size=(IMG, 2 * IMG))
    assert len(dist) <= 10 * len(targets)
    _, items = _loss()(wide, targets)
    assert items[0].item() <= HYP["box"] * 4 * 4 * REG_MAX * EPS32  # the bound of test_perfect_predictions


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    preds = [p.detach() for p in _random_preds(seed=7)]
    loss, items = _loss()(preds, TARGETS)
    loss_c, items_c = _loss()([p.cuda() for p in preds], TARGETS.cuda())
    # other kernels, other summation order: <= N * nc terms' worth of ulps
    tol = 2 * sum((IMG // int(s)) ** 2 for s in STRIDES) * 3 * EPS32
    assert torch.allclose(items_c.cpu(), items, rtol=tol, atol=0)
    assert loss_c.item() == pytest.approx(loss.item(), rel=tol)
