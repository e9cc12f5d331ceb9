"""Experiment tracking (ray_unlearn/tracking.py): a run's history and summaries in MLflow (read back with
MLflow's client from the local store) and in TensorBoard event files (read back with a TFRecord parser on
tensorboardX's protobufs); bad stores refused before any work. No Ray: `ray_unlearn.train` is replaced by
a stand-in whose `fit` runs the real loop in this process (what ray.num_workers=0 runs)."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import types
from types import SimpleNamespace
from pathlib import Path

import pytest

from ray_unlearn.cli import main
from ray_unlearn.config import load_config
from ray_unlearn.tracking import flat_params, scalars, tracking_uri

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def loop_in_process(monkeypatch, tmp_path):
    """ray_unlearn.train whose fit runs the unlearning loop here and hands over its last checkpoint."""
    from ray_unlearn.loop import LoopEnv, Unlearner, load_run

    fake = types.ModuleType("ray_unlearn.train")

    def fit(cfg, inputs, into):
        model, ref, data, tokenizer = load_run(cfg, inputs)
        Unlearner(cfg, model, ref, data, tokenizer.pad_token_id, LoopEnv(checkpoint_dir=tmp_path / "ckpt")).run()
        shutil.copytree(tmp_path / "ckpt" / f"step-{cfg.train.max_steps:06d}", into, dirs_exist_ok=True)

    fake.fit, fake.init_ray, fake.check_resume = fit, lambda cfg: None, lambda cfg: None
    monkeypatch.setitem(sys.modules, "ray_unlearn.train", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def read_events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every scalar in the TFRecord event files under `logdir` (length, crc, record,
    crc per entry)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                found.setdefault(v.tag, []).append((event.step, v.simple_value))
    return found


def test_run_logs_history_and_summaries_to_mlflow_and_tensorboard(capsys, bench_cache, micro_bench, tmp_path,
                                                                   loop_in_process):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    args = ["run", "benchmark.size=micro", f"benchmark.cache_dir={bench_cache}", "ray.num_workers=0",
            f"output_dir={out}", "train.max_steps=2", "train.log_every=1", "train.batch_size=2", "eval.max_items=2",
            "eval.mia=[min_k]", "tracking.mlflow=true", "tracking.tensorboard=true", "tracking.experiment=unlearning",
            "name=ticket-7"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    summaries = {name: json.loads((out / "eval" / ("" if name == "unlearned" else name) / f"{bench}_SUMMARY.json")
                                  .read_text()) for name in ("unlearned", "target", "retain")
                 for bench in [next((out / "eval").glob("*_SUMMARY.json")).name.removesuffix("_SUMMARY.json")]}
    assert [h["step"] for h in history] == [1, 2]

    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    assert f"in experiment 'unlearning' of {uri}" in printed.replace("\n", "")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("unlearning").experiment_id])
    assert run.info.run_name == "ticket-7" and run.info.status == "FINISHED"
    assert run.data.params["optim.name"] == "sophia" and run.data.params["train.max_steps"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss/total")
    assert [(m.step, m.value) for m in losses] == [(h["step"], pytest.approx(h["loss/total"])) for h in history]
    for name, summary in summaries.items():
        for key in ("extraction_strength", "mia_min_k"):
            assert run.data.metrics[f"eval/{name}/{key}"] == pytest.approx(summary[key]), (name, key)
    assert run.data.metrics["eval/unlearned/privleak"] == pytest.approx(summaries["unlearned"]["privleak"])

    mia = (out / "report.md").read_text().split("## Membership inference (forget = members, holdout = non-members)")[1]
    mia = mia.split("\n## ")[0]
    min_k_row = next(line for line in mia.splitlines() if line.startswith("| Min-K: "))
    for name in ("unlearned", "target", "retain"):
        assert f" {summaries[name]['mia_min_k']:.4f} |" in min_k_row, (name, min_k_row)
    for name in ("", "target/", "retain/"):
        roc = f"eval/{name}{next((out / 'eval').glob('*_MIA_ROC.png')).name}"
        assert f"![{roc}]({roc})" in mia and (out / roc).is_file()

    events = read_events(out / "tensorboard")
    assert events["train/loss/total"] == [(h["step"], pytest.approx(h["loss/total"], rel=1e-6)) for h in history]
    assert events["eval/target/extraction_strength"] == [(2, pytest.approx(summaries["target"]["extraction_strength"],
                                                                            rel=1e-6))]


@pytest.mark.parametrize("uri, says", [
    ("foo://x/y", "'foo://x/y' is not an MLflow tracking URI (schemes: sqlite, file"),
    ("sqlite:///{tmp}/afile/m.db", "lies under the file {tmp}/afile; give a path in a directory"),
    ("http://127.0.0.1:9", "cannot reach the MLflow server http://127.0.0.1:9"),
])
def test_bad_store_is_one_line_before_any_work(capsys, tmp_path, uri, says, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "out"
    rc = main(["run", "benchmark.size=micro", f"benchmark.cache_dir={tmp_path / 'cache'}", f"output_dir={out}",
               "tracking.mlflow=true", f"tracking.uri={uri.format(tmp=tmp_path)}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says.format(tmp=tmp_path) in err[0], err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_default_store_is_sqlite_under_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"output_dir={tmp_path / 'o'}"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'o' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri(cfg) == "http://mlflow:5000"
    assert tracking_uri(load_config(None, ["tracking.uri=sqlite:///x.db"])) == "sqlite:///x.db"


def test_scalars_and_params_by_hand():
    history = [{"step": 1, "loss": 2.0, "nll/forget": float("nan")}, {"step": 2, "loss": 1.5, "lr": 1e-3}]
    assert scalars(history, {"target": {"es": 0.9, "note": "x"}}, 2) == [
        ("train/loss", 2.0, 1), ("train/loss", 1.5, 2), ("train/lr", 1e-3, 2), ("eval/target/es", 0.9, 2)]
    assert flat_params({"a": {"b": 1, "c": {}}, "d": "x" * 600}) == {"a.b": "1", "a.c": "{}", "d": "x" * 500}


def test_tune_wires_rays_logger_callbacks(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    from ray_unlearn.tune import tracking_callbacks

    assert tracking_callbacks(load_config(None, [])) == []
    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.mlflow=true", "tracking.tensorboard=true",
                             "name=search1"])
    mlflow_cb, tbx_cb = tracking_callbacks(cfg)
    assert isinstance(mlflow_cb, MLflowLoggerCallback) and isinstance(tbx_cb, TBXLoggerCallback)
    assert mlflow_cb.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and mlflow_cb.experiment_name == "search1"


def test_tunes_mlflow_callback_logs_a_run_per_trial(tmp_path, monkeypatch):
    """Ray's MLflowLoggerCallback as tracking_callbacks wires it, driven as Tune drives it (a file: store here:
    the sqlite one's first use costs seconds of migrations, covered by the run test)."""
    from mlflow.tracking import MlflowClient

    from ray_unlearn.tune import tracking_callbacks

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    (callback,) = tracking_callbacks(load_config(None, ["tracking.mlflow=true", f"tracking.uri={uri}", "name=s1"]))
    class Trial:  # what the callback reads of a Tune Trial
        config = {"optim.lr": 1e-4}

        def __str__(self) -> str:
            return "trial_1"

    trial = Trial()
    callback.setup()
    callback.log_trial_start(trial)
    for i, (step, es) in enumerate([(10, 0.7), (20, 0.4)]):
        callback.log_trial_result(i + 1, trial, {"training_iteration": i + 1, "timesteps_total": step,
                                                 "extraction_strength": es})
    callback.log_trial_end(trial)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("s1").experiment_id])
    assert run.info.run_name == "trial_1" and run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.0001"}
    history = client.get_metric_history(run.info.run_id, "extraction_strength")
    assert [(m.step, m.value) for m in history] == [(10, 0.7), (20, 0.4)]


def test_trial_reports_carry_the_loop_step_as_timesteps_total():
    """Tune's MLflow/TBX loggers log a result at its timesteps_total: the trial's evaluations at their loop step."""
    from ray_unlearn.tune import _EvalReports

    queued = []
    callback = object.__new__(_EvalReports)  # outside a Tune session: its queue stood in by a list
    callback.metrics, callback._training_actor_item_queue = ["extraction_strength"], SimpleNamespace(put=queued.append)
    callback.after_report(None, [{"step": 5, "loss/total": 1.0}], None)  # no evaluation in it: not forwarded
    callback.after_report(None, [{"step": 10, "extraction_strength": 0.4}], None)
    assert queued == [{"step": 10, "extraction_strength": 0.4, "timesteps_total": 10}]


def test_a_store_failing_after_the_work_is_a_warning(tmp_path, capsys, monkeypatch):
    """Checked before any work, the store could still fail at the end (a server gone): the run's files are
    complete, so it warns instead of failing the run (and its bucket upload)."""
    import ray_unlearn.tracking
    from ray_unlearn.pipeline import track

    def broken(*args, **kwargs):
        raise RuntimeError("API request to http://mlflow:5000 failed\nretries exhausted")

    monkeypatch.setattr(ray_unlearn.tracking, "log_results", broken)
    track(load_config(None, ["tracking.mlflow=true"]), tmp_path, "r", [], {}, {})
    assert "warning: experiment tracking failed (API request to http://mlflow:5000 failed); the run's files are " \
           "complete" in capsys.readouterr().out.replace("\n", "")
