"""retain_kl = KL(ref ‖ θ) on retain answer tokens, token-mean over the batch's scored positions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.retain_kl import retain_kl_loss

L2 = math.log(2.0)  # logits [L2, 0, 0] -> p = (1/2, 1/4, 1/4)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_retain_kl_hand_computed():
    # Scored positions (logits[t] predicts labels[t+1]): item 0 -> t0, t1; item 1 -> t0 only.
    # item 0 t0: p_ref = (1/2,1/4,1/4), p_θ = (1/3,1/3,1/3)
    #   KL = 1/2·log((1/2)/(1/3)) + 2·1/4·log((1/4)/(1/3)) = 1/2·log(3/2) + 1/2·log(3/4)
    # item 0 t1: same logits -> KL = 0
    # item 1 t0: p_ref uniform, p_θ = (1/2,1/4,1/4)
    #   KL = 1/3·log((1/3)/(1/2)) + 2·1/3·log((1/3)/(1/4)) = 1/3·log(2/3) + 2/3·log(4/3)
    # unscored positions (item 0 t2, item 1 t1, t2) differ wildly and must not count.
    # loss = (KL_00 + 0 + KL_10) / 3
    policy = torch.tensor([[[0, 0, 0], [1, 2, 3], [9, 0, 0]],
                           [[L2, 0, 0], [0, 9, 0], [0, 0, 9]]], requires_grad=True)
    ref = torch.tensor([[[L2, 0, 0], [1, 2, 3], [0, 0, 9]],
                        [[0, 0, 0], [9, 0, 0], [9, 0, 0]]])
    batch = {"retain": stream([[-100, 1, 2], [-100, 0, -100]])}
    loss, _ = retain_kl_loss({"retain": SimpleNamespace(logits=policy)},
                             {"retain": SimpleNamespace(logits=ref)}, batch)
    kl_00 = 0.5 * math.log(3 / 2) + 0.5 * math.log(3 / 4)
    kl_10 = math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3
    assert loss.item() == pytest.approx((kl_00 + kl_10) / 3, rel=1e-5)
    loss.backward()
    assert policy.grad[0, 0].abs().sum().item() > 0
    assert policy.grad[0, 2].abs().sum().item() == 0.0  # unscored
    assert policy.grad[1, 1].abs().sum().item() == 0.0  # padding


def test_retain_kl_is_zero_at_reference():
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    batch = {"retain": stream([[-100, 1, 2, 3], [-100, -100, 4, -100]])}
    out = {"retain": SimpleNamespace(logits=logits)}
    loss, _ = retain_kl_loss(out, out, batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
