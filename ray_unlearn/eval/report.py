"""Human-readable outputs of a run: report.md, PNG plots, and the summary table printed at the end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

# (metric key in SUMMARY, label, which way is "forgotten" / "kept")
KEY_METRICS: list[tuple[str, str]] = [
    ("extraction_strength", "forget ES"),
    ("exact_memorization", "forget EM"),
    ("forget_Q_A_Prob", "forget prob"),
    ("forget_Q_A_ROUGE", "forget ROUGE-L"),
    ("forget_truth_ratio", "forget truth ratio"),
    ("forget_quality", "forget quality"),
    ("retain_extraction_strength", "retain ES"),
    ("retain_Q_A_Prob", "retain prob"),
    ("retain_Q_A_ROUGE", "retain ROUGE-L"),
    ("wf_Q_A_Prob_normalised", "world prob (norm.)"),
    ("wf_Q_A_ROUGE", "world ROUGE-L"),
    ("model_utility", "model utility"),
]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and 0 < abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def comparison_rows(summaries: dict[str, dict[str, float]]) -> list[list[str]]:
    """Rows [label, value per model...] for the key metrics present in any summary."""
    rows = []
    for key, label in KEY_METRICS:
        if any(key in s for s in summaries.values()):
            rows.append([label] + [_fmt(s.get(key)) for s in summaries.values()])
    return rows


def write_report(out_dir: Path, summaries: dict[str, dict[str, float]], gap: dict[str, float],
                 facts: dict[str, Any], plots: Sequence[Path]) -> Path:
    """report.md: key metrics of every model side by side, the ES gap closed, run facts, plots."""
    names = list(summaries)
    lines = ["# ray_unlearn report", "", "| metric | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in comparison_rows(summaries)]
    lines += ["", "## Forgetting vs. retention", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in gap.items()]
    lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir)})" for p in plots]
    path = out_dir / "report.md"
    _write_text(path, "\n".join(lines) + "\n")
    return path


def gap_closed(summaries: dict[str, dict[str, float]], target: str, unlearned: str, retain: str) -> dict[str, float]:
    """Fraction of the target-to-retain forget-ES gap the unlearned model closed, and its utility ratio."""
    out: dict[str, float] = {}
    es = {k: summaries.get(k, {}).get("extraction_strength") for k in (target, unlearned, retain)}
    if None not in es.values() and es[target] != es[retain]:
        out["forget ES gap closed"] = (es[target] - es[unlearned]) / (es[target] - es[retain])
    mu_t = summaries.get(target, {}).get("model_utility")
    mu_u = summaries.get(unlearned, {}).get("model_utility")
    if mu_t and mu_u is not None:
        out["model utility / target's"] = mu_u / mu_t
    return out


def plot_training(history: Sequence[dict[str, float]], path: Path) -> Path | None:
    """Forget and retain NLL (and the total loss) against the step."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("nll/forget", "forget NLL"), ("nll/retain", "retain NLL")):
        if all(key in h for h in history):
            left.plot(steps, [h[key] for h in history], marker=".", label=label)
    left.set_yscale("log")
    left.set_title("Answer NLL: forget should rise, retain stay low")
    if all("loss/total" in h for h in history):
        right.plot(steps, [h["loss/total"] for h in history], marker=".", color="tab:green")
    right.set_title("Unlearning objective")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_metrics(summaries: dict[str, dict[str, float]], path: Path) -> Path | None:
    """Grouped bars of the key metrics (values in [0, 1]) for every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [(k, lbl) for k, lbl in KEY_METRICS if k != "forget_quality" and any(k in s for s in summaries.values())]
    if not keys:
        return None
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(summaries))
    fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.9), 3.8))
    for i, (name, s) in enumerate(summaries.items()):
        ax.bar(x + i * width, [s.get(k, 0.0) or 0.0 for k, _ in keys], width, label=name)
    ax.set_xticks(x + width * (len(summaries) - 1) / 2, [lbl for _, lbl in keys], rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("Before / after unlearning")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
