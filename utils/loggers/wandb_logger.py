"""Weights & Biases: config, per-epoch history, plots and best.pt; offline under the run folder unless WANDB_MODE is set.

Offline is the default (WANDB_MODE=online opts in to syncing); a run never prompts for a login: online without credentials
switches the logger off with one warning. `wandb sync <run>/wandb/offline-run-*` uploads an offline
run later. W&B's error reporting is off unless WANDB_ERROR_REPORTING is set; system-metrics sampling, git and code
capture are off so nothing runs beside training.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from utils.loggers.base import RunInfo, RunLogger, plain

LOGGER = logging.getLogger("mobile_yolo")

# Quiet, local and cheap: no console capture, no system-metrics sampler (it may probe cloud metadata), no git or code
# snapshot, and a new run even if the process has one open (its own run is never taken over). Keys this wandb version
# does not know are dropped.
SETTINGS = {
    "silent": True, "console": "off", "save_code": False, "disable_git": True, "disable_job_creation": True,
    "x_disable_stats": True, "x_disable_machine_info": True, "x_save_requirements": False, "reinit": "create_new",
}  # fmt: skip


def wandb_settings(wandb: Any) -> Any:
    """wandb.Settings with the SETTINGS keys this wandb version knows."""
    known = getattr(wandb.Settings, "model_fields", None)
    return wandb.Settings(**{k: v for k, v in SETTINGS.items() if known is None or k in known})


def project_name(run: RunInfo) -> str:
    """WANDB_PROJECT, else the project folder's name with the characters W&B refuses replaced."""
    return os.environ.get("WANDB_PROJECT") or re.sub(r"[^\w.\-]", "_", run.project_dir.resolve().name) or "mobile-yolov5"


class WandbLogger(RunLogger):
    """One W&B run per training run, written under <run>/wandb."""

    def __init__(self, run: RunInfo) -> None:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # read when wandb starts its service process
        import wandb

        user_mode = os.environ.get("WANDB_MODE", "")  # the user's choice wins; unset means offline
        offline = user_mode in ("", "offline", "dryrun")
        if not offline and user_mode != "disabled" and not wandb.login(prompt=False, verify=False):  # never a prompt
            raise RuntimeError(f"WANDB_MODE={user_mode} needs credentials: run `wandb login` or set WANDB_API_KEY")
        self.wandb = wandb
        self.step = 0
        self.run = wandb.init(project=project_name(run), name=run.name, dir=str(run.save_dir),
                              mode=None if user_mode else "offline",
                              settings=wandb_settings(wandb))
        where = f"offline in {run.save_dir / 'wandb'} (upload later with `wandb sync`)" if offline else f"mode {user_mode}"
        LOGGER.info(f"Weights & Biases: run {run.name}, {where}")

    def log_params(self, params: dict[str, dict[str, Any]]) -> None:
        """The config: {"hyp": {...}, "opt": {...}}."""
        self.run.config.update({g: {k: plain(v) for k, v in values.items()} for g, values in params.items()}, allow_val_change=True)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One history row, the epoch as step."""
        self.run.log(dict(metrics), step=epoch)
        self.step = epoch

    def log_plots(self, files: Sequence[Path]) -> None:
        """The plots as images in the last epoch's history row (W&B copies them into the run folder)."""
        if files:
            self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p), caption=p.name) for p in files}, step=self.step)

    def log_model(self, path: Path) -> None:
        """The checkpoint as a model artifact, referenced in place (no copy into W&B's staging folder)."""
        artifact = self.wandb.Artifact(f"run_{self.run.id}_model", type="model")
        artifact.add_file(str(path), name=path.name, policy="immutable")
        self.run.log_artifact(artifact, aliases=["best"])

    def close(self) -> None:
        """Finish the run (an offline run's data is complete on disk after this)."""
        self.run.finish()
