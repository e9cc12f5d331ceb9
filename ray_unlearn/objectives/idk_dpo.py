"""IdkDPO: DPO (Rafailov et al., 2023) preferring a refusal over the forget answer.

chosen c = the "forget_idk" stream (same forget question, refusal answer such as "I don't know."),
rejected r = the "forget" stream (the true forget answer):

    loss = mean_i −logσ(β · [(logπ_θ(c_i) − logπ_ref(c_i)) − (logπ_θ(r_i) − logπ_ref(r_i))])

with logπ(y) the summed answer-token log-probability. Item i of both streams is the same question.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from ray_unlearn.logprobs import sequence_logprob


def _log_ratio(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any],
               batch: Mapping[str, Mapping[str, Tensor]], stream: str) -> Tensor:
    """logπ_θ(y) − logπ_ref(y) per item of `stream`. Shape [B]."""
    labels = batch[stream]["labels"]
    return (sequence_logprob(policy_out[stream].logits, labels)
            - sequence_logprob(ref_out[stream].logits.detach(), labels))


def idk_dpo_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
                 batch: Mapping[str, Mapping[str, Tensor]], *, beta: float) -> tuple[Tensor, dict[str, float]]:
    """loss = mean −logσ(β·[(logπ_θ(c) − logπ_ref(c)) − (logπ_θ(r) − logπ_ref(r))]), float32."""
    chosen = _log_ratio(policy_out, ref_out, batch, "forget_idk")
    rejected = _log_ratio(policy_out, ref_out, batch, "forget")
    margin = beta * (chosen - rejected)
    loss = -F.logsigmoid(margin).mean()
    return loss, {"idk_dpo/chosen_log_ratio": chosen.mean().item(),
                  "idk_dpo/rejected_log_ratio": rejected.mean().item(),
                  "idk_dpo/reward_margin": margin.mean().item()}
