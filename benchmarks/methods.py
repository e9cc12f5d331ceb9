"""The methods table: every unlearning method on the same benchmark, step budget and selection rule.

What it measures. Each method is one of the example jobs in `jobs/` (its objective, optimizer and
settings), run with `ray-unlearn run` in its own process on the built-in benchmark (`--size`, forget10),
`--steps` optimizer steps (influence unlearning keeps its single step over the whole forget set), on
`--workers` Ray Train workers (0: the driver process). Each method's learning rate is chosen by a small
sweep: the job's own rate times each of `--lr-factors`; among the rates whose model utility is at least
`--utility-bar` x the target's, the one with the highest forget quality (ties: the larger share of the
forget-ES gap closed). A method no rate of which keeps the bar is listed with its highest-utility rate,
marked. Columns: forget quality (KS p-value against the retain model; 1 = indistinguishable from
retraining), forget ES, the share of the target-to-retain forget-ES gap closed, model utility / the
target's, the unlearning time (Ray start to the final checkpoint, from the run's report) and the rate.

Writes `<out>/methods.json` (every run) and `<out>/methods.md` (the table), prints the table; the last
line is `methods: N of M keep utility >= bar x target's; best forget quality: METHOD (FQ)`.

    python benchmarks/methods.py --size small --steps 60 --workers 2
    python benchmarks/methods.py --size micro --steps 10 --methods "NPO (Sophia)" "GRIN (Sophia)"
    python benchmarks/methods.py --workers 0 train.global_batch_size=16   # the driver alone, 2 workers' batch
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"

# name -> (job file, extra overrides): the method as its example job runs it
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "GA (AdamW)": ("adamw_npo.yaml", ("objective.terms={ga: 1.0}",)),
    "GradDiff (AdamW)": ("adamw_npo.yaml", ("objective.terms={ga: 1.0, retain_nll: 1.0}",)),
    "GradDiff (Sophia)": ("soul_graddiff.yaml", ()),
    "NPO (AdamW)": ("adamw_npo.yaml", ()),
    "NPO (Sophia, SOUL)": ("soul_npo.yaml", ()),
    "SimNPO (Sophia)": ("soul_npo.yaml", ("objective.terms={simnpo: 1.0, retain_nll: 1.0}",)),
    "IdkDPO (Sophia)": ("soul_idk.yaml", ()),
    "RMU": ("rmu.yaml", ()),
    "UNDIAL": ("undial.yaml", ()),
    "WGA": ("wga.yaml", ()),
    "SatImp": ("satimp.yaml", ()),
    "CE-U": ("ce_u.yaml", ()),
    "PDU": ("pdu.yaml", ()),
    "GRIN (Sophia)": ("grin.yaml", ()),
    "influence (one step)": ("influence.yaml", ()),
}
ONE_SHOT = {"influence (one step)"}  # its step budget and batches are its own (one step over the whole forget set)
BENCH = "BUILTIN_{size}_forget10"


def job_lr(job: str) -> float:
    import yaml

    return float(yaml.safe_load((JOBS / job).read_text())["optim"]["lr"])


def run_one(method: str, lr: float, args: argparse.Namespace, out: Path) -> dict:
    """One `ray-unlearn run` of `method` at `lr`; its summaries, gap, time, or the error it ended with."""
    job, extra = METHODS[method]
    overrides = [f"benchmark.size={args.size}", f"ray.num_workers={args.workers}", f"optim.lr={lr:g}",
                 f"output_dir={out}", f"eval.max_items={args.max_items}", "eval.mia=[]", *extra,
                 *(o for o in args.overrides if method not in ONE_SHOT or not o.startswith("train."))]
    if args.cache_dir:
        overrides.append(f"benchmark.cache_dir={args.cache_dir}")
    if method not in ONE_SHOT:
        overrides.append(f"train.max_steps={args.steps}")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "ray_unlearn.cli", "run", str(JOBS / job), *overrides],
                          capture_output=True, text=True, cwd=ROOT)
    record = {"method": method, "lr": lr, "wall_s": time.time() - start, "overrides": overrides}
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        return {**record, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    bench = BENCH.format(size=args.size)
    summary = {name: json.loads((out / "eval" / sub / f"{bench}_SUMMARY.json").read_text())
               for name, sub in (("unlearned", ""), ("target", "target"), ("retain", "retain"))}
    report = (out / "report.md").read_text()
    found = re.search(r"time to unlearned model \(s\): ([0-9.]+)", report)
    es = {k: v["extraction_strength"] for k, v in summary.items()}
    return {**record, "forget_quality": summary["unlearned"].get("forget_quality"),
            "forget_es": es["unlearned"], "gap_closed": (es["target"] - es["unlearned"]) / (es["target"] - es["retain"]),
            "utility_ratio": summary["unlearned"]["model_utility"] / summary["target"]["model_utility"],
            "unlearn_s": float(found.group(1)) if found else None}


def choose(runs: list[dict], bar: float) -> tuple[dict | None, bool]:
    """(the chosen run, whether it keeps the utility bar)."""
    ok = [r for r in runs if "error" not in r]
    keep = [r for r in ok if r["utility_ratio"] >= bar]
    if keep:
        return max(keep, key=lambda r: ((r["forget_quality"] or 0.0), r["gap_closed"])), True
    return (max(ok, key=lambda r: r["utility_ratio"]) if ok else None), False


def table(rows: list[tuple[str, dict | None, bool]], bar: float) -> str:
    lines = ["| method | forget quality | forget ES | ES gap closed | utility / target's | unlearning (s) | lr |",
             "|---|---|---|---|---|---|---|"]
    for method, r, kept in rows:
        if r is None:
            lines.append(f"| {method} | failed | | | | | |")
            continue
        mark = "" if kept else f" (< {bar:g})"
        t = f"{r['unlearn_s']:.0f}" if r.get("unlearn_s") is not None else "–"
        lines.append(f"| {method} | {r['forget_quality']:.2e} | {r['forget_es']:.3f} | {r['gap_closed']:.2f} | "
                     f"{r['utility_ratio']:.3f}{mark} | {t} | {r['lr']:g} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=("micro", "small", "medium"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr-factors", type=float, nargs="+", default=[1 / 3, 1.0, 3.0])
    p.add_argument("--utility-bar", type=float, default=0.95)
    p.add_argument("--max-items", type=int, default=200, help="eval.max_items of every run")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of: {', '.join(METHODS)}")
    p.add_argument("--cache-dir", default="", help="benchmark.cache_dir (default: the config's)")
    p.add_argument("--out", default="runs/methods")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides given to every run after the method's own (train.* ones not to "
                        "influence, whose one step covers the whole forget set), e.g. train.global_batch_size=16 "
                        "(with --workers 0: the 2-worker runs' global batch)")
    args = p.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"error: unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    from rich.progress import Progress

    out = Path(args.out)
    runs: list[dict] = []
    plan = [(m, job_lr(METHODS[m][0]) * f) for m in args.methods for f in args.lr_factors]
    with Progress() as progress:
        task = progress.add_task("methods", total=len(plan))
        for i, (method, lr) in enumerate(plan):
            progress.update(task, description=f"{method} lr={lr:.2g}")
            runs.append(run_one(method, lr, args, out / f"run-{i:03d}"))
            progress.advance(task)
            out.mkdir(parents=True, exist_ok=True)
            (out / "methods.json").write_text(json.dumps(runs, indent=2))
    rows = [(m, *choose([r for r in runs if r["method"] == m], args.utility_bar)) for m in args.methods]
    extra = f"; overrides {' '.join(args.overrides)}" if args.overrides else ""
    header = (f"`{args.size}` forget10, {args.steps} steps ({args.workers} workers{extra}), lr of each method chosen "
              f"from its job's x {', '.join(f'{f:.3g}' for f in args.lr_factors)} under utility >= "
              f"{args.utility_bar:g} x the target's; measured {time.strftime('%Y-%m-%d')}")
    text = header + "\n\n" + table(rows, args.utility_bar) + "\n"
    (out / "methods.md").write_text(text)
    print(text)
    for r in runs:
        if "error" in r:
            print(f"{r['method']} lr={r['lr']:g}: {r['error']}")
    kept = [(m, r) for m, r, k in rows if k and r is not None]
    best = max(kept, key=lambda mr: mr[1]["forget_quality"] or 0.0) if kept else None
    best_text = f"{best[0]} ({best[1]['forget_quality']:.2e})" if best else "none"
    print(f"methods: {len(kept)} of {len(rows)} keep utility >= {args.utility_bar:g} x target's; "
          f"best forget quality: {best_text}")


if __name__ == "__main__":
    main()
