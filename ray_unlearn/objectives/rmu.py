"""RMU, Representation Misdirection for Unlearning (Li et al., 2024, the WMDP paper).

At one decoder layer ℓ, push the forget activations toward a fixed random direction and keep the
retain activations where the reference model has them:

    loss = act(h_ℓ(forget), c·u) + α·act(h_ℓ(retain), h_ℓ^ref(retain))
    act(a, b) = mean over items of [mean over the item's answer tokens of mean_d (a − b)²]

u ~ U[0,1)^d normalised to unit length, drawn once per run from the run's seed (so every rank and
every resume have the same u; it is in the checkpoint too). Answer tokens are the positions whose
label is set (the token itself, not the position that predicts it), as in OpenUnlearning.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ray_unlearn.logprobs import IGNORE_INDEX


def rmu_init_state(settings: Any, hidden_size: int, seed: int) -> dict[str, Tensor]:
    """u ~ U[0,1)^hidden_size from a generator seeded with `seed`, divided by its norm."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return {"u": u / u.norm()}


def activation_loss(a: Tensor, b: Tensor, labels: Tensor) -> Tensor:
    """Mean over items of the mean over answer positions of mean_d (a − b)². a, b: [B, T, d]; labels: [B, T]."""
    mask = (labels != IGNORE_INDEX).float()
    per_position = (a.float() - b.float()).pow(2).mean(dim=-1)  # [B, T]
    return ((per_position * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def rmu_loss(policy_out: Mapping[str, Any], ref_out: Mapping[str, Any] | None,
             batch: Mapping[str, Mapping[str, Tensor]], *, layer: int, steering_coeff: float,
             retain_weight: float, state: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """loss = act(h_ℓ(forget), c·u) + α·act(h_ℓ(retain), h_ℓ^ref(retain)), float32."""
    forget_h = policy_out["forget"].hidden[layer]
    target = (steering_coeff * state["u"]).to(forget_h.device).expand_as(forget_h)
    forget = activation_loss(forget_h, target, batch["forget"]["labels"])
    retain = activation_loss(policy_out["retain"].hidden[layer], ref_out["retain"].hidden[layer].detach(),
                             batch["retain"]["labels"])
    return forget + retain_weight * retain, {"rmu/forget_act": forget.item(), "rmu/retain_act": retain.item()}
