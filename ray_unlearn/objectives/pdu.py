"""PDU, primal-dual unlearning (OpenUnlearning's PDU trainer): unlearn under a retain-loss constraint L_r ≤ ε.

    loss = γ·L_f + λ·(L_r − ε)
    L_f  = mean over forget answer positions of (max_v z_v − mean_v z_v)²   (flatten the logits)
    L_r  = NLL(retain), token-mean
    λ   <- max(0, λ + η·(L_r − ε))   after every optimizer step

λ is the term's state: it starts at λ₀, is updated from the step's L_r averaged over its
micro-batches and every rank (so every rank holds the same λ), and is saved in checkpoints.
OpenUnlearning takes L_f over every position and updates λ after every forward pass; here L_f
counts answer positions only and λ moves once per optimizer step.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ray_unlearn.logprobs import batch_nll, shifted


def pdu_init_state(settings: Any, hidden_size: int, seed: int) -> dict[str, Tensor]:
    """λ = λ₀ (float64)."""
    return {"lambda": torch.tensor(float(settings.dual_init), dtype=torch.float64)}


def pdu_update_state(state: Mapping[str, Tensor], settings: Any, logs: Mapping[str, float]) -> dict[str, Tensor]:
    """λ <- max(0, λ + η·(L_r − ε)), L_r = logs["pdu/retain_loss"] (the step's, averaged over ranks)."""
    lam = float(state["lambda"]) + settings.dual_step_size * (logs["pdu/retain_loss"] - settings.retain_eps)
    return {"lambda": torch.tensor(max(0.0, lam), dtype=torch.float64)}


def pdu_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
             batch: Mapping[str, Mapping[str, Tensor]], *, gamma: float, retain_eps: float,
             state: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """loss = γ·L_f + λ·(L_r − ε) with λ from `state` (a constant here), float32. `ref_out` is unused."""
    logits, _, mask = shifted(policy_out["forget"].logits, batch["forget"]["labels"])
    logits = logits.float()
    gap = (logits.max(dim=-1).values - logits.mean(dim=-1)).pow(2)  # [B, T-1]
    forget = (gap * mask).sum() / mask.sum().clamp(min=1)
    retain = batch_nll(policy_out["retain"].logits, batch["retain"]["labels"])
    lam = float(state["lambda"])
    loss = gamma * forget + lam * (retain - retain_eps)
    return loss, {"pdu/forget_loss": forget.item(), "pdu/retain_loss": retain.item(), "pdu/lambda": lam}
