"""Ray Tune glue: a multi-objective Optuna search over unlearning runs (`ray-unlearn tune JOB.yaml`).

Each trial is a driver function (`_trial`, 0.1 CPU by default: it only waits) that builds and
fits one Ray Train `TorchTrainer` running the whole unlearning loop with the trial's values.
The loop evaluates the model every `train.eval_every` steps and at the end (on rank 0), and
`_EvalReports` forwards those evaluation reports to Tune, so ASHA can stop bad trials early and
Optuna gets the final metrics. A job with `ray.num_workers: 0` runs its trials with one worker
(Ray Train's local mode cannot report to Tune).

Before Ray starts: the search space and metrics are checked, the benchmark is resolved, and the
reference models (target, retain) are evaluated once; the retain model's forget truth ratios go
to every trial for forget quality. After the search: `tuning.pareto.write_outputs`.

Resume: run again with the same `name` and `output_dir`. The Tune experiment
(<output_dir>/tune/ray/<name>) is restored: finished trials are kept, unfinished and errored
ones run again (their Ray Train run resumes from its latest checkpoint when
`train.checkpoint_every` is set), and when `tune.num_samples` is larger than before, only the
missing trials run. Any other change to the job is refused (use a new name).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune import RunConfig as TuneRunConfig
from ray.tune import TuneConfig as RayTuneConfig
from ray.tune import Tuner
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import TIMESTEPS_TOTAL
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from ray_unlearn import storage
from ray_unlearn.config import JobConfig, dump_config, from_dict, load_config, to_dict
from ray_unlearn.errors import UnlearnError
from ray_unlearn.job import JobInputs, resolve_inputs
from ray_unlearn.tracking import allow_file_store, check_tracking, experiment_name, tracking_uri
from ray_unlearn.tuning.pareto import SearchOutputs, TrialRow, write_outputs
from ray_unlearn.tuning.space import Param, check_space, decode_point, optuna_space, parse_space, trial_job


def run_tune(cfg: JobConfig) -> SearchOutputs:
    """Search `cfg.tune.space` for the trade-off of `cfg.tune.metrics`; write the outputs, return them."""
    from ray_unlearn.job import load_checked
    from ray_unlearn.loop import check_objective_fits
    from ray_unlearn.objectives import build_objective
    from ray_unlearn.pipeline import console, progress_reporter
    from ray_unlearn.train import init_ray

    params = check_search(cfg)
    check_tracking(cfg)
    root = Path(cfg.output_dir).resolve() / "tune"
    check_resume(cfg, root)
    with progress_reporter() as report:
        inputs = resolve_inputs(cfg, report)
    check_objective_fits(build_objective(cfg.objective), load_checked(cfg, inputs, meta=True)[0])
    check_calibrated_metrics(cfg, inputs)
    init_ray(trial_scaling(cfg))
    check_trial_fits(cfg)
    references, retain_refs = reference_summaries(cfg, inputs, root)
    check_metrics_available(cfg, references["target"], bool(inputs.retain_model_path))
    console.print(f"searching {len(params)} field(s) over {cfg.tune.num_samples} trials for "
                  f"{', '.join(f'{m} ({d})' for m, d in cfg.tune.metrics.items())}")
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "search.yaml")
    grid = make_tuner(cfg, params, inputs, retain_refs, root, references["target"]).fit()
    rows = trial_rows(grid, params, cfg.train.max_steps)
    outputs = write_outputs(cfg, params, rows, root, references)
    _print_front(console, cfg, outputs, root)
    return outputs


# ---------------------------------------------------------------- checks before Ray starts


def check_search(cfg: JobConfig) -> dict[str, Param]:
    """What a search's config alone can get wrong (also checked by `submit` before a search is sent); returns
    the search space's parameters."""
    from ray_unlearn.pipeline import validate

    validate(cfg)
    if storage.is_remote(cfg.output_dir):
        raise UnlearnError("ray-unlearn tune writes its search state and trial outputs to a local output_dir; "
                           "keep output_dir local and set ray.storage_path=s3://... (or gs://) to keep the "
                           "trials' checkpoints in a bucket")
    params = check_space(cfg)
    check_metric_names(cfg)
    return params


def known_metrics() -> set[str]:
    """Every summary metric the evaluation suite can produce (the metric registry's names), and the calibrated
    ones (calibration_alpha, calibrated_<metric>) a trial adds when a searched metric names one."""
    from ray_unlearn.eval.registry import calibrated_metric_names, metric_names

    return set(metric_names()) | set(calibrated_metric_names())


def calibrates(cfg: JobConfig) -> bool:
    """A searched metric is a calibrated one: every trial evaluation then runs model-mixing calibration."""
    from ray_unlearn.eval.registry import calibrated_base

    return any(calibrated_base(name) for name in cfg.tune.metrics) or \
        bool(cfg.tune.scheduler_metric and calibrated_base(cfg.tune.scheduler_metric))


def check_calibrated_metrics(cfg: JobConfig, inputs: JobInputs) -> None:
    """Calibrated metrics need what eval.calibrate needs (a retain split) and a strategy whose evaluating rank
    holds full weights to mix (one-line UnlearnError otherwise)."""
    if not calibrates(cfg):
        return
    from ray_unlearn.eval.calibration import check_calibration_inputs

    check_calibration_inputs(bool(inputs.model_path), list(inputs.eval_splits))
    if cfg.ray.strategy == "fsdp2" or (cfg.ray.strategy == "deepspeed" and cfg.ray.zero == 3):
        raise UnlearnError(f"tune.metrics: calibrated metrics mix the trial's full weights with the target's and "
                           f"ray.strategy={cfg.ray.strategy} shards them; use ray.strategy=ddp (or deepspeed with "
                           "ray.zero_stage 1 or 2), or search uncalibrated metrics")


def check_metric_names(cfg: JobConfig) -> None:
    """Every `tune.metrics` name is a metric of the evaluation suite."""
    known = known_metrics()
    for name in cfg.tune.metrics:
        if name not in known:
            raise UnlearnError(f"tune.metrics.{name}: not a metric of the evaluation (e.g. extraction_strength, "
                               f"forget_quality, model_utility; all: {', '.join(sorted(known))})")
    if cfg.tune.scheduler == "asha" and cfg.train.eval_every <= 0:
        raise UnlearnError("tune.scheduler=asha compares trials during training: set train.eval_every > 0")


def check_metrics_available(cfg: JobConfig, target_summary: dict[str, float], has_retain: bool) -> None:
    """Every searched metric is produced for this job's data (those that need the retain model's results,
    e.g. forget quality, need a retain model; a calibrated one, its metric)."""
    from ray_unlearn.eval.registry import CALIBRATION_ALPHA, METRICS, calibrated_base

    for searched in cfg.tune.metrics:
        name = calibrated_base(searched) or searched
        if name == CALIBRATION_ALPHA:
            continue
        if METRICS[name].needs.retain and name not in target_summary and not has_retain:
            raise UnlearnError(f"tune.metrics.{searched} needs a retain model: set model.retain_model")
        if name not in target_summary:
            raise UnlearnError(f"tune.metrics.{searched}: this job's evaluation does not produce it "
                               f"(it gives: {', '.join(sorted(target_summary))})")


def check_resume(cfg: JobConfig, root: Path) -> None:
    """A rerun with the same name may only change tune.num_samples (Ray restores everything else)."""
    saved = root / "search.yaml"
    if not (root / "ray" / cfg.name).is_dir() or not saved.is_file():
        return
    before, now = to_dict(load_config(saved)), to_dict(cfg)
    for d in (before, now):
        d["tune"].pop("num_samples")
    changed = sorted(_diff(before, now))
    if changed:
        raise UnlearnError(f"search {cfg.name!r} in {root} was started with other settings ({', '.join(changed)} "
                           "differ); resume it unchanged (only tune.num_samples may grow) or pick a new name")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_trial_fits(cfg: JobConfig) -> None:
    """The concurrent trials (each a driver plus its Ray Train workers) must fit the cluster: a
    trial whose workers cannot be placed waits, then fails."""
    job = trial_scaling(cfg)
    per_trial = cfg.tune.cpus_per_trial + job.ray.max_workers * job.ray.cpus_per_worker
    need, have = cfg.tune.max_concurrent_trials * per_trial, ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise UnlearnError(f"{cfg.tune.max_concurrent_trials} concurrent trial(s) x {per_trial:g} CPUs "
                           f"(tune.cpus_per_trial={cfg.tune.cpus_per_trial:g} + {job.ray.max_workers} workers x "
                           f"{job.ray.cpus_per_worker:g}) need {need:g} CPUs but the cluster has {have:g}; lower "
                           "tune.max_concurrent_trials or ray.num_workers")


# ---------------------------------------------------------------- reference models


def reference_summaries(cfg: JobConfig, inputs: JobInputs,
                        root: Path) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Summaries of the target (and retain) model, and what the retain model gives every trial's
    evaluation (`eval.suite.References` as a dict: forget truth ratios, MIA AUCs, reference losses).

    Cached in <root>/reference.json, keyed by the models and the eval section, so a resumed
    search does not evaluate them again.
    """
    key = {"eval": to_dict(cfg.eval), "target": inputs.model_path, "retain": inputs.retain_model_path,
           "reference": inputs.mia_reference_path, "bench": inputs.bench, "data": to_dict(cfg.data)}
    cache = root / "reference.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key and "references" in saved:
            return saved["summaries"], saved["references"]
    summaries, refs = _evaluate_references(cfg, inputs)
    root.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(".reference.json.tmp")
    tmp.write_text(json.dumps({"key": key, "summaries": _finite(summaries), "references": refs.to_dict()}))
    tmp.replace(cache)
    return summaries, refs.to_dict()


def _evaluate_references(cfg: JobConfig, inputs: JobInputs) -> tuple[dict[str, dict[str, float]], Any]:
    from ray_unlearn.job import load_checked
    from ray_unlearn.models.io import load_model
    from ray_unlearn.pipeline import evaluate_models

    target, tokenizer = load_checked(cfg, inputs)
    models: dict[str, Callable[[], Any]] = {"target": lambda: target}
    if inputs.retain_model_path:
        models["retain"] = lambda: load_model(inputs.retain_model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    return evaluate_models(cfg, inputs, tokenizer, models)


def _finite(summaries: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {n: {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in s.items()}
            for n, s in summaries.items()}


# ---------------------------------------------------------------- the trial


class _EvalReports(TuneReportCallback):
    """Forward to Tune only the Ray Train reports that carry the searched metrics (the evaluation
    steps): Tune requires the searcher's and scheduler's metrics in every result it receives. Each
    gets the loop's step as `timesteps_total`, the step Tune's MLflow and TensorBoard loggers log at."""

    def __init__(self, metrics: list[str]):
        super().__init__()
        self.metrics = metrics

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and all(m in metrics[0] for m in self.metrics):
            first = {**metrics[0], TIMESTEPS_TOTAL: metrics[0]["step"]} if "step" in metrics[0] else metrics[0]
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def _trial(config: dict[str, Any], base: dict[str, Any], inputs: JobInputs, references: dict[str, Any] | None,
           root: str, target_summary: dict[str, float | None] | None = None) -> None:
    """One trial: the job with the sampled values, unlearned by its own TorchTrainer.

    Its Train run lives in <root>/trials/<trial_id> under the name <trial_id>, so a trial that
    runs again after a restore resumes from its latest checkpoint.
    """
    from ray_unlearn.train import make_trainer, run_trainer

    job = from_dict(JobConfig, base)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_job(job, parse_space(job.tune.space), config)  # fully checked by the driver already
    cfg.name, cfg.output_dir = trial_id, str(Path(root) / "trials" / trial_id)
    cfg = trial_scaling(cfg)
    run_trainer(make_trainer(cfg, inputs, [_EvalReports(list(cfg.tune.metrics))], evaluate_at_end=True,
                             references=references, calibrate=calibrates(cfg),
                             target_summary={k: v for k, v in (target_summary or {}).items() if v is not None},
                             placement_group_file=str(_placement_group_file(Path(root), trial_id))))


def _placement_group_file(root: Path, trial_id: str) -> Path:
    return root / "trials" / trial_id / "placement_group"


class _FreeStoppedTrials(tune.Callback):
    """Remove the placement group of a trial's Ray Train workers when the trial ends.

    A trial that ends normally has freed it already. A trial the scheduler stops is killed with
    its Train controller, and Ray Train's own cleaner needs the State API (the dashboard) to
    notice; without it the workers' CPUs stay reserved and the next trial waits forever.
    """

    def __init__(self, root: Path):
        self.root = root

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _free_placement_group(_placement_group_file(self.root, trial.trial_id))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _free_placement_group(_placement_group_file(self.root, trial.trial_id))


def _free_placement_group(path: Path) -> None:
    """Remove the placement group whose id `path` holds, unless it is gone already."""
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not path.is_file():
        return
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(path.read_text().strip())))
    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
        remove_placement_group(pg)
    path.unlink()


def trial_scaling(cfg: JobConfig) -> JobConfig:
    """The job as a trial runs it: at least one Ray Train worker.

    Local mode (num_workers=0) cannot run inside a Tune trial: Ray Train's local mode runs no
    callbacks, and `ray.train.get_context()` refuses to run in a Tune function.
    """
    if cfg.ray.max_workers > 0:
        return cfg
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_workers=1))


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------- the tuner


class _GrowableSearch(SearchGenerator):
    """A SearchGenerator whose sample budget is the current run's `tune.num_samples`.

    Ray restores a search's budget from its experiment state, so a resumed search could never
    grow; `budgets` (set by `make_tuner` in this process before `fit`) overrides it on restore.
    """

    budgets: dict[str, int] = {}

    def __init__(self, searcher: Any, name: str):
        super().__init__(searcher)
        self.name = name

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if self.name in self.budgets:
            self._total_samples = max(self.budgets[self.name], self._counter)
            self._finished = self._counter >= self._total_samples


def _search(cfg: JobConfig, params: dict[str, Param]) -> _GrowableSearch:
    """Optuna (TPE; multi-objective with 2+ metrics) behind a concurrency limit."""
    names, modes = list(cfg.tune.metrics), list(cfg.tune.metrics.values())
    multi = len(names) > 1
    searcher = OptunaSearch(space=optuna_space(params), metric=names if multi else names[0],
                            mode=modes if multi else modes[0], seed=cfg.tune.seed)
    return _GrowableSearch(ConcurrencyLimiter(searcher, max_concurrent=cfg.tune.max_concurrent_trials), cfg.name)


def _scheduler(cfg: JobConfig, params: dict[str, Param]) -> ASHAScheduler | None:
    """ASHA on `tune.scheduler_metric` (default: the first metric); its time unit is one evaluation."""
    if cfg.tune.scheduler != "asha":
        return None
    metric = cfg.tune.scheduler_metric or next(iter(cfg.tune.metrics))
    steps = int(params["train.max_steps"].high) if "train.max_steps" in params else cfg.train.max_steps
    evaluations = math.ceil(steps / cfg.train.eval_every)
    return ASHAScheduler(metric=metric, mode=cfg.tune.metrics[metric], time_attr="training_iteration",
                         max_t=max(evaluations, cfg.tune.grace_period), grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor)


def make_tuner(cfg: JobConfig, params: dict[str, Param], inputs: JobInputs, references: dict[str, Any] | None,
               root: Path, target_summary: dict[str, float | None] | None = None) -> Tuner:
    """A new Tuner, or the restored one when <root>/ray/<name> holds this search already (`target_summary`:
    the target's, which spares calibrating trials its evaluation)."""
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(cfg), inputs=inputs, references=references, root=str(root),
                             target_summary=target_summary),
        {"cpu": cfg.tune.cpus_per_trial})
    _GrowableSearch.budgets[cfg.name] = cfg.tune.num_samples
    experiment = root / "ray" / cfg.name
    if Tuner.can_restore(str(experiment)):
        return Tuner.restore(str(experiment), trainable, resume_unfinished=True, restart_errored=True)
    return Tuner(trainable,
                 tune_config=RayTuneConfig(search_alg=_search(cfg, params), scheduler=_scheduler(cfg, params),
                                           num_samples=cfg.tune.num_samples, trial_dirname_creator=_trial_dirname),
                 run_config=TuneRunConfig(name=cfg.name, storage_path=str(root / "ray"), verbose=1,
                                          callbacks=[_FreeStoppedTrials(root), *tracking_callbacks(cfg)]))


def tracking_callbacks(cfg: JobConfig) -> list[Any]:
    """Tune's own logger callbacks for the tracking section: MLflowLoggerCallback (one MLflow run per trial with
    its sampled values and every evaluation report, logged by the Tune driver) and TBXLoggerCallback (event
    files in each trial's directory; Tune adds it by default too, unless TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1)."""
    from ray.tune.logger import TBXLoggerCallback

    callbacks: list[Any] = []
    if cfg.tracking.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = tracking_uri(cfg)
        allow_file_store(uri)
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment_name(cfg),
                                              tags={"search": cfg.name, "output_dir": str(cfg.output_dir)}))
    if cfg.tracking.tensorboard:
        callbacks.append(TBXLoggerCallback())
    return callbacks


# ---------------------------------------------------------------- reading the results


def trial_rows(grid: Any, params: dict[str, Param], max_steps: int) -> list[TrialRow]:
    """One TrialRow per trial of a ResultGrid: last reported evaluation, searched values, status
    (STOPPED: evaluated before its last step, i.e. stopped by the scheduler)."""
    rows, known = [], known_metrics()
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        evaluated = {k: float(v) for k, v in metrics.items()
                     if k in known and isinstance(v, (int, float)) and not isinstance(v, bool)}
        values = decode_point(params, result.config)
        step = int(metrics["step"]) if isinstance(metrics.get("step"), (int, float)) else None
        status = "ERROR" if result.error else "TERMINATED"
        if not result.error and step is not None and step < values.get("train.max_steps", max_steps):
            status = "STOPPED"
        rows.append(TrialRow(trial_id=str(trial_id), values=values, metrics=evaluated, step=step, status=status,
                             error=str(result.error).strip().splitlines()[-1] if result.error else ""))
    return rows


def _short(value: Any) -> str:
    """A searched value for the terminal table: numbers to 3 significant digits, the rest compact."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _print_front(console: Any, cfg: JobConfig, outputs: SearchOutputs, root: Path) -> None:
    from rich.table import Table

    metrics = list(cfg.tune.metrics)
    table = Table(title=f"Pareto front: {len(outputs.front)} of {len(outputs.rows)} trials")
    for col in ("trial", *(p for p in cfg.tune.space), *metrics):
        table.add_column(col, overflow="fold")
    for row in outputs.front:
        table.add_row(row.trial_id, *(_short(row.values[p]) for p in cfg.tune.space),
                      *(f"{row.metrics[m]:.4g}" for m in metrics))
    console.print(table)
    errors = [r for r in outputs.rows if r.status == "ERROR"]
    if errors:
        console.print(f"{len(errors)} trial(s) failed, e.g. {errors[0].trial_id}: {errors[0].error}")
    console.print(f"outputs in [bold]{root}[/] (pareto.md, pareto.png, front/*.yaml; "
                  f"optuna-dashboard sqlite:///{root / 'study.db'})")
