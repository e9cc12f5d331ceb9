"""Evaluate a model on TOFU-style splits and write OpenUnlearning's result files.

Items follow TOFU's schema: `question`, `answer`, optional `paraphrased_answer` (str),
`perturbed_answer` (list[str]). What is computed comes from the metric registry
(`eval.registry.METRICS`): every metric whose split is given and whose inputs exist, each through
its handler below. The inputs the metrics share are computed once per model, on first use
(`_Inputs`): one teacher-forced pass per split over its (question, answer) pairs feeds probability,
EM, ES and the membership-inference scores; one greedy generation per split feeds ROUGE; the
paraphrased and perturbed answers get one pass each for the truth ratio; GradNorm takes one
backward pass per item.

Results use OpenUnlearning's schema, `{metric: {"agg_value": float, "value_by_index": {"0": {...}, ...}}}`,
with its metric names (configs/eval/tofu.yaml) and its per-index records:
- probabilities: `{"prob": p, "avg_loss": nll}` (lists over the answers for *_PERT_Prob);
- normalised probability: `{"prob": p}`; truth ratio, EM, ES: `{"score": v}`;
- ROUGE: `{"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}`;
- forget_quality and model_utility: `agg_value` only;
- mia_<attack>: `{"agg_value": AUC, "auc": AUC, "forget": {"agg_value", "value_by_index": {i: {"score"}}},
  "holdout": {...}}` (OpenUnlearning's `mia_auc` output); privleak: `{"agg_value", "retain_auc"}`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ray_unlearn.config import EvalConfig
from ray_unlearn.data.collate import (PromptFormat, as_prompt_format, encode_prompt, encode_qa, pad_batch,
                                      render_prompt, stop_token_ids)
from ray_unlearn.eval import metrics as M
from ray_unlearn.eval import mia
from ray_unlearn.eval.registry import (DEFAULT_RETAIN_AUC, EVAL_SPLITS, HOLDOUT, KEYWORD_SPLITS, METRICS, MIA_ATTACKS,
                                       PRIVLEAK_ATTACK, SPLITS, UTILITY_METRICS, Metric, SplitSpec,
                                       mia_metric_name, selected_attacks)
from ray_unlearn.logprobs import sequence_nll

__all__ = ["References", "SPLITS", "SplitSpec", "UTILITY_METRICS", "evaluate_model", "forget_truth_ratios",
           "reference_losses", "references_from", "summary", "write_eval"]

TRUTH_RATIO_AGGREGATES: dict[str, Callable[[Any], float]] = {
    "closer_to_1_better": M.truth_ratio_forget, "true_better": M.truth_ratio_retain}
MIA_SPLITS = ("forget", HOLDOUT)


@dataclass(frozen=True)
class References:
    """What the evaluation of other models gives this one (every part optional)."""

    forget_truth_ratios: tuple[float, ...] | None = None  # the retain model's per forget item: forget quality
    mia_auc: Mapping[str, float] = field(default_factory=dict)  # the retain model's AUC per attack: privleak
    losses: Mapping[str, tuple[float, ...]] | None = None  # reference model's answer NLL per forget / holdout item

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (Tune caches it and hands it to its trials)."""
        return {"forget_truth_ratios": None if self.forget_truth_ratios is None else list(self.forget_truth_ratios),
                "mia_auc": dict(self.mia_auc),
                "losses": None if self.losses is None else {k: list(v) for k, v in self.losses.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "References":
        data = data or {}
        tr, losses = data.get("forget_truth_ratios"), data.get("losses")
        return cls(forget_truth_ratios=None if tr is None else tuple(tr), mia_auc=dict(data.get("mia_auc") or {}),
                   losses=None if losses is None else {k: tuple(v) for k, v in losses.items()})


@dataclass(frozen=True)
class _Run:
    """What every split evaluation shares."""

    model: Any
    tokenizer: Any
    fmt: PromptFormat
    stop_ids: list[int]             # generation stops on these (EOS, a chat template's end-of-turn)
    max_length: int
    batch_size: int
    max_new_tokens: int
    progress: Callable[[str], None]
    attacks: tuple[str, ...] = ()   # membership-inference attacks to run
    mia_k: float = 0.4              # Min-K / Min-K++ fraction
    pool: Any = None                # workers holding the model that run the passes instead (eval.passes)


# ---------------------------------------------------------------- public API


def evaluate_model(model: Any, tokenizer: Any, splits: dict[str, list[dict]], cfg: EvalConfig,
                   prompt_format: PromptFormat | str, max_length: int = 128,
                   retain_truth_ratios: Sequence[float] | None = None,
                   progress: Callable[[str], None] | None = None,
                   references: References | None = None, pool: Any = None) -> dict[str, dict]:
    """Evaluate `model` on the given splits ("forget", "retain", "world_facts", "real_authors", "holdout").

    With a `pool` (workers that hold the model: `ray_unlearn.distributed.EvalPool`) the model passes run
    there, each worker scoring whole batches of each split (`eval.passes`), and `model` may be None: the
    results are the single-process ones.

    Metrics whose inputs are missing are skipped (no perturbed answers: no truth ratio; no retain
    forget truth ratios: no forget_quality; a utility split missing: no model_utility; no holdout
    split: no membership inference unless eval.mia lists attacks, which is an error). `references`
    carries what other models give (see References); `retain_truth_ratios` is short for its
    forget_truth_ratios. The model runs in eval mode; its training flag is restored afterwards.
    Items are encoded as `prompt_format` says (a bare template string: PromptFormat(template), chat
    template auto).
    """
    unknown = sorted(set(splits) - set(EVAL_SPLITS))
    if unknown:
        raise ValueError(f"evaluate_model: unknown split(s) {unknown}; valid: {', '.join(EVAL_SPLITS)}")
    refs = references or References()
    if retain_truth_ratios is not None:
        refs = References(tuple(retain_truth_ratios), refs.mia_auc, refs.losses)
    capped = {name: _capped(items, cfg.max_items) for name, items in splits.items()}
    attacks = selected_attacks(cfg.mia, bool(capped.get("forget")), bool(capped.get(HOLDOUT)), refs.losses is not None)
    fmt = as_prompt_format(prompt_format)
    run = _Run(model, tokenizer, fmt, stop_token_ids(tokenizer, fmt), max_length, cfg.batch_size,
               cfg.max_new_tokens, progress or (lambda msg: None), attacks, cfg.mia_k, pool)
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        inputs = _Inputs(run, {name: items for name, items in capped.items() if items}, refs, tuple(splits))
        results: dict[str, dict] = {}
        for metric in _in_order(splits):
            if _wanted(metric, inputs):
                record = HANDLERS[metric.handler](inputs, metric, results)
                if record is not None:
                    results[metric.name] = record
        return results
    finally:
        if model is not None:
            model.train(was_training)


def reference_losses(model: Any, tokenizer: Any, splits: dict[str, list[dict]], cfg: EvalConfig,
                     prompt_format: PromptFormat | str, max_length: int = 128,
                     pool: Any = None) -> dict[str, tuple[float, ...]]:
    """A reference model's per-item answer NLL on the forget and holdout splits: the reference attack's
    `References.losses`. The same items and passes as `evaluate_model`'s, so a model that is its own
    reference scores exactly 0. With a `pool` the passes run there (`model` may be None)."""
    fmt = as_prompt_format(prompt_format)
    run = _Run(model, tokenizer, fmt, [], max_length, cfg.batch_size, cfg.max_new_tokens, lambda msg: None, pool=pool)
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        return {name: tuple(float(v) for v in _teacher_forced(run, _pairs(_capped(splits[name], cfg.max_items)))["nll"])
                for name in MIA_SPLITS if splits.get(name)}
    finally:
        if model is not None:
            model.train(was_training)


def references_from(retain_results: dict, losses: Mapping[str, Sequence[float]] | None = None) -> References:
    """What the retain model's results give the other models: its forget truth ratios and MIA AUCs,
    with the reference model's `losses` (see `reference_losses`)."""
    tr = tuple(forget_truth_ratios(retain_results)) if "forget_truth_ratio" in retain_results else None
    aucs = {name: retain_results[mia_metric_name(name)]["agg_value"] for name in MIA_ATTACKS
            if mia_metric_name(name) in retain_results}
    return References(tr, aucs, None if losses is None else {k: tuple(v) for k, v in losses.items()})


def summary(results: dict) -> dict[str, float]:
    """{metric: agg_value}: the content of OpenUnlearning's <bench>_SUMMARY.json."""
    return {name: res["agg_value"] for name, res in results.items()}


def forget_truth_ratios(results: dict) -> list[float]:
    """The per-item forget truth ratios of a result dict: `retain_truth_ratios` for another model."""
    by_index = results["forget_truth_ratio"]["value_by_index"]
    return [rec["score"] for rec in by_index.values()]


def write_eval(out_dir: Path, bench: str, results: dict) -> tuple[Path, Path]:
    """Write <out_dir>/<bench>_EVAL.json (full results) and <bench>_SUMMARY.json, atomically, and with
    membership-inference results their ROC curves, <bench>_MIA_ROC.png."""
    from ray_unlearn.eval.report import plot_roc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_path, summary_path = out_dir / f"{bench}_EVAL.json", out_dir / f"{bench}_SUMMARY.json"
    _write_json_atomic(eval_path, results)
    _write_json_atomic(summary_path, summary(results))
    plot_roc(results, roc_path(out_dir, bench))
    return eval_path, summary_path


def roc_path(out_dir: Path, bench: str) -> Path:
    """Where `write_eval` puts the ROC curves of the membership-inference attacks."""
    return Path(out_dir) / f"{bench}_MIA_ROC.png"


# ---------------------------------------------------------------- which metrics, in which order


def _capped(items: Sequence[dict], max_items: int) -> list[dict]:
    """The first eval.max_items items (all with 0)."""
    return list(items)[:max_items] if max_items > 0 else list(items)


def _in_order(splits: dict[str, list[dict]]) -> list[Metric]:
    """Each given split's metrics (in the caller's split order), then the metrics of several splits."""
    per_split = [m for name in splits for m in METRICS.values() if m.split == name]
    return per_split + [m for m in METRICS.values() if m.split is None]


def _wanted(metric: Metric, inputs: "_Inputs") -> bool:
    """Its splits have items, and a membership-inference metric's attack was asked for."""
    if metric.attack and metric.attack not in inputs.run.attacks:
        return False
    return all(name in inputs.splits for name in metric.needs.splits)


# ---------------------------------------------------------------- shared inputs, computed once


class _Inputs:
    """The inputs the metrics of one model's evaluation share; each is computed on first use, once."""

    def __init__(self, run: _Run, splits: dict[str, list[dict]], references: References, given: tuple[str, ...]):
        self.run, self.splits, self.references, self.given = run, splits, references, given
        self._cache: dict[tuple[str, str], Any] = {}

    def _once(self, what: str, split: str, compute: Callable[[], Any]) -> Any:
        if (what, split) not in self._cache:
            self._cache[(what, split)] = compute()
        return self._cache[(what, split)]

    def answers(self, split: str) -> dict[str, Any]:
        """The split's one teacher-forced pass: per-item nll, em, es (+ MIA token statistics)."""
        def compute() -> dict[str, Any]:
            items = self.splits[split]
            self.run.progress(f"eval {split}: answer probability ({len(items)} items)")
            mia_split = split in MIA_SPLITS and bool(self.run.attacks)
            vocab = mia_split and any(MIA_ATTACKS[a].needs.vocab_stats for a in self.run.attacks)
            return _teacher_forced(self.run, _pairs(items), token_stats=mia_split, vocab_stats=vocab,
                                   keywords=self.keywords(split))
        return self._once("answers", split, compute)

    def keywords(self, split: str) -> list[list[str]] | None:
        """Every item's keywords, or None when some item has none (the keyword metrics are then skipped)."""
        if split not in KEYWORD_SPLITS:
            return None
        kws = [M.item_keywords(it) for it in self.splits[split]]
        return kws if all(kws) else None

    def generations(self, split: str) -> list[str]:
        def compute() -> list[str]:
            self.run.progress(f"eval {split}: ROUGE")
            return _generate(self.run, self.splits[split])
        return self._once("generations", split, compute)

    def has_truth(self, split: str) -> bool:
        """Every item has a correct answer and at least one perturbed answer."""
        key = SPLITS[split].correct_key
        return all(it.get(key) and _perturbed(it) for it in self.splits[split])

    def correct_nll(self, split: str) -> np.ndarray:
        """NLL of the truth ratio's correct answers (the paraphrased answer, or the answer itself)."""
        key = SPLITS[split].correct_key
        if key == "answer":
            return self.answers(split)["nll"]

        def compute() -> np.ndarray:
            self.run.progress(f"eval {split}: truth ratio")
            return _teacher_forced(self.run, [(it["question"], it[key]) for it in self.splits[split]])["nll"]
        return self._once("correct", split, compute)

    def perturbed_nll(self, split: str) -> list[np.ndarray]:
        """NLL of every perturbed answer, grouped per item (lengths may differ)."""
        def compute() -> list[np.ndarray]:
            if SPLITS[split].correct_key == "answer":
                self.run.progress(f"eval {split}: truth ratio")
            items = self.splits[split]
            flat = _teacher_forced(self.run, [(it["question"], a) for it in items for a in _perturbed(it)])["nll"]
            bounds = np.cumsum([0] + [len(_perturbed(it)) for it in items])
            return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return self._once("perturbed", split, compute)

    def gradnorms(self, split: str) -> np.ndarray:
        def compute() -> np.ndarray:
            items = self.splits[split]
            self.run.progress(f"eval {split}: GradNorm ({len(items)} backward passes)")
            encoded = [encode_qa(self.run.tokenizer, q, a, self.run.max_length, self.run.fmt) for q, a in _pairs(items)]
            return gradnorm_pass(self.run, encoded)
        return self._once("gradnorms", split, compute)


def _pairs(items: Sequence[dict]) -> list[tuple[str, str]]:
    return [(it["question"], it["answer"]) for it in items]


def _perturbed(item: dict) -> list[str]:
    """The item's perturbed answers as a list (a lone string counts as one)."""
    pert = item.get("perturbed_answer") or []
    return [pert] if isinstance(pert, str) else list(pert)


# ---------------------------------------------------------------- model passes


def _teacher_forced(run: _Run, pairs: list[tuple[str, str]], token_stats: bool = False,
                    vocab_stats: bool = False, keywords: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """Per-pair NLL, EM and ES of (question, answer) pairs, one forward pass per batch; with
    `token_stats` also the MIA inputs: scored token log-probs ("logp"), Min-K++'s normalised ones
    ("z", with `vocab_stats`) and the decoded answer text ("text"); with `keywords` (per pair) the
    probability per keyword token ("keyword_conf")."""
    if run.pool is not None:
        return run.pool.teacher_forced(pairs, token_stats, vocab_stats, keywords)
    pad_id = _pad_id(run.tokenizer)
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "em": [], "es": []}
    extra: dict[str, list] = {"logp": [], "z": [], "text": []}
    keyword_conf: list[float] = []
    for start in range(0, len(pairs), run.batch_size):
        encoded = [encode_qa(run.tokenizer, q, a, run.max_length, run.fmt)
                   for q, a in pairs[start:start + run.batch_size]]
        batch = pad_batch(encoded, pad_id)
        logits = M.forward_logits(run.model, batch)
        labels = batch["labels"].to(logits.device)
        parts["nll"].append(sequence_nll(logits, labels))
        parts["em"].append(M.exact_memorization_from_logits(logits, labels))
        parts["es"].append(M.extraction_strength_from_logits(logits, labels))
        if token_stats:
            stats = mia.answer_token_stats(logits, labels, vocab_stats)
            extra["logp"] += [s["logp"] for s in stats]
            extra["z"] += [s.get("z") for s in stats]
            extra["text"] += mia.answer_texts(run.tokenizer, batch["labels"])
        if keywords is not None:
            stats = mia.answer_token_stats(logits, labels)
            kept, targets = M.scored_without_last(labels).cpu(), labels[:, 1:].cpu()
            for i, st in enumerate(stats):
                mask = M.keyword_token_mask(run.tokenizer, targets[i][kept[i]].tolist(), keywords[start + i])
                keyword_conf.append(M.keyword_confidence(st["logp"], mask))
    out: dict[str, Any] = {k: torch.cat(v).double().cpu().numpy() for k, v in parts.items()}
    if keywords is not None:
        out["keyword_conf"] = np.array(keyword_conf, dtype=np.float64)
    return {**out, **extra} if token_stats else out


def _generate(run: _Run, items: list[dict]) -> list[str]:
    """Greedy answers to the items' questions, batch by batch."""
    if run.pool is not None:
        return run.pool.generate(items)
    generations: list[str] = []
    for start in range(0, len(items), run.batch_size):
        chunk = items[start:start + run.batch_size]
        prompts = [encode_prompt(run.tokenizer, it["question"], run.fmt) for it in chunk]
        generations += M.greedy_generate(run.model, run.tokenizer, prompts, run.max_new_tokens, run.stop_ids)
    return generations


def gradnorm_pass(run: _Run, encoded: list[dict[str, list[int]]]) -> np.ndarray:
    """GradNorm scores of encoded items (one backward each), on the run's model or its pool."""
    if run.pool is not None:
        return run.pool.gradnorms(encoded)
    return mia.gradnorm_scores(run.model, encoded)


def _pad_id(tokenizer: Any) -> int:
    """Padding id: pad, else EOS, else 0 (padded positions are masked and unlabelled anyway)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


# ---------------------------------------------------------------- handlers: (inputs, metric, results so far) -> record


Handler = Callable[[_Inputs, Metric, dict], "dict | None"]


def _probability(inputs: _Inputs, m: Metric, results: dict) -> dict:
    return _prob_metric(inputs.answers(m.split)["nll"])


def _extraction_strength(inputs: _Inputs, m: Metric, results: dict) -> dict:
    return _score_metric(inputs.answers(m.split)["es"])


def _exact_memorization(inputs: _Inputs, m: Metric, results: dict) -> dict:
    return _score_metric(inputs.answers(m.split)["em"])


def _rouge(inputs: _Inputs, m: Metric, results: dict) -> dict:
    """ROUGE-L recall of greedy answers; per item the generation and OpenUnlearning's ROUGE record."""
    run, items = inputs.run, inputs.splits[m.split]
    generations = inputs.generations(m.split)
    references = [it["answer"].strip() for it in items]
    by_index = {}
    for i, (it, gen, ref, scores) in enumerate(zip(items, generations, references,
                                                   M.rouge_scores(generations, references))):
        by_index[str(i)] = {**scores, "input": render_prompt(run.tokenizer, it["question"], run.fmt),
                            "ground_truth": ref, "generation": gen}
    return {"agg_value": float(np.mean([r["rougeL_recall"] for r in by_index.values()])),
            "value_by_index": by_index}


def _paraphrased_probability(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    return _prob_metric(inputs.correct_nll(m.split)) if inputs.has_truth(m.split) else None


def _perturbed_probability(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    return _prob_metric_multi(inputs.perturbed_nll(m.split)) if inputs.has_truth(m.split) else None


def _truth_ratio(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    if not inputs.has_truth(m.split):
        return None
    mean_wrong = torch.tensor([w.mean() for w in inputs.perturbed_nll(m.split)], dtype=torch.float64)[:, None]
    tr = M.truth_ratio(torch.from_numpy(inputs.correct_nll(m.split)), mean_wrong).numpy()
    aggregate = TRUTH_RATIO_AGGREGATES[SPLITS[m.split].truth_ratio_agg]
    return {"agg_value": aggregate(tr), "value_by_index": {str(i): {"score": float(v)} for i, v in enumerate(tr)}}


def _normalised_probability(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    if not inputs.has_truth(m.split):
        return None
    sum_wrong = torch.tensor([np.exp(-w).sum() for w in inputs.perturbed_nll(m.split)], dtype=torch.float64)[:, None]
    norm = M.normalised_probability(torch.from_numpy(np.exp(-inputs.answers(m.split)["nll"])), sum_wrong).numpy()
    return {"agg_value": float(norm.mean()), "value_by_index": {str(i): {"prob": float(v)} for i, v in enumerate(norm)}}


def _forget_quality(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    """KS p-value against the retain model's forget truth ratios (agg_value only), when both exist."""
    retain_tr = inputs.references.forget_truth_ratios
    if retain_tr is None or "forget_truth_ratio" not in results:
        return None
    return {"agg_value": M.forget_quality(forget_truth_ratios(results), list(retain_tr))}


def _model_utility(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    """Harmonic mean of the retain and world-facts (and real-authors) utility metrics."""
    used = ["retain", "world_facts"] + (["real_authors"] if "real_authors" in inputs.given else [])
    needed = [name for split in used for name in UTILITY_METRICS[split]]
    if not all(name in results for name in needed):
        return None
    return {"agg_value": M.model_utility([results[n]["agg_value"] for n in needed])}


def _mia_auc(inputs: _Inputs, m: Metric, results: dict) -> dict:
    """One attack's scores on forget (members) and holdout (non-members) and their AUC."""
    forget, holdout = (_attack_scores(inputs, m.attack, split) for split in MIA_SPLITS)
    auc = mia.mia_auc(forget, holdout)
    return {"agg_value": auc, "auc": auc, "forget": _scores_record(forget), "holdout": _scores_record(holdout)}


def _privleak(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    """privleak of the Min-K AUC against the retain model's (OpenUnlearning's 0.5 when it is unknown)."""
    name = mia_metric_name(PRIVLEAK_ATTACK)
    if name not in results:
        return None
    retain_auc = float(inputs.references.mia_auc.get(PRIVLEAK_ATTACK, DEFAULT_RETAIN_AUC))
    return {"agg_value": mia.privleak(results[name]["agg_value"], retain_auc), "retain_auc": retain_auc}


def _keyword_accuracy(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    """Fraction of each item's keywords its greedy answer contains (GRIN's keyword accuracy)."""
    keywords = inputs.keywords(m.split)
    if keywords is None:
        return None
    return _score_metric(np.array([M.keyword_accuracy(g, k) for g, k in zip(inputs.generations(m.split), keywords)]))


def _keyword_confidence(inputs: _Inputs, m: Metric, results: dict) -> dict | None:
    """Teacher-forced probability per keyword token (GRIN's keyword confidence)."""
    if inputs.keywords(m.split) is None:
        return None
    return _score_metric(inputs.answers(m.split)["keyword_conf"])


HANDLERS: dict[str, Handler] = {
    "keyword_accuracy": _keyword_accuracy, "keyword_confidence": _keyword_confidence,
    "probability": _probability, "extraction_strength": _extraction_strength,
    "exact_memorization": _exact_memorization, "rouge": _rouge, "paraphrased_probability": _paraphrased_probability,
    "perturbed_probability": _perturbed_probability, "truth_ratio": _truth_ratio,
    "normalised_probability": _normalised_probability, "forget_quality": _forget_quality,
    "model_utility": _model_utility, "mia_auc": _mia_auc, "privleak": _privleak,
}


# ---------------------------------------------------------------- attack scores (higher = less likely a member)


def _loss_scores(inputs: _Inputs, split: str) -> np.ndarray:
    return inputs.answers(split)["nll"]


def _zlib_scores(inputs: _Inputs, split: str) -> np.ndarray:
    a = inputs.answers(split)
    return np.array([mia.zlib_score(loss, text) for loss, text in zip(a["nll"], a["text"])])


def _min_k_scores(inputs: _Inputs, split: str) -> np.ndarray:
    return np.array([mia.lowest_k_score(lp, inputs.run.mia_k) for lp in inputs.answers(split)["logp"]])


def _min_k_plus_plus_scores(inputs: _Inputs, split: str) -> np.ndarray:
    return np.array([mia.lowest_k_score(z, inputs.run.mia_k) for z in inputs.answers(split)["z"]])


def _reference_scores(inputs: _Inputs, split: str) -> np.ndarray:
    nll = inputs.answers(split)["nll"]
    ref = np.asarray((inputs.references.losses or {}).get(split, ()), dtype=np.float64)
    if ref.shape != nll.shape:
        raise ValueError(f"reference attack: {len(ref)} reference losses for the {len(nll)} {split} items; "
                         "compute them with reference_losses on the same splits and eval settings")
    return np.array([mia.reference_score(a, b) for a, b in zip(nll, ref)])


def _gradnorm_scores(inputs: _Inputs, split: str) -> np.ndarray:
    return inputs.gradnorms(split)


ATTACK_SCORES: dict[str, Callable[[_Inputs, str], np.ndarray]] = {
    "loss": _loss_scores, "zlib": _zlib_scores, "min_k": _min_k_scores, "min_k_plus_plus": _min_k_plus_plus_scores,
    "reference": _reference_scores, "gradnorm": _gradnorm_scores,
}


def _attack_scores(inputs: _Inputs, attack: str, split: str) -> np.ndarray:
    return np.asarray(ATTACK_SCORES[attack](inputs, split), dtype=np.float64)


# ---------------------------------------------------------------- records


def _prob_metric(nll: np.ndarray) -> dict:
    """Probability metric from per-item NLLs: mean probability, {"prob", "avg_loss"} per item."""
    prob = np.exp(-nll)
    return {"agg_value": float(prob.mean()),
            "value_by_index": {str(i): {"prob": float(p), "avg_loss": float(l)}
                               for i, (p, l) in enumerate(zip(prob, nll))}}


def _prob_metric_multi(nlls: list[np.ndarray]) -> dict:
    """Probability metric with several answers per item (lists per item; mean over answers, then items)."""
    return {"agg_value": float(np.mean([np.exp(-n).mean() for n in nlls])),
            "value_by_index": {str(i): {"prob": [float(x) for x in np.exp(-n)], "avg_loss": [float(x) for x in n]}
                               for i, n in enumerate(nlls)}}


def _score_metric(values: np.ndarray) -> dict:
    """{"score": v} per item (None for NaN), mean of the defined values as agg_value."""
    defined = values[~np.isnan(values)]
    return {"agg_value": float(defined.mean()) if len(defined) else float("nan"),
            "value_by_index": {str(i): {"score": None if math.isnan(v) else float(v)} for i, v in enumerate(values)}}


def _scores_record(scores: np.ndarray) -> dict:
    """An attack's scores on one split, as OpenUnlearning's Attack.attack() returns them."""
    return {"agg_value": float(np.mean(scores)),
            "value_by_index": {str(i): {"score": float(v)} for i, v in enumerate(scores)}}


def _write_json_atomic(path: Path, obj: Any) -> None:
    """json.dump to a temporary file in the same folder, then os.replace onto `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite_or_none(obj), f, indent=4, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite_or_none(obj: Any) -> Any:
    """A JSON-ready copy: numpy / torch scalars to Python numbers, NaN and inf to None."""
    if isinstance(obj, dict):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (np.generic, torch.Tensor)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
