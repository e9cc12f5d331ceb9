"""Per-item unlearning metrics, numerically compatible with OpenUnlearning (locuslab/open-unlearning).

Teacher-forced metrics take an HF causal LM and a batch `{input_ids, attention_mask, labels}`
([B, T], -100 on unscored tokens, as built by `data.collate.pad_batch`) and return one value per
item, a float tensor [B]. Each also has a `*_from_logits` form so that one forward pass can feed
several metrics. The helpers below them work on precomputed values (NLLs, probabilities, truth
ratios) and hold the aggregation rules of OpenUnlearning's TOFU config.

Conventions copied from OpenUnlearning (src/evals/metrics/{utils,memorization,privacy,utility}.py):
- probability: exp(-token-mean NLL) over every labelled token, the closing EOS included;
- exact memorization and extraction strength drop the last labelled token of each item (the EOS
  prediction) before comparing argmax with the labels;
- truth ratio P_w / (P_c + 1e-10); forget aggregate mean(min(tr, 1 / (tr + 1e-10)));
- normalised probability p_c / (p_c + sum p_wrong + 1e-10);
- ROUGE-L recall of the greedy answer against the reference (rouge_score, Porter stemmer).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from ray_unlearn.data.collate import pad_batch
from ray_unlearn.logprobs import sequence_nll, shifted

EPS = 1e-10  # OpenUnlearning's guard in truth ratio and normalised probability


# ---------------------------------------------------------------- forward pass


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-free test models)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def forward_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] of one teacher-forced pass (labels are not passed: no loss is computed)."""
    device = model_device(model)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits


def scored_without_last(labels: torch.Tensor) -> torch.Tensor:
    """Shifted answer mask [B, T-1] with each item's last labelled token (the EOS) removed.

    This is OpenUnlearning's `actual_indices[:-1]` in `tokenwise_vocab_logprobs`.
    """
    mask = labels[:, 1:] != -100
    idx = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, idx, -1).max(dim=1).values
    return mask & (idx[None, :] != last[:, None])


def argmax_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits, kept), both [B, T-1] bool: kept = answer positions bar the EOS; hits = kept and argmax == label."""
    logits, targets, _ = shifted(logits, labels)
    kept = scored_without_last(labels)
    return (logits.argmax(dim=-1) == targets) & kept, kept


# ---------------------------------------------------------------- teacher-forced metrics


def exact_memorization_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact memorization [B] (float64) from precomputed logits; NaN for an item with no kept answer token."""
    hits, kept = argmax_hits(logits, labels)
    n = kept.sum(dim=1)
    em = hits.sum(dim=1).double() / n.clamp(min=1)
    return torch.where(n > 0, em, torch.full_like(em, float("nan")))


def extraction_strength_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Extraction strength [B] (float64) from precomputed logits (see `extraction_strength`)."""
    hits, kept = argmax_hits(logits, labels)
    n = kept.sum(dim=1)
    idx = torch.arange(kept.shape[1], device=kept.device)
    last_miss = torch.where(kept & ~hits, idx, -1).max(dim=1).values
    trailing = (kept & (idx[None, :] > last_miss[:, None])).sum(dim=1)
    k_star = torch.minimum(n - trailing, (n - 1).clamp(min=0))  # OpenUnlearning searches k < |y| only
    es = 1.0 - k_star.double() / n.clamp(min=1)
    return torch.where(n > 0, es, torch.zeros_like(es))


@torch.no_grad()
def probability(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Probability of each item's answer: exp(-mean NLL) over its labelled tokens, EOS included. [B].

    The geometric mean of the per-token probabilities, OpenUnlearning's `evaluate_probability`.
    """
    logits = forward_logits(model, batch)
    return torch.exp(-sequence_nll(logits, batch["labels"].to(logits.device))).float()


@torch.no_grad()
def exact_memorization(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Exact memorization (EM): fraction of answer tokens whose teacher-forced argmax is the label. [B].

    The last labelled token (the EOS prediction) is left out, as in OpenUnlearning; an item with
    no answer token left gets NaN (OpenUnlearning writes None and skips it in the mean).
    """
    logits = forward_logits(model, batch)
    return exact_memorization_from_logits(logits, batch["labels"].to(logits.device)).float()


@torch.no_grad()
def extraction_strength(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Extraction strength (ES) = 1 - k*/|y|, teacher-forced. [B].

    y is the answer without its last labelled token (the EOS), and k* the smallest k such that
    the argmax matches the label at every position >= k: how short a prefix of the answer the
    model needs to complete the rest greedily. As in OpenUnlearning, k is searched in
    0..|y|-1 only, so an item with no matching suffix scores 1/|y| (not 0); |y| = 0 scores 0.
    """
    logits = forward_logits(model, batch)
    return extraction_strength_from_logits(logits, batch["labels"].to(logits.device)).float()


@torch.no_grad()
def extraction_strength_generate(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Extraction strength by greedy generation: the check of `extraction_strength`. [B].

    For k = 0, 1, ..., |y|-1, greedily decode |y|-k tokens from prompt + y[:k] (EOS does not stop
    decoding) and stop at the first k whose output is exactly y[k:]; ES = 1 - k/|y|, with the
    same EOS exclusion and the same k < |y| search range. Slow (up to |y| generate calls per item).
    """
    device = model_device(model)
    kept = scored_without_last(batch["labels"])
    scores = []
    for row, keep in zip(batch["input_ids"], kept):
        positions = keep.nonzero(as_tuple=True)[0] + 1  # token positions of the kept answer
        scores.append(_es_by_generation(model, row[: int(positions[-1]) + 1].to(device), len(positions))
                      if len(positions) else 0.0)
    return torch.tensor(scores, dtype=torch.float32)


def _es_by_generation(model: Any, ids: torch.Tensor, n: int) -> float:
    """ES of one item whose token ids end with its n kept answer tokens."""
    start = len(ids) - n
    k = 0
    for k in range(n):
        prefix = ids[None, : start + k]
        out = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False,
                             max_new_tokens=n - k, eos_token_id=None, pad_token_id=0)
        if torch.equal(out[0, prefix.shape[1]:], ids[start + k:]):
            break
    return 1.0 - k / n


# ---------------------------------------------------------------- helpers on precomputed values


def truth_ratio(nll_correct: torch.Tensor, nll_wrong: torch.Tensor) -> torch.Tensor:
    """Truth ratio tr = P_w / P_c per item. nll_correct [B], nll_wrong [B, J] -> [B].

    P_c = exp(-nll_correct) (token-mean NLL of the correct, e.g. paraphrased, answer) and
    P_w = exp(-mean_j nll_wrong[:, j]) over the J perturbed answers; OpenUnlearning adds 1e-10
    to P_c. tr < 1: the model prefers the correct answer.
    """
    p_correct = torch.exp(-nll_correct.double())
    p_wrong = torch.exp(-nll_wrong.double().mean(dim=-1))
    return p_wrong / (p_correct + EPS)


def normalised_probability(p_correct: torch.Tensor, p_wrong: torch.Tensor) -> torch.Tensor:
    """p_c / (p_c + sum_j p_wrong[:, j] + 1e-10). p_correct [B], p_wrong [B, J] -> [B]."""
    p_correct = p_correct.double()
    return p_correct / (p_correct + p_wrong.double().sum(dim=-1) + EPS)


def truth_ratio_forget(tr: Any) -> float:
    """Forget-set aggregate ("closer_to_1_better"): mean(min(tr, 1/tr)); 1 = no preference left."""
    tr = torch.as_tensor(tr, dtype=torch.float64)
    return float(torch.minimum(tr, 1.0 / (tr + EPS)).mean())


def truth_ratio_retain(tr: Any) -> float:
    """Retain / world-facts aggregate ("true_better"): mean(max(0, 1 - tr)); higher = prefers the truth."""
    tr = torch.as_tensor(tr, dtype=torch.float64)
    return float((1.0 - tr).clamp(min=0.0).mean())


def forget_quality(tr_model: Sequence[float], tr_retain: Sequence[float]) -> float:
    """Forget quality: p-value of the two-sample KS test between the forget-set truth ratios of the
    evaluated model and of the retain (never-trained-on-forget) model. High = indistinguishable."""
    return float(stats.ks_2samp(np.asarray(tr_model, dtype=np.float64),
                                np.asarray(tr_retain, dtype=np.float64)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Model utility: harmonic mean of the utility metrics (0 if any is 0), scipy.stats.hmean."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("model_utility: needs at least one value")
    if min(values) <= 0.0:
        return 0.0
    return float(stats.hmean(values))


# ---------------------------------------------------------------- generation and ROUGE


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int,
                    stop_ids: Sequence[int] | None = None) -> list[str]:
    """Greedy answers to a batch of prompts (left-padded); only the new tokens, cut at the first stop
    id (default: EOS; `collate.stop_token_ids` adds a chat template's end-of-turn), stripped."""
    eos = tokenizer.eos_token_id
    stops = list(stop_ids) if stop_ids is not None else ([eos] if eos is not None else [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    batch = pad_batch([{"input_ids": list(p)} for p in prompt_ids], pad_id, left=True)
    device = model_device(model)
    input_ids = batch["input_ids"].to(device)
    out = model.generate(input_ids, attention_mask=batch["attention_mask"].to(device), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stops or None)
    texts = []
    for row in out[:, input_ids.shape[1]:].tolist():
        cut = min((row.index(s) for s in stops if s in row), default=len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=True).strip())
    return texts


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """OpenUnlearning's per-item ROUGE record: rouge1_recall, rougeL_f1, rougeL_recall."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    out = []
    for pred, ref in zip(predictions, references):
        s = scorer.score(ref, pred)
        out.append({"rouge1_recall": s["rouge1"].recall, "rougeL_f1": s["rougeL"].fmeasure,
                    "rougeL_recall": s["rougeL"].recall})
    return out


def rouge_l_recall(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L recall of each prediction against its reference (stemmed): the share of the
    reference's tokens found, in order, in the prediction."""
    return [s["rougeL_recall"] for s in rouge_scores(predictions, references)]


# ---------------------------------------------------------------- keywords (GRIN)


def item_keywords(item: dict) -> list[str]:
    """An item's keywords: its "keywords" field (a list, or one string), blanks dropped; [] when it has none."""
    kws = item.get("keywords") or []
    return [k for k in ([kws] if isinstance(kws, str) else kws) if str(k).strip()]


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(keyword.strip().lower()) + r"(?!\w)")


def keyword_accuracy(text: str, keywords: Sequence[str]) -> float:
    """Fraction of `keywords` the text contains, case-insensitive, each as a whole word (or phrase): 1 when
    the answer still names everything the item is about."""
    low = text.lower()
    return sum(bool(_keyword_pattern(k).search(low)) for k in keywords) / len(keywords)


def keyword_token_mask(tokenizer: Any, answer_ids: Sequence[int], keywords: Sequence[str]) -> list[bool]:
    """Which of an answer's tokens spell a keyword: a token is in when its characters (its span in the decoded
    answer, found by decoding growing prefixes) overlap a keyword's match in that text."""
    ends = [len(tokenizer.decode(list(answer_ids[:j + 1]), skip_special_tokens=True)) for j in range(len(answer_ids))]
    text = tokenizer.decode(list(answer_ids), skip_special_tokens=True).lower()
    spans = [m.span() for k in keywords for m in _keyword_pattern(k).finditer(text)]
    starts = [0] + ends[:-1]
    return [any(a < e and s < b for s, e in spans) for a, b in zip(starts, ends)]


def keyword_confidence(logp: Sequence[float], mask: Sequence[bool]) -> float:
    """exp(mean log p) over the keyword tokens: the teacher-forced probability per keyword token (NaN when
    no token spells a keyword)."""
    chosen = [float(v) for v, m in zip(logp, mask) if m]
    return float(np.exp(np.mean(chosen))) if chosen else float("nan")
