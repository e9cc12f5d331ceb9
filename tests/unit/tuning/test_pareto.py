"""Pareto front and outputs of a search: hand-checked dominance and ranks, agreement with Optuna's
`study.best_trials`, tables, plot, and front members exported as jobs `ray-unlearn run` loads."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import optuna
import pytest

from ray_unlearn.config import TuneConfig, load_config
from ray_unlearn.tuning.pareto import (TrialRow, dominates, front_job, nondominated_ranks, pareto_front,
                                       write_outputs, write_study)
from ray_unlearn.tuning.space import check_space, parse_space

METRICS = {"extraction_strength": "min", "model_utility": "max"}
TERMS = [{"npo": 1, "retain_nll": 1}, {"ga": 1, "retain_nll": 1}]
SPACE = {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
         "objective.terms": {"type": "choice", "values": TERMS}}


def row(trial_id: str, es: float, mu: float, lr: float = 1e-4, terms: int = 0, **kw) -> TrialRow:
    return TrialRow(trial_id, {"optim.lr": lr, "objective.terms": TERMS[terms]},
                    {"extraction_strength": es, "model_utility": mu, "forget_quality": 0.5}, step=10, **kw)


# A (0.2, 0.7) and its duplicate E are not dominated; B (0.5, 0.9) trades ES for utility;
# C (0.3, 0.6) is dominated by A; D (0.6, 0.8) by B; F errored; G has no finite ES.
ROWS = [row("a", 0.2, 0.7), row("b", 0.5, 0.9, terms=1), row("c", 0.3, 0.6), row("d", 0.6, 0.8),
        row("e", 0.2, 0.7, lr=2e-4), row("f", 0.0, 1.0, status="ERROR", error="boom"), row("g", math.nan, 1.0)]


def test_dominates_by_hand():
    modes = ["min", "max"]
    assert dominates([0.2, 0.7], [0.3, 0.6], modes)
    assert dominates([0.2, 0.7], [0.2, 0.6], modes)       # equal on one, better on the other
    assert not dominates([0.2, 0.7], [0.2, 0.7], modes)   # equal points do not dominate each other
    assert not dominates([0.2, 0.7], [0.5, 0.9], modes)   # a trade-off
    assert dominates([0.5, 0.9], [0.6, 0.8], modes)


def test_nondominated_ranks_by_hand():
    points = [[0.2, 0.7], [0.5, 0.9], [0.3, 0.6], [0.6, 0.8], [0.2, 0.7], [0.7, 0.5]]
    # front 0: both (0.2, 0.7) and (0.5, 0.9); front 1: (0.3, 0.6), (0.6, 0.8); (0.7, 0.5) is below (0.3, 0.6)
    assert nondominated_ranks(points, ["min", "max"]) == [0, 0, 1, 1, 0, 2]


def test_front_skips_errored_and_non_finite_trials_and_keeps_ties():
    front = pareto_front(ROWS, METRICS)
    assert [r.trial_id for r in front] == ["a", "e", "b"]  # best ES first


def test_stopped_trials_count_but_errored_do_not():
    stopped = row("s", 0.1, 0.65, status="STOPPED")
    assert [r.trial_id for r in pareto_front([*ROWS, stopped], METRICS)] == ["s", "a", "e", "b"]


def _study_front(rows, metrics, params, tmp_path: Path) -> list[str]:
    path = write_study(rows, params, metrics, tmp_path / "study.db", "s")
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{path}")
    return sorted(t.user_attrs["ray_trial_id"] for t in study.best_trials)


@pytest.mark.parametrize("seed", range(6))
def test_front_agrees_with_optuna_best_trials(seed, tmp_path):
    rnd = random.Random(seed)
    names = ["extraction_strength", "model_utility", "forget_quality"][: 1 + seed % 3]
    metrics = {m: rnd.choice(["min", "max"]) for m in names}
    params = parse_space({"optim.lr": SPACE["optim.lr"]})
    rows = []
    for i in range(25):
        values = {m: round(rnd.random(), 1) for m in names}  # coarse values: ties and duplicates happen
        if i % 9 == 8:
            values[names[0]] = math.nan
        rows.append(TrialRow(f"t{i:02d}", {"optim.lr": 1e-4}, values, step=5,
                             status="ERROR" if i % 11 == 10 else "TERMINATED"))
    ours = sorted(r.trial_id for r in pareto_front(rows, metrics))
    assert ours and ours == _study_front(rows, metrics, params, tmp_path)


def test_study_holds_every_trial_with_its_params(tmp_path):
    params = parse_space(SPACE)
    path = write_study(ROWS, params, METRICS, tmp_path / "study.db", "soul")
    study = optuna.load_study(study_name="soul", storage=f"sqlite:///{path}")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert set(by_id) == {r.trial_id for r in ROWS}
    assert by_id["b"].values == [0.5, 0.9]
    assert by_id["b"].params == {"optim.lr": 1e-4, "objective.terms": '{"ga": 1, "retain_nll": 1}'}
    assert by_id["f"].state == optuna.trial.TrialState.FAIL and by_id["g"].state == optuna.trial.TrialState.FAIL
    assert by_id["a"].user_attrs["forget_quality"] == 0.5
    write_study(ROWS[:2], params, METRICS, path, "soul")  # rewriting replaces the study
    assert len(optuna.load_study(study_name="soul", storage=f"sqlite:///{path}").trials) == 2


def base_job(tmp_path: Path):
    cfg = load_config(None, ["name=search", f"output_dir={tmp_path / 'out'}", "optim.name=adamw"])
    cfg.tune.space = SPACE
    return cfg


def test_front_job_is_a_complete_job_with_the_trial_values(tmp_path):
    base = base_job(tmp_path)
    cfg = front_job(base, ROWS[1])
    assert (cfg.name, cfg.output_dir) == ("search-b", str(tmp_path / "out" / "tune" / "front" / "b"))
    assert cfg.objective.terms == {"ga": 1.0, "retain_nll": 1.0} and cfg.optim.lr == 1e-4
    assert cfg.optim.name == "adamw" and cfg.tune == TuneConfig()
    stopped = front_job(base, row("s", 0.1, 0.5, status="STOPPED"))
    assert stopped.train.max_steps == 10  # a trial stopped early is reproduced at the step it was evaluated


def test_write_outputs(tmp_path):
    base = base_job(tmp_path)
    params = check_space(base)
    root = tmp_path / "out" / "tune"
    refs = {"target": {"extraction_strength": 1.0, "model_utility": 0.72},
            "retain": {"extraction_strength": 0.18, "model_utility": 0.68}}
    out = write_outputs(base, params, ROWS, root, refs)
    assert [r.trial_id for r in out.front] == ["a", "e", "b"]
    assert set(out.files) == {"trials.csv", "pareto.csv", "pareto.md", "pareto.png", "study.db",
                              "front/a.yaml", "front/e.yaml", "front/b.yaml"}
    assert (root / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    trials = list(csv.DictReader((root / "trials.csv").open()))
    assert [t["trial_id"] for t in trials] == list("abcdefg")
    assert [t["front_rank"] for t in trials] == ["0", "0", "1", "1", "0", "", ""]
    front = list(csv.DictReader((root / "pareto.csv").open()))
    assert [t["trial_id"] for t in front] == ["a", "e", "b"]
    assert front[2]["objective.terms"] == '{"ga":1,"retain_nll":1}' and front[2]["extraction_strength"] == "0.5"
    md = (root / "pareto.md").read_text().splitlines()
    assert md[2].startswith("| trial_id | front_rank | status | step | optim.lr | objective.terms | "
                            "extraction_strength | model_utility | forget_quality |")
    assert len([ln for ln in md if ln.startswith("| ")]) == 2 + 3

    for r in out.front:  # every front member is a job `ray-unlearn run` loads, with that trial's values
        cfg = load_config(root / "front" / f"{r.trial_id}.yaml")
        assert cfg.optim.lr == r.values["optim.lr"]
        assert cfg.objective.terms == {k: float(v) for k, v in r.values["objective.terms"].items()}
        assert cfg.name == f"search-{r.trial_id}" and not cfg.tune.space

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{root / 'study.db'}")
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.best_trials) == ["a", "b", "e"]

    write_outputs(base, params, ROWS[1:], root, refs)  # a later front without a: its job file goes
    assert sorted(p.name for p in (root / "front").glob("*.yaml")) == ["b.yaml", "e.yaml"]


def test_single_metric_plot_and_front(tmp_path):
    base = base_job(tmp_path)
    base.tune.metrics = {"model_utility": "max"}
    out = write_outputs(base, check_space(base), ROWS, tmp_path / "t")
    assert [r.trial_id for r in out.front] == ["g"]  # only utility is searched: g's NaN ES does not matter
    assert (tmp_path / "t" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_no_complete_trial_writes_tables_without_a_plot(tmp_path):
    base = base_job(tmp_path)
    out = write_outputs(base, check_space(base), [ROWS[5]], tmp_path / "t")
    assert out.front == [] and "pareto.png" not in out.files
    assert (tmp_path / "t" / "trials.csv").read_text().count("\n") == 2
