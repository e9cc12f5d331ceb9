"""Negative Preference Optimization (Zhang et al., 2024) on the forget set.

    loss = mean_i −(2/β) · logσ(−β · (logπ_θ(y_i) − logπ_ref(y_i)))
         = mean_i (2/β) · log(1 + (π_θ(y_i) / π_ref(y_i))^β)

with logπ(y) the *summed* answer-token log-probability (OpenUnlearning's convention). At θ = ref
the loss is (2/β)·log 2; as β → 0 its gradient tends to that of gradient ascent on logπ_θ(y).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from ray_unlearn.logprobs import sequence_logprob


def npo_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
             batch: Mapping[str, Mapping[str, Tensor]], *, beta: float) -> tuple[Tensor, dict[str, float]]:
    """loss = mean −(2/β)·logσ(−β·(logπ_θ(y_f) − logπ_ref(y_f))), summed log-probs, float32."""
    labels = batch["forget"]["labels"]
    logp = sequence_logprob(policy_out["forget"].logits, labels)
    logp_ref = sequence_logprob(ref_out["forget"].logits.detach(), labels)
    log_ratio = logp - logp_ref
    loss = (-2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
    return loss, {"npo/log_ratio": log_ratio.mean().item()}
