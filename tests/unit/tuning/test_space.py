"""The search space: parsing, checks against the job (one-line errors naming the field), Optuna
distributions, JSON-encoded choices, and applying a sampled point to a job."""

from __future__ import annotations

import optuna
import pytest

from ray_unlearn.config import load_config
from ray_unlearn.errors import UnlearnError
from ray_unlearn.tuning.space import (Param, apply_values, check_space, decode_point, encode_point, field_type,
                                      optuna_space, parse_param, parse_space, trial_job)

TERMS = [{"npo": 1, "retain_nll": 1}, {"ga": 1, "retain_nll": 1}]
SPACE = {
    "optim.lr": {"type": "loguniform", "low": "1e-5", "high": 1e-3},  # YAML 1.1 reads 1e-5 as a string
    "objective.terms.retain_nll": {"type": "uniform", "low": 0.5, "high": 2},
    "optim.name": {"type": "choice", "values": ["sophia", "adamw"]},
    "optim.hessian_interval": {"type": "int", "low": 1, "high": 20},
    "objective.npo_beta": {"type": "loguniform", "low": 0.05, "high": 1.0},
}


def job(space: dict, *overrides: str):
    cfg = load_config(None, list(overrides))
    cfg.tune.space = space
    return cfg


def error_of(space: dict, *overrides: str) -> str:
    with pytest.raises(UnlearnError) as info:
        check_space(job(space, *overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_parse_gives_the_optuna_distributions():
    params = check_space(job(SPACE))
    dists = optuna_space(params)
    assert dists["optim.lr"] == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    assert dists["objective.terms.retain_nll"] == optuna.distributions.FloatDistribution(0.5, 2.0)
    assert dists["optim.name"] == optuna.distributions.CategoricalDistribution(["sophia", "adamw"])
    assert dists["optim.hessian_interval"] == optuna.distributions.IntDistribution(1, 20)


def test_int_with_log_scale():
    p = parse_param("train.max_steps", {"type": "int", "low": 10, "high": 100, "log": True})
    assert p.distribution() == optuna.distributions.IntDistribution(10, 100, log=True)


@pytest.mark.parametrize("space, needle", [
    ({"optim.lrr": {"type": "uniform", "low": 0, "high": 1}}, "tune.space.optim.lrr: unknown field 'lrr' in optim"),
    ({"optimizer.lr": {"type": "uniform", "low": 0, "high": 1}}, "tune.space.optimizer.lr: unknown field 'optimizer'"),
    ({"optim.name": {"type": "choice", "values": []}}, "tune.space.optim.name: type choice needs a non-empty list"),
    ({"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-5}}, "tune.space.optim.lr: low (0.001) must be below"),
    ({"optim.lr": {"type": "uniform", "low": 1e-3, "high": 1e-3}}, "tune.space.optim.lr: low (0.001) must be below"),
    ({"optim.lr": {"type": "loguniform", "low": 0, "high": 1e-3}}, "tune.space.optim.lr: a log scale needs low > 0"),
    ({"optim.lr": {"type": "normal", "low": 0, "high": 1}}, "tune.space.optim.lr.type: 'normal' is not one of"),
    ({"optim.lr": {"type": "uniform", "low": 0}}, "tune.space.optim.lr: type uniform needs high"),
    ({"optim.lr": {"type": "uniform", "low": 0, "high": 1, "step": 2}}, "tune.space.optim.lr: unknown key(s) step"),
    ({"optim.lr": {"type": "uniform", "low": "x", "high": 1}}, "tune.space.optim.lr.low: expected a number"),
    ({"optim.lr": 1e-4}, "tune.space.optim.lr: expected {type:"),
    ({"optim": {"lr": {"type": "uniform", "low": 0, "high": 1}}}, "tune.space.optim: expected {type:"),
    ({"optim": {"type": "choice", "values": [1, 2]}}, "tune.space.optim: optim is a whole section"),
    ({"optim.lr.x": {"type": "uniform", "low": 0, "high": 1}}, "optim.lr is a single value, it has no field 'x'"),
    ({"name": {"type": "choice", "values": ["a", "b"]}}, "tune.space.name: name cannot be searched"),
    ({"tune.num_samples": {"type": "int", "low": 1, "high": 3}}, "tune.space.tune.num_samples: tune cannot be"),
    ({"train.max_steps": {"type": "uniform", "low": 1, "high": 3}}, "an int field; use type: int"),
    ({"train.max_steps": {"type": "int", "low": 1.5, "high": 3}}, "tune.space.train.max_steps.low: expected an integ"),
    ({"objective.terms": {"type": "uniform", "low": 0, "high": 1}}, "a dict field can only be searched with type: ch"),
    ({"optim.name": {"type": "choice", "values": ["sophia", "adam"]}},
     "tune.space.optim.name: value 'adam' gives an invalid job: optim.name: unknown optimizer 'adam'"),
    ({"optim.hessian": {"type": "choice", "values": ["gnb", "newton"]}},
     "tune.space.optim.hessian: value 'newton' gives an invalid job: optim.hessian: 'newton' is not one of"),
    ({"optim.lr": {"type": "uniform", "low": -1, "high": 1}}, "value -1.0 gives an invalid job: optim.lr: must be > 0"),
    ({"objective.terms.foo": {"type": "uniform", "low": 0, "high": 1}}, "tune.space.objective.terms.foo: value 0.0 "
                                                                        "gives an invalid job"),
    ({"objective.terms": {"type": "choice", "values": [{"npo": 1}, {"npo": 1}]}}, "values repeat"),
    ({"objective.terms": {"type": "choice", "values": TERMS}, "objective.terms.npo": {"type": "uniform", "low": 0,
                                                                                       "high": 1}},
     "tune.space.objective.terms.npo: lies inside tune.space.objective.terms"),
    ({}, "tune.space: empty"),
])
def test_bad_space_is_a_one_line_error_naming_the_field(space, needle):
    assert needle in error_of(space)


def test_field_types():
    assert field_type("optim.lr") is float
    assert field_type("objective.terms.npo") is float
    assert field_type("train.max_steps") is int
    assert field_type("optim.name") is str


def test_dict_choices_travel_as_json_strings():
    params = parse_space({"objective.terms": {"type": "choice", "values": TERMS},
                          "optim.name": {"type": "choice", "values": ["sophia", "adamw"]}})
    terms, name = params["objective.terms"], params["optim.name"]
    assert terms.encoded and not name.encoded
    assert terms.distribution().choices == ('{"npo": 1, "retain_nll": 1}', '{"ga": 1, "retain_nll": 1}')
    point = encode_point(params, {"objective.terms": TERMS[1], "optim.name": "adamw"})
    assert point == {"objective.terms": '{"ga": 1, "retain_nll": 1}', "optim.name": "adamw"}
    assert decode_point(params, point) == {"objective.terms": TERMS[1], "optim.name": "adamw"}


def test_a_chosen_mapping_replaces_the_whole_value():
    base = load_config(None, [])
    assert set(base.objective.terms) == {"npo", "retain_nll"}
    cfg = apply_values(base, {"objective.terms": {"ga": 1, "retain_nll": 2}})
    assert cfg.objective.terms == {"ga": 1.0, "retain_nll": 2.0}
    assert base.objective.terms == {"npo": 1.0, "retain_nll": 2.0}  # the base job is not modified


def test_trial_job_applies_the_sampled_point():
    base = job(SPACE)
    params = check_space(base)
    cfg = trial_job(base, params, {"optim.lr": 3e-4, "objective.terms.retain_nll": 1.5, "optim.name": "adamw",
                                   "optim.hessian_interval": 7, "objective.npo_beta": 0.2})
    assert (cfg.optim.lr, cfg.optim.name, cfg.optim.hessian_interval) == (3e-4, "adamw", 7)
    assert cfg.objective.terms == {"npo": 1.0, "retain_nll": 1.5}
    assert cfg.objective.npo_beta == 0.2
    assert cfg.train == base.train


def test_point_missing_a_field_is_an_error():
    params = parse_space({"optim.lr": SPACE["optim.lr"]})
    with pytest.raises(UnlearnError, match="optim.lr"):
        decode_point(params, {})


def test_corners():
    assert Param("x", "int", low=1, high=5).corners() == [1, 5]
    assert Param("x", "choice", values=("a", "b")).corners() == ["a", "b"]


def test_space_from_a_yaml_override():
    cfg = load_config(None, ["tune.space={optim.lr: {type: loguniform, low: 1e-5, high: 1e-3}}"])
    assert check_space(cfg)["optim.lr"].low == 1e-5
