"""SimNPO (Fan et al., 2024, "Simplicity Prevails"): reference-free, length-normalized NPO.

    loss = mean_i −(2/β) · logσ(−β · logπ_θ(y_i)/|y_i| − δ)
         = mean_i −(2/β) · logσ(β · NLL_i − δ),      NLL_i = −logπ_θ(y_i)/|y_i|

with logπ(y) the summed answer-token log-probability and |y| the number of answer tokens.
Minimizing it raises the forget answers' per-token NLL, i.e. it unlearns.

This is the paper's form, with the margin δ (γ in the paper) outside β. OpenUnlearning writes
the margin inside, −(2/β)·logσ(β·(NLL_i − δ_OU)), so its `delta` is δ_OU = δ/β.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from ray_unlearn.logprobs import answer_lengths, sequence_logprob


def simnpo_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
                batch: Mapping[str, Mapping[str, Tensor]], *, beta: float,
                delta: float) -> tuple[Tensor, dict[str, float]]:
    """loss = mean −(2/β)·logσ(β·(−logπ_θ(y_f)/|y_f|) − δ), float32. `ref_out` is unused."""
    labels = batch["forget"]["labels"]
    logp = sequence_logprob(policy_out["forget"].logits, labels)
    nll = -logp / answer_lengths(labels).clamp(min=1)
    loss = (-2.0 / beta) * F.logsigmoid(beta * nll - delta).mean()
    return loss, {"simnpo/forget_nll": nll.mean().item()}
