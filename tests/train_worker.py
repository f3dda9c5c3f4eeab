"""Run in a subprocess by tests/test_train_every_backbone.py: one real training run per config, a crash fails only that test.

python -m tests.train_worker OUT_DIR TASK=DATA=CFG [...]: each config trains one epoch of one batch through the task's
training entry point (train_main with the task's options: the Trainer's own memory layout, optimizer, loss, validation
and checkpoints), then its checkpoint is exported to ONNX and run through the runtime next to the .pt. Before each run
it prints "training CFG" (so a crash names its config); after it, one "RESULT {json}" line with what the step did: the
loss items, the validation metrics, per part of the model (backbone row 0, the rest) the gradient norm read from the
optimizer's first-step state (SGD's momentum buffer or Adam's first moment hold the step's gradient) and whether every
gradient and parameter is finite, the layout check of tests/layout_worker.py on the model the Trainer built, and the
ONNX file's largest difference from the .pt.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from models.heads.base import head_class
from tests.conftest import final_rows_error, query_set_error, rel_err, rounding_tol
from tests.layout_worker import check_model
from utils.checkpoint import unwrap_model
from utils.engine.callbacks import Callbacks
from utils.engine.launch import train_main
from utils.engine.options import train_options
from utils.engine.trainer import DistInfo

GRADIENT_STATE = ("momentum_buffer", "exp_avg")  # per-parameter optimizer state that holds the first step's gradient


def _step_record(trainer: Any) -> dict[str, Any]:
    """What the first optimizer step did, per part of the model: gradient norm and finiteness."""
    model = unwrap_model(trainer.model)
    state = trainer.optimizer.state
    parts: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        part = parts.setdefault("backbone" if name.startswith("model.0.") else "neck_head",
                                {"grad_sq": 0.0, "finite": True, "params": 0})
        grad = next((state[p][k] for k in GRADIENT_STATE if k in state.get(p, {})), None)
        part["params"] += 1
        if grad is not None:
            part["grad_sq"] += float(grad.double().square().sum())
            part["finite"] &= bool(torch.isfinite(grad).all())
        part["finite"] &= bool(torch.isfinite(p).all())
    return {k: {**v, "grad_norm": math.sqrt(v.pop("grad_sq"))} for k, v in parts.items()}


def train_one(out: Path, task: str, data: str, cfg: str) -> dict[str, Any]:
    """One epoch of one batch of `cfg`; returns the layout check, the step record, the epoch's loss items and the checkpoint."""
    record: dict[str, Any] = {"cfg": cfg}
    callbacks = Callbacks()

    def check_layout(trainer: Any, **_: Any) -> None:
        checked, failed = check_model(unwrap_model(trainer.model), trainer.opt.imgsz)
        record["layout"] = {"checked": checked, "failed": failed}

    def after_step(trainer: Any, ni: int, **_: Any) -> None:
        if ni == 0:
            record["parts"] = _step_record(trainer)

    def losses(trainer: Any, epoch: int, losses: torch.Tensor) -> None:
        record["losses"] = [float(x) for x in losses]

    def metrics(trainer: Any, epoch: int, results: Any) -> None:
        record["metrics"] = [float(x) for x in results]

    callbacks.register("on_train_start", check_layout)
    callbacks.register("on_train_batch_end", after_step)
    callbacks.register("on_train_epoch_end", losses)
    callbacks.register("on_fit_epoch_end", metrics)
    opt = train_options(task, cfg=cfg, data=data, epochs=1, imgsz=64, batch_size=2, workers=0, project=str(out),
                        name=Path(cfg).stem, exist_ok=True, noplots=True, noautoanchor=True, device="cpu")
    best = train_main(opt, callbacks, DistInfo())
    record["checkpoint"] = str(best) if Path(best).is_file() else ""
    if record["checkpoint"]:
        record["onnx"] = onnx_parity(Path(best))
    return record


def onnx_parity(weights: Path) -> dict[str, Any]:
    """Export the checkpoint to ONNX and run one batch of a real-looking image through both files' runtimes."""
    from utils.export.exporter import export_model
    from utils.runtime.backend import DetectBackend

    (onnx,) = export_model(weights=str(weights), include=("onnx",), imgsz=(64, 64), device="cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 64, generator=generator)
    backends = [DetectBackend(w, device=torch.device("cpu")) for w in (weights, onnx)]
    refs, gots = ([o] if isinstance(o, torch.Tensor) else list(o) for o in (b(x) for b in backends))
    match = len(refs) == len(gots) and all(r.shape == g.shape for r, g in zip(refs, gots))
    tol = rounding_tol(backends[0].model)  # float32, op order only
    head = head_class(backends[0].head_kind)  # ranked rows (final detections, RT-DETR's queries): rounding may reorder near-ties
    err_of = (lambda g, r: final_rows_error(g, r, tol)) if head.final_rows_output else query_set_error if head.nms_free else rel_err
    err = max((err_of(g, r) for r, g in zip(refs, gots)), default=0.0) if match else float("inf")
    return {"shapes_match": match, "max_err": err, "tol": tol}


def main(out: str, jobs: list[str]) -> None:
    """Train each TASK=DATA=CFG job in turn, printing progress and one RESULT line per job."""
    for job in jobs:
        task, data, cfg = job.split("=", 2)
        print(f"training {cfg}", flush=True)
        print("RESULT " + json.dumps(train_one(Path(out), task, data, cfg)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
