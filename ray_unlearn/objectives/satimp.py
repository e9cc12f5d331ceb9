"""SatImp (Yang et al., 2025): gradient ascent weighted by saturation and importance.

    loss = −mean_t(p_t^β1 · (1 − p_t)^β2 · CE_t),   p_t = p_θ(y_t), weights detached

averaged over every answer token of the batch. This is the forget loss only: OpenUnlearning's
SatImp adds γ·forget + α·retain NLL, here the weights of `satimp` and `retain_nll` in
objective.terms (its SatImp.yaml uses γ = 0.1, α = 1; its class default γ = 1, α = 0.1).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ray_unlearn.logprobs import token_logprobs


def satimp_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
                batch: Mapping[str, Mapping[str, Tensor]], *, beta1: float,
                beta2: float) -> tuple[Tensor, dict[str, float]]:
    """loss = −mean over answer tokens of p^β1·(1 − p)^β2 (detached) · CE, float32. `ref_out` is unused."""
    logp, mask = token_logprobs(policy_out["forget"].logits, batch["forget"]["labels"])
    p = logp.detach().exp()
    weight = p.pow(beta1) * (1 - p).pow(beta2)
    count = mask.sum().clamp(min=1)
    loss = ((weight * logp) * mask).sum() / count  # −mean(w · CE) = mean(w · logp)
    return loss, {"satimp/mean_weight": ((weight * mask).sum() / count).item()}
