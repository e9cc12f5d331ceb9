"""The main job, driver side: check inputs, unlearn on Ray Train, save, evaluate, report.

Only `run_job` reaches Ray, through `ray_unlearn.train` (imported when the run starts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ray_unlearn import storage
from ray_unlearn.config import AuditConfig, JobConfig, dump_config, to_dict
from ray_unlearn.errors import UnlearnError
from ray_unlearn.job import JobInputs, load_checked, resolve_inputs
from ray_unlearn.tracking import check_tracking

if TYPE_CHECKING:
    from ray_unlearn.eval.suite import References

console = Console(stderr=False, highlight=False)


@contextmanager
def progress_reporter() -> Iterator[Callable[[str, int, int], None]]:
    """Progress of long steps; yields report(task, done, total).

    A live rich bar on a terminal; in logs (no terminal) one plain line per task every 10 %.
    """
    if not console.is_terminal:
        shown: dict[str, int] = {}

        def report_line(task: str, done: int, total: int) -> None:
            tenth = 10 * done // max(1, total)
            if shown.get(task, -1) < tenth:
                shown[task] = tenth
                console.print(f"{task}: {done}/{total}")

        yield report_line
        return
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:
        def report(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = prog.add_task(task, total=total)
            prog.update(tasks[task], completed=done, total=total)

        yield report


def validate(cfg: JobConfig) -> None:
    """Check names that only the objective and optimizer registries know."""
    from ray_unlearn.objectives import build_objective
    from ray_unlearn.optim import OPTIMIZERS

    build_objective(cfg.objective)
    if cfg.objective.terms.get("nll"):
        raise UnlearnError("objective.terms.nll fine-tunes on the answers it is given (ray-unlearn finetune); an "
                           "unlearning run keeps the retain answers with retain_nll: use that instead")
    if cfg.optim.name not in OPTIMIZERS:
        raise UnlearnError(f"optim.name: unknown optimizer {cfg.optim.name!r} (valid: {', '.join(sorted(OPTIMIZERS))})")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run_job(cfg: JobConfig) -> dict[str, dict[str, float]]:
    """Unlearn, save the model, evaluate and report; returns the summaries by model name.

    With a bucket as output_dir, the driver writes its files to a local copy and uploads it, and Ray
    Train keeps the checkpoints in the bucket (unless ray.storage_path says elsewhere)."""
    t0 = time.time()
    validate(cfg)
    check_tracking(cfg)
    if not cfg.audit.request_id:
        from ray_unlearn.audit import new_request_id

        cfg = dataclasses.replace(cfg, audit=AuditConfig(request_id=new_request_id()))  # config.yaml records it
    with progress_reporter() as report:
        inputs = resolve_inputs(cfg, report)
    if inputs.build_figures:
        f = inputs.build_figures
        console.print(f"benchmark {f['size']}: forget10 ES target {f['target_forget10_es']:.3f} vs retain model "
                      f"{f['retain_forget10_es']:.3f} (the target memorized what the retain model never saw)")
    model, tokenizer = load_checked(cfg, inputs, meta=True)  # from the config: the driver never loads the weights
    from ray_unlearn.loop import check_objective_fits
    from ray_unlearn.objectives import build_objective

    check_objective_fits(build_objective(cfg.objective), model)  # e.g. objective.rmu.layer within the model
    if cfg.model.lora.enabled:
        from ray_unlearn.models.lora import check_lora_targets

        check_lora_targets(cfg.model.lora.target_modules, model)
    check_calibration(cfg, inputs)
    check_attacks(cfg, inputs)
    for key, location in (("output_dir", cfg.output_dir), ("ray.storage_path", cfg.ray.storage_path)):
        storage.check_writable(key, location)  # a bucket: exists, reachable, takes a write
    from ray_unlearn.train import check_resume, init_ray

    check_resume(cfg)
    init_ray(cfg)  # the cluster must hold the workers before anything is written
    if not storage.is_remote(cfg.output_dir):
        return _unlearn(cfg, inputs, tokenizer, Path(cfg.output_dir), t0)
    staging = Path(tempfile.mkdtemp(prefix="ray_unlearn_out_"))  # the driver's files, uploaded as they are made
    try:
        return _unlearn(cfg, inputs, tokenizer, staging, t0, publish=lambda: storage.upload(staging, cfg.output_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unlearn(cfg: JobConfig, inputs: JobInputs, tokenizer: Any, out: Path, t0: float,
             publish: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """run_job once the inputs are checked: `out` is output_dir, or a local copy of it that `publish`
    uploads (once the config is written, and at the end)."""
    from ray_unlearn.loop import checkpoint_history
    from ray_unlearn.models.io import publish_model
    from ray_unlearn.train import fit

    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    publish()
    workers = f"{cfg.ray.min_workers}-{cfg.ray.max_workers} (elastic)" if cfg.ray.elastic else cfg.ray.num_workers
    console.print(f"unlearning {inputs.model_path} on {len(inputs.forget)} forget / {len(inputs.retain)} retain "
                  f"items with {cfg.optim.name} ({workers} Ray Train workers, {cfg.ray.strategy})")
    terms = " + ".join(f"{w:g} x {name}" for name, w in cfg.objective.terms.items())
    console.print(f"objective {terms}, lr {cfg.optim.lr:g}, {cfg.train.max_steps} steps (recipe: {cfg.recipe}; "
                  "objective.terms, optim.lr and train.max_steps a job sets win)")

    retain_eval = None  # in-training evaluation measures forget quality and privleak against the retain model
    if cfg.eval.enabled and cfg.train.eval_every > 0 and inputs.retain_model_path:
        retain_eval = retain_references(cfg, inputs, tokenizer)
    extras = {"references": retain_eval[1].to_dict()} if retain_eval else {}
    with tempfile.TemporaryDirectory(prefix="ray_unlearn_final_") as final:
        fit(cfg, inputs, Path(final), **extras)  # the last checkpoint holds the full weights, gathered by the workers
        history = checkpoint_history(Path(final))
        train_s = time.time() - t0
        publish_model(final, tokenizer, out / "model")
        if cfg.model.lora.enabled:  # the adapter beside the merged model
            from ray_unlearn.models.lora import ADAPTER_DIR, ADAPTER_FILES

            publish_model(Path(final) / ADAPTER_DIR, tokenizer, out / "adapter", ADAPTER_FILES)
        selection = write_selection(Path(final), out / "localize")
    _write_json(out / "history.json", history)
    summaries: dict[str, dict[str, float]] = {}
    attacks = calibration = None
    if cfg.eval.enabled:
        refs: dict[str, References] = {}
        summaries = evaluate_all(cfg, inputs, out / "model", tokenizer, out, refs_out=refs, retain_eval=retain_eval)
        if cfg.eval.calibrate:
            calibration = calibrate_run(cfg, inputs, out / "model", tokenizer, out, summaries, refs.get("refs"))
        attacks = red_team_run(cfg, inputs, out / "model", tokenizer, out, summaries) if cfg.eval.attacks else None
    record = _write_audit(cfg, inputs, out, summaries, t0, attacks, calibration)
    if cfg.eval.enabled:
        _report(cfg, inputs, out, summaries, history, {"time to unlearned model (s)": f"{train_s:.1f}"},
                calibration, attacks, selection, record)
    track(cfg, out, cfg.name, history, summaries, {"request_id": record["request_id"]})
    publish()
    where = cfg.output_dir if storage.is_remote(cfg.output_dir) else out.resolve()
    console.print(f"outputs in [bold]{where}[/] (model: {storage.join(str(where), 'model')})")
    return summaries


def eval_job(cfg: JobConfig, model: str) -> dict[str, dict[str, float]]:
    """`ray-unlearn eval MODEL`: evaluate a model (HF directory or hub id) without unlearning, beside the
    job's target (model.path, or the built-in target) and retain model, with the job's MIA and red-team
    attacks; writes the same EVAL/SUMMARY files (MODEL's under <out>/eval, the others under
    <out>/eval/<name>), attacks.json, report.md and plots. Returns the summaries by name ("evaluated",
    and "target" / "retain" where known and not MODEL itself)."""
    from ray_unlearn.eval.report import (attack_sections, gap_closed, mia_section, plot_attacks, plot_metrics,
                                         write_report)
    from ray_unlearn.eval.suite import roc_path, write_eval
    from ray_unlearn.models.io import (_check_model_dir, check_vocab, empty_model, load_model, load_tokenizer,
                                       looks_like_path)

    t0 = time.time()
    if looks_like_path(model):
        _check_model_dir(Path(model).expanduser())  # one line before anything is built or written
    validate(cfg)
    check_tracking(cfg)
    with progress_reporter() as report:
        inputs = resolve_inputs(cfg, report)
    check_attacks(cfg, inputs)
    if storage.is_remote(cfg.output_dir):
        raise UnlearnError("ray-unlearn eval writes to a local output_dir; copy the results to the bucket after")
    storage.check_writable("output_dir", cfg.output_dir)
    m = cfg.model
    own_tokenizer = looks_like_path(model) and any((Path(model).expanduser() / f).is_file()
                                                   for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer_path = model if own_tokenizer or not looks_like_path(model) else inputs.tokenizer_path
    tokenizer = load_tokenizer(tokenizer_path, m.trust_remote_code)

    def same(a: str | None, b: str) -> bool:
        return a is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    models: dict[str, Callable[[], Any]] = {}
    if inputs.retain_model_path and not same(inputs.retain_model_path, model):
        models["retain"] = lambda: load_model(inputs.retain_model_path, m.dtype, m.trust_remote_code)
    if not same(inputs.model_path, model):
        models["target"] = lambda: load_model(inputs.model_path, m.dtype, m.trust_remote_code)
    models["evaluated"] = lambda: load_model(model, m.dtype, m.trust_remote_code)
    paths = {"retain": inputs.retain_model_path, "target": inputs.model_path, "evaluated": model}
    for name in models:  # every model reads the one tokenizer's ids: check on shapes before anything is written
        check_vocab(empty_model(paths[name], m.dtype, m.trust_remote_code), tokenizer,
                    f"the {name} model ({paths[name]})")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")

    def write(name: str, results: dict) -> None:
        eval_dir = out / "eval" if name == "evaluated" else out / "eval" / name
        eval_dir.mkdir(parents=True, exist_ok=True)
        write_eval(eval_dir, inputs.bench, results)

    console.print(f"evaluating {model} on {inputs.bench} ({len(inputs.forget)} forget items)")
    found, _ = evaluate_models(cfg, inputs, tokenizer, models, write,
                               {k: v for k, v in paths.items() if k in models and _is_local_dir(v)}, tokenizer_path)
    summaries = {n: found[n] for n in ("target", "evaluated", "retain") if n in found}
    attacks = red_team_run(cfg, inputs, Path(model), tokenizer, out, summaries, "evaluated") \
        if cfg.eval.attacks else None
    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    roc = roc_path(out / "eval", inputs.bench)
    mia = mia_section(summaries, roc_plots(out, inputs.bench, summaries, "evaluated"))  # the ROC plots are in it
    plots = [p for p in (plot_metrics(summaries, plots_dir / "metrics.png"), roc if roc.is_file() and not mia else None,
                         plot_attacks(attacks, plots_dir / "attacks.png") if attacks else None) if p is not None]
    gap = gap_closed(summaries, "target", "evaluated", "retain")
    facts = {"evaluated model": model, "target model": inputs.model_path,
             "retain model": inputs.retain_model_path or "none", "benchmark": inputs.bench,
             "time (s)": f"{time.time() - t0:.1f}"}
    sections = ([mia] if mia else []) + (attack_sections(attacks, "evaluated") if attacks else [])
    write_report(out, summaries, gap, facts, plots, sections)
    _print_summary(summaries, gap)
    track(cfg, out, f"eval {model}", [], summaries, {"evaluated_model": model})
    console.print(f"outputs in [bold]{out.resolve()}[/]")
    return summaries


def roc_plots(out: Path, bench: str, summaries: dict[str, dict[str, float]], main: str) -> list[Path]:
    """The ROC plots written with the models' EVAL files: `main`'s under <out>/eval, the others' under
    <out>/eval/<name>."""
    from ray_unlearn.eval.suite import roc_path

    found = [roc_path(out / "eval" if name == main else out / "eval" / name, bench) for name in summaries]
    return [p for p in found if p.is_file()]


def track(cfg: JobConfig, out: Path, run_name: str, history: list[dict[str, float]],
          summaries: dict[str, dict[str, float]], tags: dict[str, str]) -> None:
    """The history and summaries to MLflow / TensorBoard as cfg.tracking asks (ray_unlearn.tracking), with a line
    saying where they went. The store was checked before any work; should it fail now (a server gone), the
    run's own outputs are complete: a warning line, not a failed run."""
    from ray_unlearn.tracking import TENSORBOARD_DIR, experiment_name, log_results, tracking_uri

    if not (cfg.tracking.mlflow or cfg.tracking.tensorboard):
        return
    try:
        run_id = log_results(cfg, out, run_name, history, summaries, {"output_dir": str(cfg.output_dir), **tags})
    except Exception as e:  # noqa: BLE001 - MLflow's store errors have no common type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        console.print(f"[yellow]warning:[/] experiment tracking failed ({first}); the run's files are complete")
        return
    if run_id:
        console.print(f"MLflow: run {run_id} in experiment {experiment_name(cfg)!r} of {tracking_uri(cfg, out)} "
                      f"(mlflow ui --backend-store-uri {tracking_uri(cfg, out)})")
    if cfg.tracking.tensorboard:
        console.print(f"TensorBoard: tensorboard --logdir {out.resolve() / TENSORBOARD_DIR}")


def write_selection(final: Path, into: Path) -> dict[str, Any] | None:
    """A localized run (GRIN): its masks (`masks.safetensors`, 1 = the entry could move) and where the
    selection fell (`selection.json`: per tensor, decoder layer and module type) into `into`; None for
    other runs."""
    from safetensors.torch import load_file

    from ray_unlearn.localize import LOCALIZE_FILE, summarize_masks

    masks = final / LOCALIZE_FILE
    if not masks.is_file():
        return None
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(masks, into / "masks.safetensors")
    summary = summarize_masks(load_file(str(masks)))
    _write_json(into / "selection.json", summary)
    console.print(f"localized: {summary['selected']:,} of {summary['total']:,} entries could move "
                  f"({100 * summary['fraction']:.2f} %; {into / 'selection.json'})")
    return summary


def _write_audit(cfg: JobConfig, inputs: JobInputs, out: Path, summaries: dict[str, dict[str, float]],
                 t0: float, attacks: dict[str, Any] | None = None,
                 calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """<out>/audit.json (DESIGN.md §12): hashes of the forget items and of both models, config, versions,
    metrics (with attacks and calibration when run) and verdict; returns the record."""
    from ray_unlearn import audit

    record = audit.build_record(request_id=cfg.audit.request_id, forget_items=inputs.forget,
                                forget_source=cfg.data.forget_path or None, input_model=inputs.model_path,
                                output_model=out / "model", run_dir=out, config=to_dict(cfg), bench=inputs.bench,
                                summaries=summaries, started=t0, finished=time.time(), attacks=attacks,
                                calibration=calibration)
    audit.write(out, record)
    verdict = record.get("verdict", {}).get("verdict") or f"omitted: {record.get('verdict_omitted')}"
    console.print(f"audit record: request {record['request_id']}, verdict {verdict}")
    return record


def evaluate_models(cfg: JobConfig, inputs: JobInputs, tokenizer: Any, models: dict[str, Callable[[], Any]],
                    on_result: Callable[[str, dict], None] | None = None, paths: dict[str, str] | None = None,
                    tokenizer_path: str | None = None, known: dict[str, dict] | None = None,
                    refs: References | None = None) -> tuple[dict[str, dict[str, float]], References]:
    """Evaluate each model (a "retain" entry first: its forget truth ratios and MIA AUCs give the
    others' forget quality and privleak); returns (summaries by name, what the retain model gives).

    The reference attack's reference losses come from the model at `inputs.mia_reference_path`,
    scored once: the "retain" entry's model when that is the reference, else loaded for it. With
    eval.num_workers, a model whose directory `paths` names is scored by that many Ray actors instead
    (`ray_unlearn.distributed.EvalPool`, with `tokenizer`, loaded from `tokenizer_path`, default the job's), and
    the driver does not load it. `known` holds results already computed (by name: not evaluated again) and
    `refs` the References they were computed with."""
    from ray_unlearn.eval.suite import References, references_from, summary

    with _pools(cfg, tokenizer_path or inputs.tokenizer_path) as open_pool:
        summaries, refs = {}, refs or References()
        for name in sorted(models, key=lambda n: n != "retain"):
            if known and name in known:
                results = known[name]
            else:
                pool = open_pool((paths or {}).get(name))
                model = models[name]() if pool is None else None
                if refs.losses is None and _wants_reference_losses(cfg, inputs):
                    is_reference = name == "retain" and inputs.mia_reference_path == inputs.retain_model_path
                    refs = References(refs.forget_truth_ratios, refs.mia_auc, _reference_losses(
                        cfg, inputs, tokenizer, model if is_reference else None, pool if is_reference else None))
                results = _evaluate_one(cfg, inputs, tokenizer, name, model, refs, pool)
                del model
                if pool is not None:
                    pool.close()  # its actors' CPUs go to the next model's
            if name == "retain":
                refs = references_from(results, refs.losses)
            if on_result is not None:
                on_result(name, results)
            summaries[name] = summary(results)
        return summaries, refs


def _evaluate_one(cfg: JobConfig, inputs: JobInputs, tokenizer: Any, name: str, model: Any, refs: References,
                  pool: Any) -> dict:
    """One model's evaluation results, with progress on the console."""
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.suite import evaluate_model

    with console.status(f"evaluating {name} model") as status:
        say = status.update if console.is_terminal else console.print
        return evaluate_model(model, tokenizer, inputs.eval_splits, cfg.eval, prompt_format(cfg.data),
                              cfg.data.max_length, references=refs, pool=pool,
                              progress=lambda msg: say(f"evaluating {name} model: {msg}"))


@contextmanager
def _pools(cfg: JobConfig, tokenizer_path: str) -> Iterator[Callable[[str | None], Any]]:
    """open(model dir or None) -> an EvalPool for it, or None (eval.num_workers = 0, or no directory)."""
    if not cfg.eval.num_workers:
        yield lambda path: None
        return
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.distributed import eval_pools

    with eval_pools(cfg.eval.num_workers, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                    tokenizer_path=tokenizer_path, fmt=prompt_format(cfg.data), max_length=cfg.data.max_length,
                    batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                    use_gpu=cfg.ray.use_gpu) as open_pool:
        yield lambda path: None if path is None else open_pool(str(path))


def _is_local_dir(path: str | None) -> bool:
    """A model directory on this machine (an actor loads it from there; a hub id is left to the driver)."""
    return bool(path) and Path(path).is_dir()


def _wants_reference_losses(cfg: JobConfig, inputs: JobInputs) -> bool:
    """The reference attack will run: it is asked for (or auto) and has its model and splits."""
    from ray_unlearn.eval.registry import HOLDOUT

    wanted = cfg.eval.mia == "auto" or "reference" in cfg.eval.mia
    return wanted and bool(inputs.mia_reference_path) and bool(inputs.eval_splits.get("forget")) \
        and bool(inputs.eval_splits.get(HOLDOUT))


def _reference_losses(cfg: JobConfig, inputs: JobInputs, tokenizer: Any, model: Any | None,
                      pool: Any = None) -> dict:
    """The reference model's per-item answer NLL on forget and holdout (`model` or `pool`, else loaded from
    its path)."""
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.suite import reference_losses
    from ray_unlearn.models.io import load_model

    if model is None and pool is None:
        model = load_model(inputs.mia_reference_path, cfg.model.dtype, cfg.model.trust_remote_code)
    return reference_losses(model, tokenizer, inputs.eval_splits, cfg.eval, prompt_format(cfg.data),
                            cfg.data.max_length, pool=pool)


def evaluate_all(cfg: JobConfig, inputs: JobInputs, unlearned: Path, tokenizer: Any,
                 out: Path, refs_out: dict | None = None,
                 retain_eval: tuple[dict, References] | None = None) -> dict[str, dict[str, float]]:
    """Evaluate retain (when known), target and unlearned (HF directory) models; write their EVAL/SUMMARY
    files. `refs_out`, when given, receives the retain model's References under "refs"; `retain_eval`, the
    retain model's results and References when they were computed already (`retain_references`)."""
    from ray_unlearn.eval.suite import write_eval
    from ray_unlearn.models.io import load_model

    models: dict[str, Callable[[], Any]] = {}
    if inputs.retain_model_path:
        models["retain"] = lambda: load_model(inputs.retain_model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    models["target"] = lambda: load_model(inputs.model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    models["unlearned"] = lambda: load_model(str(unlearned), cfg.model.dtype, cfg.model.trust_remote_code)

    def write(name: str, results: dict) -> None:
        eval_dir = out / "eval" if name == "unlearned" else out / "eval" / name
        eval_dir.mkdir(parents=True, exist_ok=True)
        write_eval(eval_dir, inputs.bench, results)

    paths = {"retain": inputs.retain_model_path, "target": inputs.model_path, "unlearned": str(unlearned)}
    known, given = ({"retain": retain_eval[0]}, retain_eval[1]) if retain_eval else (None, None)
    summaries, refs = evaluate_models(cfg, inputs, tokenizer, models, write,
                                      {k: v for k, v in paths.items() if k in models and _is_local_dir(v)},
                                      known=known, refs=given)
    if refs_out is not None:
        refs_out["refs"] = refs
    return {n: summaries[n] for n in ("target", "unlearned", "retain") if n in summaries}


def retain_references(cfg: JobConfig, inputs: JobInputs, tokenizer: Any) -> tuple[dict, References]:
    """The retain model's evaluation results and the References they give (forget truth ratios, MIA AUCs,
    reference losses): what in-training evaluation needs for forget quality and privleak, computed before
    training and reused by the final evaluation."""
    from ray_unlearn.models.io import load_model

    captured: dict[str, dict] = {}
    path = inputs.retain_model_path
    _, refs = evaluate_models(cfg, inputs, tokenizer,
                              {"retain": lambda: load_model(path, cfg.model.dtype, cfg.model.trust_remote_code)},
                              lambda name, results: captured.update({name: results}),
                              {"retain": path} if _is_local_dir(path) else None)
    return captured["retain"], refs


def relearned(cfg: JobConfig, model: Any, tokenizer: Any, items: list[dict]) -> Any:
    """A copy of `model` after the relearn attack: eval.relearn_steps steps of the run's own loop (one plain
    process) with the fine-tuning objective NLL(items) (the `nll` term on the train stream) and AdamW at
    eval.relearn_lr."""
    import copy

    from ray_unlearn.config import from_dict
    from ray_unlearn.loop import LoopEnv, Unlearner, encode_data

    e = cfg.eval
    data = to_dict(cfg)
    data["objective"] = {"terms": {"nll": 1.0}}
    data["optim"] = {"name": "adamw", "lr": e.relearn_lr, "weight_decay": 0.0}
    data["train"] = {"max_steps": e.relearn_steps, "batch_size": min(len(items), cfg.train.batch_size),
                     "log_every": e.relearn_steps, "seed": cfg.train.seed}
    data["ray"] = {"num_workers": 0}  # one plain process, its checkpoint in a temporary directory
    data["localize"] = {"method": "none"}  # the attacker fine-tunes every weight
    victim = copy.deepcopy(model)
    with tempfile.TemporaryDirectory(prefix="ray_unlearn_relearn_") as tmp:
        data["output_dir"] = tmp
        attack_cfg = from_dict(JobConfig, data)
        Unlearner(attack_cfg, victim, None, encode_data(attack_cfg, tokenizer, [], [], train=items),
                  tokenizer.pad_token_id, LoopEnv(checkpoint_dir=Path(tmp))).run()
    return victim.eval()


def check_attacks(cfg: JobConfig, inputs: JobInputs) -> None:
    """eval.attacks' inputs, checked before any work (one-line UnlearnError)."""
    if not cfg.eval.attacks:
        return
    if not cfg.eval.enabled:
        raise UnlearnError("eval.attacks: the red-team attacks are part of the evaluation; set eval.enabled=true "
                           "or eval.attacks=[]")
    if not inputs.eval_splits.get("forget"):
        raise UnlearnError("eval.attacks: the attacks re-measure the forget split's question/answer items, which "
                           "this data has none of (a text corpus?); give question/answer forget data or set "
                           "eval.attacks=[]")
    if "scope" in cfg.eval.attacks:
        from ray_unlearn.eval.redteam import check_neighbours

        check_neighbours(inputs.neighbours)


def check_calibration(cfg: JobConfig, inputs: JobInputs) -> None:
    """eval.calibrate's inputs, checked before any work (one-line UnlearnError)."""
    if not cfg.eval.calibrate:
        return
    from ray_unlearn.eval.calibration import check_calibration_inputs

    if not cfg.eval.enabled:
        raise UnlearnError("eval.calibrate: calibration is part of the evaluation; set eval.enabled=true "
                           "or eval.calibrate=false")
    check_calibration_inputs(bool(inputs.model_path), list(inputs.eval_splits))


def calibration_label(alpha: float) -> str:
    """The report's column of the calibrated mixture."""
    return f"calibrated (α={alpha:.3f})"


def calibrate_run(cfg: JobConfig, inputs: JobInputs, unlearned: Path, tokenizer: Any, out: Path,
                  summaries: dict[str, dict[str, float]], refs: References | None) -> dict[str, Any]:
    """Model-mixing calibration of the unlearned model against the target (eval.calibrate): bisection
    over α with evaluate_model on mixed copies (eval.max_items items, the retain model's references);
    writes <out>/eval/calibration.json and adds the calibrated summary to `summaries`."""
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.calibration import calibrate
    from ray_unlearn.eval.suite import evaluate_model, summary
    from ray_unlearn.models.io import load_model

    check_calibration(cfg, inputs)
    m = cfg.model
    target = load_model(inputs.model_path, m.dtype, m.trust_remote_code)
    model = load_model(str(unlearned), m.dtype, m.trust_remote_code)
    n = [0]

    def evaluate(mixed: Any) -> dict[str, float]:
        n[0] += 1
        with console.status("calibrating: evaluating a mixed model") as status:
            say = status.update if console.is_terminal else console.print
            results = evaluate_model(mixed, tokenizer, inputs.eval_splits, cfg.eval, prompt_format(cfg.data),
                                     cfg.data.max_length, references=refs,
                                     progress=lambda msg: say(f"calibration evaluation {n[0]}: {msg}"))
        return summary(results)

    known = {a: summaries[k] for a, k in ((0.0, "target"), (1.0, "unlearned")) if k in summaries}
    result = calibrate(target, model, evaluate, cfg.eval.calibration_tau, cfg.eval.calibration_steps, known)
    del target, model
    (out / "eval").mkdir(parents=True, exist_ok=True)
    from ray_unlearn.eval.suite import _write_json_atomic

    _write_json_atomic(out / "eval" / "calibration.json", result)
    summaries[calibration_label(result["alpha"])] = result["calibrated"]
    console.print(f"calibration: α={result['alpha']:.3f} keeps retain ES ≥ {result['tau']:g} × the target's "
                  f"({result['threshold']:.3f}); forget ES there {result['calibrated'].get('extraction_strength')}")
    return result


def red_team_run(cfg: JobConfig, inputs: JobInputs, unlearned: Path, tokenizer: Any, out: Path,
                 summaries: dict[str, dict[str, float]], name: str = "unlearned"
                 ) -> dict[str, dict[str, dict[str, float]]]:
    """eval.attacks on the unlearned model (summaries[name] its plain evaluation): for each attack the forget
    split's metrics measured again under it, {attack: {metric: {"before", "after"}}} ("before": the plain
    evaluation, the same items; the scope attack's in_scope / out_of_scope entries: the target model);
    written to <out>/eval/attacks.json."""
    from ray_unlearn.eval.suite import _write_json_atomic
    from ray_unlearn.models.io import load_model

    check_attacks(cfg, inputs)
    model = load_model(str(unlearned), cfg.model.dtype, cfg.model.trust_remote_code)
    result = attack_results(cfg, inputs, model, tokenizer, summaries.get(name, {}), cfg.eval.attacks)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / "eval" / "attacks.json", result)
    return result


def forget_measure(cfg: JobConfig, tokenizer: Any) -> Callable[[Any, list[dict], str], dict[str, float]]:
    """measure(model, items, what): the forget split's summary metrics of `model` on `items` (no MIA, every
    item: the callers cap them), with a status line saying `what`."""
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.suite import evaluate_model, summary

    plain = dataclasses.replace(cfg.eval, max_items=0, mia=[])

    def measure(model: Any, items: list[dict], what: str) -> dict[str, float]:
        with console.status(f"red team: {what}") as status:
            say = status.update if console.is_terminal else console.print
            return summary(evaluate_model(model, tokenizer, {"forget": items}, plain, prompt_format(cfg.data),
                                          cfg.data.max_length, progress=lambda msg: say(f"{what}: {msg}")))
    return measure


def attack_results(cfg: JobConfig, inputs: JobInputs, model: Any, tokenizer: Any, before: dict[str, float],
                   attacks: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """`attacks` on `model`, whose plain forget metrics (first eval.max_items items) are `before`:
    {attack: {metric: {"before", "after"}}}; scope adds its in_scope / out_of_scope entries."""
    from ray_unlearn.eval.redteam import attacked, relearn_split
    from ray_unlearn.eval.suite import _capped

    e, result = cfg.eval, {}
    forget = _capped(inputs.eval_splits["forget"], e.max_items)  # jailbreak multiplies them: capped here
    measure = forget_measure(cfg, tokenizer)
    for attack in attacks:
        if attack == "scope":
            result.update(scope_results(cfg, inputs, model, measure))
            continue
        plain = before
        if attack == "relearn":
            slice_, items = relearn_split(forget, e.relearn_fraction)
            plain = measure(model, items, "relearn (before)")
            under = relearned(cfg, model, tokenizer, slice_)
        else:
            under, items = attacked(model, forget, attack, e.jailbreak_prompts, e.in_context_examples, tokenizer,
                                    e.token_noise, e.embedding_noise)
        after = measure(under, items, attack)
        del under
        result[attack] = {k: {"before": plain.get(k), "after": v} for k, v in after.items()}
    return result


def scope_results(cfg: JobConfig, inputs: JobInputs, model: Any,
                  measure: Callable[[Any, list[dict], str], dict[str, float]]) -> dict[str, dict[str, dict]]:
    """The scope attack: the target model ("before") and `model` ("after") on the paraphrased forget questions
    (in_scope) and on the neighbours (out_of_scope), eval.max_items of each."""
    from ray_unlearn.eval.redteam import scope_items
    from ray_unlearn.eval.suite import _capped
    from ray_unlearn.models.io import load_model

    cap = cfg.eval.max_items
    sets = scope_items(_capped(inputs.eval_splits["forget"], cap), _capped(inputs.neighbours, cap))
    target = load_model(inputs.model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    result = {}
    for entry, items in sets.items():
        before = measure(target, items, f"{entry} (target)")
        after = measure(model, items, entry)
        result[entry] = {k: {"before": before.get(k), "after": v} for k, v in after.items()}
    return result


def robustness_job(run_dirs: Sequence[str], overrides: list[str], output_dir: str | None = None) -> dict[str, Any]:
    """`ray-unlearn robustness RUN_DIR [RUN_DIR ...]`: a population of models mixed between the target and each
    run's unlearned model, θ(α) = (1−α)·θ_target + α·θ_unlearned for α in eval.robustness_alphas, each measured
    plain and under eval.attacks (every attack but scope when none is set); Pearson r of every forget metric
    before vs after each attack across the population, ranked (eval/robustness.py), written to `output_dir`
    (default <first RUN_DIR>/robustness): robustness.json, robustness.md, robustness.png. The runs must share
    the target and the forget set; the config (and `overrides`) is the first run's."""
    from ray_unlearn.config import load_config

    if any(storage.is_remote(d) for d in [*run_dirs, output_dir or ""]):
        raise UnlearnError("ray-unlearn robustness reads and writes local directories; copy the runs from the "
                           "bucket first")
    runs = [_finished_run(Path(d).expanduser()) for d in run_dirs]
    cfg = load_config(str(runs[0] / "config.yaml"), overrides)
    for run in runs[1:]:
        _check_same_target(cfg, load_config(str(run / "config.yaml"), []), runs[0], run)
    attacks = robustness_attacks(cfg)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, enabled=True, attacks=attacks))
    with progress_reporter() as report:
        inputs = resolve_inputs(cfg, report)
    check_attacks(cfg, inputs)
    out = Path(output_dir).expanduser() if output_dir else runs[0] / "robustness"
    population = [rec for i, run in enumerate(runs)  # α = 0 is the target: measured once, with the first run
                  for rec in robustness_population(cfg, inputs, run / "model", f"run{i + 1}:" if len(runs) > 1 else "",
                                                   with_target=i == 0)]
    return _write_robustness(cfg, inputs, runs, out, population, attacks)


def _finished_run(run: Path) -> Path:
    """`run` is the output_dir of a finished `ray-unlearn run` (config.yaml and model/), or a one-line error."""
    if (run / "tune" / "search.yaml").is_file() or (run / "search.yaml").is_file():
        raise UnlearnError(f"{run} is a Tune search: robustness needs runs' unlearned models; run front members "
                           f"(ray-unlearn run {run}/tune/front/<trial>.yaml) and give their output_dirs")
    if not (run / "config.yaml").is_file():
        raise UnlearnError(f"{run}: no config.yaml; give the output_dir of a finished `ray-unlearn run`")
    if not (run / "model").is_dir():
        raise UnlearnError(f"{run}/model is missing: the run did not finish; run it again (it resumes) first")
    return run


def _check_same_target(first: JobConfig, other: JobConfig, first_dir: Path, other_dir: Path) -> None:
    """Both runs unlearned the same forget set from the same target model, or a one-line error."""
    def key(c: JobConfig) -> tuple:
        return (c.model.path, c.data.forget_path, c.data.forget_split,
                None if c.model.path else (c.benchmark.size, c.benchmark.seed))

    if key(first) != key(other):
        raise UnlearnError(f"{other_dir} unlearned another target model or forget set than {first_dir} (model.path, "
                           "data.forget_path / forget_split or benchmark differ); give runs of one target and forget set")


def robustness_attacks(cfg: JobConfig) -> list[str]:
    """The attacks robustness correlates: eval.attacks, or every attack when it is empty; never scope (it
    compares the target with the unlearned model rather than putting one model under pressure)."""
    from ray_unlearn.eval.redteam import ATTACKS

    attacks = [a for a in (cfg.eval.attacks or ATTACKS) if a != "scope"]
    if not attacks:
        raise UnlearnError("eval.attacks: robustness correlates metrics before vs after attacks and scope is not one "
                           "(it compares target with unlearned); add an attack, e.g. eval.attacks=[quantize_int4]")
    return attacks


def robustness_population(cfg: JobConfig, inputs: JobInputs, unlearned: Path, prefix: str = "",
                          with_target: bool = True) -> list[dict[str, Any]]:
    """For each α of eval.robustness_alphas (sorted; α = 0, the target itself, only `with_target`):
    {"model": prefix + alpha=α, "alpha", "unlearned", "attacks": attack_results of θ(α)}."""
    import copy

    from ray_unlearn.eval.calibration import mix_state
    from ray_unlearn.eval.suite import _capped
    from ray_unlearn.models.io import load_model, load_tokenizer

    m = cfg.model
    tokenizer = load_tokenizer(inputs.tokenizer_path, m.trust_remote_code)
    target = load_model(inputs.model_path, m.dtype, m.trust_remote_code)
    target_sd = {k: v.detach().clone() for k, v in target.state_dict().items()}
    unlearned_sd = load_model(str(unlearned), m.dtype, m.trust_remote_code).state_dict()
    mixed, forget = copy.deepcopy(target), _capped(inputs.eval_splits["forget"], cfg.eval.max_items)
    alphas = sorted(a for a in set(cfg.eval.robustness_alphas) if with_target or a > 0)
    measure, population = forget_measure(cfg, tokenizer), []
    for i, alpha in enumerate(alphas):  # a status line per measurement (measure's) and a line per model
        console.print(f"robustness: {prefix}model {i + 1}/{len(alphas)}, α={alpha:g} ({len(cfg.eval.attacks)} "
                      "attacks)")
        mixed.load_state_dict(mix_state(target_sd, unlearned_sd, alpha))
        before = measure(mixed, forget, f"α={alpha:g}")
        population.append({"model": f"{prefix}alpha={alpha:g}", "alpha": alpha, "unlearned": str(unlearned),
                           "attacks": attack_results(cfg, inputs, mixed, tokenizer, before, cfg.eval.attacks)})
    return population


def _write_robustness(cfg: JobConfig, inputs: JobInputs, runs: list[Path], out: Path,
                      population: list[dict[str, Any]], attacks: list[str]) -> dict[str, Any]:
    """robustness.json / .md / .png of the population (eval.robustness.write_outputs), the ranking printed."""
    from ray_unlearn.eval.registry import METRICS
    from ray_unlearn.eval.robustness import write_outputs

    measured = {k for rec in population for by_metric in rec["attacks"].values() for k in by_metric}
    metrics = [m.name for m in METRICS.values() if m.split == "forget" and m.name in measured]
    alphas = sorted({rec["alpha"] for rec in population})
    facts = {"runs": ", ".join(str(run.resolve()) for run in runs), "target model": inputs.model_path,
             "models": f"{len(population)}: θ(α) = (1−α)·θ_target + α·θ_unlearned for each run's unlearned model, "
                       f"α in " + ", ".join(f"{a:g}" for a in alphas),
             "forget items": f"the first {cfg.eval.max_items or 'all'} of {inputs.bench}'s forget split",
             "attacks": ", ".join(attacks)}
    result = write_outputs(out, population, attacks, metrics, facts)
    table = Table(title="metric robustness (Pearson r before vs after, across the population)")
    for col in ("metric", "mean r", "min r", "undefined"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in result["ranking"]:
        table.add_row(row["metric"], *("n/a" if row[k] is None else f"{row[k]:.3f}" for k in ("mean_r", "min_r")),
                      str(row["undefined"]))
    console.print(table)
    console.print(f"robustness table, heat map and values in [bold]{out.resolve()}[/] (robustness.md, .png, .json)")
    return result


def _report(cfg: JobConfig, inputs: JobInputs, out: Path, summaries: dict[str, dict[str, float]],
            history: list[dict[str, float]], facts: dict[str, Any],
            calibration: dict[str, Any] | None = None, attacks: dict[str, dict] | None = None,
            selection: dict[str, Any] | None = None, audit: dict[str, Any] | None = None) -> None:
    from ray_unlearn.eval.report import (attack_sections, audit_rows, calibration_rows, gap_closed, mia_section,
                                         plot_attacks, plot_calibration, plot_metrics, plot_selection, plot_training,
                                         selection_rows, write_report)

    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    from ray_unlearn.eval.suite import roc_path

    roc = roc_path(out / "eval", inputs.bench)  # the unlearned model's, written with its EVAL files
    mia = mia_section(summaries, roc_plots(out, inputs.bench, summaries, "unlearned"))  # the ROC plots are in it
    plots = [p for p in (plot_training(history, plots_dir / "training_curves.png"),
                         plot_metrics(summaries, plots_dir / "metrics.png"), roc if roc.is_file() and not mia else None,
                         plot_calibration(calibration, plots_dir / "calibration.png") if calibration else None,
                         plot_attacks(attacks, plots_dir / "attacks.png") if attacks else None,
                         plot_selection(selection, plots_dir / "localize_selection.png") if selection else None)
             if p is not None]
    gap = gap_closed(summaries, "target", "unlearned", "retain")
    facts = {"model": inputs.model_path, "benchmark": inputs.bench, "optimizer": cfg.optim.name,
             "objective": ", ".join(f"{k}×{v:g}" for k, v in cfg.objective.terms.items()),
             "steps": cfg.train.max_steps, "workers": cfg.ray.num_workers, **facts}
    if calibration:
        facts["calibration"] = (f"α={calibration['alpha']:.3f} (largest with retain ES ≥ {calibration['tau']:g} × "
                                f"target's = {calibration['threshold']:.4f}; {calibration['steps']} bisection steps, "
                                f"{len(calibration['curve'])} points in eval/calibration.json)")
    if inputs.build_figures:
        facts["benchmark build"] = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in inputs.build_figures.items())
    if selection:
        lc = cfg.localize
        facts["localized"] = (f"{lc.method}: {100 * selection['fraction']:.2f} % of entries could move (top "
                              f"{lc.fraction:g}, {lc.scope}, noise {lc.noise:g} x std; localize/selection.json)")
    sections = ([mia] if mia else []) + (attack_sections(attacks) if attacks else [])
    if calibration:
        sections.append(("Model-mixing calibration (θ(α) = (1−α)·θ_target + α·θ_unlearned)",
                         calibration_rows(calibration)))
    if selection:
        sections.append(("Localized unlearning: entries selected by module type", selection_rows(selection)))
    if audit:
        sections.append(("Audit record (audit.json; `ray-unlearn verify` re-checks it)", audit_rows(audit)))
    write_report(out, summaries, gap, facts, plots, sections)
    _print_summary(summaries, gap)


def _print_summary(summaries: dict[str, dict[str, float]], gap: dict[str, float]) -> None:
    """The key metrics of every model side by side, and the gap closed, on the console."""
    from ray_unlearn.eval.report import comparison_rows

    table = Table(title="ray_unlearn summary")
    table.add_column("metric")
    for name in summaries:
        table.add_column(name, justify="right")
    for row in comparison_rows(summaries):
        table.add_row(*row)
    console.print(table)
    for k, v in gap.items():
        console.print(f"{k}: {v:.3f}")
