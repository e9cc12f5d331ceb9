"""UNDIAL (Dong et al., 2024): self-distillation toward reference logits with the true token pushed down.

At every answer position t (logits at t predict the answer token y_{t+1}),

    q_t = softmax(z_ref,t − β·onehot(y_{t+1})),   loss = mean_t CE(z_θ,t, q_t) = mean_t −Σ_v q_t(v)·log p_θ,t(v)

averaged over the batch's answer positions. OpenUnlearning averages over every position of the
sequence (prompt and padding included); here only answer positions count.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from ray_unlearn.logprobs import shifted


def undial_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
                batch: Mapping[str, Mapping[str, Tensor]], *, beta: float) -> tuple[Tensor, dict[str, float]]:
    """loss = mean over answer positions of CE(z_θ, softmax(z_ref − β·onehot(y))), float32."""
    labels = batch["forget"]["labels"]
    logits, targets, mask = shifted(policy_out["forget"].logits, labels)
    ref_logits, _, _ = shifted(ref_out["forget"].logits.detach(), labels)
    pushed = ref_logits.float() - beta * F.one_hot(targets, ref_logits.shape[-1]).float()
    soft = F.softmax(pushed, dim=-1)
    ce = -(soft * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)  # [B, T-1]
    loss = (ce * mask).sum() / mask.sum().clamp(min=1)
    return loss, {}
