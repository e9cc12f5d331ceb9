"""satimp = −mean over forget answer tokens of p^β1·(1 − p)^β2 (detached) · CE_t."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.satimp import satimp_loss

L2, L3 = math.log(2.0), math.log(3.0)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


BATCH = {"forget": stream([[-100, 0, 1], [-100, -100, 2]])}


def logits(requires_grad: bool = False) -> torch.Tensor:
    # scored: item 0 t0 p(0) = 1/2, item 0 t1 p(1) = 1/3, item 1 t1 p(2) = 3/5
    return torch.tensor([[[L2, 0, 0], [0, 0, 0], [5, 5, 5]],
                         [[9, 0, 0], [0, 0, L3], [1, 2, 3]]], requires_grad=requires_grad)


def test_satimp_hand_computed_defaults():
    # β1 = 5, β2 = 1: w = p^5·(1 − p)
    #   p = 1/2 -> 1/32 · 1/2 = 1/64;  p = 1/3 -> 1/243 · 2/3 = 2/729;  p = 3/5 -> 243/3125 · 2/5 = 486/15625
    # loss = −(w0·log 2 + w1·log 3 + w2·log(5/3)) / 3
    expected = -(1 / 64 * L2 + 2 / 729 * L3 + 486 / 15625 * math.log(5 / 3)) / 3
    loss, logs = satimp_loss({"forget": SimpleNamespace(logits=logits())}, None, BATCH, beta1=5.0, beta2=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["satimp/mean_weight"] == pytest.approx((1 / 64 + 2 / 729 + 486 / 15625) / 3, rel=1e-6)


def test_satimp_with_zero_exponents_is_gradient_ascent():
    # β1 = β2 = 0: every weight 1 -> −mean CE = −(log 2 + log 3 + log(5/3)) / 3
    loss, _ = satimp_loss({"forget": SimpleNamespace(logits=logits())}, None, BATCH, beta1=0.0, beta2=0.0)
    assert loss.item() == pytest.approx(-(L2 + L3 + math.log(5 / 3)) / 3, rel=1e-6)


def test_satimp_weights_are_constants_in_the_gradient():
    # item 0 t0, v = y = 0: dloss/dz = −(1/3)·w·(p − 1) = −(1/3)·(1/64)·(−1/2) = 1/384
    z = logits(requires_grad=True)
    loss, _ = satimp_loss({"forget": SimpleNamespace(logits=z)}, None, BATCH, beta1=5.0, beta2=1.0)
    loss.backward()
    assert z.grad[0, 0, 0].item() == pytest.approx(1 / 384, rel=1e-6)
