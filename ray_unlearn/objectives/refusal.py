"""Refusal term (SOUL's preference-optimization objective): loss = NLL(forget question → refusal).

Trains the model to answer forget questions with the refusal in the "forget_idk" stream
(e.g. "I don't know."); NLL is token-mean over the batch's answer tokens.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ray_unlearn.logprobs import batch_nll


def refusal_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
                 batch: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
    """loss = NLL(forget_idk), token-mean over the batch's refusal-answer tokens. `ref_out` is unused."""
    return batch_nll(policy_out["forget_idk"].logits, batch["forget_idk"]["labels"]), {}
