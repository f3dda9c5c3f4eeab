"""Training step time in the Trainer's memory layout against the contiguous layout, interleaved on one machine.

python -m scripts.layout_speed --cfg models/yolov5_mobilenetv4.yaml models/yolov5n_mobileone_s0.yaml --img 320 --batch 8
For each config, two Trainers (same seed, same data) differ only in the layout: utils.engine.memory_format's
(channels-last but for 1x1 strided convs) and plain contiguous memory. Each round times Trainer.train_step on the same
batch for both (best of --per-round, order alternating between rounds); reported are the median step time of each and
the median of the per-round ratios, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from utils.engine.options import train_options
from utils.engine.trainer import Trainer

LAYOUTS = ("training", "contiguous")


def make_trainer(cfg: str, layout: str, opt: argparse.Namespace, save_dir: Path) -> tuple[Trainer, tuple]:
    """A Trainer whose model (and EMA) is in `layout`, and one batch from its own loader in that layout."""
    topt = train_options(cfg=cfg, data=opt.data, imgsz=opt.img, batch_size=opt.batch, workers=0, epochs=100, noplots=True,
                         noautoanchor=True, save_dir=str(save_dir))
    trainer = Trainer(topt, torch.device("cpu"))  # built in the training layout
    if layout == "contiguous":
        for model in (trainer.model, trainer.ema.ema if trainer.ema else None):
            if model is not None:
                model.to(memory_format=torch.contiguous_format)
    trainer.warmup_iters, trainer.last_opt_step = -1, -1  # steady-state steps
    trainer.model.train()
    imgs, targets, _, _, *extras = next(iter(trainer.train_loader))
    x = imgs.float() / 255
    return trainer, (x if layout == "training" else x.contiguous(), targets, extras)


def step_ms(trainer: Trainer, batch: tuple) -> float:
    """Milliseconds of one real training step (forward, loss, backward, optimizer and EMA update)."""
    x, targets, extras = batch
    t0 = time.perf_counter()
    trainer.train_step(x, targets, ni=10_000, epoch=0, last=True, extras=extras)
    return (time.perf_counter() - t0) * 1e3


def compare(cfg: str, opt: argparse.Namespace) -> str:
    """One markdown row: median ms per layout and the median per-round ratio training / contiguous."""
    with tempfile.TemporaryDirectory(prefix="layout_speed_") as tmp:
        runs = {name: make_trainer(cfg, name, opt, Path(tmp) / name) for name in LAYOUTS}
        for trainer, batch in runs.values():
            step_ms(trainer, batch)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(opt.rounds):
            for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
                times[name].append(min(step_ms(*runs[name]) for _ in range(opt.per_round)))
    ratio = statistics.median(a / b for a, b in zip(times["training"], times["contiguous"]))
    ms = {name: statistics.median(t) for name, t in times.items()}
    return f"| {Path(cfg).stem} | {opt.img} | {opt.batch} | {ms['contiguous']:.0f} | {ms['training']:.0f} | {ratio:.3f} |"


def main(argv: list[str] | None = None) -> list[str]:
    """Print one markdown table over --cfg."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", nargs="+", default=["models/yolov5_mobilenetv4.yaml"])
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--per-round", type=int, default=2)
    opt = p.parse_args(argv)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {opt.rounds} interleaved rounds x best of {opt.per_round}",
             "", "| config | img | batch | contiguous ms | training layout ms | ratio |", "|---|---|---|---|---|---|"]
    lines += [compare(cfg, opt) for cfg in opt.cfg]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
