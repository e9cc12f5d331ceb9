"""Fine-tuning: loss = NLL(train), the standard causal-LM loss on the train stream's answers.

Not an unlearning term: `ray-unlearn finetune` trains the target and retain models with it and the
relearning attack fine-tunes the unlearned model with it, both through the one training loop.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ray_unlearn.logprobs import batch_nll


def nll_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
             batch: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
    """loss = NLL(train), token-mean over the batch's answer tokens. `ref_out` is unused."""
    return batch_nll(policy_out["train"].logits, batch["train"]["labels"]), {}
