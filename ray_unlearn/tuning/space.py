"""The search space of `ray-unlearn tune`: parse, check, convert, apply (no Ray here).

In the job YAML, `tune.space` maps a dotted config field to a distribution:

    tune:
      space:
        optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
        objective.terms.npo: {type: uniform, low: 0.5, high: 2.0}
        optim.hessian_interval: {type: int, low: 1, high: 20}       # optional log: true
        optim.name: {type: choice, values: [sophia, adamw]}
        objective.terms: {type: choice, values: [{npo: 1, retain_nll: 1}, {ga: 1, retain_nll: 1}]}

Any field of the job can be searched except `name`, `output_dir` and the `tune` section;
mappings and lists (`objective.terms`, `optim.betas`) only with `choice`, which replaces the
whole value. A field and a field inside it (`objective.terms` and `objective.terms.npo`) cannot
both be searched. Optuna's categorical distribution needs hashable values, so a choice with a
mapping or list among its values is encoded as JSON strings (`encode` / `decode`).

Everything is checked before Ray starts: unknown fields, empty choices, low >= high, and every
bound and choice is applied to the job and validated like a loaded config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any

from ray_unlearn.config import JobConfig, from_dict, to_dict
from ray_unlearn.errors import UnlearnError

PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "int": ("low", "high", "log"),
    "choice": ("values",),
}
NOT_SEARCHABLE = ("name", "output_dir", "tune")


@dataclass(frozen=True)
class Param:
    """One searched field: `path` (dotted), its distribution type and bounds or choices."""

    path: str
    type: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    values: tuple[Any, ...] = ()

    @property
    def encoded(self) -> bool:
        """Whether choices travel as JSON strings (some value is a mapping or a list)."""
        return self.type == "choice" and any(isinstance(v, (dict, list)) for v in self.values)

    def encode(self, value: Any) -> Any:
        """Config value -> the value Optuna and Tune carry."""
        return json.dumps(value, sort_keys=True) if self.encoded else value

    def decode(self, value: Any) -> Any:
        """The value Optuna and Tune carry -> config value."""
        return json.loads(value) if self.encoded else value

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna import distributions as d

        if self.type == "choice":
            return d.CategoricalDistribution([self.encode(v) for v in self.values])
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log)
        return d.FloatDistribution(self.low, self.high, log=self.type == "loguniform")

    def corners(self) -> list[Any]:
        """The values that bound the space: every choice, or low and high."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


# ---------------------------------------------------------------- parsing


def _number(key: str, value: Any, integer: bool = False) -> float:
    """A finite float (YAML may give 1e-5 as a string), or an int where `integer`."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UnlearnError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UnlearnError(f"{key}: expected a finite number, got {value!r}")
    if integer and value != int(value):
        raise UnlearnError(f"{key}: expected an integer, got {value!r}")
    return int(value) if integer else float(value)


def parse_param(path: str, spec: Any) -> Param:
    """One `tune.space` entry -> Param, or a one-line UnlearnError naming `tune.space.<path>`."""
    key = f"tune.space.{path}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise UnlearnError(f"{key}: expected {{type: loguniform|uniform|int|choice, ...}}, got {spec!r}; "
                           "write the field as one dotted key, e.g. optim.lr")
    kind = spec["type"]
    if kind not in PARAM_KEYS:
        raise UnlearnError(f"{key}.type: {kind!r} is not one of {', '.join(PARAM_KEYS)}")
    extra = sorted(set(spec) - {"type", *PARAM_KEYS[kind]})
    if extra:
        raise UnlearnError(f"{key}: unknown key(s) {', '.join(map(str, extra))} for type {kind} "
                           f"(valid: {', '.join(PARAM_KEYS[kind])})")
    if kind == "choice":
        return _parse_choice(key, path, spec)
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise UnlearnError(f"{key}: type {kind} needs {' and '.join(missing)}")
    low = _number(f"{key}.low", spec["low"], integer=kind == "int")
    high = _number(f"{key}.high", spec["high"], integer=kind == "int")
    if not low < high:
        raise UnlearnError(f"{key}: low ({low}) must be below high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UnlearnError(f"{key}.log: expected true or false, got {log!r}")
    if (kind == "loguniform" or log) and low <= 0:
        raise UnlearnError(f"{key}: a log scale needs low > 0, got {low}")
    return Param(path, kind, low=low, high=high, log=log)


def _parse_choice(key: str, path: str, spec: dict) -> Param:
    values = spec.get("values")
    if not isinstance(values, list) or not values:
        raise UnlearnError(f"{key}: type choice needs a non-empty list of values, got {values!r}")
    param = Param(path, "choice", values=tuple(values))
    encoded = [param.encode(v) for v in values]
    if len(set(map(repr, encoded))) != len(encoded):
        raise UnlearnError(f"{key}: values repeat: {values!r}")
    return param


def parse_space(space: dict[str, Any]) -> dict[str, Param]:
    """The `tune.space` mapping -> {path: Param}, checking shapes only (see `check_space`)."""
    params = {str(path): parse_param(str(path), spec) for path, spec in space.items()}
    paths = sorted(params)
    for a in paths:
        for b in paths:
            if b.startswith(a + "."):
                raise UnlearnError(f"tune.space.{b}: lies inside tune.space.{a}; search either the whole "
                                   f"{a} or fields inside it, not both")
    return params


# ---------------------------------------------------------------- fields of the job


def field_type(path: str) -> Any:
    """The declared type of dotted field `path` of JobConfig (mapping keys may be new names)."""
    key = f"tune.space.{path}"
    parts = path.split(".")
    if not path or "" in parts:
        raise UnlearnError(f"{key}: not a dotted config field")
    if parts[0] in NOT_SEARCHABLE:
        raise UnlearnError(f"{key}: {parts[0]} cannot be searched (not searchable: {', '.join(NOT_SEARCHABLE)})")
    tp: Any = JobConfig
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                section = ".".join(parts[:i]) or "the job"
                raise UnlearnError(f"{key}: unknown field {part!r} in {section} (valid: {', '.join(names)})")
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise UnlearnError(f"{key}: {'.'.join(parts[:i])} is a single value, it has no field {part!r}")
    if dataclasses.is_dataclass(tp):
        raise UnlearnError(f"{key}: {path} is a whole section; search the fields inside it, e.g. {path}."
                           f"{dataclasses.fields(tp)[0].name}")
    return tp


def _check_kind(param: Param, tp: Any) -> None:
    """Numeric distributions only on numeric fields; mappings and lists only with choice."""
    key = f"tune.space.{param.path}"
    if param.type == "choice":
        return
    if tp is not float and tp is not int:
        name = getattr(tp, "__name__", str(tp))
        raise UnlearnError(f"{key}: a {name} field can only be searched with type: choice")
    if tp is int and param.type != "int":
        raise UnlearnError(f"{key}: an int field; use type: int (with log: true for a log scale)")


def check_space(cfg: JobConfig) -> dict[str, Param]:
    """Parse `cfg.tune.space` and check it against the job, before anything runs.

    Every field must exist and take the distribution's values, and every bound and choice,
    applied alone to the job, must give a valid job (config checks plus the objective and
    optimizer registries). Raises UnlearnError naming `tune.space.<field>`.
    """
    if not cfg.tune.space:
        raise UnlearnError("tune.space: empty; add at least one field to search, e.g. "
                           "optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}")
    params = parse_space(cfg.tune.space)
    for param in params.values():
        _check_kind(param, field_type(param.path))
        for value in param.corners():
            try:
                _validate_job(apply_values(cfg, {param.path: value}))
            except UnlearnError as e:
                raise UnlearnError(f"tune.space.{param.path}: value {value!r} gives an invalid job: {e}") from None
    return params


def _validate_job(cfg: JobConfig) -> None:
    from ray_unlearn.pipeline import validate

    validate(cfg)


# ---------------------------------------------------------------- points


def optuna_space(params: dict[str, Param]) -> dict[str, Any]:
    """{path: Optuna distribution}, what OptunaSearch and `optuna.trial.create_trial` take."""
    return {path: p.distribution() for path, p in params.items()}


def decode_point(params: dict[str, Param], point: dict[str, Any]) -> dict[str, Any]:
    """A sampled point as Tune/Optuna carry it -> {path: config value} (only searched fields)."""
    missing = sorted(set(params) - set(point))
    if missing:
        raise UnlearnError(f"sampled point lacks searched field(s) {', '.join(missing)}")
    return {path: p.decode(point[path]) for path, p in params.items()}


def encode_point(params: dict[str, Param], values: dict[str, Any]) -> dict[str, Any]:
    """{path: config value} -> the point as Optuna carries it."""
    return {path: params[path].encode(values[path]) for path in params}


def apply_values(cfg: JobConfig, values: dict[str, Any]) -> JobConfig:
    """A new JobConfig with each dotted field set to its value (mappings replaced, not merged)."""
    data = to_dict(cfg)
    for path in sorted(values, key=lambda p: p.count(".")):
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = json.loads(json.dumps(values[path]))  # a copy: trials never share mutable values
    return from_dict(JobConfig, data)


def trial_job(cfg: JobConfig, params: dict[str, Param], point: dict[str, Any]) -> JobConfig:
    """The complete job of one trial: the base job with the sampled point applied."""
    return apply_values(cfg, decode_point(params, point))
