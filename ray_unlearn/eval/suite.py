"""Evaluate a model on TOFU-style splits and write OpenUnlearning's result files.

Items follow TOFU's schema: `question`, `answer`, optional `paraphrased_answer` (str),
`perturbed_answer` (list[str]). Results use OpenUnlearning's schema,
`{metric: {"agg_value": float, "value_by_index": {"0": {...}, ...}}}`, with its metric names
(configs/eval/tofu.yaml) and its per-index records:
- probabilities: `{"prob": p, "avg_loss": nll}` (lists over the answers for *_PERT_Prob);
- normalised probability: `{"prob": p}`; truth ratio, EM, ES: `{"score": v}`;
- ROUGE: `{"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}`;
- forget_quality and model_utility: `agg_value` only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ray_unlearn.config import EvalConfig
from ray_unlearn.data.collate import (PromptFormat, as_prompt_format, encode_prompt, encode_qa, pad_batch,
                                      render_prompt, stop_token_ids)
from ray_unlearn.eval import metrics as M
from ray_unlearn.logprobs import sequence_nll


@dataclass(frozen=True)
class SplitSpec:
    """Which metrics a split gets and under which OpenUnlearning names."""

    prefix: str                     # metric-name prefix: forget_Q_A_Prob, wf_Q_A_ROUGE, ...
    correct_key: str                # the "true" answer of the truth ratio
    truth_ratio_name: str
    truth_ratio_agg: Callable[[Any], float]
    es_name: str | None = None      # extraction strength on this split's answers
    em_name: str | None = None      # exact memorization on this split's answers
    normalised: bool = False        # also report <prefix>_Q_A_Prob_normalised


SPLITS: dict[str, SplitSpec] = {
    "forget": SplitSpec("forget", "paraphrased_answer", "forget_truth_ratio", M.truth_ratio_forget,
                        es_name="extraction_strength", em_name="exact_memorization"),
    "retain": SplitSpec("retain", "paraphrased_answer", "retain_Truth_Ratio", M.truth_ratio_retain,
                        es_name="retain_extraction_strength"),
    "real_authors": SplitSpec("ra", "answer", "ra_Truth_Ratio", M.truth_ratio_retain, normalised=True),
    "world_facts": SplitSpec("wf", "answer", "wf_Truth_Ratio", M.truth_ratio_retain, normalised=True),
}

# OpenUnlearning's model_utility: hmean of these, per split present (ra only with a real_authors split).
UTILITY_METRICS: dict[str, tuple[str, ...]] = {
    "retain": ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"),
    "real_authors": ("ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio"),
    "world_facts": ("wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"),
}


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


# ---------------------------------------------------------------- public API


def evaluate_model(model: Any, tokenizer: Any, splits: dict[str, list[dict]], cfg: EvalConfig,
                   prompt_format: PromptFormat | str, max_length: int = 128,
                   retain_truth_ratios: Sequence[float] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Evaluate `model` on the given splits ("forget", "retain", "world_facts", "real_authors").

    Metrics whose inputs are missing are skipped (no perturbed answers: no truth ratio; no
    retain_truth_ratios: no forget_quality; a utility split missing: no model_utility).
    The model runs in eval mode; its training flag is restored afterwards. Items are encoded as
    `prompt_format` says (a bare template string: PromptFormat(template), chat template auto).
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"evaluate_model: unknown split(s) {unknown}; valid: {', '.join(SPLITS)}")
    fmt = as_prompt_format(prompt_format)
    run = _Run(model, tokenizer, fmt, stop_token_ids(tokenizer, fmt), max_length, cfg.batch_size,
               cfg.max_new_tokens, progress or (lambda msg: None))
    was_training = model.training
    model.eval()
    try:
        results: dict[str, dict] = {}
        for name, items in splits.items():
            items = list(items)[: cfg.max_items] if cfg.max_items > 0 else list(items)
            if items:
                results.update(_evaluate_split(run, name, items))
        _add_forget_quality(results, retain_truth_ratios)
        _add_model_utility(results, splits)
        return results
    finally:
        model.train(was_training)


def summary(results: dict) -> dict[str, float]:
    """{metric: agg_value}: the content of OpenUnlearning's <bench>_SUMMARY.json."""
    return {name: res["agg_value"] for name, res in results.items()}


def forget_truth_ratios(results: dict) -> list[float]:
    """The per-item forget truth ratios of a result dict: `retain_truth_ratios` for another model."""
    by_index = results["forget_truth_ratio"]["value_by_index"]
    return [rec["score"] for rec in by_index.values()]


def write_eval(out_dir: Path, bench: str, results: dict) -> tuple[Path, Path]:
    """Write <out_dir>/<bench>_EVAL.json (full results) and <bench>_SUMMARY.json, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_path, summary_path = out_dir / f"{bench}_EVAL.json", out_dir / f"{bench}_SUMMARY.json"
    _write_json_atomic(eval_path, results)
    _write_json_atomic(summary_path, summary(results))
    return eval_path, summary_path


# ---------------------------------------------------------------- one split


def _evaluate_split(run: _Run, name: str, items: list[dict]) -> dict[str, dict]:
    """All metrics of one split, named after its SplitSpec."""
    spec, p = SPLITS[name], SPLITS[name].prefix
    run.progress(f"eval {name}: answer probability ({len(items)} items)")
    answers = _teacher_forced(run, [(it["question"], it["answer"]) for it in items])
    out = {f"{p}_Q_A_Prob": _prob_metric(answers["nll"])}
    if spec.es_name:
        out[spec.es_name] = _score_metric(answers["es"])
    if spec.em_name:
        out[spec.em_name] = _score_metric(answers["em"])
    run.progress(f"eval {name}: ROUGE")
    out[f"{p}_Q_A_ROUGE"] = _rouge_metric(run, items)
    if _has_truth_inputs(items, spec.correct_key):
        run.progress(f"eval {name}: truth ratio")
        out.update(_truth_metrics(run, items, spec, answers["nll"]))
    return out


def _has_truth_inputs(items: list[dict], correct_key: str) -> bool:
    """Every item has a correct answer and at least one perturbed answer."""
    return all(it.get(correct_key) and _perturbed(it) for it in items)


def _perturbed(item: dict) -> list[str]:
    """The item's perturbed answers as a list (a lone string counts as one)."""
    pert = item.get("perturbed_answer") or []
    return [pert] if isinstance(pert, str) else list(pert)


def _truth_metrics(run: _Run, items: list[dict], spec: SplitSpec, answer_nll: np.ndarray) -> dict[str, dict]:
    """Truth ratio (+ the PARA/PERT probabilities it is made of, + normalised probability)."""
    p, out = spec.prefix, {}
    if spec.correct_key == "answer":
        correct_nll = answer_nll
    else:
        correct_nll = _teacher_forced(run, [(it["question"], it[spec.correct_key]) for it in items])["nll"]
        out[f"{p}_Q_A_PARA_Prob"] = _prob_metric(correct_nll)
    wrong_nll = _perturbed_nll(run, items)
    out[f"{p}_Q_A_PERT_Prob"] = _prob_metric_multi(wrong_nll)
    mean_wrong = torch.tensor([w.mean() for w in wrong_nll], dtype=torch.float64)[:, None]
    tr = M.truth_ratio(torch.from_numpy(correct_nll), mean_wrong).numpy()
    out[spec.truth_ratio_name] = {"agg_value": spec.truth_ratio_agg(tr),
                                  "value_by_index": {str(i): {"score": float(v)} for i, v in enumerate(tr)}}
    if spec.normalised:
        sum_wrong = torch.tensor([np.exp(-w).sum() for w in wrong_nll], dtype=torch.float64)[:, None]
        norm = M.normalised_probability(torch.from_numpy(np.exp(-answer_nll)), sum_wrong).numpy()
        out[f"{p}_Q_A_Prob_normalised"] = {"agg_value": float(norm.mean()),
                                           "value_by_index": {str(i): {"prob": float(v)} for i, v in enumerate(norm)}}
    return out


# ---------------------------------------------------------------- model passes


def _teacher_forced(run: _Run, pairs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Per-pair NLL, EM and ES of (question, answer) pairs, one forward pass per batch."""
    pad_id = _pad_id(run.tokenizer)
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "em": [], "es": []}
    for start in range(0, len(pairs), run.batch_size):
        encoded = [encode_qa(run.tokenizer, q, a, run.max_length, run.fmt)
                   for q, a in pairs[start:start + run.batch_size]]
        batch = pad_batch(encoded, pad_id)
        logits = M.forward_logits(run.model, batch)
        labels = batch["labels"].to(logits.device)
        parts["nll"].append(sequence_nll(logits, labels))
        parts["em"].append(M.exact_memorization_from_logits(logits, labels))
        parts["es"].append(M.extraction_strength_from_logits(logits, labels))
    return {k: torch.cat(v).double().cpu().numpy() for k, v in parts.items()}


def _perturbed_nll(run: _Run, items: list[dict]) -> list[np.ndarray]:
    """NLL of every perturbed answer, grouped per item (lengths may differ)."""
    pairs = [(it["question"], a) for it in items for a in _perturbed(it)]
    flat = _teacher_forced(run, pairs)["nll"]
    bounds = np.cumsum([0] + [len(_perturbed(it)) for it in items])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _rouge_metric(run: _Run, items: list[dict]) -> dict:
    """ROUGE-L recall of greedy answers; per item the generation and OpenUnlearning's ROUGE record."""
    generations: list[str] = []
    for start in range(0, len(items), run.batch_size):
        chunk = items[start:start + run.batch_size]
        prompts = [encode_prompt(run.tokenizer, it["question"], run.fmt) for it in chunk]
        generations += M.greedy_generate(run.model, run.tokenizer, prompts, run.max_new_tokens, run.stop_ids)
    references = [it["answer"].strip() for it in items]
    by_index = {}
    for i, (it, gen, ref, scores) in enumerate(zip(items, generations, references,
                                                   M.rouge_scores(generations, references))):
        by_index[str(i)] = {**scores, "input": render_prompt(run.tokenizer, it["question"], run.fmt),
                            "ground_truth": ref, "generation": gen}
    return {"agg_value": float(np.mean([r["rougeL_recall"] for r in by_index.values()])),
            "value_by_index": by_index}


def _pad_id(tokenizer: Any) -> int:
    """Padding id: pad, else EOS, else 0 (padded positions are masked and unlabelled anyway)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


# ---------------------------------------------------------------- records and aggregates


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


def _add_forget_quality(results: dict, retain_truth_ratios: Sequence[float] | None) -> None:
    """forget_quality (agg_value only) when both truth-ratio samples exist."""
    if retain_truth_ratios is not None and "forget_truth_ratio" in results:
        results["forget_quality"] = {"agg_value": M.forget_quality(forget_truth_ratios(results),
                                                                   list(retain_truth_ratios))}


def _add_model_utility(results: dict, splits: dict) -> None:
    """model_utility = hmean of the retain and world-facts (and real-authors) utility metrics."""
    used = ["retain", "world_facts"] + (["real_authors"] if "real_authors" in splits else [])
    needed = [name for split in used for name in UTILITY_METRICS[split]]
    if all(name in results for name in needed):
        results["model_utility"] = {"agg_value": M.model_utility([results[n]["agg_value"] for n in needed])}


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
