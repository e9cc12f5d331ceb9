"""Retain-set KL to the reference model: loss = KL(ref ‖ θ) on retain answer tokens.

At every scored position t (logits at t predict the answer token at t + 1),
    KL_t = Σ_v p_ref(v) · (log p_ref(v) − log p_θ(v)),
and the loss is the mean of KL_t over every scored position of the batch (token-mean).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from ray_unlearn.logprobs import shifted


def retain_kl_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
                   batch: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
    """loss = mean over scored retain positions of Σ_v p_ref·(log p_ref − log p_θ), in float32."""
    labels = batch["retain"]["labels"]
    policy_logits, _, mask = shifted(policy_out["retain"].logits, labels)
    ref_logits, _, _ = shifted(ref_out["retain"].logits.detach(), labels)
    logp = F.log_softmax(policy_logits.float(), dim=-1)
    logp_ref = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(dim=-1)  # [B, T-1]
    return (kl * mask).sum() / mask.sum().clamp(min=1), {}
