"""undial = mean over forget answer positions of CE(z_θ, softmax(z_ref − β·onehot(y)))."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.undial import undial_loss

L2, L3 = math.log(2.0), math.log(3.0)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_undial_hand_computed():
    # β = log 2. Scored: item 0 t0 (true 0), item 0 t1 (true 1); item 0 t2 and all of item 1 but t1 unscored.
    # item 0 t0: ref uniform -> q ∝ (1/2, 1, 1) = (1/5, 2/5, 2/5); θ [L2,0,0]: log p = (log 1/2, log 1/4, log 1/4)
    #   CE = 1/5·log 2 + 4/5·log 4 = 9/5·log 2
    # item 0 t1: ref [0, L2, 0] -> pushed [0, 0, 0] -> q uniform; θ uniform -> CE = log 3
    # item 1 t1 (true 2): ref [0, 0, L3] -> pushed [0, 0, L3 − L2] -> q ∝ (1, 1, 3/2) = (2/7, 2/7, 3/7);
    #   θ [L2, 0, 0] -> CE = 2/7·log 2 + 5/7·log 4 = 12/7·log 2
    policy = torch.tensor([[[L2, 0, 0], [0, 0, 0], [9, 0, 0]],
                           [[5, 0, 0], [L2, 0, 0], [0, 9, 0]]], requires_grad=True)
    ref = torch.tensor([[[0, 0, 0], [0, L2, 0], [0, 0, 9]],
                        [[0, 3, 0], [0, 0, L3], [4, 0, 0]]])
    batch = {"forget": stream([[-100, 0, 1], [-100, -100, 2]])}
    loss, _ = undial_loss({"forget": SimpleNamespace(logits=policy)}, {"forget": SimpleNamespace(logits=ref)},
                          batch, beta=L2)
    assert loss.item() == pytest.approx((9 / 5 * L2 + L3 + 12 / 7 * L2) / 3, rel=1e-6)
    # dCE/dz = p − q: item 0 t0 -> ((1/2 − 1/5), (1/4 − 2/5), (1/4 − 2/5)) / 3
    loss.backward()
    assert policy.grad[0, 0].tolist() == pytest.approx([0.3 / 3, -0.15 / 3, -0.15 / 3], rel=1e-5)
    assert policy.grad[1, 0].abs().sum().item() == 0  # a prompt position


def test_undial_without_penalty_at_the_reference_is_its_entropy():
    # β = 0 and θ = ref: CE(p, p) = H(p); [L2, 0, 0] -> H = 1/2·log 2 + 2·1/4·log 4 = 3/2·log 2
    z = torch.tensor([[[L2, 0, 0], [L2, 0, 0], [0, 0, 0]]])
    out = {"forget": SimpleNamespace(logits=z)}
    loss, _ = undial_loss(out, out, {"forget": stream([[-100, 1, 2]])}, beta=0.0)
    assert loss.item() == pytest.approx(1.5 * L2, rel=1e-6)
