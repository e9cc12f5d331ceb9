"""`ray-unlearn`: run (unlearn + evaluate + report), finetune (train target and retain models on your own data),
eval (evaluate a model without unlearning), robustness (rank metrics by their correlation before vs after
attacks), data (build the built-in benchmark), config,
verify (check a run directory against its audit.json: exit 0 all match, 1 a mismatch), submit (run a job on a
Ray cluster through its Jobs API: exit status = the job's).

Bad input ends with `error: <one line>` on stderr and exit status 2; nothing is written before
the inputs have been checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from ray_unlearn.config import JobConfig, dump_config, load_config, to_dict
from ray_unlearn.errors import UnlearnError


def _split_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[JOB.yaml] [key=value ...]` -> (job path or None, overrides)."""
    job, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif job is None:
            job = a
        else:
            raise UnlearnError(f"unexpected argument {a!r}: give one job file and key=value overrides")
    return job, overrides


def _load(ns: argparse.Namespace) -> JobConfig:
    job, overrides = _split_args(ns.args)
    if getattr(ns, "output_dir", None):
        overrides.append(f"output_dir={ns.output_dir}")
    return load_config(job, overrides)


def cmd_run(ns: argparse.Namespace) -> int:
    from ray_unlearn.pipeline import run_job

    run_job(_load(ns))
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from ray_unlearn.pipeline import eval_job

    cfg = _load(ns)
    if cfg.output_dir == JobConfig().output_dir:  # not set: runs/eval/<MODEL> rather than run's runs/unlearn
        name = Path(ns.model.rstrip("/")).name or "model"
        cfg = load_config(*_split_args([*ns.args, f"output_dir=runs/eval/{name}"]))
    eval_job(cfg, ns.model)
    return 0


def cmd_finetune(ns: argparse.Namespace) -> int:
    from ray_unlearn.finetune import finetune_job

    cfg = _load(ns)
    if cfg.output_dir == JobConfig().output_dir:  # not set: runs/finetune rather than run's runs/unlearn
        cfg = load_config(*_split_args([*ns.args, "output_dir=runs/finetune"]))
    finetune_job(cfg)
    return 0


def cmd_tune(ns: argparse.Namespace) -> int:
    from ray_unlearn.tune import run_tune

    run_tune(_load(ns))
    return 0


def cmd_robustness(ns: argparse.Namespace) -> int:
    from ray_unlearn.pipeline import robustness_job

    robustness_job([ns.run_dir, *(a for a in ns.args if "=" not in a)], [a for a in ns.args if "=" in a],
                   ns.output_dir)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from ray_unlearn.serve import run_serve

    job, overrides = _split_args(ns.args)
    return run_serve(job, overrides)


def cmd_submit(ns: argparse.Namespace) -> int:
    from ray_unlearn.jobs import submit

    return submit(ns.args, ns.address, ns.working_dir, ns.no_wait)


def cmd_data(ns: argparse.Namespace) -> int:
    from ray_unlearn.pipeline import console, progress_reporter
    from ray_unlearn.models.build import ensure_benchmark

    cfg = _load(ns)
    with progress_reporter() as report:
        built = ensure_benchmark(cfg.benchmark, cfg.data.prompt_template, report)
    console.print(f"benchmark [bold]{cfg.benchmark.size}[/] at {built.root}")
    for k, v in built.manifest.items():
        console.print(f"  {k}: {v}")
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    import yaml

    cfg = _load(ns)
    if ns.write:
        dump_config(cfg, ns.write)
        print(f"wrote {ns.write}")
    else:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_verify(ns: argparse.Namespace) -> int:
    from ray_unlearn.audit import check

    result = check(ns.run_dir)
    print(result.line)
    return 0 if result.ok else 1


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are one `error:` line naming the fix, exit 2 (argparse prints the whole usage)."""

    def error(self, message: str):  # noqa: ANN201 (NoReturn)
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ray-unlearn", description="Distributed LLM unlearning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="unlearn with Ray Train, then evaluate and write the report")
    run.add_argument("args", nargs="*", help="[JOB.yaml] [key=value ...] (no job file: the built-in default)")
    run.add_argument("--output-dir", help="output directory (same as output_dir=...)")
    run.set_defaults(fn=cmd_run)
    ft = sub.add_parser("finetune", help="fine-tune a base model on your forget + retain data (the target model) "
                                         "and on retain alone (the retain model), on Ray Train; report how well "
                                         "each memorized its data")
    ft.add_argument("args", nargs="*", help="[JOB.yaml] [key=value ...]: data.forget_path, data.retain_path, "
                                            "model.path (empty: a fresh built-in model), the finetune section "
                                            "(default output_dir: runs/finetune)")
    ft.add_argument("--output-dir", help="output directory (same as output_dir=...)")
    ft.set_defaults(fn=cmd_finetune)
    ev = sub.add_parser("eval", help="evaluate a model (HF directory or hub id) without unlearning: the same "
                                     "metrics, MIA, attacks, files and report as run")
    ev.add_argument("model", help="HF model directory or hub id to evaluate")
    ev.add_argument("args", nargs="*", help="[JOB.yaml] [key=value ...]: the data, the target and retain models "
                                            "to compare with, eval settings (default output_dir: runs/eval/<MODEL>)")
    ev.add_argument("--output-dir", help="output directory (same as output_dir=...)")
    ev.set_defaults(fn=cmd_eval)
    tune = sub.add_parser("tune", help="search the forgetting/retention trade-off with Ray Tune + Optuna")
    tune.add_argument("args", nargs="*", help="JOB.yaml (with a tune: section) [key=value ...]")
    tune.add_argument("--output-dir", help="output directory (same as output_dir=...)")
    tune.set_defaults(fn=cmd_tune)
    submit = sub.add_parser("submit", help="run a job on a Ray cluster (Jobs API): ships the working directory, "
                                           "streams the logs, exits with the job's status")
    submit.add_argument("args", nargs="+", help="[run|tune|finetune] JOB.yaml [key=value ...]: the command the job "
                                                "runs (default run) and its job file (inside --working-dir)")
    submit.add_argument("--address", help="the head's jobs API, e.g. http://<head>:8265 (default: RAY_ADDRESS, "
                                          "else http://127.0.0.1:8265)")
    submit.add_argument("--working-dir", default=".", help="directory shipped with the job (default: .)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return once it is submitted")
    submit.set_defaults(fn=cmd_submit)
    rob = sub.add_parser("robustness", help="rank metrics by robustness: Pearson r before vs after each attack "
                                             "across models mixed between a run's target and unlearned model")
    rob.add_argument("run_dir", help="the output_dir of a finished `ray-unlearn run`")
    rob.add_argument("args", nargs="*", help="[RUN_DIR ...] more runs of the same target and forget set (other "
                                             "methods), then key=value overrides of the first run's config "
                                             "(eval.attacks, eval.robustness_alphas, eval.max_items, ...)")
    rob.add_argument("--output-dir", help="where to write robustness.{json,md,png} (default: under the first "
                                          "RUN_DIR, robustness/)")
    rob.set_defaults(fn=cmd_robustness)
    serve = sub.add_parser("serve", help="serve base and unlearned models over HTTP (OpenAI-style + /v1/verify)")
    serve.add_argument("args", nargs="*", help="[SERVE.yaml] [key=value ...]")
    serve.set_defaults(fn=cmd_serve)
    data = sub.add_parser("data", help="build (or show the cached) built-in benchmark and its models")
    data.add_argument("args", nargs="*", help="[JOB.yaml] [key=value ...], e.g. benchmark.size=micro")
    data.set_defaults(fn=cmd_data)
    verify = sub.add_parser("verify", help="re-hash a run's forget items and models and compare with its audit.json "
                                           "(exit 1 on a mismatch)")
    verify.add_argument("run_dir", help="a local run directory (the output_dir of `ray-unlearn run`)")
    verify.set_defaults(fn=cmd_verify)
    conf = sub.add_parser("config", help="print the complete resolved config as YAML")
    conf.add_argument("args", nargs="*", help="[JOB.yaml] [key=value ...]")
    conf.add_argument("--write", help="write it to this file instead")
    conf.set_defaults(fn=cmd_config)
    return p


def quiet_libraries() -> None:
    """Keep HF's per-file progress bars and advisory warnings out of the job's output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_libraries()
    warnings.formatwarning = _one_line_warning
    try:
        return ns.fn(ns)
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
