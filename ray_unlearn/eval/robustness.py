"""Metric robustness (DESIGN §7; seed paper 002, Wang et al., ICLR 2025): which metric survives red-teaming?

Across a population of unlearned models, a metric is robust to an attack when its value under the
attack still ranks the models as its plain value does: the Pearson correlation r of the metric
before vs after the attack, over the models. The paper ranks metrics this way and finds extraction
strength (ES) the most robust. Here every metric of the forget split is correlated for every attack
of `eval/attacks.json`'s kind (the same before -> after pairs `pipeline.attack_results` measures);
metrics are ranked by their mean r over the attacks where r is defined, then by their lowest r.

r is undefined (recorded as None with the reason, never as a number) when fewer than 3 models have
both values, or when the before or the after values are all equal across the population (a constant
column: scipy would return NaN with a warning; we check first and say which side is constant).

Pure numpy / scipy / matplotlib: `correlations`, `ranking`, `write_outputs`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ray_unlearn.eval.report import _write_text, save_figure

MIN_MODELS = 3  # fewer models make r meaningless (two points always give +-1)
Population = Sequence[Mapping[str, Mapping[str, Mapping[str, float | None]]]]  # per model: {attack: {metric: {before, after}}}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def pearson(before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    """{"r", "p", "n", "note"}: scipy.stats.pearsonr of the pairs, or r = p = None and a note saying why
    it is undefined (fewer than MIN_MODELS pairs, or a constant side)."""
    from scipy.stats import pearsonr

    n = len(before)
    if n < MIN_MODELS:
        return {"r": None, "p": None, "n": n, "note": f"undefined: {n} model(s) with values, {MIN_MODELS} needed"}
    for side, values in (("before", before), ("after", after)):
        if max(values) == min(values):
            return {"r": None, "p": None, "n": n,
                    "note": f"undefined: {side} the attack the values are constant ({values[0]:.4g} for every model)"}
    r, p = pearsonr(before, after)
    return {"r": float(min(1.0, max(-1.0, r))), "p": float(p), "n": n, "note": ""}


def correlations(population: Population, attacks: Sequence[str], metrics: Sequence[str]
                 ) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric: {attack: pearson(...)}} over the models of `population` that have finite before and after
    values of that metric under that attack."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in metrics:
        table[metric] = {}
        for attack in attacks:
            pairs = [(rec[attack][metric].get("before"), rec[attack][metric].get("after")) for rec in population
                     if metric in rec.get(attack, {})]
            pairs = [(b, a) for b, a in pairs if _finite(b) and _finite(a)]
            table[metric][attack] = pearson([b for b, _ in pairs], [a for _, a in pairs])
    return table


def ranking(table: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Metrics from most to least robust: mean r over the attacks where it is defined (higher first), then the
    lowest r; metrics with no defined r last. Each row: metric, mean_r, min_r, defined, undefined."""
    rows = []
    for metric, by_attack in table.items():
        rs = [c["r"] for c in by_attack.values() if c["r"] is not None]
        rows.append({"metric": metric, "mean_r": sum(rs) / len(rs) if rs else None, "min_r": min(rs) if rs else None,
                     "defined": len(rs), "undefined": len(by_attack) - len(rs)})
    return sorted(rows, key=lambda row: (row["mean_r"] is None, -(row["mean_r"] or 0.0), -(row["min_r"] or 0.0)))


def _cell(c: Mapping[str, Any]) -> str:
    return "n/a" if c["r"] is None else f"{c['r']:.3f}"


def markdown(table: Mapping[str, Mapping[str, Mapping[str, Any]]], ranked: Sequence[Mapping[str, Any]],
             facts: Mapping[str, Any]) -> str:
    """robustness.md: the ranking with r per attack, the undefined cells' reasons, the population facts."""
    attacks = list(next(iter(table.values()), {}))
    lines = ["# Metric robustness", "", "Pearson r of each forget metric before vs after each attack, across the "
             "population of models (higher = the metric ranks models the same under the attack). Ranked by mean r "
             "over the attacks where r is defined.", "",
             "| rank | metric | mean r | min r | " + " | ".join(attacks) + " |",
             "|---|---|---|---|" + "---|" * len(attacks)]
    for i, row in enumerate(ranked, 1):
        mean = "n/a" if row["mean_r"] is None else f"{row['mean_r']:.3f}"
        low = "n/a" if row["min_r"] is None else f"{row['min_r']:.3f}"
        cells = [_cell(table[row["metric"]][a]) for a in attacks]
        lines.append(f"| {i} | {row['metric']} | {mean} | {low} | " + " | ".join(cells) + " |")
    notes = [f"- {m} under {a}: {c['note']}" for m, by in table.items() for a, c in by.items() if c["note"]]
    if notes:
        lines += ["", "## Undefined correlations (n/a)", ""] + notes
    lines += ["", "## Population", ""] + [f"- {k}: {v}" for k, v in facts.items()]
    return "\n".join(lines) + "\n"


def plot_heatmap(table: Mapping[str, Mapping[str, Mapping[str, Any]]], order: Sequence[str], path: Path) -> Path:
    """Metrics (rows, in `order`) x attacks (columns) heat map of r in [-1, 1]; undefined cells grey, "n/a"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = list(table[order[0]])
    grid = np.array([[np.nan if table[m][a]["r"] is None else table[m][a]["r"] for a in attacks] for m in order])
    fig, ax = plt.subplots(figsize=(1.0 * len(attacks) + 3.5, 0.45 * len(order) + 1.8))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i in range(len(order)):
        for j in range(len(attacks)):
            v = grid[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(v) and abs(v) > 0.6 else "black")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(order)), order)
    ax.set_title("Metric robustness: Pearson r before vs after each attack")
    fig.colorbar(image, ax=ax, label="r")
    return save_figure(fig, path)


def write_outputs(out_dir: Path, population: Sequence[Mapping[str, Any]], attacks: Sequence[str],
                  metrics: Sequence[str], facts: Mapping[str, Any]) -> dict[str, Any]:
    """robustness.json (population, correlations, ranking, facts), robustness.md and robustness.png in
    `out_dir`; `population`: per model {"model": name, "attacks": {attack: {metric: {before, after}}}}."""
    from ray_unlearn.eval.suite import _write_json_atomic

    table = correlations([rec["attacks"] for rec in population], attacks, metrics)
    ranked = ranking(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"facts": dict(facts), "ranking": ranked, "correlations": table, "population": list(population)}
    _write_json_atomic(out_dir / "robustness.json", result)
    _write_text(out_dir / "robustness.md", markdown(table, ranked, facts))
    plot_heatmap(table, [row["metric"] for row in ranked], out_dir / "robustness.png")
    return result
