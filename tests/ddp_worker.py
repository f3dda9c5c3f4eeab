"""Run under torchrun by tests/test_ddp.py: trains one tiny epoch and saves this rank's final parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import train
from utils.checkpoint import unwrap_model
from utils.engine.callbacks import Callbacks


def main(data: str, project: str, cfg: str) -> None:
    """Train with the given data yaml; each rank writes rank<N>.pt with its model parameters once the epoch loop ends."""
    callbacks = Callbacks()

    def save_params(trainer, epoch: int, losses) -> None:  # type: ignore[no-untyped-def]
        params = {k: v.detach().cpu() for k, v in unwrap_model(trainer.model).named_parameters()}
        torch.save(params, Path(project) / f"rank{trainer.dist.rank}.pt")

    callbacks.register("on_train_epoch_end", save_params)
    train.run(callbacks=callbacks, cfg=cfg, data=data, epochs=1, imgsz=64, batch_size=8, workers=0,
              project=project, name="ddp", exist_ok=True, noplots=True, noautoanchor=True, device="cpu")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
