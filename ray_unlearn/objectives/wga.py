"""WGA, weighted gradient ascent (Wang et al., 2025, "Rethinking LLM unlearning objectives").

    loss = −mean_t(w_t · CE_t),   w_t = p_θ(y_t)^β (detached),   CE_t = −log p_θ(y_t)

averaged over every answer token of the batch: gradient ascent that spends less effort on tokens
the model already finds unlikely.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ray_unlearn.logprobs import token_logprobs


def wga_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
             batch: Mapping[str, Mapping[str, Tensor]], *, beta: float) -> tuple[Tensor, dict[str, float]]:
    """loss = −mean over answer tokens of p^β (detached) · CE, float32. `ref_out` is unused."""
    logp, mask = token_logprobs(policy_out["forget"].logits, batch["forget"]["labels"])
    weight = logp.detach().exp().pow(beta)
    count = mask.sum().clamp(min=1)
    loss = ((weight * logp) * mask).sum() / count  # −mean(w · CE) = mean(w · logp)
    return loss, {"wga/forget_nll": (-(logp * mask).sum() / count).item(),
                  "wga/mean_weight": ((weight * mask).sum() / count).item()}
