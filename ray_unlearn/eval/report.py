"""Human-readable outputs of a run: report.md, PNG plots, and the summary table printed at the end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ray_unlearn.eval.redteam import SCOPE_ENTRIES
from ray_unlearn.eval.registry import MIA_ATTACKS, mia_metric_name, report_rows


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (a temporary name, then renamed) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path

# (metric key in SUMMARY, label): the report table's rows, from the metric registry
KEY_METRICS: list[tuple[str, str]] = report_rows()


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


def mia_section(summaries: dict[str, dict[str, float]], rocs: Sequence[Path] = ()) -> tuple | None:
    """The membership-inference section: per attack that ran its AUC (forget items = members, holdout =
    non-members) for every model, then privleak, with the models' ROC plots (`rocs`) below; None when no
    attack ran."""
    attacks = [a for a in MIA_ATTACKS if any(mia_metric_name(a) in s for s in summaries.values())]
    if not attacks:
        return None
    rows = [["AUC per attack", *summaries]]
    rows += [[f"{MIA_ATTACKS[a].label.removeprefix('MIA AUC ')}: {MIA_ATTACKS[a].score}",
              *(_fmt(s.get(mia_metric_name(a))) for s in summaries.values())] for a in attacks]
    if any("privleak" in s for s in summaries.values()):
        rows.append(["privleak (Min-K AUC against the retain model's; 0 = as the retain model, -100 = fully "
                     "memorized)", *(_fmt(s.get("privleak")) for s in summaries.values())])
    title = "Membership inference (forget = members, holdout = non-members)"
    return (title, rows, *rocs)


def write_report(out_dir: Path, summaries: dict[str, dict[str, float]], gap: dict[str, float],
                 facts: dict[str, Any], plots: Sequence[Path],
                 sections: Sequence[tuple] = ()) -> Path:
    """report.md: key metrics of every model side by side, the ES gap closed, more tables (`sections`:
    (title, rows with a header row first[, images shown below the table])), run facts, plots."""
    names = list(summaries)
    lines = ["# ray_unlearn report", "", "| metric | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in comparison_rows(summaries)]
    lines += ["", "## Forgetting vs. retention", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in gap.items()]
    for title, rows, *images in sections:
        lines += ["", f"## {title}", "", "| " + " | ".join(rows[0]) + " |", "|---|" + "---|" * (len(rows[0]) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        lines += [line for p in images for line in ("", f"![{p.relative_to(out_dir)}]({p.relative_to(out_dir)})")]
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
    return save_figure(fig, path)


def plot_metrics(summaries: dict[str, dict[str, float]], path: Path) -> Path | None:
    """Grouped bars of the key metrics (values in [0, 1]) for every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [(k, lbl) for k, lbl in KEY_METRICS if k != "forget_quality" and k != "privleak"
            and any(k in s for s in summaries.values())]
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
    return save_figure(fig, path)


def plot_memorization(memo: dict[str, dict[str, dict[str, float | None]]], path: Path) -> Path:
    """`ray-unlearn finetune`: extraction strength and answer probability of each model (target, retain) on
    the forget and retain items, as grouped bars; `memo` is {model: {split: {metric: value}}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bars = [(split, metric) for split in ("forget", "retain") for metric in ("extraction_strength", "probability")]
    x, width = np.arange(len(bars)), 0.8 / max(1, len(memo))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, by_split) in enumerate(memo.items()):
        ax.bar(x + i * width, [by_split[s][m] or 0.0 for s, m in bars], width, label=f"{name} model")
    labels = [f"{split} {'ES' if metric == 'extraction_strength' else 'prob'}" for split, metric in bars]
    ax.set_xticks(x + width * (len(memo) - 1) / 2, labels)
    ax.set_ylim(0, 1.05)
    ax.set_title("Memorization: the target should know forget and retain, the retain model only retain")
    ax.title.set_fontsize(9)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_roc(results: dict[str, dict], path: Path) -> Path | None:
    """ROC curve of every membership-inference attack in `results` (one model), AUC in the legend.

    Drawn as member detection: a forget item flagged (score below the threshold) is a true positive,
    a holdout item flagged a false positive; the area is the reported AUC (forget 0 / holdout 1 with
    loss-like scores is the same ranking)."""
    attacks = [a for a in MIA_ATTACKS if mia_metric_name(a) in results]
    if not attacks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for attack in attacks:
        rec = results[mia_metric_name(attack)]
        forget, holdout = ([v["score"] for v in rec[s]["value_by_index"].values()] for s in ("forget", "holdout"))
        fpr, tpr, _ = roc_curve([1] * len(forget) + [0] * len(holdout), -np.asarray(forget + holdout, dtype=float))
        ax.plot(fpr, tpr, label=f"{MIA_ATTACKS[attack].label.removeprefix('MIA AUC ')} (AUC {rec['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("holdout items flagged as members (FPR)")
    ax.set_ylabel("forget items flagged as members (TPR)")
    ax.set_title("Membership inference: forget vs holdout")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_calibration(calibration: dict[str, Any], path: Path) -> Path | None:
    """Model-mixing calibration: retain and forget ES against α, the retention bar and the chosen α."""
    curve = [p for p in calibration.get("curve", []) if p.get("retain_es") is not None]
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [p["alpha"] for p in curve]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.plot(alphas, [p["retain_es"] for p in curve], marker="o", label="retain ES")
    if all(p.get("forget_es") is not None for p in curve):
        ax.plot(alphas, [p["forget_es"] for p in curve], marker="s", label="forget ES")
    ax.axhline(calibration["threshold"], color="grey", linestyle=":",
               label=f"bar: {calibration['tau']:g} × target's retain ES")
    ax.axvline(calibration["alpha"], color="tab:red", linestyle="--", label=f"α = {calibration['alpha']:.3f}")
    ax.set_xlabel("α  (θ = (1−α)·θ_target + α·θ_unlearned)")
    ax.set_ylabel("extraction strength")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title("Model-mixing calibration")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def calibration_rows(calibration: dict[str, Any]) -> list[list[str]]:
    """The report's table of the calibration curve (header row first): every α evaluated, its retain and forget ES,
    whether it meets the bar, the chosen α marked."""
    rows = [["α", "retain ES", "forget ES", f"retain ES ≥ {_fmt(calibration['threshold'])}"]]
    for p in calibration.get("curve", []):
        meets = p.get("retain_es") is not None and p["retain_es"] >= calibration["threshold"]
        mark = " (chosen)" if p["alpha"] == calibration["alpha"] else ""
        rows.append([f"{p['alpha']:.4f}{mark}", _fmt(p.get("retain_es")), _fmt(p.get("forget_es")),
                     "yes" if meets else "no"])
    return rows


def attack_rows(attacks: dict[str, dict[str, dict[str, float]]], names: Sequence[str] | None = None,
                labels: dict[str, str] | None = None, first: str = "attack") -> list[list[str]]:
    """Header (`first`, then metric labels) + one row per red-team attack (`names`, default all): each key
    forget metric it measured as "before → after"; `labels` renames rows."""
    names = list(attacks) if names is None else list(names)
    keys = [(k, label) for k, label in KEY_METRICS if any(k in attacks[n] for n in names)]
    rows = [[first] + [label for _, label in keys]]
    for name in names:
        metrics = attacks[name]
        rows.append([(labels or {}).get(name, name)]
                    + [f"{_fmt(metrics[k]['before'])} → {_fmt(metrics[k]['after'])}" if k in metrics else "–"
                       for k, _ in keys])
    return rows


SCOPE_LABELS = {"in_scope": "in scope: paraphrased forget questions", "out_of_scope": "out of scope: neighbours"}


def attack_sections(attacks: dict[str, dict[str, dict[str, float]]], evaluated: str = "unlearned"
                    ) -> list[tuple[str, list[list[str]]]]:
    """The report's tables of eval/attacks.json: the red-team attacks (before → under attack) and the scope
    attack's two entries (target → the `evaluated` model), each when present."""
    red = [n for n in attacks if n not in SCOPE_ENTRIES]
    scope = [n for n in SCOPE_ENTRIES if n in attacks]
    sections = [("Red-team attacks (forget split, before → after)", attack_rows(attacks, red))] if red else []
    if scope:  # the forget metrics' definitions on other items: the labels lose "forget "
        rows = attack_rows(attacks, scope, SCOPE_LABELS, "items")
        rows[0] = [h.removeprefix("forget ") for h in rows[0]]
        sections.append((f"Unlearning scope (target → {evaluated}; in scope should fall, out of scope stay)", rows))
    return sections


def plot_attacks(attacks: dict[str, dict[str, dict[str, float]]], path: Path, key: str = "extraction_strength"
                 ) -> Path | None:
    """Forget ES (`key`) before and after each red-team attack, as paired bars; the scope attack's entries
    (target vs evaluated model, in scope and out of scope) in a panel of their own."""
    def drawn(names: Sequence[str]) -> list[str]:
        return [n for n in names if key in attacks[n] and attacks[n][key]["before"] is not None]

    label = dict(KEY_METRICS).get(key, key)
    panels = [(drawn([n for n in attacks if n not in SCOPE_ENTRIES]), ("before", "under attack"),
               "forget set under red-team attacks", label),
              (drawn([n for n in SCOPE_ENTRIES if n in attacks]), ("target", "evaluated model"), "unlearning scope",
               label.removeprefix("forget "))]
    panels = [p for p in panels if p[0]]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [max(3.0, 1.3 * len(panel[0]) + 1) for panel in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (names, (left, right), title, ylabel) in zip(axes[0], panels):
        x = list(range(len(names)))
        ax.bar([i - 0.2 for i in x], [attacks[n][key]["before"] for n in names], 0.4, label=left)
        ax.bar([i + 0.2 for i in x], [attacks[n][key]["after"] for n in names], 0.4, label=right)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_selection(summary: dict[str, Any], path: Path) -> Path:
    """Where a localized run's selection fell (GRIN): the fraction of entries selected per decoder layer and
    per module type, against the fraction over the whole model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, modules = summary["layers"], summary["modules"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 0.5 * (len(layers) + len(modules)) + 4), 3.6))
    for ax, groups, title in ((left, layers, "per decoder layer"), (right, modules, "per module type")):
        names = list(groups)
        ax.bar(range(len(names)), [100 * groups[n]["fraction"] for n in names])
        ax.axhline(100 * summary["fraction"], color="gray", linestyle="--", label="whole model")
        ax.set_xticks(range(len(names)), names, rotation=30 if ax is right else 0, ha="right" if ax is right else "center")
        ax.set_ylabel("entries selected (%)")
        ax.set_title(title)
    left.legend()
    fig.suptitle(f"localized unlearning: {summary['selected']:,} of {summary['total']:,} entries selected")
    return save_figure(fig, path)


def selection_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The report's table of a localized run's selection by module type (header row first)."""
    rows = [["module type", "selected", "entries", "fraction"]]
    for name, g in summary["modules"].items():
        rows.append([name, f"{g['selected']:,}", f"{g['total']:,}", f"{100 * g['fraction']:.2f} %"])
    return rows


def _files_summary(entry: dict[str, Any]) -> str:
    """A model entry of audit.json in one cell: its path, how many files were hashed, the weight files' digests."""
    files = entry.get("files")
    if files is None:
        return f"{entry['path']}: {entry.get('note', 'not hashed')}"
    weights = [name for name in files if name.endswith((".safetensors", ".bin", ".pt", ".pth"))]
    shown = ", ".join(f"`{name}` {files[name][:12]}…" for name in weights[:3])
    more = f", +{len(weights) - 3} more" if len(weights) > 3 else ""
    return f"{entry['path']}: {len(files)} files SHA-256 hashed; weights {shown}{more}"


def audit_rows(record: dict[str, Any]) -> list[list[str]]:
    """The report's summary of a run's audit record (header row first): request id, what was hashed, verdict."""
    forget = record["forget"]
    source = f"; from {forget['source']}" if forget.get("source") else ""
    verdict = record.get("verdict")
    if verdict:
        rule = verdict["rule"]
        said = (f"**{verdict['verdict']}**: {verdict['forgotten_items']} of {verdict['items']} forget items "
                f"({100 * verdict['forgotten_fraction']:.0f} %) have ES ≤ {rule['es_threshold']:g} and probability ≤ "
                f"{rule['prob_ratio']:g} × the target's; forgotten needs ≥ "
                f"{100 * rule['min_forgotten_fraction']:.0f} %")
    else:
        said = f"omitted: {record.get('verdict_omitted', 'unknown')}"
    return [["field", "value"], ["request id", f"`{record['request_id']}`"],
            ["forget items", f"{forget['items']} items, SHA-256 {forget['sha256'][:16]}… (canonical JSON{source})"],
            ["input model", _files_summary(record["input_model"])],
            ["output model", _files_summary(record["output_model"])],
            ["verdict", said], ["started / finished", f"{record['started_at']} / {record['finished_at']}"]]
