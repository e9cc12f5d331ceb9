"""Sophia (SOUL) vs. AdamW: the same unlearning objective, the same step budget.

What it measures. For each optimizer and each learning rate of its small sweep, a fresh copy of
the built-in benchmark's target model is unlearned for `train.max_steps` steps with the same
objective (default: NPO + retain NLL), the same data order and the same seed, then evaluated:
forget extraction strength (ES, lower = more forgotten), forget quality (KS p-value of the
forget truth ratios against the retain model's, higher = closer to retraining) and model
utility (retain + world facts, higher = better kept). Per optimizer one learning rate is
chosen: the lowest forget ES among the runs that keep model utility >= 0.9 x the target
model's (when none does, the best trade-off, min(ES - utility / target utility), flagged).

Step time. The headline

    Sophia step time / AdamW step time = X.XX

is measured after the sweep: an AdamW and a Sophia `Unlearner` (each at its chosen lr, on fresh
target copies) take 2 x `train.max_steps` `train_step`s in lock step, alternating which goes
first, so any moment's machine load falls on both alike; the ratio is the median, over windows
of `optim.hessian_interval` paired steps (one Hessian estimate each), of Sophia's time over
AdamW's. The window range printed beside it shows how much outside load there was. A
`train_step` is the whole optimizer step: forward passes (policy, and reference for NPO),
backward, clipping, Sophia's Hessian estimate when due, the update. 1.10 means Sophia's steps
cost 10 % more; with the gnb estimator most of the extra is one more forward + backward on
the forget batch every 10 steps (the default empirical estimator reuses the step's gradient). Below it, as checks, the same ratio from the
sweep runs themselves (every `train_step` of every run pooled; the wall time of whole `run()`s
divided by steps; each round's ratio): runs of the two optimizers alternate, after an untimed
warm-up, but a run lasts seconds, so on a busy machine these drift far from the headline; that
spread is the noise.

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
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
# On `small`, 60 NPO steps at 1e-5 barely move either optimizer (forget ES ~0.96-0.99) and both cross
# 0.9 x target utility between 3e-5 and 1e-4: the default grid is the same for both, finest there.
DEFAULT_LRS = "2e-5,3e-5,5e-5,7e-5,1e-4"
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
    p.add_argument("--lrs-adamw", default=DEFAULT_LRS,
                   help="AdamW learning-rate sweep, comma-separated (default: %(default)s)")
    p.add_argument("--lrs-sophia", default=DEFAULT_LRS,
                   help="Sophia learning-rate sweep, comma-separated (default: %(default)s)")
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
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.suite import evaluate_model

    c = bench.cfg
    return evaluate_model(model, bench.tokenizer, bench.inputs.eval_splits, c.eval, prompt_format(c.data),
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


def make_unlearner(bench: Bench, cfg: JobConfig, checkpoint_dir: Path) -> Any:
    """An `Unlearner` over a fresh target copy (plain process: rank 0 of 1, no Ray)."""
    from ray_unlearn.loop import LoopEnv, Unlearner

    env = LoopEnv(device=bench.device, checkpoint_dir=checkpoint_dir)
    return Unlearner(cfg, bench.fresh_target(), bench.ref, bench.data, bench.tokenizer.pad_token_id, env)


def time_train_steps(unlearner: Any, device: torch.device) -> list[float]:
    """Wrap `unlearner.train_step` (loop.py unchanged) so every call's wall seconds land in the returned list."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds: list[float] = []
    step = unlearner.train_step

    def timed_step() -> dict[str, float]:
        sync()
        t0 = time.perf_counter()
        logs = step()
        sync()
        seconds.append(time.perf_counter() - t0)
        return logs

    unlearner.train_step = timed_step
    return seconds


def unlearn(bench: Bench, cfg: JobConfig) -> tuple[Any, dict[str, Any]]:
    """Unlearn a fresh target copy with `cfg` (`Unlearner.run()`); returns (model, timing and loop figures)."""
    torch.manual_seed(cfg.train.seed)  # same stochastic Hessian samples for every lr
    with tempfile.TemporaryDirectory(prefix="bench_sophia_ckpt_") as tmp:
        unlearner = make_unlearner(bench, cfg, Path(tmp))
        step_seconds = time_train_steps(unlearner, bench.device)
        t0 = time.perf_counter()
        history = unlearner.run()
        wall = time.perf_counter() - t0
    clip = [h["clip_rate"] for h in history if "clip_rate" in h]
    return unlearner.model, {"steps": len(step_seconds), "train_step_s": sum(step_seconds), "wall_s": wall,
                             "clip_rate": sum(clip) / len(clip) if clip else None,
                             "step_ms": [round(x * 1e3, 2) for x in step_seconds]}


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


# ---------------------------------------------------------------- step time


def paired_step_seconds(bench: Bench, lrs: dict[str, float]) -> dict[str, list[float]]:
    """Wall seconds of every `train_step` of an AdamW and a Sophia unlearner (fresh target copies),
    stepped in lock step, the order alternating (A S, S A, ...), so each moment's load hits both.

    The first step of each is untimed (optimizer state is allocated there); then it times
    max(2 x train.max_steps, 5 x optim.hessian_interval) steps each, so every window of
    hessian_interval steps holds exactly one Hessian estimate and there are enough windows for
    their median to shrug off a few that a burst of outside load hit.
    """
    cfg = bench.cfg
    steps = max(2 * cfg.train.max_steps, 5 * cfg.optim.hessian_interval)
    torch.manual_seed(cfg.train.seed)
    with tempfile.TemporaryDirectory(prefix="bench_sophia_ckpt_") as tmp:
        unlearners = {n: make_unlearner(bench, with_optimizer(cfg, n, lrs[n]), Path(tmp)) for n in OPTIMIZERS}
        for u in unlearners.values():
            u.model.train()  # as Unlearner.run() does
            u.train_step()
        seconds = {n: time_train_steps(u, bench.device) for n, u in unlearners.items()}
        for i in range(steps):
            for name in OPTIMIZERS if i % 2 == 0 else OPTIMIZERS[::-1]:
                unlearners[name].train_step()
    return seconds


def paired_ratio(seconds: dict[str, list[float]], window: int) -> dict[str, Any]:
    """Sophia / AdamW time per window of `window` paired steps (one Hessian estimate each); the
    headline is the median window, so a burst of load from elsewhere moves it little."""
    a, s = seconds["adamw"], seconds["sophia"]
    windows = [sum(s[i:i + window]) / sum(a[i:i + window]) for i in range(0, len(a) - window + 1, window)]
    return {"ratio": statistics.median(windows), "window_ratios": windows, "window_steps": window,
            "adamw_ms": 1e3 * statistics.median(a), "sophia_ms": 1e3 * statistics.median(s),
            "adamw_step_ms": [round(x * 1e3, 2) for x in a], "sophia_step_ms": [round(x * 1e3, 2) for x in s]}


def sweep_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Checks from the sweep runs: train_step and whole-run() seconds per step pooled over every
    finished run, Sophia / AdamW, and the train_step ratio of each round (its spread = the noise)."""
    per: dict[str, Any] = {}
    for name in OPTIMIZERS:
        done = [r for r in rows if r["optimizer"] == name and r.get("steps")]
        steps = sum(r["steps"] for r in done)
        per[f"{name}_step_s"] = sum(r["train_step_s"] for r in done) / steps if steps else None
        per[f"{name}_wall_step_s"] = sum(r["wall_s"] for r in done) / steps if steps else None
    for ratio, key in (("train_step_ratio", "step_s"), ("run_wall_ratio", "wall_step_s")):
        a, s = per[f"adamw_{key}"], per[f"sophia_{key}"]
        per[ratio] = s / a if a and s else None
    by_round: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.get("steps"):
            by_round.setdefault(r["round"], {})[r["optimizer"]] = r["step_s"]
    per["round_ratios"] = [t["sophia"] / t["adamw"] for _, t in sorted(by_round.items()) if len(t) == 2]
    return per


def measure_step_time(bench: Bench, rows: list[dict[str, Any]], chosen: dict[str, dict | None]) -> dict[str, Any]:
    """The paired measurement at each optimizer's chosen lr (config lr when none), plus the sweep's checks."""
    lrs = {n: chosen[n]["lr"] if chosen[n] else bench.cfg.optim.lr for n in OPTIMIZERS}
    with console.status("timing AdamW and Sophia steps in lock step"):
        try:
            paired = paired_ratio(paired_step_seconds(bench, lrs), bench.cfg.optim.hessian_interval)
        except UnlearnError as e:
            paired = {"ratio": None, "error": str(e)}
    return {"paired": {"lrs": lrs, **paired}, "sweep": sweep_ratios(rows), "device": str(bench.device)}


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
    lines += timing_lines(timing)
    o = cfg.optim
    lines.append(f"setup: {cfg.benchmark.size}/{cfg.data.forget_split}, objective "
                 f"{' + '.join(f'{w:g}×{t}' for t, w in cfg.objective.terms.items())}, {cfg.train.max_steps} steps, "
                 f"batch {cfg.train.batch_size}, Sophia hessian={o.hessian} every {o.hessian_interval}, "
                 f"rho={o.rho:g}, eval.max_items={cfg.eval.max_items}, {torch.get_num_threads()} threads")
    return lines + [f"warning: {n}" for n in notes]


def timing_lines(timing: dict[str, Any]) -> list[str]:
    """The headline ratio (paired steps) and the checks from the sweep runs."""
    p, sw = timing["paired"], timing["sweep"]
    if p["ratio"] is None:
        lines = [f"Sophia step time / AdamW step time = – (paired timing failed: {p.get('error')})"]
    else:
        w = p["window_ratios"]
        lines = [f"Sophia step time / AdamW step time = {p['ratio']:.2f}",
                 f"(median of {len(w)} windows of {p['window_steps']} lock-step train_steps at the chosen lrs, "
                 f"windows {min(w):.2f}-{max(w):.2f}; median step AdamW {p['adamw_ms']:.1f} ms, "
                 f"Sophia {p['sophia_ms']:.1f} ms)"]
    if sw["train_step_ratio"]:
        lines.append(f"(checks from the sweep runs: train_step {sw['train_step_ratio']:.2f}, whole run() "
                     f"{sw['run_wall_ratio']:.2f}, per round " + ", ".join(f"{x:.2f}" for x in sw["round_ratios"])
                     + "; if these are far from the headline, the machine was busy)")
    return lines


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
    timing = measure_step_time(bench, rows, chosen)
    lines = summary_lines(cfg, chosen, timing, edge_warnings(rows, chosen))
    print_results(table_rows(rows, refs), lines)
    out = Path(args.out)
    write_outputs(out, cfg, rows, refs, chosen, timing, lines)
    console.print(f"results in {out.resolve()} (results.json, results.md, es_vs_utility.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
