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
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ray_unlearn import storage
from ray_unlearn.config import AuditConfig, JobConfig, dump_config, to_dict
from ray_unlearn.errors import UnlearnError
from ray_unlearn.job import JobInputs, load_checked, resolve_inputs

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

    with tempfile.TemporaryDirectory(prefix="ray_unlearn_final_") as final:
        fit(cfg, inputs, Path(final))  # the last checkpoint holds the full weights, gathered by the workers
        history = checkpoint_history(Path(final))
        train_s = time.time() - t0
        publish_model(final, tokenizer, out / "model")
        if cfg.model.lora.enabled:  # the adapter beside the merged model
            from ray_unlearn.models.lora import ADAPTER_DIR, ADAPTER_FILES

            publish_model(Path(final) / ADAPTER_DIR, tokenizer, out / "adapter", ADAPTER_FILES)
        selection = write_selection(Path(final), out / "localize")
    _write_json(out / "history.json", history)
    summaries: dict[str, dict[str, float]] = {}
    attacks = None
    if cfg.eval.enabled:
        refs: dict[str, References] = {}
        summaries = evaluate_all(cfg, inputs, out / "model", tokenizer, out, refs_out=refs)
        calibration = None
        if cfg.eval.calibrate:
            calibration = calibrate_run(cfg, inputs, out / "model", tokenizer, out, summaries, refs.get("refs"))
        attacks = red_team_run(cfg, inputs, out / "model", tokenizer, out, summaries) if cfg.eval.attacks else None
        _report(cfg, inputs, out, summaries, history, {"time to unlearned model (s)": f"{train_s:.1f}"},
                calibration, attacks, selection)
    _write_audit(cfg, inputs, out, summaries, t0, attacks)
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
    from ray_unlearn.eval.report import attack_rows, gap_closed, plot_attacks, plot_metrics, write_report
    from ray_unlearn.eval.suite import roc_path, write_eval
    from ray_unlearn.models.io import (_check_model_dir, check_vocab, empty_model, load_model, load_tokenizer,
                                       looks_like_path)

    t0 = time.time()
    if looks_like_path(model):
        _check_model_dir(Path(model).expanduser())  # one line before anything is built or written
    validate(cfg)
    with progress_reporter() as report:
        inputs = resolve_inputs(cfg, report)
    check_attacks(cfg, inputs)
    if storage.is_remote(cfg.output_dir):
        raise UnlearnError("ray-unlearn eval writes to a local output_dir; copy the results to the bucket after")
    storage.check_writable("output_dir", cfg.output_dir)
    m = cfg.model
    own_tokenizer = looks_like_path(model) and any((Path(model).expanduser() / f).is_file()
                                                   for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(model if own_tokenizer or not looks_like_path(model) else inputs.tokenizer_path,
                               m.trust_remote_code)

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
    found, _ = evaluate_models(cfg, inputs, tokenizer, models, write)
    summaries = {n: found[n] for n in ("target", "evaluated", "retain") if n in found}
    attacks = red_team_run(cfg, inputs, Path(model), tokenizer, out, summaries, "evaluated") \
        if cfg.eval.attacks else None
    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    roc = roc_path(out / "eval", inputs.bench)
    plots = [p for p in (plot_metrics(summaries, plots_dir / "metrics.png"), roc if roc.is_file() else None,
                         plot_attacks(attacks, plots_dir / "attacks.png") if attacks else None) if p is not None]
    gap = gap_closed(summaries, "target", "evaluated", "retain")
    facts = {"evaluated model": model, "target model": inputs.model_path,
             "retain model": inputs.retain_model_path or "none", "benchmark": inputs.bench,
             "time (s)": f"{time.time() - t0:.1f}"}
    sections = [("Red-team attacks (forget split, before → after)", attack_rows(attacks))] if attacks else []
    write_report(out, summaries, gap, facts, plots, sections)
    _print_summary(summaries, gap)
    console.print(f"outputs in [bold]{out.resolve()}[/]")
    return summaries


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
                 t0: float, attacks: dict[str, Any] | None = None) -> None:
    """<out>/audit.json (DESIGN.md §12): hashes of the forget items and of both models, config, versions,
    metrics and verdict."""
    from ray_unlearn import audit

    record = audit.build_record(request_id=cfg.audit.request_id, forget_items=inputs.forget,
                                forget_source=cfg.data.forget_path or None, input_model=inputs.model_path,
                                output_model=out / "model", run_dir=out, config=to_dict(cfg), bench=inputs.bench,
                                summaries=summaries, started=t0, finished=time.time(), attacks=attacks)
    audit.write(out, record)
    verdict = record.get("verdict", {}).get("verdict") or f"omitted: {record.get('verdict_omitted')}"
    console.print(f"audit record: request {record['request_id']}, verdict {verdict}")


def evaluate_models(cfg: JobConfig, inputs: JobInputs, tokenizer: Any, models: dict[str, Callable[[], Any]],
                    on_result: Callable[[str, dict], None] | None = None
                    ) -> tuple[dict[str, dict[str, float]], References]:
    """Evaluate each model (a "retain" entry first: its forget truth ratios and MIA AUCs give the
    others' forget quality and privleak); returns (summaries by name, what the retain model gives).

    The reference attack's reference losses come from the model at `inputs.mia_reference_path`,
    scored once: the "retain" entry's model when that is the reference, else loaded for it."""
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.suite import References, evaluate_model, references_from, summary

    summaries, refs = {}, References()
    for name in sorted(models, key=lambda n: n != "retain"):
        model = models[name]()
        if refs.losses is None and _wants_reference_losses(cfg, inputs):
            is_reference = name == "retain" and inputs.mia_reference_path == inputs.retain_model_path
            refs = References(refs.forget_truth_ratios, refs.mia_auc, _reference_losses(
                cfg, inputs, tokenizer, model if is_reference else None))
        with console.status(f"evaluating {name} model") as status:
            say = status.update if console.is_terminal else console.print
            results = evaluate_model(model, tokenizer, inputs.eval_splits, cfg.eval, prompt_format(cfg.data),
                                     cfg.data.max_length, references=refs,
                                     progress=lambda msg, n=name: say(f"evaluating {n} model: {msg}"))
        del model
        if name == "retain":
            refs = references_from(results, refs.losses)
        if on_result is not None:
            on_result(name, results)
        summaries[name] = summary(results)
    return summaries, refs


def _wants_reference_losses(cfg: JobConfig, inputs: JobInputs) -> bool:
    """The reference attack will run: it is asked for (or auto) and has its model and splits."""
    from ray_unlearn.eval.registry import HOLDOUT

    wanted = cfg.eval.mia == "auto" or "reference" in cfg.eval.mia
    return wanted and bool(inputs.mia_reference_path) and bool(inputs.eval_splits.get("forget")) \
        and bool(inputs.eval_splits.get(HOLDOUT))


def _reference_losses(cfg: JobConfig, inputs: JobInputs, tokenizer: Any, model: Any | None) -> dict:
    """The reference model's per-item answer NLL on forget and holdout (`model`, or loaded from its path)."""
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.suite import reference_losses
    from ray_unlearn.models.io import load_model

    if model is None:
        model = load_model(inputs.mia_reference_path, cfg.model.dtype, cfg.model.trust_remote_code)
    return reference_losses(model, tokenizer, inputs.eval_splits, cfg.eval, prompt_format(cfg.data),
                            cfg.data.max_length)


def evaluate_all(cfg: JobConfig, inputs: JobInputs, unlearned: Path, tokenizer: Any,
                 out: Path, refs_out: dict | None = None) -> dict[str, dict[str, float]]:
    """Evaluate retain (when known), target and unlearned (HF directory) models; write their EVAL/SUMMARY
    files. `refs_out`, when given, receives the retain model's References under "refs"."""
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

    summaries, refs = evaluate_models(cfg, inputs, tokenizer, models, write)
    if refs_out is not None:
        refs_out["refs"] = refs
    return {n: summaries[n] for n in ("target", "unlearned", "retain") if n in summaries}


def relearned(cfg: JobConfig, model: Any, tokenizer: Any, items: list[dict]) -> Any:
    """A copy of `model` after the relearn attack: eval.relearn_steps steps of the run's own loop (one plain
    process) with the objective NLL(items) (`ga` weighted -1) and AdamW at eval.relearn_lr."""
    import copy

    from ray_unlearn.config import from_dict
    from ray_unlearn.loop import LoopEnv, Unlearner, encode_data

    e = cfg.eval
    data = to_dict(cfg)
    data["objective"] = {"terms": {"ga": -1.0}}
    data["optim"] = {"name": "adamw", "lr": e.relearn_lr, "weight_decay": 0.0}
    data["train"] = {"max_steps": e.relearn_steps, "batch_size": min(len(items), cfg.train.batch_size),
                     "log_every": e.relearn_steps, "seed": cfg.train.seed}
    data["ray"] = {"num_workers": 0}  # one plain process, its checkpoint in a temporary directory
    data["localize"] = {"method": "none"}  # the attacker fine-tunes every weight
    victim = copy.deepcopy(model)
    with tempfile.TemporaryDirectory(prefix="ray_unlearn_relearn_") as tmp:
        data["output_dir"] = tmp
        attack_cfg = from_dict(JobConfig, data)
        Unlearner(attack_cfg, victim, None, encode_data(attack_cfg, tokenizer, items, []), tokenizer.pad_token_id,
                  LoopEnv(checkpoint_dir=Path(tmp))).run()
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
    evaluation, the same items); written to <out>/eval/attacks.json."""
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.redteam import attacked, relearn_split
    from ray_unlearn.eval.suite import _capped, _write_json_atomic, evaluate_model, summary
    from ray_unlearn.models.io import load_model

    check_attacks(cfg, inputs)
    forget = _capped(inputs.eval_splits["forget"], cfg.eval.max_items)
    model = load_model(str(unlearned), cfg.model.dtype, cfg.model.trust_remote_code)
    plain = dataclasses.replace(cfg.eval, max_items=0, mia=[])  # the items are capped above (jailbreak multiplies)
    e, result = cfg.eval, {}

    def measure(m: Any, items: list[dict], what: str) -> dict[str, float]:
        with console.status(f"red team: {what}") as status:
            say = status.update if console.is_terminal else console.print
            return summary(evaluate_model(m, tokenizer, {"forget": items}, plain, prompt_format(cfg.data),
                                          cfg.data.max_length, progress=lambda msg: say(f"{what}: {msg}")))

    for attack in e.attacks:
        before = summaries.get(name, {})
        if attack == "relearn":
            slice_, items = relearn_split(forget, e.relearn_fraction)
            before = measure(model, items, "relearn (before)")
            under = relearned(cfg, model, tokenizer, slice_)
        else:
            under, items = attacked(model, forget, attack, e.jailbreak_prompts, e.in_context_examples, tokenizer,
                                    e.token_noise, e.embedding_noise)
        after = measure(under, items, attack)
        del under
        result[attack] = {k: {"before": before.get(k), "after": v} for k, v in after.items()}
    (out / "eval").mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / "eval" / "attacks.json", result)
    return result


def _report(cfg: JobConfig, inputs: JobInputs, out: Path, summaries: dict[str, dict[str, float]],
            history: list[dict[str, float]], facts: dict[str, Any],
            calibration: dict[str, Any] | None = None, attacks: dict[str, dict] | None = None,
            selection: dict[str, Any] | None = None) -> None:
    from ray_unlearn.eval.report import (attack_rows, gap_closed, plot_attacks, plot_calibration,
                                         plot_metrics, plot_selection, plot_training, selection_rows, write_report)

    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    from ray_unlearn.eval.suite import roc_path

    roc = roc_path(out / "eval", inputs.bench)  # the unlearned model's, written with its EVAL files
    plots = [p for p in (plot_training(history, plots_dir / "training_curves.png"),
                         plot_metrics(summaries, plots_dir / "metrics.png"), roc if roc.is_file() else None,
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
    sections = [("Red-team attacks (forget split, before → after)", attack_rows(attacks))] if attacks else []
    if selection:
        sections.append(("Localized unlearning: entries selected by module type", selection_rows(selection)))
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
