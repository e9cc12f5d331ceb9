"""idk_dpo = mean −logσ(β[(logπ_θ(c) − logπ_ref(c)) − (logπ_θ(r) − logπ_ref(r))]), c = forget_idk, r = forget."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.idk_dpo import idk_dpo_loss

L2 = math.log(2.0)  # logits [L2, 0, 0] -> p = (1/2, 1/4, 1/4)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_idk_dpo_hand_computed():
    # ref uniform on both streams: logπ_ref = 2·log(1/3) = −log 9.
    # rejected (forget, labels [-, 0, 1]): p(0) = 1/2, p(1) = 1/3 -> logπ_θ = −log 6; ratio = log(9/6) = log 1.5
    # chosen (forget_idk, labels [-, 2, 2]): p(2) = 1/2 twice -> logπ_θ = −log 4; ratio = log(9/4)
    # β = 2: margin = 2·(log(9/4) − log(3/2)) = 2·log 1.5 = log 2.25
    # loss = −logσ(log 2.25) = log(1 + 1/2.25) = log(13/9)
    rejected = torch.tensor([[[L2, 0, 0], [0, 0, 0], [0, 8, 0]]], requires_grad=True)
    chosen = torch.tensor([[[0, 0, L2], [0, 0, L2], [8, 0, 0]]], requires_grad=True)
    policy = {"forget": SimpleNamespace(logits=rejected), "forget_idk": SimpleNamespace(logits=chosen)}
    ref = {"forget": SimpleNamespace(logits=torch.zeros(1, 3, 3)),
           "forget_idk": SimpleNamespace(logits=torch.zeros(1, 3, 3))}
    batch = {"forget": stream([[-100, 0, 1]]), "forget_idk": stream([[-100, 2, 2]])}
    loss, logs = idk_dpo_loss(policy, ref, batch, beta=2.0)
    assert loss.item() == pytest.approx(math.log(13 / 9), rel=1e-6)
    assert logs["idk_dpo/chosen_log_ratio"] == pytest.approx(math.log(9 / 4), rel=1e-6)
    assert logs["idk_dpo/rejected_log_ratio"] == pytest.approx(math.log(1.5), rel=1e-6)
    assert logs["idk_dpo/reward_margin"] == pytest.approx(math.log(2.25), rel=1e-6)
    # descent raises the refusal token's logit and lowers the forget token's logit
    loss.backward()
    assert chosen.grad[0, 0, 2].item() < 0
    assert rejected.grad[0, 0, 0].item() > 0
