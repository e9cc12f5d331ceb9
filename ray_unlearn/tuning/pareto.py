"""Reading a finished search (no Ray here): Pareto front, tables, plot, job files, Optuna study.

A trial is a `TrialRow`: its searched values, the metrics of its last evaluation and its status.
Trial a dominates trial b when a is at least as good on every metric of `tune.metrics` (in that
metric's direction) and strictly better on one; the Pareto front is the complete trials (every
metric finite) that no other complete trial dominates: Optuna's definition, so `study.best_trials`
of the study written by `write_study` holds the same trials. Non-dominated sorting ranks every
complete trial: 0 for the front, 1 for the front of the rest, and so on.

Outputs under `<output_dir>/tune/` (see `write_outputs`): trials.csv, pareto.csv, pareto.md,
pareto.png, front/<trial_id>.yaml and study.db.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ray_unlearn.config import JobConfig, dump_config
from ray_unlearn.eval.registry import HEADLINE_METRICS
from ray_unlearn.eval.report import save_figure
from ray_unlearn.tuning.space import Param, apply_values, encode_point, optuna_space


@dataclass
class TrialRow:
    """One trial of the search, as read back from Ray Tune."""

    trial_id: str
    values: dict[str, Any]                      # searched field -> config value
    metrics: dict[str, float] = field(default_factory=dict)  # summary metrics of the last evaluation
    step: int | None = None                     # unlearning step of that evaluation
    status: str = "TERMINATED"                  # TERMINATED, STOPPED (early, by the scheduler) or ERROR
    error: str = ""

    def objective(self, metrics: dict[str, str]) -> list[float] | None:
        """Its values of the searched metrics (in order), or None when it has no finite value for one."""
        vals = [self.metrics.get(m) for m in metrics]
        if self.status == "ERROR" or any(v is None or not math.isfinite(v) for v in vals):
            return None
        return [float(v) for v in vals]


@dataclass
class SearchOutputs:
    """What `write_outputs` produced: every trial, the front (best first metric first) and the files."""

    rows: list[TrialRow]
    front: list[TrialRow]
    files: dict[str, Path]


# ---------------------------------------------------------------- dominance


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether point a dominates point b: no worse on every metric, better on one."""
    better = False
    for x, y, mode in zip(a, b, modes):
        x, y = (x, y) if mode == "min" else (-x, -y)
        if x > y:
            return False
        better = better or x < y
    return better


def nondominated_ranks(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Front number of every point: 0 = not dominated, k = dominated only by points of fronts < k."""
    ranks = [-1] * len(points)
    left, rank = set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i], modes) for j in left if j != i)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def pareto_front(rows: Sequence[TrialRow], metrics: dict[str, str]) -> list[TrialRow]:
    """The non-dominated complete trials, sorted by the first metric (best first)."""
    complete = [r for r in rows if r.objective(metrics) is not None]
    modes = list(metrics.values())
    ranks = nondominated_ranks([r.objective(metrics) for r in complete], modes)
    front = [r for r, k in zip(complete, ranks) if k == 0]
    first, sign = next(iter(metrics)), 1 if modes[0] == "min" else -1
    return sorted(front, key=lambda r: (sign * r.metrics[first], r.trial_id))


def front_ranks(rows: Sequence[TrialRow], metrics: dict[str, str]) -> dict[str, int]:
    """{trial_id: non-dominated rank} of the complete trials."""
    complete = [r for r in rows if r.objective(metrics) is not None]
    ranks = nondominated_ranks([r.objective(metrics) for r in complete], list(metrics.values()))
    return {r.trial_id: k for r, k in zip(complete, ranks)}


# ---------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "" if value is None else str(value)


# shown after the searched metrics in pareto.md (the CSV files have every reported metric)
MARKDOWN_METRICS = HEADLINE_METRICS


def table_rows(rows: Sequence[TrialRow], metrics: dict[str, str], paths: Sequence[str], ranks: dict[str, int],
               others: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, cells): trial, front rank, status, step, searched fields, searched metrics, `others`
    (default: every other reported metric), one row per trial."""
    if others is None:
        others = sorted({m for r in rows for m in r.metrics} - set(metrics))
    header = ["trial_id", "front_rank", "status", "step", *paths, *metrics, *others]
    cells = [[r.trial_id, _cell(ranks.get(r.trial_id)), r.status, _cell(r.step),
              *(_cell(r.values.get(p)) for p in paths), *(_cell(r.metrics.get(m)) for m in (*metrics, *others))]
             for r in rows]
    return header, cells


def csv_text(header: list[str], cells: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(cells)
    return buf.getvalue()


def markdown_text(header: list[str], cells: list[list[str]], title: str) -> str:
    """A GitHub Markdown table (pipes in cells escaped)."""
    def row(items: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in items) + " |"

    lines = [f"# {title}", "", row(header), row(["---"] * len(header)), *(row(c) for c in cells)]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- plot


def plot_front(rows: Sequence[TrialRow], front: Sequence[TrialRow], metrics: dict[str, str], path: Path,
               references: dict[str, dict[str, float]] | None = None) -> Path | None:
    """Every complete trial on the first two metrics, the front highlighted and joined, and the
    reference models (target, retain) marked; with one metric, the metric against the trial number."""
    complete = [r for r in rows if r.objective(metrics) is not None]
    if not complete:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics)[:2]
    if len(names) == 1:  # x: the trial's position among the complete trials
        def xy(items: Sequence[TrialRow]) -> tuple[list[float], list[float]]:
            return [float(complete.index(r)) for r in items], [r.metrics[names[0]] for r in items]
    else:
        def xy(items: Sequence[TrialRow]) -> tuple[list[float], list[float]]:
            return [r.metrics[names[0]] for r in items], [r.metrics[names[1]] for r in items]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(*xy(complete), color="#9aa5b1", label=f"trials ({len(complete)})", zorder=2)
    ax.plot(*xy(front), color="#d62728", marker="o", linestyle="--" if len(names) > 1 else "none",
            label=f"Pareto front ({len(front)})", zorder=3)
    for row, x, y in zip(front, *xy(front)):
        ax.annotate(row.trial_id, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for (name, summary), marker in zip((references or {}).items(), ("X", "*", "P")):
        if len(names) > 1 and all(isinstance(summary.get(m), float) for m in names):
            ax.scatter([summary[names[0]]], [summary[names[1]]], marker=marker, s=120, color="black",
                       label=f"{name} model", zorder=4)
    better = {"min": "lower is better", "max": "higher is better"}
    ax.set_xlabel(f"{names[0]} ({better[metrics[names[0]]]})" if len(names) > 1 else "trial")
    ax.set_ylabel(f"{names[-1]} ({better[metrics[names[-1]]]})")
    ax.set_title(f"Tune search: {len(complete)} trials" + (f" (first two of {len(metrics)} metrics)"
                                                          if len(metrics) > 2 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------- job files


def front_job(base: JobConfig, row: TrialRow) -> JobConfig:
    """The complete job of a front member: the search's job with the trial's values, its own name and
    output_dir (<output_dir>/tune/front/<trial_id>), the default tune section; a trial the scheduler
    stopped early runs as many steps as it had when it was evaluated."""
    from ray_unlearn.config import TuneConfig

    values = dict(row.values)
    if row.status == "STOPPED" and row.step:
        values["train.max_steps"] = row.step
    cfg = apply_values(base, values)
    cfg.name = f"{base.name}-{row.trial_id}"
    cfg.output_dir = str(Path(base.output_dir) / "tune" / "front" / row.trial_id)
    cfg.tune = TuneConfig()
    return cfg


def export_front_jobs(base: JobConfig, front: Sequence[TrialRow], out_root: Path,
                      metrics: dict[str, str]) -> list[Path]:
    """<out_root>/front/<trial_id>.yaml per front member: a complete job `ray-unlearn run` accepts."""
    folder = out_root / "front"
    folder.mkdir(parents=True, exist_ok=True)
    keep = {f"{row.trial_id}.yaml" for row in front}
    for stale in folder.glob("*.yaml"):  # members of an earlier front (before a resumed search added trials)
        if stale.name not in keep:
            stale.unlink()
    paths = []
    for row in front:
        path = folder / f"{row.trial_id}.yaml"
        tmp = folder / f".{row.trial_id}.yaml.tmp"
        dump_config(front_job(base, row), tmp)
        got = ", ".join(f"{m}={row.metrics[m]:.4g}" for m in metrics)
        header = f"# Pareto-front member {row.trial_id} of search {base.name!r}: {got} at step {row.step}.\n"
        tmp.write_text(header + tmp.read_text())
        os.replace(tmp, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- Optuna study


def write_study(rows: Sequence[TrialRow], params: dict[str, Param], metrics: dict[str, str], path: Path,
                study_name: str) -> Path:
    """Every trial as an Optuna trial in a fresh SQLite study (`optuna-dashboard sqlite:///<path>`).

    Complete trials carry their metric values (study directions from `metrics`); errored trials
    and trials with a missing or non-finite metric are stored as FAIL. User attributes: the Ray
    trial id, the step of the evaluation and every reported metric.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp.resolve()}")
    study = optuna.create_study(storage=storage, study_name=study_name,
                                directions=["minimize" if m == "min" else "maximize" for m in metrics.values()])
    distributions = optuna_space(params)
    for row in rows:
        values = row.objective(metrics)
        attrs = {"ray_trial_id": row.trial_id, "step": row.step, "status": row.status, "error": row.error[:500],
                 **{k: v for k, v in row.metrics.items() if math.isfinite(v)}}
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if values is not None else optuna.trial.TrialState.FAIL,
            values=values, params=encode_point(params, row.values), distributions=distributions,
            user_attrs=attrs))
    storage.engine.dispose()
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- all outputs


def write_outputs(base: JobConfig, params: dict[str, Param], rows: Sequence[TrialRow], out_root: Path,
                  references: dict[str, dict[str, float]] | None = None) -> SearchOutputs:
    """Write every output of a search under `out_root` and return what was written."""
    metrics = dict(base.tune.metrics)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r.trial_id)
    front = pareto_front(rows, metrics)
    ranks = front_ranks(rows, metrics)
    header, cells = table_rows(rows, metrics, list(params), ranks)
    front_header, front_cells = table_rows(front, metrics, list(params), ranks)
    shown = [m for m in MARKDOWN_METRICS if m not in metrics and any(m in r.metrics for r in front)]
    md_header, md_cells = table_rows(front, metrics, list(params), ranks, others=shown)
    title = (f"Pareto front of search {base.name!r} ({', '.join(f'{m}: {d}' for m, d in metrics.items())}; "
             f"{len(front)} of {len(rows)} trials)")
    files = {"trials.csv": _write_text(out_root / "trials.csv", csv_text(header, cells)),
             "pareto.csv": _write_text(out_root / "pareto.csv", csv_text(front_header, front_cells)),
             "pareto.md": _write_text(out_root / "pareto.md", markdown_text(md_header, md_cells, title)),
             "study.db": write_study(rows, params, metrics, out_root / "study.db", base.name)}
    plot = plot_front(rows, front, metrics, out_root / "pareto.png", references)
    if plot is not None:
        files["pareto.png"] = plot
    for p in export_front_jobs(base, front, out_root, metrics):
        files[f"front/{p.name}"] = p
    return SearchOutputs(rows=list(rows), front=front, files=files)
