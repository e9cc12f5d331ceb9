"""Token log-probabilities of answer tokens: the shared arithmetic of objectives and metrics.

Conventions (HF / OpenUnlearning): `labels` has the same shape as `input_ids`, with -100 on
every position that is not scored (prompt and padding). Logits at position t predict the token
at t + 1, so everything here shifts by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits with the tokens they predict.

    logits: [B, T, V]; labels: [B, T] -> (logits [B, T-1, V], targets [B, T-1], mask [B, T-1] bool)
    """
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits, targets.masked_fill(~mask, 0), mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token. Returns (logp [B, T-1] with 0 where masked, mask [B, T-1])."""
    logits, targets, mask = shifted(logits, labels)
    logp = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return logp * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed answer-token log-probability per item: log pi(y | x). Shape [B]."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(dim=1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood per item over its answer tokens. Shape [B]."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def answer_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Number of scored (answer) tokens per item |y|. Shape [B]."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def batch_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL over every answer token of the batch (the standard HF causal-LM loss). Scalar."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / mask.sum().clamp(min=1)
