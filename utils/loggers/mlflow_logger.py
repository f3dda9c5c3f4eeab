"""MLflow: parameters, per-epoch metrics, plots and best.pt, in a local store under the project folder by default.

Without MLFLOW_TRACKING_URI the store is <project>/mlflow.db (SQLite: the local store MLflow 3 supports without a server;
its file store raises unless opted in) with artifacts in <project>/mlruns; nothing leaves the machine. MLflow's usage
telemetry is switched off unless MLFLOW_DISABLE_TELEMETRY or DO_NOT_TRACK is set.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from utils.cli import shell_command
from utils.loggers.base import RunInfo, RunLogger, flat_params, safe_name

LOGGER = logging.getLogger("mobile_yolo")
PARAMS_PER_CALL = 100  # MLflow's limit per log_batch
PARAM_CHARS = 500  # the value length every MLflow version and server accepts


def local_store(project_dir: Path) -> tuple[str, str]:
    """The default tracking URI (a SQLite file) and artifact root (a folder) under the project folder."""
    root = project_dir.resolve()
    return f"sqlite:///{quote((root / 'mlflow.db').as_posix(), safe='/')}", (root / "mlruns").as_uri()  # ? # % quoted


class MLflowLogger(RunLogger):
    """One MLflow run per training run: experiment = the project folder's name (or MLFLOW_EXPERIMENT_NAME), run = its name."""

    def __init__(self, run: RunInfo) -> None:
        if "DO_NOT_TRACK" not in os.environ:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is first imported
        from mlflow.tracking import MlflowClient

        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI", ""), None
        if not uri:
            uri, artifacts = local_store(run.project_dir)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.project_dir.resolve().name or "mobile-yolov5"
        self.run_id: str = self.client.create_run(self._experiment_id(experiment, artifacts), run_name=run.name).info.run_id
        where = f"view with {shell_command('mlflow', 'ui', '--backend-store-uri', uri)}" if artifacts else f"tracking at {uri}"
        LOGGER.info(f"MLflow: run {run.name} in experiment {experiment}; {where}")

    def _experiment_id(self, name: str, artifacts: str | None) -> str:
        """The experiment's id, created on first use (a run of the same project that created it meanwhile is fine)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name, artifact_location=artifacts))
        except Exception:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def log_params(self, params: dict[str, dict[str, Any]]) -> None:
        """hyp/<key> and opt/<key> as MLflow params (text, at most PARAM_CHARS long)."""
        from mlflow.entities import Param

        items = [Param(safe_name(k), str(v)[:PARAM_CHARS]) for k, v in flat_params(params).items()]
        for i in range(0, len(items), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_CALL])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """All of the epoch's metrics in one call, the epoch as step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(safe_name(k), v, now, epoch) for k, v in metrics.items()])

    def log_plots(self, files: Sequence[Path]) -> None:
        """Each plot under the run's artifacts, in plots/."""
        for path in files:
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def log_model(self, path: Path) -> None:
        """The checkpoint under the run's artifacts, in weights/."""
        self.client.log_artifact(self.run_id, str(path), artifact_path="weights")

    def close(self) -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id)
