"""Experiment loggers (utils.loggers): a tiny training run with TensorBoard, MLflow and W&B on, each read back from what it
wrote (offline: local stores only); a logger that raises is switched off with one warning and the run's results stay the
same; a missing package is one hint line; MOBILE_YOLO_LOGGERS_OFF switches loggers off."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import ipaddress
import json
import logging
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_shapes_yaml
from utils.engine.callbacks import Callbacks
from utils.engine.options import train_options
from utils.engine.trainer import DistInfo, Trainer
from utils.loggers import registry
from utils.loggers.base import RunLogger
from utils.loggers.mlflow_logger import local_store
from utils.loggers.registry import LOGGERS, OFF_ENV, LoggerError, LoggerSpec, attach_loggers, switched_off

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")  # SQLAlchemy options MLflow's store uses
USER_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _train(data: Path, save_dir: Path) -> Path:
    """Two epochs of one batch each at 64 px, validated (with plots) at the end only."""
    opt = train_options(cfg="models/yolov5n.yaml", data=str(data), epochs=2, imgsz=64, batch_size=8, workers=0, noval=True,
                        noautoanchor=True, save_dir=str(save_dir))
    return Trainer(opt, torch.device("cpu"), DistInfo()).fit()


def _csv(save_dir: Path) -> list[dict[str, float]]:
    """results.csv rows by column name."""
    lines = (save_dir / "results.csv").read_text().splitlines()
    header = [c.strip() for c in lines[0].split(",")]
    return [dict(zip(header, (float(v) for v in ln.split(",")))) for ln in lines[1:]]


def _no_network(mp: pytest.MonkeyPatch) -> list[Any]:
    """Refuse (and record) any socket connection that leaves the machine; local sockets (W&B's service) still work."""
    refused: list[Any] = []
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                local = ipaddress.ip_address(address[0]).is_loopback
            except ValueError:
                local = address[0] == "localhost"
            if not local:
                refused.append(address)
                raise OSError(f"test: network access to {address} refused")
        return connect(sock, address)

    mp.setattr(socket.socket, "connect", guarded)
    return refused


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shapes_yaml(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=2, seed=3)


class Run(types.SimpleNamespace):
    """The shared logged run: its folder, the log lines it wrote and the fake loggers' calls."""

    save_dir: Path
    lines: list[tuple[int, str]]
    calls: dict[str, list]


class _Lines(logging.Handler):
    def __init__(self, lines: list[tuple[int, str]]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One training run with every installed logger on (defaults only, W&B's own folders kept in the temporary folder)
    beside three fake ones: one that fails to start, one that fails at its first epoch, one that records its calls."""
    root = tmp_path_factory.mktemp("logged")
    calls: dict[str, list] = {}
    lines: list[tuple[int, str]] = []
    handler, log = _Lines(lines), logging.getLogger("mobile_yolo")
    with pytest.MonkeyPatch.context() as mp:
        for name in USER_ENV:
            mp.delenv(name, raising=False)
        mp.setenv(OFF_ENV, "")
        for name, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
            mp.setenv(name, str(root / "wandb-home" / sub))
        mp.setattr(registry, "LOGGERS", (*LOGGERS, *_specs(calls)))
        refused, level = _no_network(mp), log.level
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            _train(data, root / "project" / "exp")
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
        assert refused == []
        yield Run(save_dir=root / "project" / "exp", lines=lines, calls=calls)
        if _installed("wandb"):
            import wandb

            wandb.teardown()  # stop W&B's service process, started with this fixture's folders


def _plots(save_dir: Path) -> list[str]:
    return sorted(p.stem for p in save_dir.iterdir() if p.suffix in (".png", ".jpg"))


def test_run_writes_the_plots_the_loggers_log(run: Run) -> None:
    assert {"results", "confusion_matrix", "labels", "train_batch0"} <= set(_plots(run.save_dir))
    assert [row["epoch"] for row in _csv(run.save_dir)] == [0, 1]


@pytest.mark.skipif(not _installed("tensorboard"), reason="tensorboard not installed (requirements-loggers.txt)")
def test_tensorboard_event_file_holds_scalars_params_and_plots(run: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.save_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    rows = _csv(run.save_dir)
    assert set(events.Tags()["scalars"]) == set(rows[0]) - {"epoch"}
    for column in ("train/box_loss", "metrics/mAP_0.5:0.95", "val/obj_loss", "x/lr0"):
        logged = [(e.step, e.value) for e in events.Scalars(column)]
        assert logged == [(int(r["epoch"]), pytest.approx(r[column], rel=1e-6)) for r in rows]
    assert {f"plots/{p}" for p in _plots(run.save_dir)} == set(events.Tags()["images"])
    text = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "| lr0 | 0.01 |" in text["hyp/text_summary"] and "| epochs | 2 |" in text["opt/text_summary"]
    assert text["weights/text_summary"] == str(run.save_dir / "weights" / "best.pt")


@pytest.mark.skipif(not _installed("mlflow", "sqlalchemy", "alembic"), reason="mlflow (with sqlalchemy, alembic) not installed")
def test_mlflow_local_store_holds_params_metrics_plots_and_best(run: Run, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri, artifacts = local_store(run.save_dir.parent)
    assert (run.save_dir.parent / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("project")
    assert experiment is not None and experiment.artifact_location == artifacts
    (found,) = client.search_runs([experiment.experiment_id])
    run_id, params = found.info.run_id, found.data.params
    assert (found.info.run_name, found.info.status) == ("exp", "FINISHED")
    assert params["hyp/lr0"] == "0.01" and params["opt/epochs"] == "2" and params["opt/imgsz"] == "64"
    rows = _csv(run.save_dir)
    for column, key in (("train/box_loss", "train/box_loss"), ("metrics/mAP_0.5:0.95", "metrics/mAP_0.5_0.95"), ("x/lr2", "x/lr2")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(int(r["epoch"]), pytest.approx(r[column], rel=1e-6)) for r in rows]
    plots = sorted(Path(a.path).stem for a in client.list_artifacts(run_id, "plots"))
    assert plots == _plots(run.save_dir)
    best = client.download_artifacts(run_id, "weights/best.pt", str(tmp_path))
    assert Path(best).read_bytes() == (run.save_dir / "weights" / "best.pt").read_bytes()


def _wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file: a W&B header (7 bytes), then LevelDB-log chunks in 32 KiB blocks, each chunk
    checksum (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last), data."""
    from wandb.proto import wandb_internal_pb2

    raw, block, records, pending = path.read_bytes(), 32768, [], b""
    assert raw[:4] == b":W&B"
    pos = 7
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        size, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if kind == 0:
            break
        pending += raw[pos + 7 : pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items: Any) -> dict[str, Any]:
    """W&B key/value_json items as {"a/b.c": value} (nested keys joined with dots)."""
    return {".".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in items}


@pytest.mark.skipif(not _installed("wandb"), reason="wandb not installed (requirements-loggers.txt)")
def test_wandb_offline_run_holds_config_history_plots_and_best(run: Run) -> None:
    (run_dir,) = (run.save_dir / "wandb").glob("offline-run-*")
    records = _wandb_records(next(run_dir.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    (record,) = [r.run for r, k in zip(records, kinds) if k == "run"]
    assert (record.display_name, record.project) == ("exp", "project")
    config: dict[str, Any] = {}
    for r, k in zip(records, kinds):
        if k == "config":
            config.update(_items(r.config.update))
    assert config["hyp"]["lr0"] == 0.01 and config["opt"]["epochs"] == 2 and config["opt"]["imgsz"] == 64
    history = [_items(r.history.item) for r, k in zip(records, kinds) if k == "history"]
    rows = _csv(run.save_dir)
    assert [h["_step"] for h in history] == [0, 1]
    for h, row in zip(history, rows):
        assert {c: h[c] for c in row if c != "epoch"} == {c: pytest.approx(v, rel=1e-6) for c, v in row.items() if c != "epoch"}
    images = {k.split(".")[0] for k in history[-1] if k.startswith("plots/")}
    assert images == {f"plots/{p}" for p in _plots(run.save_dir)}
    assert all((run_dir / "files" / history[-1][f"{k}.path"]).is_file() for k in images)
    (artifact,) = [r.artifact for r, k in zip(records, kinds) if k == "artifact"]
    digest = base64.b64encode(hashlib.md5((run.save_dir / "weights" / "best.pt").read_bytes()).digest()).decode()
    assert artifact.type == "model" and [(c.path, c.digest) for c in artifact.manifest.contents] == [("best.pt", digest)]


class Recorder(RunLogger):
    """A logger that records its calls; `fail` names the method that raises (at its first call)."""

    def __init__(self, calls: list[tuple[str, Any]], fail: str = "") -> None:
        self.calls, self.fail = calls, fail
        if fail == "__init__":
            raise RuntimeError("cannot reach the tracking store")

    def _record(self, name: str, value: Any) -> None:
        self.calls.append((name, value))
        if name == self.fail:
            raise RuntimeError(f"{name} failed")

    def log_params(self, params: dict[str, dict[str, Any]]) -> None:
        self._record("log_params", sorted(params))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._record("log_epoch", (epoch, metrics["train/box_loss"]))

    def log_plots(self, files: Any) -> None:
        self._record("log_plots", [p.stem for p in files])

    def log_model(self, path: Path) -> None:
        self._record("log_model", path.name)

    def close(self) -> None:
        self._record("close", None)


def _specs(calls: dict[str, list]) -> tuple[LoggerSpec, ...]:
    """Three fake loggers: one that fails to start, one that fails at its first epoch, one that works."""
    return tuple(
        LoggerSpec(key, key.title(), lambda: (), lambda run, key=key, fail=fail: Recorder(calls.setdefault(key, []), fail))
        for key, fail in (("broken", "__init__"), ("flaky", "log_epoch"), ("good", ""))
    )


def test_failing_loggers_are_switched_off_with_one_warning_each(run: Run) -> None:
    warnings = [msg for level, msg in run.lines if level >= logging.WARNING and "logging off" in msg]
    assert warnings == ["WARNING: Broken logging off after an error at start: RuntimeError: cannot reach the tracking store",
                        "WARNING: Flaky logging off after an error at epoch 0: RuntimeError: log_epoch failed"]
    rows = _csv(run.save_dir)
    assert run.calls["broken"] == []
    assert run.calls["flaky"] == [("log_params", ["hyp", "opt"]), ("log_epoch", (0, rows[0]["train/box_loss"])), ("close", None)]
    assert run.calls["good"] == [
        ("log_params", ["hyp", "opt"]), *[("log_epoch", (int(r["epoch"]), r["train/box_loss"])) for r in rows],
        ("log_plots", _plots(run.save_dir)), ("log_model", "best.pt"), ("close", None),
    ]


def test_results_are_the_same_without_loggers(run: Run, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The logged run (with two loggers failing) trained exactly like a run with every logger switched off."""
    monkeypatch.setenv(OFF_ENV, "all")
    best = _train(data, tmp_path / "project" / "exp")
    assert best.is_file() and _csv(tmp_path / "project" / "exp") == _csv(run.save_dir)
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["exp"]  # no MLflow store
    assert not [p for p in (tmp_path / "project" / "exp").iterdir() if p.name == "wandb" or p.name.startswith("events.")]


def _fake_trainer(save_dir: Path) -> Any:
    save_dir.mkdir(parents=True)
    (save_dir / "results.csv").write_text("epoch,train/box_loss\n0,0.5\n")
    return types.SimpleNamespace(save_dir=str(save_dir), hyp=types.SimpleNamespace(as_dict=lambda: {"lr0": 0.01}),
                                 options_record=lambda: {"epochs": 1})


def test_missing_packages_give_one_hint_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    for module in ("tensorboard", "mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(OFF_ENV, "")
    trainer, cb = _fake_trainer(tmp_path / "exp"), Callbacks()
    loggers = attach_loggers(cb, trainer, LOGGERS)  # the real three (the shared run's fixture adds fakes)
    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        cb.run("on_train_start", trainer=trainer)
        cb.run("on_fit_epoch_end", trainer=trainer, epoch=0, results=())
        cb.run("on_train_end", trainer=trainer, best=tmp_path / "exp" / "best.pt")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and loggers.active == [] and all(r.levelno == logging.INFO for r in caplog.records)
    for name, module in (("TensorBoard", "tensorboard"), ("MLflow", "mlflow"), ("Weights & Biases", "wandb")):
        (line,) = [ln for ln in lines if ln.startswith(f"{name}: off")]
        assert module in line and "requirements-loggers.txt" in line and f"{OFF_ENV}=" in line and "\n" not in line


def test_switch_turns_loggers_off_and_rejects_unknown_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    calls: dict[str, list] = {}
    specs = _specs(calls)
    assert switched_off(specs, "flaky, broken") == {"flaky", "broken"} and switched_off(specs, "ALL") == {"broken", "flaky", "good"}
    assert switched_off(specs, "") == set()
    known = "known: broken, flaky, good, all"
    with pytest.raises(LoggerError, match=f"^environment variable {OFF_ENV}: unknown logger 'tensorbord'; {known}$"):
        switched_off(specs, "good,tensorbord")
    monkeypatch.setenv(OFF_ENV, "broken flaky")
    trainer, other, cb = _fake_trainer(tmp_path / "exp"), _fake_trainer(tmp_path / "other"), Callbacks()
    attach_loggers(cb, trainer, specs)
    with caplog.at_level(logging.INFO, logger="mobile_yolo"):
        for who in (other, trainer):  # another trainer sharing the callbacks object is not logged
            cb.run("on_train_start", trainer=who)
            cb.run("on_fit_epoch_end", trainer=who, epoch=0, results=())
            cb.run("on_train_end", trainer=who, best=tmp_path / "exp" / "missing.pt")
    assert calls == {"good": [("log_params", ["hyp", "opt"]), ("log_epoch", (0, 0.5)), ("log_plots", []), ("close", None)]}
    assert caplog.records == []


def test_unreadable_results_row_skips_the_epoch_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    calls: dict[str, list] = {}
    monkeypatch.setenv(OFF_ENV, "broken,flaky")
    trainer, cb = _fake_trainer(tmp_path / "exp"), Callbacks()
    loggers = attach_loggers(cb, trainer, _specs(calls))
    cb.run("on_train_start", trainer=trainer)
    with caplog.at_level(logging.WARNING, logger="mobile_yolo"):
        cb.run("on_fit_epoch_end", trainer=trainer, epoch=3, results=())  # results.csv's last row is epoch 0's
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("WARNING: loggers: epoch 3 not logged") and "results.csv" in line
    assert [name for name, _ in loggers.active] == ["Good"] and calls["good"] == [("log_params", ["hyp", "opt"])]


@pytest.mark.skipif(not _installed("mlflow"), reason="mlflow not installed (requirements-loggers.txt)")
def test_mlflow_tracking_uri_replaces_the_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from utils.loggers.base import RunInfo
    from utils.loggers.mlflow_logger import MLflowLogger

    store = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the quick store for this test; the default is SQLite
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    refused = _no_network(monkeypatch)
    logger = MLflowLogger(RunInfo(tmp_path / "project" / "exp"))
    logger.log_epoch(0, {"metrics/mAP_0.5:0.95": 0.25})
    logger.close()
    experiment = MlflowClient(tracking_uri=store).get_experiment_by_name("mine")
    assert experiment is not None and refused == [] and not (tmp_path / "project").exists()
    (found,) = MlflowClient(tracking_uri=store).search_runs([experiment.experiment_id])
    assert found.info.run_name == "exp" and found.data.metrics == {"metrics/mAP_0.5_0.95": 0.25}


@pytest.mark.skipif(not _installed("wandb"), reason="wandb not installed (requirements-loggers.txt)")
def test_wandb_online_without_credentials_refuses_instead_of_prompting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.loggers.base import RunInfo
    from utils.loggers.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "online")
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no stored credentials either
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name))
    refused = _no_network(monkeypatch)
    with pytest.raises(RuntimeError, match=r"^WANDB_MODE=online needs credentials: run `wandb login` or set WANDB_API_KEY$"):
        WandbLogger(RunInfo(tmp_path / "project" / "exp"))
    assert refused == [] and not (tmp_path / "project").exists()
