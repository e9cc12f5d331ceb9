"""Sophia (SOUL) vs. AdamW: the same unlearning objective, the same step budget.

What it measures. For each optimizer and each learning rate of its small sweep, a fresh copy of
the built-in benchmark's target model is unlearned for `train.max_steps` steps with the same
objective (default: NPO + retain NLL), the same data order and the same seed, then evaluated:
forget extraction strength (ES, lower = more forgotten), forget quality (KS p-value of the
forget truth ratios against the retain model's, higher = closer to retraining) and model
utility (retain + world facts, higher = better kept). Per optimizer one learning rate is
chosen: the lowest forget ES among the runs that keep model utility >= 0.9 x the target
model's (when none does, the best trade-off, min(ES - utility / target utility), flagged).

Step time. Every `Unlearner.train_step` call is timed (forward, backward, clipping, Sophia's
Hessian estimate when due, the update). The printed ratio

    Sophia step time / AdamW step time = total train_step seconds per step, Sophia over AdamW

is pooled over every run of the sweep. Runs of the two optimizers alternate (and which one goes
first alternates too), after an untimed warm-up of both, so machine load affects both alike.
A ratio of 1.10 means Sophia's steps cost 10 % more; with the default gnb estimator every
`optim.hessian_interval` = 10 steps, most of the extra is one more forward + backward on the
forget batch per 10 steps. Wall seconds per step (the whole `run()`, final checkpoint
included) are reported too.

It runs in ONE process with the pure-PyTorch loop (`ray_unlearn.loop.Unlearner`), without
Ray: the point is the optimizer comparison, and Ray's start-up, scheduling and checkpoint
transfer would only add noise to the step times.

    python benchmarks/sophia_vs_adamw.py                         # small benchmark, defaults
    python benchmarks/sophia_vs_adamw.py --size micro --steps 10 --lrs-adamw 1e-4,1e-3 \\
        --lrs-sophia 1e-4,1e-3 benchmark.cache_dir=/tmp/rucache  # quick check
    python benchmarks/sophia_vs_adamw.py optim.hessian=hutchinson optim.rho=0.1

Outputs (in --out): results.json, results.md, es_vs_utility.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table

from ray_unlearn.config import JobConfig, load_config
from ray_unlearn.errors import UnlearnError

console = Console(highlight=False)
if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
    console = Console(highlight=False, width=150)

OPTIMIZERS = ("adamw", "sophia")
UTILITY_FLOOR = 0.9  # chosen lr must keep model utility >= this x the target model's
DEFAULT_OVERRIDES = ["eval.max_items=100"]  # evaluation on 100 items per split, for speed
RULE = (f"rule: per optimizer, the lr with the lowest forget ES among runs with model utility >= "
        f"{UTILITY_FLOOR:g} x the target's; if no run qualifies, the lowest ES - utility/target utility (flagged)")


# ---------------------------------------------------------------- arguments and config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("micro", "small", "medium"), help="built-in benchmark (default: small)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the config's train.max_steps)")
    p.add_argument("--objective", help="'+'-joined objective terms, weight 1 each, e.g. npo+retain_nll or "
                                       "ga+retain_nll (default: the config's objective)")
    p.add_argument("--lrs-adamw", default="1e-5,3e-5,1e-4", help="AdamW learning-rate sweep (comma-separated)")
    p.add_argument("--lrs-sophia", default="1e-5,3e-5,1e-4", help="Sophia learning-rate sweep (comma-separated)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="torch CPU threads (default: the cores this process may use)")
    p.add_argument("--out", default="runs/bench_sophia_vs_adamw", help="where results.json/.md and the PNG go")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.hessian=hutchinson benchmark.cache_dir=/tmp/rucache")
    return p.parse_args(argv)


def parse_lrs(text: str) -> list[float]:
    """'1e-5,3e-5' -> [1e-05, 3e-05]; a clear error for anything else."""
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UnlearnError(f"learning rates {text!r}: give comma-separated numbers, e.g. 1e-5,3e-5,1e-4") from None
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise UnlearnError(f"learning rates {text!r}: give at least one positive number")
    return lrs


def build_config(args: argparse.Namespace) -> JobConfig:
    """Defaults, then DEFAULT_OVERRIDES, the flags and the key=value overrides (later ones win)."""
    flags = []
    if args.size:
        flags.append(f"benchmark.size={args.size}")
    if args.steps is not None:
        flags.append(f"train.max_steps={args.steps}")
    cfg = load_config(None, DEFAULT_OVERRIDES + flags + list(args.overrides))
    if args.objective:
        # `objective.terms.x=1` overrides are merged into the default terms, so they cannot drop
        # npo; the objective flag replaces the terms instead.
        terms = {name.strip(): 1.0 for name in args.objective.split("+") if name.strip()}
        cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, terms=terms))
    from ray_unlearn.objectives import build_objective

    build_objective(cfg.objective)  # unknown term names fail here, listing the valid ones
    return cfg


def with_optimizer(cfg: JobConfig, name: str, lr: float) -> JobConfig:
    """A copy of `cfg` whose optim section uses optimizer `name` at peak lr `lr`."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name=name, lr=lr))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UnlearnError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(name)


# ---------------------------------------------------------------- what every run shares


@dataclass
class Bench:
    """Config, data and models shared by every run of the sweep."""

    cfg: JobConfig
    inputs: Any        # ray_unlearn.job.JobInputs
    tokenizer: Any
    data: Any          # ray_unlearn.loop.UnlearnData
    ref: Any | None    # frozen reference model, when the objective needs one
    device: torch.device

    def fresh_target(self) -> Any:
        """A newly loaded copy of the model to unlearn, on the device."""
        from ray_unlearn.models.io import load_model

        c = self.cfg.model
        return load_model(self.inputs.model_path, c.dtype, c.trust_remote_code).to(self.device)


def setup(cfg: JobConfig, device: torch.device) -> Bench:
    """Build/load the benchmark, tokenizer, encoded data and (when needed) the reference model."""
    from ray_unlearn.job import load_checked, resolve_inputs
    from ray_unlearn.loop import encode_data
    from ray_unlearn.objectives import build_objective, objective_ref_streams

    with console.status(f"benchmark {cfg.benchmark.size}: loading (the first time it is built, a few minutes)"):
        inputs = resolve_inputs(cfg)
    model, tokenizer = load_checked(cfg, inputs)
    ref = None
    if objective_ref_streams(build_objective(cfg.objective)):
        ref = model.to(device).eval().requires_grad_(False)
    data = encode_data(cfg, tokenizer, inputs.forget, inputs.retain, inputs.kind)
    return Bench(cfg, inputs, tokenizer, data, ref, device)


def evaluate(bench: Bench, model: Any, retain_tr: list[float] | None) -> dict[str, Any]:
    """evaluate_model on the benchmark's eval splits (forget quality when retain_tr is given)."""
    from ray_unlearn.eval.suite import evaluate_model

    c = bench.cfg
    return evaluate_model(model, bench.tokenizer, bench.inputs.eval_splits, c.eval, c.data.prompt_template,
                          c.data.max_length, retain_truth_ratios=retain_tr)


def reference_summaries(bench: Bench) -> tuple[dict[str, dict[str, float]], list[float] | None]:
    """Summaries of the target and retain models; the retain model's forget truth ratios."""
    from ray_unlearn.eval.suite import forget_truth_ratios, summary
    from ray_unlearn.models.io import load_model

    out, retain_tr = {}, None
    if bench.inputs.retain_model_path:
        c = bench.cfg.model
        with console.status("evaluating the retain model"):
            retain = load_model(bench.inputs.retain_model_path, c.dtype, c.trust_remote_code).to(bench.device)
            results = evaluate(bench, retain, None)
        out["retain"] = summary(results)
        retain_tr = forget_truth_ratios(results) if "forget_truth_ratio" in results else None
    with console.status("evaluating the target model"):
        target = bench.ref if bench.ref is not None else bench.fresh_target()
        out["target"] = summary(evaluate(bench, target, retain_tr))
    return out, retain_tr


# ---------------------------------------------------------------- one run


def time_train_steps(unlearner: Any, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Wrap `unlearner.train_step` (loop.py unchanged): every call's wall and process-CPU seconds
    land in the returned {"wall": [...], "cpu": [...]}."""
    seconds: dict[str, list[float]] = {"wall": [], "cpu": []}
    step = unlearner.train_step

    def timed_step() -> dict[str, float]:
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        logs = step()
        sync()
        seconds["wall"].append(time.perf_counter() - wall)
        seconds["cpu"].append(time.process_time() - cpu)
        return logs

    unlearner.train_step = timed_step
    return seconds


def unlearn(bench: Bench, cfg: JobConfig) -> tuple[Any, dict[str, Any]]:
    """Unlearn a fresh target copy with `cfg`; returns (model, timing and loop figures)."""
    from ray_unlearn.loop import LoopEnv, Unlearner

    sync = torch.cuda.synchronize if bench.device.type == "cuda" else (lambda: None)
    torch.manual_seed(cfg.train.seed)  # same stochastic Hessian samples for every lr
    model = bench.fresh_target()
    with tempfile.TemporaryDirectory(prefix="bench_sophia_ckpt_") as tmp:
        env = LoopEnv(device=bench.device, checkpoint_dir=Path(tmp))
        unlearner = Unlearner(cfg, model, bench.ref, bench.data, bench.tokenizer.pad_token_id, env)
        step_seconds = time_train_steps(unlearner, sync)
        t0 = time.perf_counter()
        history = unlearner.run()
        wall = time.perf_counter() - t0
    clip = [h["clip_rate"] for h in history if "clip_rate" in h]
    return model, {"steps": len(step_seconds["wall"]), "train_step_s": sum(step_seconds["wall"]),
                   "train_step_cpu_s": sum(step_seconds["cpu"]), "wall_s": wall,
                   "clip_rate": sum(clip) / len(clip) if clip else None,
                   "step_ms": [round(x * 1e3, 2) for x in step_seconds["wall"]]}


def run_one(bench: Bench, rnd: int, optimizer: str, lr: float, retain_tr: list[float] | None) -> dict[str, Any]:
    """One (optimizer, lr) run of round `rnd`: unlearn, evaluate; a non-finite loss is recorded as a failed row."""
    from ray_unlearn.eval.suite import summary

    row: dict[str, Any] = {"round": rnd, "optimizer": optimizer, "lr": lr}
    try:
        model, figures = unlearn(bench, with_optimizer(bench.cfg, optimizer, lr))
    except UnlearnError as e:
        console.print(f"  {optimizer} lr={lr:g} failed: {e}")
        return {**row, "error": str(e)}
    s = summary(evaluate(bench, model, retain_tr))
    row.update(figures, forget_es=s.get("extraction_strength"), forget_quality=s.get("forget_quality"),
               model_utility=s.get("model_utility"))
    row["step_s"] = figures["train_step_s"] / max(1, figures["steps"])
    row["wall_step_s"] = figures["wall_s"] / max(1, figures["steps"])
    console.print(f"  {optimizer:6s} lr={lr:<8g} ES {_f(row['forget_es'])}  FQ {_f(row['forget_quality'])}  "
                  f"MU {_f(row['model_utility'])}  {row['step_s'] * 1e3:.1f} ms/step")
    return row


def warm_up(bench: Bench) -> None:
    """Two untimed steps of each optimizer, so one-off start-up costs land in neither's timing."""
    for name in OPTIMIZERS:
        cfg = with_optimizer(bench.cfg, name, bench.cfg.optim.lr)
        unlearn(bench, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=2, log_every=1)))


def interleaved(lrs: dict[str, list[float]]) -> list[tuple[int, str, float]]:
    """(round, optimizer, lr): round i runs each optimizer's i-th lr back to back, and which
    optimizer goes first alternates from round to round."""
    order = []
    for i in range(max(len(v) for v in lrs.values())):
        names = OPTIMIZERS if i % 2 == 0 else OPTIMIZERS[::-1]
        order += [(i, n, lrs[n][i]) for n in names if i < len(lrs[n])]
    return order


# ---------------------------------------------------------------- choosing and summarising


def choose_lr(rows: list[dict[str, Any]], target_mu: float | None) -> dict[str, Any] | None:
    """The chosen run of one optimizer (see RULE); `fallback` is set when none kept the utility."""
    done = [r for r in rows if r.get("forget_es") is not None]
    if not done:
        return None
    if target_mu is None or any(r.get("model_utility") is None for r in done):
        return {**min(done, key=lambda r: r["forget_es"]), "fallback": "no model utility: lowest ES"}
    kept = [r for r in done if r["model_utility"] >= UTILITY_FLOOR * target_mu]
    if kept:
        return {**min(kept, key=lambda r: r["forget_es"]), "fallback": None}
    best = min(done, key=lambda r: r["forget_es"] - r["model_utility"] / target_mu)
    return {**best, "fallback": f"no lr kept {UTILITY_FLOOR:g} x target utility: best ES-utility trade-off"}


def step_time_ratio(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per step pooled over every finished run of each optimizer, and Sophia / AdamW.

    ratio: train_step wall time (the headline); cpu_ratio: train_step process-CPU time (less
    sensitive to other processes on the machine); wall_ratio: whole run() wall time;
    round_ratios: the train_step ratio of each round (the spread shows how noisy the machine was).
    """
    per: dict[str, Any] = {}
    for name in OPTIMIZERS:
        done = [r for r in rows if r["optimizer"] == name and r.get("steps")]
        steps = sum(r["steps"] for r in done)
        for key, field in (("step_s", "train_step_s"), ("cpu_step_s", "train_step_cpu_s"), ("wall_step_s", "wall_s")):
            per[f"{name}_{key}"] = sum(r[field] for r in done) / steps if steps else None
    for ratio, key in (("ratio", "step_s"), ("cpu_ratio", "cpu_step_s"), ("wall_ratio", "wall_step_s")):
        a, s = per[f"adamw_{key}"], per[f"sophia_{key}"]
        per[ratio] = s / a if a and s else None
    by_round: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.get("steps"):
            by_round.setdefault(r["round"], {})[r["optimizer"]] = r["step_s"]
    per["round_ratios"] = [t["sophia"] / t["adamw"] for _, t in sorted(by_round.items()) if len(t) == 2]
    return per


def edge_warnings(rows: list[dict[str, Any]], chosen: dict[str, dict | None]) -> list[str]:
    """A note for every optimizer whose chosen lr is the largest or smallest it tried."""
    notes = []
    for name, c in chosen.items():
        lrs = sorted(r["lr"] for r in rows if r["optimizer"] == name)
        if c is not None and len(lrs) > 1 and c["lr"] in (lrs[0], lrs[-1]):
            notes.append(f"{name}: the chosen lr {c['lr']:g} is at the edge of its sweep; widen --lrs-{name}")
    return notes


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and 0 < abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


COLUMNS = ["optimizer", "lr", "forget ES ↓", "forget quality ↑", "model utility ↑", "utility / target",
           "ms/step (train_step)", "ms/step (wall)", "Sophia clip rate"]


def table_rows(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> list[list[str]]:
    """One row per reference model and per run, as strings (shared by the console and Markdown tables)."""
    target_mu = refs.get("target", {}).get("model_utility")
    out = []
    for name, s in refs.items():
        mu = s.get("model_utility")
        out.append([f"({name} model)", "–", _f(s.get("extraction_strength")), _f(s.get("forget_quality")),
                    _f(mu), _f(mu / target_mu) if mu is not None and target_mu else "–", "–", "–", "–"])
    for r in rows:
        if "error" in r:
            out.append([r["optimizer"], f"{r['lr']:g}", "failed", "–", "–", "–", "–", "–", "–"])
            continue
        mu = r["model_utility"]
        out.append([r["optimizer"], f"{r['lr']:g}", _f(r["forget_es"]), _f(r["forget_quality"]), _f(mu),
                    _f(mu / target_mu) if mu is not None and target_mu else "–", f"{r['step_s'] * 1e3:.1f}",
                    f"{r['wall_step_s'] * 1e3:.1f}", _f(r["clip_rate"], 3)])
    return out


def summary_lines(cfg: JobConfig, chosen: dict[str, dict | None], timing: dict[str, Any],
                  notes: list[str]) -> list[str]:
    """The chosen run per optimizer, the step-time ratio, the rule, the setup and any warnings."""
    lines = [RULE]
    for name, c in chosen.items():
        if c is None:
            lines.append(f"chosen {name}: none (every run failed)")
            continue
        lines.append(f"chosen {name}: lr={c['lr']:g}  forget ES {_f(c['forget_es'])}  forget quality "
                     f"{_f(c['forget_quality'])}  model utility {_f(c['model_utility'])}"
                     + (f"  [{c['fallback']}]" if c["fallback"] else ""))
    ratio = timing["ratio"]
    lines.append(f"Sophia step time / AdamW step time = {ratio:.2f}" if ratio else
                 "Sophia step time / AdamW step time = – (a side has no finished run)")
    if ratio:
        checks = [f"AdamW {timing['adamw_step_s'] * 1e3:.1f} ms, Sophia {timing['sophia_step_s'] * 1e3:.1f} ms "
                  f"per train_step; whole run() wall ratio {timing['wall_ratio']:.2f}"]
        if timing["cpu_ratio"] and timing["device"] == "cpu":  # CPU time says nothing about GPU work
            checks.append(f"CPU-time ratio {timing['cpu_ratio']:.2f}")
        checks.append("per-round ratios " + ", ".join(f"{x:.2f}" for x in timing["round_ratios"]))
        lines.append("(" + "; ".join(checks) + ")")
    o = cfg.optim
    lines.append(f"setup: {cfg.benchmark.size}/{cfg.data.forget_split}, objective "
                 f"{' + '.join(f'{w:g}×{t}' for t, w in cfg.objective.terms.items())}, {cfg.train.max_steps} steps, "
                 f"batch {cfg.train.batch_size}, Sophia hessian={o.hessian} every {o.hessian_interval}, "
                 f"rho={o.rho:g}, eval.max_items={cfg.eval.max_items}, {torch.get_num_threads()} threads")
    return lines + [f"warning: {n}" for n in notes]


# ---------------------------------------------------------------- outputs


def print_results(rows_txt: list[list[str]], lines: list[str]) -> None:
    table = Table(title="Sophia vs. AdamW: same objective, same steps")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows_txt:
        table.add_row(*r)
    console.print(table)
    for line in lines:
        console.print(line)


def write_markdown(path: Path, rows_txt: list[list[str]], lines: list[str]) -> None:
    md = ["# Sophia vs. AdamW", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(r) + " |" for r in rows_txt]
    md += [""] + [f"- {line}" for line in lines]
    _write_text(path, "\n".join(md) + "\n")


def plot_scatter(path: Path, rows: list[dict[str, Any]], refs: dict[str, dict[str, float]],
                 chosen: dict[str, dict | None]) -> None:
    """Forget ES (x) vs. model utility (y): one marker per run, colored by optimizer, lr written beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, color in zip(OPTIMIZERS, ("tab:blue", "tab:orange")):
        done = [r for r in rows if r["optimizer"] == name and r.get("model_utility") is not None]
        ax.scatter([r["forget_es"] for r in done], [r["model_utility"] for r in done], c=color, label=name)
        for r in done:
            ax.annotate(f"{r['lr']:g}", (r["forget_es"], r["model_utility"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        c = chosen.get(name)
        if c is not None and c.get("model_utility") is not None:
            ax.scatter([c["forget_es"]], [c["model_utility"]], s=160, facecolors="none", edgecolors=color)
    for name, marker in (("target", "s"), ("retain", "^")):
        s = refs.get(name, {})
        if s.get("model_utility") is not None:
            ax.scatter([s["extraction_strength"]], [s["model_utility"]], c="black", marker=marker,
                       label=f"{name} model")
    target_mu = refs.get("target", {}).get("model_utility")
    if target_mu:
        ax.axhline(UTILITY_FLOOR * target_mu, color="grey", ls="--", lw=0.8,
                   label=f"{UTILITY_FLOOR:g} × target utility")
    ax.set_xlabel("forget extraction strength (lower = more forgotten)")
    ax.set_ylabel("model utility")
    ax.set_title("Sophia vs. AdamW (circled: chosen lr)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(out: Path, cfg: JobConfig, rows: list[dict[str, Any]], refs: dict[str, dict[str, float]],
                  chosen: dict[str, dict | None], timing: dict[str, Any], lines: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {"rule": RULE, "config": dataclasses.asdict(cfg), "references": refs, "runs": rows,
               "chosen": chosen, "timing": timing, "summary": lines}
    _write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    write_markdown(out / "results.md", table_rows(rows, refs), lines)
    plot_scatter(out / "es_vs_utility.png", rows, refs, chosen)


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        lrs = {"adamw": parse_lrs(args.lrs_adamw), "sophia": parse_lrs(args.lrs_sophia)}
        device = pick_device(args.device)
        torch.set_num_threads(max(1, args.threads))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar per run
        bench = setup(cfg, device)
        refs, retain_tr = reference_summaries(bench)
        warm_up(bench)
        order = interleaved(lrs)
        console.print(f"{len(order)} runs of {cfg.train.max_steps} steps on {device} "
                      f"({torch.get_num_threads()} threads), interleaved:")
        rows = [run_one(bench, rnd, name, lr, retain_tr) for rnd, name, lr in order]
    except UnlearnError as e:
        console.print(f"error: {e}", style="red")
        return 2
    rows.sort(key=lambda r: (OPTIMIZERS.index(r["optimizer"]), r["lr"]))
    target_mu = refs.get("target", {}).get("model_utility")
    chosen = {name: choose_lr([r for r in rows if r["optimizer"] == name], target_mu) for name in OPTIMIZERS}
    timing = {**step_time_ratio(rows), "device": str(device)}
    lines = summary_lines(cfg, chosen, timing, edge_warnings(rows, chosen))
    print_results(table_rows(rows, refs), lines)
    out = Path(args.out)
    write_outputs(out, cfg, rows, refs, chosen, timing, lines)
    console.print(f"results in {out.resolve()} (results.json, results.md, es_vs_utility.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
