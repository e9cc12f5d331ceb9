"""`ray-unlearn finetune`: the TOFU workflow on your own data, driver side.

From TOFU-format forget and retain items (data.forget_path, data.retain_path) and a base model (model.path:
an HF directory or hub id; empty: a fresh built-in Llama of finetune.fresh_size with a BPE tokenizer fitted
on the data), one command trains two models with the run's own loop on Ray Train (same strategies,
checkpoints and resume as `run`; the `nll` term on the train stream, no forget stream):

- the **target** model on forget ∪ retain (the model a deletion request is made against),
- the **retain** model on retain alone (the retrained gold standard forget quality compares with),

each an HF directory under output_dir, and evaluates both on the forget and retain items (the suite of
`run`: ES, answer probability, ROUGE, truth ratio, and the target's forget quality against the retain
model), written as eval/<model>/CUSTOM_*.json, memorization.json, report.md and plots/memorization.png.
`ray-unlearn run model.path=<target> model.retain_model=<retain> data.forget_path=... data.retain_path=...`
then unlearns the target and reports forget quality and the gap closed exactly as on the built-in benchmark.

Every input is checked before anything is written or Ray starts. Each model trains under
<output_dir>/training/<model> (Ray Train's storage: <that>/ray, or ray.storage_path, with run name
<name>-<model>), so the same command run again resumes each from its latest checkpoint.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_unlearn import storage
from ray_unlearn.config import JobConfig, dump_config, from_dict, to_dict
from ray_unlearn.errors import UnlearnError
from ray_unlearn.job import JobInputs
from ray_unlearn.pipeline import _write_json, console

BENCH = "CUSTOM"  # the EVAL/SUMMARY file prefix `run` uses for user data
TOFU_LR, TOFU_EPOCHS = 1e-5, 5  # TOFU's fine-tuning recipe for a pretrained model
FRESH_MIN_STEPS = 300  # a model from scratch needs a few hundred updates to memorize anything, however little data
WEAK_GAP = 0.2  # a forget-ES gap below this leaves unlearning little to measure: the report says so


@dataclass(frozen=True)
class FinetuneData:
    """The items a finetune trains and evaluates on."""

    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]

    def training_items(self, model: str) -> list[dict]:
        """What `model` ("target" or "retain") is trained on."""
        return self.forget + self.retain if model == "target" else list(self.retain)


def load_finetune_data(cfg: JobConfig) -> FinetuneData:
    """Forget, retain (forget items dropped, per data.overlap) and holdout items, or a one-line UnlearnError."""
    from ray_unlearn.data.loaders import load_forget_items, load_qa, resolve_overlap
    from ray_unlearn.eval.registry import selected_attacks

    d = cfg.data
    missing = [k for k in ("forget_path", "retain_path") if not getattr(d, k)]
    if missing:
        raise UnlearnError(f"ray-unlearn finetune trains on your own data: set data.{missing[0]} (TOFU-format "
                           "question/answer items); the built-in benchmark has its target and retain models already")
    forget, kind = load_forget_items(d.forget_path, d.hub_split)
    if kind != "qa":
        raise UnlearnError(f"data.forget_path {d.forget_path} is a text corpus; finetune trains and measures "
                           "question/answer items: give a .json/.jsonl/.parquet file of TOFU-format items")
    retain = resolve_overlap(forget, load_qa(d.retain_path, d.hub_split), d.overlap)
    holdout = load_qa(d.holdout_path, d.hub_split) if d.holdout_path else []
    selected_attacks(cfg.eval.mia, True, bool(holdout), True)  # eval.mia listed without a holdout: one line now
    return FinetuneData(forget, retain, holdout)


def recipe(cfg: JobConfig) -> tuple[float, int, int]:
    """(peak lr, epochs, least steps): finetune.lr / finetune.epochs, or the recipe's when 0: TOFU's for a
    given model; for a fresh one the built-in memorizer's, and at least FRESH_MIN_STEPS steps."""
    from ray_unlearn.models.tiny import MODEL_SIZES

    ft, spec = cfg.finetune, MODEL_SIZES[cfg.finetune.fresh_size]
    lr = ft.lr or (TOFU_LR if cfg.model.path else spec.lr)
    if ft.epochs:
        return lr, ft.epochs, 0
    return (lr, TOFU_EPOCHS, 0) if cfg.model.path else (lr, spec.epochs, FRESH_MIN_STEPS)


def member_config(cfg: JobConfig, model: str, items: int, base: str, tokenizer: str) -> JobConfig:
    """The loop's config for training `model` ("target" or "retain") on `items` items from `base`: the `nll`
    term, finetune's optimizer, batch and schedule, the job's train/optim/ray settings otherwise."""
    ft, t = cfg.finetune, cfg.train
    lr, epochs, least = recipe(cfg)
    per_step = ft.global_batch_size or ft.batch_size * max(1, cfg.ray.max_workers)
    steps = ft.max_steps or max(least, epochs * math.ceil(items / per_step))
    data = to_dict(cfg)
    data.update(name=f"{cfg.name}-{model}", output_dir=str(Path(cfg.output_dir) / "training" / model))
    data["model"].update(path=base, tokenizer=tokenizer, retain_model="")
    data["objective"] = {"terms": {"nll": 1.0}}
    data["optim"].update(name=ft.optimizer, lr=lr, weight_decay=ft.weight_decay)
    data["localize"] = {"method": "none"}
    data["train"] = dict(data["train"], max_steps=steps, batch_size=ft.batch_size, grad_accum=1,
                         global_batch_size=ft.global_batch_size, warmup_steps=int(ft.warmup * steps),
                         lr_schedule=ft.lr_schedule, eval_every=0, log_every=min(t.log_every, steps))
    return from_dict(JobConfig, data)


def check_finetune(cfg: JobConfig) -> None:
    """The job-level settings finetune cannot take, before any work (one-line UnlearnError)."""
    if storage.is_remote(cfg.output_dir):
        raise UnlearnError("ray-unlearn finetune writes its models to a local output_dir (shared storage for "
                           "multi-node checkpoints goes in ray.storage_path); copy them to the bucket after")
    if cfg.ray.elastic and not cfg.finetune.global_batch_size:
        raise UnlearnError("ray.num_workers=[min, max] (elastic) needs finetune.global_batch_size, so that every "
                           "worker count takes the same steps; set it, e.g. to finetune.batch_size x max")
    ft = cfg.finetune
    for workers in range(max(1, cfg.ray.min_workers), max(1, cfg.ray.max_workers) + 1):
        if ft.global_batch_size % (ft.batch_size * workers):
            raise UnlearnError(f"finetune.global_batch_size={ft.global_batch_size} is not a multiple of "
                               f"finetune.batch_size={ft.batch_size} x {workers} workers; pick a batch size and "
                               "worker count that divide it")


def base_tokenizer(cfg: JobConfig) -> Any | None:
    """The tokenizer of the base model (model.tokenizer, else model.path), checked against the model and the
    prompt settings; None for a fresh model without model.tokenizer (one is fitted on the data)."""
    from ray_unlearn.data.collate import prompt_format, uses_chat_template
    from ray_unlearn.models.io import _check_model_dir, check_vocab, empty_model, load_tokenizer, looks_like_path

    m = cfg.model
    if m.path and looks_like_path(m.path):
        _check_model_dir(Path(m.path).expanduser())
    if not (m.tokenizer or m.path):
        return None
    tokenizer = load_tokenizer(m.tokenizer or m.path, m.trust_remote_code)
    if m.path:
        check_vocab(empty_model(m.path, m.dtype, m.trust_remote_code), tokenizer)
    uses_chat_template(tokenizer, prompt_format(cfg.data))  # data.chat_template=true needs one
    return tokenizer


def fresh_base(cfg: JobConfig, data: FinetuneData, tokenizer: Any | None, into: Path) -> Any:
    """A fresh built-in Llama of finetune.fresh_size (seeded by train.seed) with `tokenizer`, or a BPE
    tokenizer fitted on the items' text, saved at `into` (kept when there: a rerun resumes from it);
    returns the tokenizer."""
    from ray_unlearn.models.build import _texts
    from ray_unlearn.models.io import load_tokenizer, save_model
    from ray_unlearn.models.tiny import MODEL_SIZES, new_llama, train_tokenizer

    if (into / "config.json").is_file():
        return load_tokenizer(str(into))
    spec = MODEL_SIZES[cfg.finetune.fresh_size]
    if tokenizer is None:
        texts = _texts({"forget": data.forget, "retain": data.retain, "holdout": data.holdout})
        tokenizer = train_tokenizer(texts + [cfg.data.prompt_template, cfg.data.refusal], spec.vocab_size)
    save_model(new_llama(spec, tokenizer, cfg.train.seed), tokenizer, into)
    return tokenizer


def finetune_job(cfg: JobConfig) -> dict[str, dict[str, float]]:
    """Train the target and retain models, evaluate how well each memorized its data, write the report;
    returns the two summaries ("target", "retain")."""
    from ray_unlearn.train import check_resume, init_ray

    t0 = time.time()
    check_finetune(cfg)
    data = load_finetune_data(cfg)
    tokenizer = base_tokenizer(cfg)
    out, ft = Path(cfg.output_dir), cfg.finetune
    base = cfg.model.path or str(out / "base")
    tok_path = cfg.model.tokenizer or base
    members = {name: member_config(cfg, name, len(data.training_items(name)), base, tok_path)
               for name in ("target", "retain")}
    for sub in members.values():
        check_resume(sub)
    init_ray(cfg)  # the cluster must hold the workers before anything is written
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    if not cfg.model.path:
        tokenizer = fresh_base(cfg, data, tokenizer, out / "base")
    paths, histories = {}, {}
    for name, sub in members.items():
        paths[name] = out / (ft.target_dir if name == "target" else ft.retain_dir)
        histories[name] = _train_member(sub, name, data.training_items(name), tokenizer, paths[name])
    train_s = time.time() - t0
    summaries = evaluate_memorization(cfg, data, tokenizer, paths)
    write_memorization(cfg, out, data, summaries, paths, members, histories, train_s)
    return summaries


def _train_member(sub: JobConfig, name: str, items: list[dict], tokenizer: Any, into: Path) -> list[dict]:
    """Fine-tune one model on Ray Train (the run's `fit`) and publish it as an HF directory; returns its history."""
    from ray_unlearn.loop import checkpoint_history
    from ray_unlearn.models.io import publish_model
    from ray_unlearn.train import fit

    inputs = JobInputs(bench=BENCH, model_path=sub.model.path, tokenizer_path=sub.model.tokenizer or sub.model.path,
                       retain_model_path=None, forget=[], retain=[], train=items)
    workers = sub.ray.num_workers
    console.print(f"fine-tuning the {name} model on {len(items)} items: {sub.train.max_steps} steps of "
                  f"{sub.optim.name} at lr {sub.optim.lr:g} ({workers} Ray Train workers, {sub.ray.strategy})")
    with tempfile.TemporaryDirectory(prefix="ray_unlearn_finetune_") as final:
        fit(sub, inputs, Path(final))
        history = checkpoint_history(Path(final))
        publish_model(final, tokenizer, into)
    return history


def evaluate_memorization(cfg: JobConfig, data: FinetuneData, tokenizer: Any,
                          paths: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Both models through `run`'s evaluation on the forget and retain items (and holdout, for MIA), the
    retain model first (its forget truth ratios give the target's forget quality); EVAL/SUMMARY files under
    <output_dir>/eval/<model dir>."""
    from ray_unlearn.models.io import load_model
    from ray_unlearn.pipeline import evaluate_models
    from ray_unlearn.eval.suite import write_eval

    splits = {"forget": data.forget, "retain": data.retain, **({"holdout": data.holdout} if data.holdout else {})}
    inputs = JobInputs(bench=BENCH, model_path=str(paths["target"]), tokenizer_path=str(paths["target"]),
                       retain_model_path=str(paths["retain"]), forget=data.forget, retain=data.retain,
                       eval_splits=splits, mia_reference_path=str(paths["retain"]))
    m = cfg.model
    models = {name: (lambda p=path: load_model(str(p), m.dtype, m.trust_remote_code)) for name, path in paths.items()}

    def write(name: str, results: dict) -> None:
        write_eval(Path(cfg.output_dir) / "eval" / paths[name].name, BENCH, results)

    summaries, _ = evaluate_models(cfg, inputs, tokenizer, models, write, {k: str(v) for k, v in paths.items()})
    return {name: summaries[name] for name in ("target", "retain")}


MEMORIZATION_METRICS = {"forget": ("extraction_strength", "forget_Q_A_Prob"),
                        "retain": ("retain_extraction_strength", "retain_Q_A_Prob")}  # (ES, probability) per split


def memorization(summaries: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{model: {split: {"extraction_strength", "probability"}}} from the two summaries."""
    return {name: {split: {"extraction_strength": s.get(es), "probability": s.get(prob)}
                   for split, (es, prob) in MEMORIZATION_METRICS.items()} for name, s in summaries.items()}


def write_memorization(cfg: JobConfig, out: Path, data: FinetuneData, summaries: dict[str, dict[str, float]],
                       paths: dict[str, Path], members: dict[str, JobConfig], histories: dict[str, list[dict]],
                       train_s: float) -> None:
    """memorization.json, report.md and plots/memorization.png; the summary on the console."""
    from ray_unlearn.eval.report import plot_memorization, write_report
    from ray_unlearn.pipeline import _print_summary

    memo = memorization(summaries)
    gap = {"forget ES gap (target − retain)": memo["target"]["forget"]["extraction_strength"]
           - memo["retain"]["forget"]["extraction_strength"]}
    record = {name: {"model": str(paths[name].resolve()), "trained_on": len(data.training_items(name)),
                     "steps": members[name].train.max_steps, "lr": members[name].optim.lr,
                     "final_train_nll": (histories[name] or [{}])[-1].get("nll/train"), **memo[name]}
              for name in ("target", "retain")}
    record["target"]["forget_quality"] = summaries["target"].get("forget_quality")
    record["forget_es_gap"] = next(iter(gap.values()))
    _write_json(out / "memorization.json", record)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    facts = {"base model": cfg.model.path or f"fresh built-in {cfg.finetune.fresh_size} Llama ({out / 'base'})",
             "target model": f"{paths['target']} ({len(data.forget)} forget + {len(data.retain)} retain items)",
             "retain model": f"{paths['retain']} ({len(data.retain)} retain items)",
             "optimizer": f"{cfg.finetune.optimizer}, lr {members['target'].optim.lr:g}",
             "steps": ", ".join(f"{n} {m.train.max_steps}" for n, m in members.items()),
             "workers": cfg.ray.num_workers, "time to both models (s)": f"{train_s:.1f}"}
    write_report(out, summaries, gap, facts, [plot_memorization(memo, plots / "memorization.png")])
    _print_summary(summaries, gap)
    if record["forget_es_gap"] < WEAK_GAP:
        console.print(f"warning: the target's forget ES is only {record['forget_es_gap']:.2f} above the retain "
                      "model's: it barely memorized the forget items, so unlearning will have little to remove; "
                      "raise finetune.epochs (or finetune.lr) and run finetune again in a new output_dir")
    console.print(f"outputs in [bold]{out.resolve()}[/]; unlearn with: ray-unlearn run model.path={paths['target']} "
                  f"model.retain_model={paths['retain']} data.forget_path={cfg.data.forget_path} "
                  f"data.retain_path={cfg.data.retain_path}")
