"""Run under torchrun by tests/test_ddp.py: trains one tiny epoch and saves this rank's final parameters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import train
from utils.checkpoint import unwrap_model


def main(data: str, project: str) -> None:
    """Train with the given data yaml; each rank writes rank<N>.pt with its model parameters."""
    finish = train._finish

    def save_then_finish(run: dict, opt, t0: float, epochs_done: int):  # type: ignore[no-untyped-def]
        params = {k: v.detach().cpu() for k, v in unwrap_model(run["model"]).named_parameters()}
        torch.save(params, Path(project) / f"rank{os.environ['RANK']}.pt")
        return finish(run, opt, t0, epochs_done)

    train._finish = save_then_finish
    train.run(cfg="models/yolov5n.yaml", data=data, epochs=1, imgsz=64, batch_size=8, workers=0, project=project, name="ddp",
              exist_ok=True, noplots=True, noautoanchor=True, device="cpu")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
