"""End to end on the micro benchmark: a Ray Tune + Optuna search of full Ray Train runs, its
outputs, and resuming it with a larger budget (only the missing trial runs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest

pytestmark = pytest.mark.slow

SPACE = ("tune.space={optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}, "
         "objective.terms: {type: choice, values: [{npo: 1, retain_nll: 1}, {ga: 1, retain_nll: 1}]}}")


def search(micro_config, num_samples: int):
    return micro_config(SPACE, "name=search", f"tune.num_samples={num_samples}", "ray.num_workers=0",
                        "train.max_steps=10", "train.eval_every=5", "optim.hessian=empirical",
                        "eval.max_items=8", "eval.max_new_tokens=8", "tune.scheduler=asha")


def test_search_writes_the_front_and_resumes(micro_bench, micro_config, ray_session):
    from ray_unlearn.config import load_config
    from ray_unlearn.tune import run_tune

    cfg = search(micro_config, 2)
    first = run_tune(cfg)
    root = Path(cfg.output_dir).resolve() / "tune"
    assert len(first.rows) == 2 and first.front
    for row in first.rows:  # evaluated during training (ASHA may stop a trial after its first evaluation)
        assert row.status in ("TERMINATED", "STOPPED"), row.error
        assert row.step == (10 if row.status == "TERMINATED" else 5)
        assert {"extraction_strength", "model_utility", "forget_quality"} <= set(row.metrics)

    for name in ("trials.csv", "pareto.csv", "pareto.md", "pareto.png", "study.db", "reference.json"):
        assert (root / name).is_file(), name
    assert (root / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(csv.DictReader((root / "pareto.csv").open()))) == len(first.front)
    reference = json.loads((root / "reference.json").read_text())["summaries"]
    assert reference["target"]["extraction_strength"] > reference["retain"]["extraction_strength"]

    for row in first.front:  # each member is a complete job `ray-unlearn run` accepts, with that trial's values
        job = load_config(root / "front" / f"{row.trial_id}.yaml")
        assert job.optim.lr == row.values["optim.lr"]
        assert job.objective.terms == {k: float(v) for k, v in row.values["objective.terms"].items()}
        assert job.ray.num_workers == 0 and job.benchmark.size == "micro"

    # resume with a larger budget: the two finished trials are kept, one new trial runs
    again = run_tune(search(micro_config, 3))
    before = {r.trial_id: r for r in first.rows}
    assert len(again.rows) == 3
    kept = [r for r in again.rows if r.trial_id in before]
    assert len(kept) == 2 and all(r.metrics == before[r.trial_id].metrics for r in kept)
    assert len(list((root / "trials").iterdir())) == 3  # one Ray Train run per trial, none repeated

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{root / 'study.db'}")
    assert len(study.trials) == 3
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.best_trials) == \
        sorted(r.trial_id for r in again.front)


def test_a_stopped_trial_frees_its_train_workers(micro_bench, micro_config, ray_session, tmp_path):
    """Stopping a trial (what ASHA does) kills its Train controller; its workers' placement group
    must be freed or, on 2 CPUs, the next trial waits forever. Tune's stop criterion stops every
    trial at its first evaluation, as deterministically as ASHA stopping a bad one."""
    from ray import tune
    from ray.util.placement_group import placement_group_table

    from ray_unlearn.config import to_dict
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.tune import _FreeStoppedTrials, _search, _trial, trial_rows
    from ray_unlearn.tuning.space import check_space

    cfg = search(micro_config, 2)
    params, inputs, root = check_space(cfg), resolve_inputs(cfg), tmp_path / "tune"
    trainable = tune.with_resources(tune.with_parameters(_trial, base=to_dict(cfg), inputs=inputs, references=None,
                                                         root=str(root)), {"cpu": 0.1})
    grid = tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=_search(cfg, params), num_samples=2),
                      run_config=tune.RunConfig(name="stopped", storage_path=str(root / "ray"),
                                                stop={"training_iteration": 1},
                                                callbacks=[_FreeStoppedTrials(root)])).fit()
    rows = trial_rows(grid, params, cfg.train.max_steps)
    assert [r.status for r in rows] == ["STOPPED", "STOPPED"] and [r.step for r in rows] == [5, 5]
    live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"
            and pg["bundles"] == {0: {"CPU": 1.0}}]
    assert live == []


def _ray_processes() -> tuple[int, float, int]:
    """(Ray worker processes on this machine, their total RSS in MiB, PlacementGroupCleaner actors among them)."""
    import psutil

    count, rss, cleaners = 0, 0.0, 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::"):
            count += 1
            rss += proc.info["memory_info"].rss / 2**20 if proc.info["memory_info"] else 0.0
            cleaners += "PlacementGroupCleaner" in cmd
    return count, rss, cleaners


def test_trials_release_what_they_held(micro_bench, micro_config, ray_session, monkeypatch):
    """Issue 6 (d): a search whose Ray processes and their memory stay flat after the first trials (each
    finished trial once left its Ray Train placement-group cleaner, ~200 MB, alive until the whole search
    ended). Sampled by the driver as each trial completes. 4 trials (each ~20 s of mostly Ray Train
    start-up and shutdown): a leak of one process per trial shows as +2 between the 2nd and the 4th."""
    import time

    from ray_unlearn import tune as tune_module
    from ray_unlearn.tune import run_tune

    samples: list[tuple[int, float, int]] = []
    complete = tune_module._FreeStoppedTrials.on_trial_complete

    def sample_after(self, *args, **kwargs):
        complete(self, *args, **kwargs)
        time.sleep(1.0)  # the trial's controller and workers exit as it completes
        samples.append(_ray_processes())

    monkeypatch.setattr(tune_module._FreeStoppedTrials, "on_trial_complete", sample_after)
    cfg = micro_config("tune.space={optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}}", "name=flat",
                       "tune.num_samples=4", "ray.num_workers=1", "train.max_steps=1", "optim.hessian=empirical",
                       "eval.max_items=4", "eval.max_new_tokens=2")
    outputs = run_tune(cfg)
    print("after each trial (ray processes, their RSS MiB, placement-group cleaners):", samples)
    assert len(outputs.rows) == 4 and len(samples) == 4
    (count2, rss2, cleaners2), (count4, rss4, cleaners4) = samples[1], samples[-1]
    assert count4 <= count2 + 1, samples
    assert rss4 <= 1.2 * rss2 + 100, samples
    assert cleaners4 <= cleaners2, samples  # (earlier tests' killed runs may have left some: no more than that)
