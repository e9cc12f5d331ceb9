"""Ray Train overhead: steps/s of the unlearning loop in a 1-worker Ray Train run vs. a plain process.

What it measures. The same unlearning run (the config's defaults: SOUL's Sophia optimizer,
NPO + retain NLL, reporting every `train.log_every` = 5 steps; the built-in `micro` benchmark
by default, `--steps` optimizer steps, no evaluation) runs two ways:

- `ray train`: the TorchTrainer of `ray_unlearn.train.make_trainer`, run by `run_trainer` as
  `ray-unlearn run` does, with `ray.num_workers=1` (one worker reserving `ray.cpus_per_worker`
  CPUs); its worker runs `train.train_func`: load, `Unlearner.run()`, `ray.train.report`;
- `plain`: `ray_unlearn.loop.load_run` + `Unlearner(...).run()` in a freshly spawned Python
  process that never imports Ray, while no Ray cluster is running.

Both sides run the identical loop, with one addition (`install_loop_clock`, applied by both): each
optimizer step's logs carry the clock at the step's start and the seconds spent in `train_step`
so far, so the history of logged steps (in the final checkpoint) shows both the loop's pace and
its compute. Start-up (Ray's start, the worker's start, imports, model load), the first
`--warmup` steps and the final checkpoint are left out. Between two logged steps lie
`train.log_every` loop iterations: the steps themselves and what the loop does between them,
which in Ray Train includes one `ray.train.report`. The headline, printed as the very last line,

    ray train 1 worker / plain loop: R

is Ray's loop steps/s over the plain loop's (1.00 = no overhead; the goal is >= 0.95): per side,
the median over those windows of seconds per step, inverted; R is the median of `--rounds`
per-round ratios. Each round runs both sides back to back, alternating which goes first, so any
moment's outside load falls on both alike. Below the table: the same ratio from `train_step`
time alone (the loop's `step_time_s`: forward passes of the policy and the NPO reference,
backward, clipping, Sophia's update), the time per window spent outside `train_step` (Ray
Train 2.60 blocks a report until its controller polls the worker, every
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 2 s by default, which made R = 0.08 on micro;
`ray_unlearn.train` sets 0.05 s unless the variable is set, R = 0.95), and the whole-run wall times (Ray start;
`trainer.fit()`; the plain process from spawn to result). `train.log_every=N` changes how
often the loop reports.

Process settings. Ray gives a worker that reserves C CPUs OMP_NUM_THREADS = floor(C) (at least
1; an OMP_NUM_THREADS already set wins), so with the default `ray.cpus_per_worker=1` the Ray
worker runs torch on ONE thread; and Ray starts its workers at a lower CPU priority (niceness 15
unless RAY_worker_niceness says otherwise), which on a busy machine hands the worker's CPU time
to other processes. For a like-for-like comparison of the loop the script first asks a Ray task
reserving `ray.cpus_per_worker` CPUs for its `torch.get_num_threads()` and niceness, and the
plain process uses the same: `torch.set_num_threads(threads)` and `os.nice` up to that niceness.
`--threads` and `--plain-niceness` override them (`--plain-niceness 0`: the plain loop at
normal priority, as a plain script runs; on an idle machine it makes no difference, on a busy
one the gap it opens is Ray's scheduling priority, not its overhead).

    python benchmarks/ray_overhead.py                               # micro, 60 steps, 2 rounds, ~3 min
    python benchmarks/ray_overhead.py --rounds 4 --steps 60 train.log_every=10
    python benchmarks/ray_overhead.py --size small ray.cpus_per_worker=2   # plain loop on 2 threads too
    python benchmarks/ray_overhead.py benchmark.cache_dir=/tmp/rucache optim.name=adamw

Outputs (in --out, default runs/bench_ray_overhead): results.json (every logged step's clock,
the config), results.md (the table and the summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from ray_unlearn.config import JobConfig, load_config
from ray_unlearn.errors import UnlearnError

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, reachable on loopback only

console = Console(highlight=False)
if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
    console = Console(highlight=False, width=150)

SIDES = ("ray", "plain")
LABELS = {"ray": "ray train (1 worker)", "plain": "plain loop (no Ray)"}
GOAL = 0.95
MIN_WINDOWS = 3
DEFAULT_OVERRIDES = ["eval.enabled=false", "ray.cpus_per_worker=1"]
# Forced after the user's overrides: one worker, no in-loop evaluation, one checkpoint (at the end).
FORCED_OVERRIDES = ["ray.num_workers=1", "train.eval_every=0", "train.checkpoint_every=0"]
START, BUSY = "clock/start_s", "clock/train_step_s"  # history keys added by install_loop_clock


# ---------------------------------------------------------------- arguments and config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags and the key=value config overrides."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="micro", choices=("micro", "small", "medium"),
                   help="built-in benchmark (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5,
                   help="first steps of each run left out of the measurement (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of (ray, plain) runs, the order alternating (default: %(default)s)")
    p.add_argument("--threads", type=int,
                   help="torch threads of the plain loop (default: those of a Ray worker with ray.cpus_per_worker "
                        "CPUs, asked of Ray)")
    p.add_argument("--plain-niceness", type=int,
                   help="niceness of the plain loop's process, at least this script's (default: a Ray worker's)")
    p.add_argument("--out", default="runs/bench_ray_overhead", help="where results.json/.md go")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.log_every=1 benchmark.cache_dir=/tmp/rucache")
    return p.parse_args(argv)


def logged_steps(cfg: JobConfig) -> list[int]:
    """The steps `Unlearner.run()` puts in its history: every log_every-th and the last."""
    t = cfg.train
    return sorted({s for s in range(1, t.max_steps + 1) if s % t.log_every == 0} | {t.max_steps})


def build_config(args: argparse.Namespace) -> JobConfig:
    """Defaults, DEFAULT_OVERRIDES, the flags, the key=value overrides, then FORCED_OVERRIDES."""
    if args.rounds < 1:
        raise UnlearnError("--rounds: give at least 1 (2 or more alternate which side goes first)")
    if args.warmup < 0:
        raise UnlearnError("--warmup: give 0 or more steps")
    flags = [f"benchmark.size={args.size}", f"train.max_steps={args.steps}"]
    cfg = load_config(None, DEFAULT_OVERRIDES + flags + list(args.overrides) + FORCED_OVERRIDES)
    windows = len([s for s in logged_steps(cfg) if s > args.warmup]) - 1
    if windows < MIN_WINDOWS:
        raise UnlearnError(f"--steps {args.steps} with --warmup {args.warmup} and train.log_every="
                           f"{cfg.train.log_every} leaves {max(0, windows)} windows between logged steps; "
                           f"need {MIN_WINDOWS}: raise --steps or lower train.log_every")
    return cfg


def with_output_dir(cfg: JobConfig, path: Path) -> JobConfig:
    """A copy of `cfg` writing under `path` (a fresh directory per run, so no run resumes another)."""
    return dataclasses.replace(cfg, output_dir=str(path))


# ---------------------------------------------------------------- the clock (both sides)


def install_loop_clock() -> None:
    """Wrap `Unlearner.train_step` (loop.py unchanged) so each step's logs carry the clock at its
    start (START) and the seconds spent in train_step before it (BUSY): differences between two
    logged steps give the loop's time and its compute time over the steps between them."""
    from ray_unlearn.loop import Unlearner

    step = Unlearner.train_step
    if getattr(step, "clocked", False):
        return

    def clocked(self: Any) -> dict[str, float]:
        start, busy = time.perf_counter(), getattr(self, "_bench_busy_s", 0.0)
        logs = step(self)
        self._bench_busy_s = busy + time.perf_counter() - start
        logs[START], logs[BUSY] = start, busy
        return logs

    clocked.clocked = True
    Unlearner.train_step = clocked


def windows(history: list[dict[str, float]], warmup: int) -> list[dict[str, float]]:
    """Seconds per step between consecutive logged steps after the warm-up: `loop` (the whole loop
    iteration, reports included), `train_step` (compute only), `outside` (loop - train_step per window)."""
    logged = sorted((h for h in history if h["step"] > warmup), key=lambda h: h["step"])
    out = []
    for a, b in zip(logged, logged[1:]):
        n = b["step"] - a["step"]
        loop, busy = b[START] - a[START], b[BUSY] - a[BUSY]
        out.append({"steps": n, "loop": loop / n, "train_step": busy / n, "outside": loop - busy})
    return out


# ---------------------------------------------------------------- the plain side


def plain_child(cfg: JobConfig, inputs: Any, setting: dict[str, int], checkpoint_dir: str) -> dict[str, Any]:
    """Runs in a fresh spawned process (no Ray): take `setting`'s torch threads and niceness, load
    the run as a Ray Train worker does, `Unlearner.run()`; returns the history and the settings used."""
    import torch

    from ray_unlearn.cli import quiet_libraries
    from ray_unlearn.loop import LoopEnv, Unlearner, load_run

    quiet_libraries()
    torch.set_num_threads(setting["threads"])
    os.nice(max(0, setting["niceness"] - os.nice(0)))  # raise only: lowering needs privileges
    install_loop_clock()
    torch.manual_seed(cfg.train.seed)  # as train_func does on rank 0
    model, ref, data, tokenizer = load_run(cfg, inputs)

    def on_step(step: int, total: int, logs: dict[str, float]) -> None:
        if step % cfg.train.log_every == 0 or step == total:
            print(f"[plain] step {step}/{total} {1e3 * logs['step_time_s']:.0f} ms/step", flush=True)

    env = LoopEnv(checkpoint_dir=Path(checkpoint_dir), on_step=on_step)
    history = Unlearner(cfg, model, ref, data, tokenizer.pad_token_id, env).run()
    return {"history": history, "threads": torch.get_num_threads(), "niceness": os.nice(0)}


def run_plain(cfg: JobConfig, inputs: Any, setting: dict[str, int], workdir: Path) -> dict[str, Any]:
    """The plain side of one round, in a new process; wall time from spawn to result."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = pool.submit(plain_child, cfg, inputs, setting, str(workdir / "checkpoints")).result()
    return {**got, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- the Ray side


def probe_worker(cfg: JobConfig) -> dict[str, int]:
    """Start Ray, ask a fresh task reserving `ray.cpus_per_worker` CPUs for its torch threads and
    niceness (Ray sets both as for a Ray Train worker with that reservation), stop Ray."""
    import ray

    from ray_unlearn.train import init_ray

    @ray.remote(num_cpus=cfg.ray.cpus_per_worker)
    def settings() -> dict[str, int]:
        import torch

        return {"threads": torch.get_num_threads(), "niceness": os.nice(0)}

    init_ray(cfg)
    try:
        return ray.get(settings.remote())
    finally:
        ray.shutdown()


def clocked_train_func(config: dict[str, Any]) -> None:
    """The Ray Train worker's entry point: `ray_unlearn.train.train_func` with the loop clock installed."""
    from ray_unlearn.train import train_func

    install_loop_clock()
    train_func(config)


def run_ray(cfg: JobConfig, inputs: Any) -> dict[str, Any]:
    """The Ray side of one round: start Ray, make_trainer's TorchTrainer (entry point: clocked_train_func)
    runs one worker, read the history from the final checkpoint, stop Ray."""
    import ray
    from ray.train.torch import TorchTrainer

    from ray_unlearn.loop import checkpoint_history
    from ray_unlearn.train import init_ray, make_trainer, run_trainer

    t0 = time.perf_counter()
    init_ray(cfg)
    try:
        started = time.perf_counter()
        base = make_trainer(cfg, inputs)
        trainer = TorchTrainer(clocked_train_func, train_loop_config=base.train_loop_config,
                               scaling_config=base.scaling_config, run_config=base.run_config)
        result = run_trainer(trainer)
        fit_s = time.perf_counter() - started
        with result.checkpoint.as_directory() as ckpt:
            history = checkpoint_history(Path(ckpt))
    finally:
        ray.shutdown()
    return {"history": history, "ray_start_s": started - t0, "wall_s": fit_s}


# ---------------------------------------------------------------- rounds


def run_side(side: str, cfg: JobConfig, inputs: Any, setting: dict[str, int], workdir: Path,
             warmup: int) -> dict[str, Any]:
    """One run of `side` in its own directory; adds the steady-state figures and the load average."""
    workdir.mkdir(parents=True)
    run_cfg = with_output_dir(cfg, workdir)
    got = run_ray(run_cfg, inputs) if side == "ray" else run_plain(run_cfg, inputs, setting, workdir)
    history = got.pop("history")
    if any(START not in h for h in history):
        raise UnlearnError(f"{side}: the history lacks the loop clock; did Unlearner.train_step change?")
    w = windows(history, warmup)
    figures = {k: statistics.median(x[k] for x in w) for k in ("loop", "train_step", "outside")}
    return {**got, "side": side, "loop_s_per_step": figures["loop"], "steps_per_s": 1.0 / figures["loop"],
            "train_step_s_per_step": figures["train_step"], "outside_s_per_window": figures["outside"],
            "load_1m": os.getloadavg()[0], "windows": w, "history": history}


def run_rounds(cfg: JobConfig, inputs: Any, setting: dict[str, int], rounds: int,
               warmup: int) -> list[dict[str, Any]]:
    """`rounds` rounds of both sides, the ray side first in even rounds and second in odd ones."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_ray_overhead_") as tmp:
        for rnd in range(rounds):
            order = SIDES if rnd % 2 == 0 else SIDES[::-1]
            for pos, side in enumerate(order):
                console.rule(f"round {rnd + 1}/{rounds}: {LABELS[side]}")
                run = run_side(side, cfg, inputs, setting, Path(tmp) / f"round{rnd}-{side}", warmup)
                runs.append({"round": rnd, "position": pos, **run})
                console.print(f"{LABELS[side]}: {run['steps_per_s']:.2f} steps/s (loop), train_step "
                              f"{1e3 * run['train_step_s_per_step']:.1f} ms/step, whole run {run['wall_s']:.1f} s")
    return runs


# ---------------------------------------------------------------- summary


def round_ratios(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Per round, plain's seconds per step over ray's (= ray steps/s over plain steps/s) for figure `key`."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["side"]] = r[key]
    return [t["plain"] / t["ray"] for _, t in sorted(by_round.items())]


def summarize(runs: list[dict[str, Any]], worker: dict[str, int]) -> dict[str, Any]:
    """Per-round ratios of loop and train_step rates and their medians (R: the loop's), the time
    outside train_step, wall times, and the process settings of both sides."""
    loop, compute = round_ratios(runs, "loop_s_per_step"), round_ratios(runs, "train_step_s_per_step")
    plain = [r for r in runs if r["side"] == "plain"]

    def mean(key: str, side: str) -> float:
        return statistics.mean(r[key] for r in runs if r["side"] == side)

    return {"ratio": statistics.median(loop), "round_ratios": loop,
            "train_step_ratio": statistics.median(compute), "train_step_round_ratios": compute,
            "outside_s_per_window": {s: mean("outside_s_per_window", s) for s in SIDES},
            "mean_wall_s": {s: mean("wall_s", s) for s in SIDES}, "mean_ray_start_s": mean("ray_start_s", "ray"),
            "ray_worker": worker, "plain": {"threads": plain[0]["threads"], "niceness": plain[0]["niceness"]}}


def summary_lines(cfg: JobConfig, s: dict[str, Any], warmup: int) -> list[str]:
    """What the table does not show: ratios, where the time goes, setup, warnings (not the headline)."""
    w, out, rw, pl = s["mean_wall_s"], s["outside_s_per_window"], s["ray_worker"], s["plain"]
    every = cfg.train.log_every
    return ["loop steps/s, ray / plain, per round: " + ", ".join(f"{x:.3f}" for x in s["round_ratios"])
            + f"; median {s['ratio']:.3f} (goal >= {GOAL})",
            "train_step only (compute, no reports), ray / plain, per round: "
            + ", ".join(f"{x:.3f}" for x in s["train_step_round_ratios"]) + f"; median {s['train_step_ratio']:.3f}",
            f"other ms/window = time outside train_step per {every} steps (one report in Ray): ray {1e3 * out['ray']:.0f} ms, "
            f"plain {1e3 * out['plain']:.0f} ms",
            f"whole-run wall time (mean over rounds, start-up included): ray train {w['ray']:.1f} s for "
            f"trainer.fit() after {s['mean_ray_start_s']:.1f} s of Ray start; plain loop {w['plain']:.1f} s "
            f"from process spawn to result",
            f"setup: {cfg.benchmark.size}/{cfg.data.forget_split}, objective "
            f"{' + '.join(f'{wt:g}×{t}' for t, wt in cfg.objective.terms.items())}, {cfg.optim.name} "
            f"(hessian={cfg.optim.hessian}), {cfg.train.max_steps} steps (windows between logged steps after "
            f"step {warmup}), log_every {every}, batch {cfg.train.batch_size}, "
            f"ray.cpus_per_worker={cfg.ray.cpus_per_worker:g}",
            f"processes: Ray worker {rw['threads']} torch thread(s), niceness {rw['niceness']}; plain loop "
            f"{pl['threads']} thread(s), niceness {pl['niceness']}"] + \
        (["warning: the plain loop's threads or niceness differ from the Ray worker's (--threads, "
          "--plain-niceness): the ratio includes that difference"] if pl != rw else [])


COLUMNS = ["round", "side", "ran", "windows", "loop steps/s", "train_step ms/step", "other ms/window",
           "whole run s", "Ray start s", "load 1 min"]
SHORT = {"ray": "ray train", "plain": "plain"}


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """One row per run, as strings (shared by the console and Markdown tables)."""
    return [[str(r["round"] + 1), SHORT[r["side"]], "first" if r["position"] == 0 else "second",
             str(len(r["windows"])), f"{r['steps_per_s']:.2f}", f"{1e3 * r['train_step_s_per_step']:.1f}",
             f"{1e3 * r['outside_s_per_window']:.0f}", f"{r['wall_s']:.1f}",
             f"{r['ray_start_s']:.1f}" if "ray_start_s" in r else "–", f"{r['load_1m']:.1f}"] for r in runs]


# ---------------------------------------------------------------- outputs


def print_results(rows: list[list[str]], lines: list[str]) -> None:
    """The table, then the summary lines (the headline comes last, from main)."""
    table = Table(title="Ray Train (1 worker) vs. plain loop: steady-state steps")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i in (1, 2) else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in lines:
        console.print(line)


def _write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(out: Path, cfg: JobConfig, runs: list[dict[str, Any]], s: dict[str, Any],
                  lines: list[str], headline: str) -> None:
    """results.json (every figure, every logged step's clock, the config) and results.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"headline": headline, "summary": s, "runs": runs, "lines": lines,
               "config": dataclasses.asdict(cfg)}
    _write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    md = ["# Ray Train (1 worker) vs. plain loop", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    md += [""] + [f"- {line}" for line in lines] + ["", f"**{headline}**"]
    _write_text(out / "results.md", "\n".join(md) + "\n")


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Probe a Ray worker's settings, run the rounds, print and write the results; the headline last."""
    args = parse_args(argv)
    from ray_unlearn.cli import quiet_libraries
    from ray_unlearn.job import resolve_inputs

    quiet_libraries()
    try:
        cfg = build_config(args)
        with console.status(f"benchmark {cfg.benchmark.size}: loading (the first time it is built, a few minutes)"):
            inputs = resolve_inputs(cfg)
        with console.status("asking Ray for a worker's torch threads and niceness"):
            worker = probe_worker(cfg)
        plain = {"threads": args.threads or worker["threads"],
                 "niceness": worker["niceness"] if args.plain_niceness is None else args.plain_niceness}
        console.print(f"{args.rounds} rounds of {cfg.train.max_steps} steps per side; the Ray Train worker "
                      f"({cfg.ray.cpus_per_worker:g} CPU) runs {worker['threads']} torch thread(s) at niceness "
                      f"{worker['niceness']}, the plain loop {plain['threads']} at niceness {plain['niceness']}")
        runs = run_rounds(cfg, inputs, plain, args.rounds, args.warmup)
    except UnlearnError as e:
        console.print(f"error: {e}", style="red")
        return 2
    s = summarize(runs, worker)
    lines = summary_lines(cfg, s, args.warmup)
    headline = f"ray train 1 worker / plain loop: {s['ratio']:.2f}"
    print_results(table_rows(runs), lines)
    out = Path(args.out)
    write_outputs(out, cfg, runs, s, lines, headline)
    console.print(f"results in {out.resolve()} (results.json, results.md)")
    sys.stdout.flush()
    print(headline, flush=True)  # the very last line
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
