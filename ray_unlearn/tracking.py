"""Experiment tracking (the `tracking` config section): a run's training history and evaluation summaries
to MLflow and to TensorBoard event files. Ray-free; `ray_unlearn.tune` wires Ray Tune's own logger
callbacks (MLflowLoggerCallback, TBXLoggerCallback) to the same settings.

The driver logs once the work is done (`log_results`): the loop's history reaches it in the final
checkpoint whatever the worker count, so one writer, on the machine that holds the default store
(sqlite under output_dir), records rank 0's logged steps and every model's summary.
"""

from __future__ import annotations

import logging
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlparse

from ray_unlearn.config import JobConfig, to_dict
from ray_unlearn.errors import UnlearnError
from ray_unlearn.storage import is_remote

MLFLOW_DB = "mlflow.db"  # the default store's file under output_dir
TENSORBOARD_DIR = "tensorboard"
STORE_SCHEMES = ("sqlite", "file", "http", "https", "databricks", "postgresql", "mysql", "mssql")
PARAM_CHARS = 500  # a config value longer than this is cut (MLflow's limit is 6000)
BATCH = 100  # metrics and params per log_batch call (MLflow takes at most 1000 metrics and 100 params)


def tracking_uri(cfg: JobConfig, out: Path | None = None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<out or output_dir>/mlflow.db."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(out or cfg.output_dir).expanduser().resolve() / MLFLOW_DB).as_posix()}"


def experiment_name(cfg: JobConfig) -> str:
    return cfg.tracking.experiment or cfg.name


def check_tracking(cfg: JobConfig) -> None:
    """Before any work: the MLflow store's scheme is one MLflow knows, a local store can be written and a
    server answers (one-line UnlearnError otherwise). Nothing is written."""
    if not cfg.tracking.mlflow:
        return
    uri = tracking_uri(cfg)
    scheme = store_scheme(uri)
    if scheme not in (*STORE_SCHEMES, ""):
        raise UnlearnError(f"tracking.uri: {uri!r} is not an MLflow tracking URI (schemes: "
                           f"{', '.join(STORE_SCHEMES)}); e.g. sqlite:///runs/mlflow.db, or empty for "
                           "sqlite:///<output_dir>/mlflow.db")
    default_in_bucket = not cfg.tracking.uri and uri.endswith(MLFLOW_DB) and is_remote(cfg.output_dir)
    if scheme in ("sqlite", "file", "") and not default_in_bucket:  # that one is uploaded with the run's files
        _check_local_store(uri, _local_path(uri, scheme))
    elif scheme in ("http", "https"):
        _check_server(uri)


def store_scheme(uri: str) -> str:
    """The URI's scheme, lower case; "" for a plain path (a file store)."""
    return "databricks" if uri == "databricks" else urlparse(uri).scheme.lower()


def allow_file_store(uri: str) -> None:
    """MLflow 3 refuses its file store (maintenance mode) unless MLFLOW_ALLOW_FILE_STORE is set: a file: URI or
    plain path in tracking.uri asks for it."""
    if store_scheme(uri) in ("file", ""):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _local_path(uri: str, scheme: str) -> Path:
    """The file (sqlite) or directory (file store, plain path) a local store lives in."""
    if scheme == "sqlite":
        return Path(unquote(uri.split("://", 1)[1]).removeprefix("/"))  # sqlite:///rel, sqlite:////abs
    return Path(unquote(urlparse(uri).path) if scheme == "file" else uri).expanduser()


def _check_local_store(uri: str, path: Path) -> None:
    where = path.absolute()
    existing = next(p for p in (where, *where.parents) if p.exists())
    if existing.is_file() and existing != where:
        raise UnlearnError(f"tracking.uri: {uri} lies under the file {existing}; give a path in a directory")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise UnlearnError(f"tracking.uri: cannot write the MLflow store {uri} ({existing} is not writable); "
                           "give a writable location")


def _check_server(uri: str) -> None:
    """An MLflow server answers /health (its liveness endpoint) within 5 s."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            return
    except urllib.error.HTTPError as e:
        raise UnlearnError(f"tracking.uri: {uri} answered /health with HTTP {e.code}; is it an MLflow server?") \
            from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UnlearnError(f"tracking.uri: cannot reach the MLflow server {uri} ({reason}); start it or fix the "
                           "URI") from None


def log_results(cfg: JobConfig, out: Path, run_name: str, history: Sequence[dict[str, float]],
                summaries: dict[str, dict[str, float]], tags: dict[str, str] | None = None) -> str | None:
    """Log `history` (one entry per logged step, with its "step") and `summaries` (by model name, at the last
    step) as cfg.tracking asks: an MLflow run (returned: its id) and TensorBoard scalars under <out>/tensorboard."""
    step = int(history[-1]["step"]) if history and "step" in history[-1] else 0
    if cfg.tracking.tensorboard:
        write_tensorboard(out / TENSORBOARD_DIR, history, summaries, step)
    if not cfg.tracking.mlflow:
        return None
    return log_mlflow(tracking_uri(cfg, out), experiment_name(cfg), run_name, flat_params(to_dict(cfg)),
                      history, summaries, step, tags or {})


def scalars(history: Sequence[dict[str, Any]], summaries: dict[str, dict[str, Any]],
            last_step: int) -> list[tuple[str, float, int]]:
    """(name, value, step) of every finite number: train/<key> per history step, eval/<model>/<metric> at
    `last_step`."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    found = [(f"train/{k}", float(v), int(h["step"])) for h in history for k, v in h.items()
             if k != "step" and finite(v) and "step" in h]
    found += [(f"eval/{model}/{k}", float(v), last_step) for model, s in summaries.items() for k, v in s.items()
              if finite(v)]
    return found


def write_tensorboard(logdir: Path, history: Sequence[dict[str, Any]], summaries: dict[str, dict[str, Any]],
                      last_step: int) -> None:
    """The scalars as TensorBoard event files in `logdir` (tensorboardX)."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(logdir))
    try:
        for name, value, step in scalars(history, summaries, last_step):
            writer.add_scalar(name, value, step)
    finally:
        writer.close()


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as text (cut at PARAM_CHARS)."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)[:PARAM_CHARS]
    return params


def log_mlflow(uri: str, experiment: str, run_name: str, params: dict[str, str], history: Sequence[dict[str, Any]],
               summaries: dict[str, dict[str, Any]], last_step: int, tags: dict[str, str]) -> str:
    """One finished MLflow run in `experiment` (created when missing) of the store at `uri`; returns its id."""
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # the sqlite store's first use logs its table migrations at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    allow_file_store(uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, step) for name, value, step in scalars(history, summaries, last_step)]
    param_list = [Param(k, v) for k, v in params.items()]
    try:
        for i in range(0, max(len(metrics), len(param_list)), BATCH):
            client.log_batch(run.info.run_id, metrics=metrics[i:i + BATCH], params=param_list[i:i + BATCH])
    except Exception:
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id
