"""Gradient ascent on the forget set: loss = −NLL(forget).

NLL is the token-mean cross-entropy over every answer token of the batch, so minimizing this
term pushes the forget answers' likelihood down without bound (the classic GA baseline).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ray_unlearn.logprobs import batch_nll


def ga_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
            batch: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
    """loss = −NLL(forget), NLL token-mean over the batch's answer tokens. `ref_out` is unused."""
    nll = batch_nll(policy_out["forget"].logits, batch["forget"]["labels"])
    return -nll, {"ga/forget_nll": nll.item()}
