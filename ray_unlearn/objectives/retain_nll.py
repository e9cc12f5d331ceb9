"""Retain-set likelihood: loss = NLL(retain), the standard causal-LM loss on retain answers."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ray_unlearn.logprobs import batch_nll


def retain_nll_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
                    batch: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
    """loss = NLL(retain), token-mean over the batch's answer tokens. `ref_out` is unused."""
    return batch_nll(policy_out["retain"].logits, batch["retain"]["labels"]), {}
