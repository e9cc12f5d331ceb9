"""`ray-unlearn tune` refuses bad input with one line before Ray starts; the tune config section;
the pieces of the Tune glue that need no running Ray (scheduler, resumable budget, trial scaling)."""

from __future__ import annotations

import pytest
import yaml

from ray_unlearn.cli import main
from ray_unlearn.config import dump_config, load_config
from ray_unlearn.errors import UnlearnError

LR = {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}


@pytest.fixture
def no_ray(monkeypatch):
    """Make starting Ray, or resolving the job's data, fail the test."""
    import ray

    import ray_unlearn.train
    import ray_unlearn.tune

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started (or data resolved) before the input was checked")

    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(ray_unlearn.train, "init_ray", forbidden)
    monkeypatch.setattr(ray_unlearn.tune, "resolve_inputs", forbidden)
    return ray_unlearn.tune


def job(tmp_path, space=None, *overrides):
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", "name=s", *overrides])
    cfg.tune.space = LR if space is None else space
    return cfg


@pytest.mark.parametrize("space, overrides, needle", [
    ({"optim.lrr": {"type": "uniform", "low": 0, "high": 1}}, [], "tune.space.optim.lrr: unknown field"),
    ({"optim.name": {"type": "choice", "values": []}}, [], "tune.space.optim.name: type choice needs a non-empty"),
    ({"optim.lr": {"type": "uniform", "low": 1, "high": 0.1}}, [], "tune.space.optim.lr: low (1.0) must be below"),
    (LR, ["tune.metrics={extraction_strenght: min}"], "tune.metrics.extraction_strenght: not a metric"),
    (LR, ["tune.scheduler=asha"], "tune.scheduler=asha compares trials during training: set train.eval_every"),
])
def test_bad_search_fails_before_ray_starts(no_ray, tmp_path, space, overrides, needle):
    with pytest.raises(UnlearnError) as info:
        no_ray.run_tune(job(tmp_path, space, *overrides))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_prints_one_line_and_exits_2(no_ray, tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "tune": {"space": {"optim.lrr": LR["optim.lr"]}}}))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tune.space.optim.lrr: unknown field 'lrr' in optim") and err.count("\n") == 1


@pytest.mark.parametrize("overrides, needle", [
    (["tune.metrics={extraction_strength: lowest}"], "tune.metrics.extraction_strength: 'lowest' is not one of"),
    (["tune.metrics={}"], "tune.metrics: needs at least one metric"),
    (["tune.num_samples=0"], "tune.num_samples: must be > 0"),
    (["tune.scheduler=hyperband"], "tune.scheduler: 'hyperband' is not one of none, asha"),
    (["tune.scheduler_metric=forget_quality"], "tune.scheduler_metric: 'forget_quality' is not one of tune.metrics"),
    (["tune.reduction_factor=1"], "tune.reduction_factor: must be > 1"),
    (["tune.cpus_per_trial=0"], "tune.cpus_per_trial: must be > 0"),
    (["train.eval_every=-1"], "train.eval_every: must be >= 0"),
    (["tune.spaces={}"], "unknown config key tune.spaces"),
])
def test_tune_section_is_checked_on_load(overrides, needle):
    with pytest.raises(UnlearnError) as info:
        load_config(None, overrides)
    assert needle in str(info.value)


def test_resume_refuses_other_settings_but_lets_num_samples_grow(tmp_path):
    from ray_unlearn.tune import check_resume

    root = tmp_path / "out" / "tune"
    (root / "ray" / "s").mkdir(parents=True)
    dump_config(job(tmp_path), root / "search.yaml")
    check_resume(job(tmp_path, None, "tune.num_samples=20"), root)
    with pytest.raises(UnlearnError, match=r"other settings \(optim.rho, tune.space.optim.lr.high differ\)"):
        check_resume(job(tmp_path, {"optim.lr": {**LR["optim.lr"], "high": 1e-2}}, "optim.rho=0.1"), root)


def test_scheduler_counts_evaluations():
    from ray_unlearn.tune import _scheduler
    from ray_unlearn.tuning.space import check_space

    cfg = load_config(None, ["tune.scheduler=asha", "train.max_steps=25", "train.eval_every=10",
                             "tune.metrics={model_utility: max, extraction_strength: min}"])
    cfg.tune.space = LR
    asha = _scheduler(cfg, check_space(cfg))
    assert (asha.metric, asha._max_t, asha._time_attr) == ("model_utility", 3, "training_iteration")
    assert asha._mode == "max"
    cfg.tune.scheduler_metric = "extraction_strength"
    cfg.tune.space = {**LR, "train.max_steps": {"type": "int", "low": 10, "high": 60}}
    asha = _scheduler(cfg, check_space(cfg))
    assert (asha.metric, asha._mode, asha._max_t) == ("extraction_strength", "min", 6)
    cfg.tune.scheduler = "none"
    assert _scheduler(cfg, check_space(cfg)) is None


def test_resumed_search_takes_the_budget_of_the_current_run():
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from ray_unlearn.tune import _GrowableSearch

    search = _GrowableSearch(ConcurrencyLimiter(OptunaSearch(), max_concurrent=1), "grow-test")
    state = {"counter": 2, "total_samples": 2, "finished": True, "experiment": None}
    _GrowableSearch.budgets["grow-test"] = 3
    search.set_state(dict(state))
    assert (search.total_samples, search.is_finished()) == (3, False)
    _GrowableSearch.budgets["grow-test"] = 1  # asking for fewer runs nothing new
    search.set_state(dict(state))
    assert (search.total_samples, search.is_finished()) == (2, True)


def test_trials_run_at_least_one_worker():
    from ray_unlearn.tune import trial_scaling

    cfg = load_config(None, ["ray.num_workers=0"])
    assert trial_scaling(cfg).ray.num_workers == 1 and cfg.ray.num_workers == 0
    two = load_config(None, ["ray.num_workers=2"])
    assert trial_scaling(two) is two


def test_known_metrics_cover_the_suite_summary():
    from ray_unlearn.tune import known_metrics

    for name in ("extraction_strength", "forget_quality", "model_utility", "exact_memorization",
                 "retain_extraction_strength", "forget_truth_ratio", "wf_Q_A_Prob_normalised", "retain_Truth_Ratio"):
        assert name in known_metrics()


def test_concurrent_trials_must_fit_the_cluster(monkeypatch):
    import ray

    from ray_unlearn.tune import check_trial_fits

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    check_trial_fits(load_config(None, ["ray.num_workers=1", "tune.max_concurrent_trials=1"]))
    check_trial_fits(load_config(None, ["ray.num_workers=0"]))  # trials run one worker: 1.1 CPUs
    with pytest.raises(UnlearnError, match=r"2 concurrent trial\(s\) x 1.1 CPUs .* need 2.2 CPUs but the cluster "
                                           r"has 2; lower tune.max_concurrent_trials or ray.num_workers"):
        check_trial_fits(load_config(None, ["ray.num_workers=1", "tune.max_concurrent_trials=2"]))
    with pytest.raises(UnlearnError, match="need 2.1 CPUs"):
        check_trial_fits(load_config(None, ["ray.num_workers=2"]))
