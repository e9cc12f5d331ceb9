"""refusal = NLL(forget question -> refusal answer), the "forget_idk" stream."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.refusal import refusal_loss

L2 = math.log(2.0)  # logits [0, 0, L2] -> p = (1/4, 1/4, 1/2)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_refusal_is_nll_of_refusal_answer():
    # labels [-, 2, 2]: t0 [0,0,L2] -> p(2) = 1/2;  t1 uniform -> p(2) = 1/3
    # NLL = (log 2 + log 3) / 2
    logits = torch.tensor([[[0, 0, L2], [0, 0, 0], [6, 0, 0]]], requires_grad=True)
    batch = {"forget_idk": stream([[-100, 2, 2]])}
    loss, _ = refusal_loss({"forget_idk": SimpleNamespace(logits=logits)}, None, batch)
    assert loss.item() == pytest.approx((math.log(2) + math.log(3)) / 2, rel=1e-6)
    # dNLL/dz_target = −(1 − 1/2)/2: descent raises the refusal token's logit
    loss.backward()
    assert logits.grad[0, 0, 2].item() == pytest.approx(-0.25, rel=1e-5)
