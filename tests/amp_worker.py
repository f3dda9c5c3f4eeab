"""Run in a subprocess by tests/test_mixed_precision.py: half-precision CPU kernels (oneDNN bfloat16, float16 fallbacks)
run on the training path there, and a crash in one fails the tests instead of ending the test run.

python -m tests.amp_worker OUT_DIR CASE=KIND=CFG [...]: per case, a Trainer for CFG (whose head is of KIND) on the
task's sample data; the float32 training step, then one under each half type, through the Trainer's own step code
switched to AMP by utils.engine.amp's policy; the loss the step computed against the float32 loss of the same
predictions; and eval-mode inference of the BN-calibrated, fused model in each half type against float32 and against a
yardstick (see `yardstick_error`). One thread: the results do not depend on the machine's cores. Before each case it
prints "running CASE"; after it one "RESULT {json}" line of measurements (tests/test_mixed_precision.py holds the
tolerances and the assertions), or of the error the case raised.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models  # noqa: F401  (registers the built-in modules)
from models.heads.base import head_policy
from utils.engine.amp import amp_policy
from utils.engine.launch import resolve_options
from utils.engine.options import train_options
from utils.engine.trainer import DistInfo, Trainer
from utils.tasks import TrainBatch, get_task

IMGSZ, BATCH = 128, 2  # B * (H/32) * (W/32) = 32 values per channel at stride 32: batch statistics that are not degenerate
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NI = 1000  # the step's batch index: past the warm-up, so every parameter group steps at its scheduled learning rate
FP16_MAX = torch.finfo(torch.float16).max
GRAD_HEADROOM = 2.0  # the GradScaler starts one halving below where the float32 step's gradients would just fit float16
MAX_SKIPS = 8  # GradScaler halvings allowed before a step must be taken
CALIBRATION_BATCHES = 3  # training batches whose train-mode passes give the BN running statistics for inference
TOP = 10  # detections per image compared at inference
UPDATE_ULPS = 16.0  # an optimizer update this many float32 ulps of the weight's scale cannot round away
EPS32 = torch.finfo(torch.float32).eps


def layer_count(model: nn.Module) -> int:
    """The conv and linear layers of `model` (the L of the tolerances)."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def tree_float(x: Any) -> Any:
    """`x` with every floating tensor in it (lists, tuples, NamedTuples) detached and made float32."""
    if isinstance(x, torch.Tensor):
        return x.detach().float() if x.is_floating_point() else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tree_float(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(tree_float(v) for v in x)
    return x


class RecordingLoss:
    """Wraps the Trainer's loss: passes every call through and keeps the last call's predictions and loss."""

    def __init__(self, loss: Any) -> None:
        self.loss, self.names = loss, loss.names
        self.preds: Any = None
        self.value: torch.Tensor | None = None

    def __call__(self, preds: Any, *args: Any) -> Any:
        out = self.loss(preds, *args)
        self.preds, self.value = tree_float(preds), out[0].detach()
        return out


class GradientPeak:
    """Context: the largest |gradient| that reaches the output of any leaf module of `model` in a backward pass within."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.largest = model, 0.0
        self.handles: list[Any] = []

    def _watch(self, module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._record)

    def _record(self, grad: torch.Tensor) -> None:
        self.largest = max(self.largest, float(grad.detach().abs().max()))

    def __enter__(self) -> GradientPeak:
        self.handles = [m.register_forward_hook(self._watch) for m in self.model.modules() if not any(m.children())]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


class HeadCase:
    """A Trainer for one config on its task's sample data, one training batch and the state every step starts from."""

    def __init__(self, kind: str, cfg: str, root: Path) -> None:
        task = head_policy(kind).task
        data = get_task(task).sample_data(root / "data", n_train=4, n_val=2, seed=5)
        opt = train_options(task, cfg=cfg, data=str(data), epochs=1, imgsz=IMGSZ, batch_size=BATCH, workers=0, project=str(root),
                            name="run", exist_ok=True, noplots=True, noautoanchor=True, noval=True, device="cpu")
        self.trainer = Trainer(resolve_options(opt, DistInfo()), torch.device("cpu"))
        self.default_amp = self.trainer.amp.describe(), bool(self.trainer.scaler.is_enabled())
        batches = [self.trainer.task.train_batch(raw, self.trainer.device) for _ in range(2) for raw in self.trainer.train_loader]
        self.batch: TrainBatch = batches[0]
        self.calibration = [b.imgs for b in batches[:CALIBRATION_BATCHES]]
        self.model_state = copy.deepcopy(self.trainer.model.state_dict())
        self.optimizer_state = copy.deepcopy(self.trainer.optimizer.state_dict())
        self.loss = RecordingLoss(self.trainer.loss)
        self.trainer.loss = self.loss
        self.reference = self.step(torch.float32)

    def step(self, dtype: torch.dtype) -> dict[str, Any]:
        """One training step from the start state under amp_policy("cpu", dtype), through the Trainer's step code; with
        float16, a step whose gradients overflow is skipped by the GradScaler and tried again at its halved scale."""
        tr = self.trainer
        tr.use_amp(amp_policy(tr.device, dtype))
        if tr.amp.scaled:
            self._start_scale()
        skips = 0
        while True:
            record = self._try_step()
            overflow = tr.amp.scaled and not all(bool(torch.isfinite(g).all()) for g in record["grads"].values())
            if not overflow or skips == MAX_SKIPS:
                return {**record, "skips": skips}
            if any(not torch.equal(p, self.model_state[n]) for n, p in tr.model.named_parameters()):
                raise AssertionError(f"a step whose gradients overflowed at loss scale {record['scale']} changed the weights")
            skips += 1

    def _try_step(self) -> dict[str, Any]:
        """train_step (its forward, loss and scaled backward, the gradients kept), then _optimizer_step (unscale, clip,
        the step the scaler skips on overflow, zero_grad): loss items, unscaled gradients, weights after, the loss scale
        and the largest gradient of any layer output or parameter."""
        tr = self.trainer
        tr.model.load_state_dict(self.model_state)
        tr.optimizer.load_state_dict(self.optimizer_state)
        tr.warmup_iters, tr.last_opt_step = -1, NI  # fit() sets the first; the second keeps the gradients for a look
        torch.manual_seed(0)  # RT-DETR's denoising queries draw noise: the same in every run
        with GradientPeak(tr.model) as peak:
            items = tr.train_step(self.batch.imgs, self.batch.targets, NI, 0, extras=self.batch.extras).detach().clone()
        scale = float(tr.scaler.get_scale())
        grads = {n: p.grad.detach() / scale for n, p in tr.model.named_parameters() if p.grad is not None}
        tr._optimizer_step()
        weights = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        largest = max(peak.largest / scale, *(float(g.abs().max()) for g in grads.values()))
        return {"items": items, "grads": grads, "weights": weights, "scale": scale, "largest_grad": largest}

    def _start_scale(self) -> None:
        """Start the GradScaler where its halvings would settle: GradScaler starts at 2^16 and halves on every step whose
        float16 gradients overflow, skipping it (a run's first steps, on a GPU too); here it starts at the largest power
        of two (at most 2^16) at which twice the float32 step's largest gradient, of any layer output or parameter, fits
        float16 (half-precision gradients run above the float32 ones: RT-DETR's overflow at the float32 bound). step()
        halves it further on an overflow, as GradScaler does."""
        start = 2.0 ** min(16, math.floor(math.log2(FP16_MAX / (GRAD_HEADROOM * self.reference["largest_grad"]))))
        self.trainer.scaler.scale(torch.ones(()))  # creates the scale tensor, which update() then sets
        self.trainer.scaler.update(start)

    def float32_loss_of_last_predictions(self) -> torch.Tensor:
        """The loss, outside autocast, of the predictions the last step's loss saw, made float32."""
        with torch.no_grad():
            return self.loss.loss(self.loss.preds, self.batch.targets, *self.batch.extras)[0]


def step_record(case: HeadCase, dtype: torch.dtype) -> dict[str, Any]:
    """One half-precision step against the float32 one: losses, gradient finiteness, the weights it moved, the loss scale,
    and how far the step's loss lies from the float32 loss of the same predictions (in float32 ulps)."""
    ref, got = case.reference, case.step(dtype)
    amp_loss, float32_loss = case.loss.value, case.float32_loss_of_last_predictions()
    start = case.model_state
    # updates within a few float32 ulps of the weight can round away in either run: only larger ones must show
    ref_moved = {n for n, w in ref["weights"].items() if (w - start[n]).abs().max() > UPDATE_ULPS * EPS32 * start[n].abs().max()}
    moved = {n for n, w in got["weights"].items() if not torch.equal(w, start[n])}
    assert amp_loss is not None
    return {
        "loss": float(got["items"].sum()), "ref_loss": float(ref["items"].sum()), "items_finite": bool(torch.isfinite(got["items"]).all()),
        "same_as_float32": bool(torch.equal(got["items"], ref["items"])),
        "bad_grads": [n for n, g in got["grads"].items() if not bool(torch.isfinite(g).all())][:5],
        "grad_names_match": set(got["grads"]) == set(ref["grads"]), "ref_moved": len(ref_moved), "not_moved": sorted(ref_moved - moved)[:5],
        "scale": got["scale"], "skips": got["skips"],
        "loss_ulps": float((amp_loss.float() - float32_loss).abs() / float32_loss.abs().clamp(min=1e-30) / EPS32),
    }


def calibrated_model(case: HeadCase) -> nn.Module:
    """The start-state model in inference form: BN running statistics averaged over train-mode passes of real batches,
    then eval mode and fused (BN folded into the convs, as detect.py and val.py run it)."""
    model = copy.deepcopy(case.trainer.model)
    model.load_state_dict(case.model_state)
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the passes
    model.train()
    with torch.no_grad():
        for imgs in case.calibration:
            model(imgs)
    return model.eval().fuse()  # type: ignore[operator]


def scored_rows(model: nn.Module, out: Any, imgsz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval output as float32 (B, N, 4 + nc) rows, box corners clipped to the image and divided by its size, then class
    scores, and each row's (B, N) best score. A classifier's probabilities are one row per image."""
    head: Any = model.head
    outs = head.inference_outputs(out)
    pred = (outs if isinstance(outs, torch.Tensor) else outs[0]).float()
    if pred.ndim == 2:
        return pred[:, None], pred.amax(-1, keepdim=True)
    if getattr(head, "final_rows_output", False):  # (B, k, 6) final rows: the score goes to its class's column
        scores = nn.functional.one_hot(pred[..., 5].long(), head.nc) * pred[..., 4:5]
        return torch.cat((pred[..., :4].clamp(0, imgsz) / imgsz, scores), -1), pred[..., 4]
    boxes, scores, _ = head.split_output(pred, int(getattr(head, "nm", 0)))  # mask coefficients left out
    return torch.cat((boxes.clamp(0, imgsz) / imgsz, scores), -1), scores.amax(-1)


def farthest_top_row(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The largest distance (max-norm) from one of a's TOP best-scored rows of an image to the nearest row of b's same image.

    Nearest rather than same-index rows: NMS-free heads pick their queries by a top-k, whose order rounding may change."""
    worst = 0.0
    for rows_a, rank_a, rows_b in zip(a[0], a[1], b[0]):
        top = rows_a[rank_a.topk(min(TOP, len(rank_a))).indices]
        worst = max(worst, float((top[:, None] - rows_b[None]).abs().amax(-1).amin(-1).max()))
    return worst


def detection_error(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """farthest_top_row both ways."""
    return max(farthest_top_row(a, b), farthest_top_row(b, a))


def yardstick_error(model: nn.Module, imgs: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> float:
    """The detection error that rounding to `dtype` alone causes on this model: float32 inference with the weights and
    the input rounded to `dtype`. It carries the model's own sensitivity (its conditioning, its decode's gains)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtype).float())
        return detection_error(ref, scored_rows(rounded, rounded(imgs.to(dtype).float()), IMGSZ))


def inference_records(case: HeadCase) -> dict[str, Any]:
    """Per half type: whether the autocast detections are finite, their error against float32 and the yardstick's."""
    model, imgs = calibrated_model(case), case.batch.imgs
    records: dict[str, Any] = {"layers": layer_count(model)}
    with torch.no_grad():
        ref = scored_rows(model, model(imgs), IMGSZ)
        for name, dtype in HALF.items():
            with amp_policy("cpu", dtype).autocast():
                got = scored_rows(model, model(imgs), IMGSZ)
            records[name] = {"finite": bool(torch.isfinite(got[0]).all()), "err": detection_error(ref, got),
                             "yardstick": yardstick_error(model, imgs, ref, dtype)}
    return records


def run_case(case: str, kind: str, cfg: str, root: Path) -> dict[str, Any]:
    """Every measurement of one test case: a config whose head is of `kind`."""
    start = time.perf_counter()
    head_case = HeadCase(kind, cfg, root)
    steps = {name: step_record(head_case, dtype) for name, dtype in HALF.items()}
    return {"case": case, "kind": kind, "cfg": cfg, "layers": layer_count(head_case.trainer.model), "default_amp": head_case.default_amp,
            "steps": steps, "inference": inference_records(head_case), "seconds": time.perf_counter() - start}


def main(out: str, jobs: list[str]) -> None:
    """Measure each CASE=KIND=CFG job in turn, printing progress and one RESULT line per job (its error, if it raised one)."""
    torch.set_num_threads(1)  # results independent of the machine's cores; no OpenMP threads spinning against other tests
    for job in jobs:
        case, kind, cfg = job.split("=", 2)
        print(f"running {case}", flush=True)
        try:
            record = run_case(case, kind, cfg, Path(out) / case)
        except Exception:  # one case's failure (a missing loss, a dtype error) fails that case's tests only
            record = {"case": case, "error": traceback.format_exc(limit=-4)}
        print("RESULT " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
