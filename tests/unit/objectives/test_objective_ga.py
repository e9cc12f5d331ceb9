"""ga = −NLL(forget), NLL token-mean over every answer token of the batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.ga import ga_loss

L2 = math.log(2.0)  # logits [L2, 0, 0] -> p = (1/2, 1/4, 1/4)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_ga_is_minus_token_mean_nll_over_batch():
    # item 0: labels [-, 0, 1]; logits[t] predicts label[t+1]
    #   t0 [L2,0,0] -> p(0) = 1/2;  t1 uniform -> p(1) = 1/3;  t2 unscored
    # item 1: labels [-, 2, -]: t0 uniform -> p(2) = 1/3; t1, t2 unscored
    # NLL = (log 2 + log 3 + log 3) / 3 answer tokens  ->  ga = −NLL
    logits = torch.tensor([[[L2, 0, 0], [0, 0, 0], [5, 5, -5]],
                           [[0, 0, 0], [9, 0, 0], [0, 9, 0]]], requires_grad=True)
    batch = {"forget": stream([[-100, 0, 1], [-100, 2, -100]])}
    loss, logs = ga_loss({"forget": SimpleNamespace(logits=logits)}, None, batch)
    nll = (math.log(2) + 2 * math.log(3)) / 3
    assert loss.item() == pytest.approx(-nll, rel=1e-6)
    assert logs == {"ga/forget_nll": pytest.approx(nll, rel=1e-6)}
    # d(−NLL)/dz_target = (1 − p_target)/N = (1 − 1/2)/3: descent lowers the forget token's logit
    loss.backward()
    assert logits.grad[0, 0, 0].item() == pytest.approx(1 / 6, rel=1e-5)
    assert logits.grad[0, 2].abs().sum().item() == 0.0  # unscored position gets no gradient
