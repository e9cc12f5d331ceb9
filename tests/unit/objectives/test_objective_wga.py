"""wga = −mean over forget answer tokens of p_θ(y_t)^β (detached) · CE_t."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.wga import wga_loss

L2, L3 = math.log(2.0), math.log(3.0)  # logits [L2, 0, 0] -> p = (1/2, 1/4, 1/4); [0, 0, L3] -> (1/5, 1/5, 3/5)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def logits(requires_grad: bool = False) -> torch.Tensor:
    # item 0, labels [-, 0, 1]: t0 [L2,0,0] predicts 0 (p = 1/2), t1 uniform predicts 1 (p = 1/3)
    # item 1, labels [-, -, 2]: t1 [0,0,L3] predicts 2 (p = 3/5); t0 is a prompt position (not scored)
    return torch.tensor([[[L2, 0, 0], [0, 0, 0], [5, 5, 5]],
                         [[9, 0, 0], [0, 0, L3], [1, 2, 3]]], requires_grad=requires_grad)


BATCH = {"forget": stream([[-100, 0, 1], [-100, -100, 2]])}


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_wga_hand_computed(beta):
    p = [1 / 2, 1 / 3, 3 / 5]
    expected = -sum(pt ** beta * -math.log(pt) for pt in p) / 3
    loss, logs = wga_loss({"forget": SimpleNamespace(logits=logits())}, None, BATCH, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["wga/forget_nll"] == pytest.approx((L2 + L3 + math.log(5 / 3)) / 3, rel=1e-6)
    assert logs["wga/mean_weight"] == pytest.approx(sum(pt ** beta for pt in p) / 3, rel=1e-6)


def test_wga_weights_are_constants_in_the_gradient():
    # dloss/dz = −(1/N)·w·(p − onehot(y)); at item 0 t0, v = y = 0: −(1/3)·(1/2)·(1/2 − 1) = 1/12
    # (a weight in the graph would add −(1/N)·CE·dw/dz and change it)
    z = logits(requires_grad=True)
    loss, _ = wga_loss({"forget": SimpleNamespace(logits=z)}, None, BATCH, beta=1.0)
    loss.backward()
    assert z.grad[0, 0, 0].item() == pytest.approx(1 / 12, rel=1e-6)
    assert z.grad[0, 0, 1].item() == pytest.approx(-(1 / 3) * (1 / 2) * (1 / 4), rel=1e-6)
    assert z.grad[1, 0].abs().sum().item() == 0  # prompt position
