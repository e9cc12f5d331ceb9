"""CE-U, cross-entropy unlearning (Yang et al., 2025, arXiv:2503.01224).

At every answer position t the target is the model's own (detached) distribution with the true
token removed: q_t = softmax(z_t with z_t[y_t] = −inf), and

    loss = mean_t CE(z_t, q_t) = mean_t −Σ_v q_t(v)·log p_θ,t(v)

over the batch's answer positions, leaving out the first `skip_first` answer tokens of every item
(the paper's footnote; OpenUnlearning's ignore_first_n_answer_tokens = 1).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from ray_unlearn.logprobs import IGNORE_INDEX, shifted


def skip_first_answer_tokens(labels: Tensor, n: int) -> Tensor:
    """`labels` with the first n set labels of every row set to IGNORE_INDEX. [B, T] -> [B, T]."""
    answer = labels != IGNORE_INDEX
    return labels.masked_fill(answer & (answer.cumsum(dim=1) <= n), IGNORE_INDEX)


def ce_u_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
              batch: Mapping[str, Mapping[str, Tensor]], *, skip_first: int) -> tuple[Tensor, dict[str, float]]:
    """loss = mean over answer positions (the first `skip_first` per item left out) of
    CE(z, softmax(z.detach() with the true token at −inf)), float32. `ref_out` is unused."""
    labels = skip_first_answer_tokens(batch["forget"]["labels"], skip_first)
    logits, targets, mask = shifted(policy_out["forget"].logits, labels)
    logits = logits.float()
    without_true = logits.detach().scatter(-1, targets.unsqueeze(-1), float("-inf"))
    target = F.softmax(without_true, dim=-1)
    ce = -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1)  # [B, T-1]
    return (ce * mask).sum() / mask.sum().clamp(min=1), {}
