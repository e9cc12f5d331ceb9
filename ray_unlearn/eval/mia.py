"""Membership inference (MIA): per-item attack scores, AUC and privleak, as OpenUnlearning defines them.

Every score is loss-like: higher = less likely a member (OpenUnlearning's convention, DESIGN.md §7).
The AUC is `roc_auc_score(labels, scores)` with the forget items (members, if the model still holds
them) labelled 0 and the holdout items (never trained on) labelled 1: AUC ≈ 1 means the forget set
still looks memorized, ≈ 0.5 that the two are indistinguishable. That is the same number as scoring
"member" with the negated score and labelling forget 1.

Token selection (OpenUnlearning's src/evals/metrics/utils.py): LOSS, ZLib and Reference use the
token-mean NLL over every labelled answer token, the closing EOS included (`evaluate_probability`);
Min-K, Min-K++ and GradNorm use the answer-token log-probs without the last labelled token (the EOS
prediction; `tokenwise_logprobs`). The scores:

- LOSS = avg_loss; ZLib = avg_loss / len(zlib.compress(answer text)), the text decoded from the
  labelled tokens with special tokens skipped; Reference = avg_loss - avg_loss of a reference model;
- Min-K = -mean of the lowest max(1, floor(n * k)) of the n token log-probs;
- Min-K++ = the same over z_t = (log p(y_t) - mu_t) / sqrt(max(var_t, 1e-6)), where mu_t and var_t are
  the mean and variance of log p under p over the vocabulary at position t;
- GradNorm = mean over parameter tensors of ||d(-mean token log-prob)/d theta||_2, one item at a time;
- an item with no scored token scores 0 (OpenUnlearning's Min-K does the same).

privleak = ((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain + 1e-10) * 100 (OpenUnlearning's MUSE
form): 0 = leaks like the retain model, -100 = fully memorized, > 0 = over-unlearned.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import torch

from ray_unlearn.eval.metrics import model_device, scored_without_last
from ray_unlearn.logprobs import token_logprobs

MIN_VARIANCE = 1e-6  # Min-K++'s floor on the vocabulary variance (OpenUnlearning's clamp)
PRIVLEAK_EPS = 1e-10


# ---------------------------------------------------------------- per-token statistics


def answer_token_stats(logits: torch.Tensor, labels: torch.Tensor,
                       vocab_stats: bool = False) -> list[dict[str, np.ndarray]]:
    """Per item, its scored answer tokens (the EOS left out): {"logp": log p(y_t) [n]} and, with
    `vocab_stats`, {"z": Min-K++'s normalised log-prob [n]}. logits [B, T, V], labels [B, T]."""
    logp, _ = token_logprobs(logits, labels)  # [B, T-1]
    kept = scored_without_last(labels)
    targets = labels[:, 1:]
    out = []
    for i in range(labels.shape[0]):
        stats = {"logp": logp[i][kept[i]].double().cpu().numpy()}
        if vocab_stats:
            stats["z"] = _normalised_logp(logits[i, :-1][kept[i]], targets[i][kept[i]]).cpu().numpy()
        out.append(stats)
    return out


def _normalised_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(log p(y_t) - mu_t) / sqrt(max(var_t, 1e-6)) with mu_t = sum_v p log p, var_t = sum_v p (log p)^2 - mu_t^2.
    logits [n, V] at the scored positions, targets [n] -> [n] (computed in float64: the ratio divides
    a difference of near-equal numbers by as little as 1e-3)."""
    lsm = torch.log_softmax(logits.double(), dim=-1)
    p = lsm.exp()
    mu = (p * lsm).sum(-1)
    var = (p * lsm.square()).sum(-1) - mu.square()
    logp = lsm.gather(-1, targets[:, None].long())[:, 0]
    return (logp - mu) / var.clamp(min=MIN_VARIANCE).sqrt()


def answer_texts(tokenizer: Any, labels: torch.Tensor) -> list[str]:
    """The labelled tokens of each item decoded, special tokens skipped: what ZLib compresses."""
    return [tokenizer.decode(row[row != -100].tolist(), skip_special_tokens=True) for row in labels.cpu()]


# ---------------------------------------------------------------- scores (higher = less likely a member)


def lowest_k_score(values: np.ndarray, k: float) -> float:
    """-mean of the lowest max(1, floor(n * k)) values; 0 for an empty item. Min-K on log-probs, Min-K++ on z."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 0.0
    return -float(np.sort(values)[: max(1, int(len(values) * k))].mean())


def zlib_score(avg_loss: float, text: str) -> float:
    """ZLib: answer NLL over the zlib entropy (compressed bytes) of the answer text."""
    return float(avg_loss) / len(zlib.compress(text.encode("utf-8")))


def reference_score(avg_loss: float, reference_loss: float) -> float:
    """Reference: the model's answer NLL minus the reference model's on the same item."""
    return float(avg_loss) - float(reference_loss)


def gradnorm_scores(model: Any, encoded: Sequence[dict[str, list[int]]]) -> np.ndarray:
    """GradNorm per item [N]: mean over parameter tensors of the L2 norm of the gradient of the
    item's -mean answer-token log-prob (EOS left out), one item per backward pass (no padding).

    Uses `torch.autograd.grad`, so the model's `.grad` buffers are left as they were. Parameters
    that require grad are the ones differentiated (OpenUnlearning: those whose .grad is set); a
    model with none has all of its parameters differentiated."""
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [] if params else list(model.parameters())
    for p in frozen:
        p.requires_grad_(True)
    try:
        return np.array([_gradnorm(model, item, params or frozen) for item in encoded], dtype=np.float64)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _gradnorm(model: Any, item: dict[str, list[int]], params: list[torch.Tensor]) -> float:
    device = model_device(model)
    ids = torch.tensor([item["input_ids"]], device=device)
    labels = torch.tensor([item["labels"]], device=device)
    with torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        logp, _ = token_logprobs(logits, labels)
        kept = scored_without_last(labels)
        if not kept.any():
            return 0.0
        grads = torch.autograd.grad(-logp[kept].mean(), params, allow_unused=True)
    norms = [g.detach().float().norm(2) for g in grads if g is not None]
    return float(torch.stack(norms).mean()) if norms else 0.0


# ---------------------------------------------------------------- AUC and privleak


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """roc_auc_score with forget labelled 0 and holdout 1 (loss-like scores): 1 = the forget set looks
    memorized, 0.5 = indistinguishable from the holdout set."""
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return float(roc_auc_score(labels, np.concatenate([np.asarray(forget_scores, dtype=np.float64),
                                                       np.asarray(holdout_scores, dtype=np.float64)])))


def privleak(auc: float, retain_auc: float) -> float:
    """((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain + 1e-10) * 100: 0 = leaks like the retain model,
    -100 = fully memorized (AUC 1), > 0 = over-unlearned (the forget set looks less familiar than the holdout)."""
    score, ref = 1.0 - auc, 1.0 - retain_auc
    return (score - ref) / (ref + PRIVLEAK_EPS) * 100.0
