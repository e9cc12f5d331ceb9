"""retain_nll = NLL(retain), token-mean over answer tokens."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.retain_nll import retain_nll_loss

L2 = math.log(2.0)  # logits [L2, 0, 0] -> p = (1/2, 1/4, 1/4)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_retain_nll_hand_computed():
    # labels [-, 0, 1]: t0 [L2,0,0] -> p(0) = 1/2;  t1 uniform -> p(1) = 1/3
    # NLL = (log 2 + log 3) / 2
    logits = torch.tensor([[[L2, 0, 0], [0, 0, 0], [3, 1, 0]]], requires_grad=True)
    batch = {"retain": stream([[-100, 0, 1]])}
    loss, logs = retain_nll_loss({"retain": SimpleNamespace(logits=logits)}, None, batch)
    assert loss.item() == pytest.approx((math.log(2) + math.log(3)) / 2, rel=1e-6)
    assert logs == {}
    # dNLL/dz_target = −(1 − p)/N = −(1 − 1/2)/2: descent raises the retain token's logit
    loss.backward()
    assert logits.grad[0, 0, 0].item() == pytest.approx(-0.25, rel=1e-5)
