"""simnpo = mean −(2/β)·logσ(β·(−logπ_θ(y_f)/|y_f|) − δ), reference-free."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.simnpo import simnpo_loss

L2 = math.log(2.0)  # logits [L2, 0, 0] -> p = (1/2, 1/4, 1/4)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def _example() -> tuple[torch.Tensor, dict]:
    logits = torch.tensor([[[L2, 0, 0], [0, 0, 0], [0, 7, 0]],
                           [[0, 0, 0], [5, 0, 0], [0, 0, 5]]], requires_grad=True)
    return logits, {"forget": stream([[-100, 0, 1], [-100, 2, -100]])}


def test_simnpo_hand_computed():
    # β = 2, δ = 0.5.
    # item 0, labels [-, 0, 1]: logπ = −log 6, |y| = 2 -> NLL = log(6)/2
    #   z = β·NLL − δ = log 6 − 0.5;  loss_0 = −(2/2)·logσ(z) = log(1 + e^(−z)) = log(1 + e^0.5 / 6)
    # item 1, labels [-, 2, -]: logπ = −log 3, |y| = 1 -> z = 2·log 3 − 0.5 -> loss_1 = log(1 + e^0.5 / 9)
    logits, batch = _example()
    loss, logs = simnpo_loss({"forget": SimpleNamespace(logits=logits)}, None, batch, beta=2.0, delta=0.5)
    expected = (math.log(1 + math.exp(0.5) / 6) + math.log(1 + math.exp(0.5) / 9)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs == {"simnpo/forget_nll": pytest.approx((math.log(6) / 2 + math.log(3)) / 2, rel=1e-6)}
    # reference-free and unlearning: descent lowers the forget token's logit (raises its NLL)
    loss.backward()
    assert logits.grad[0, 0, 0].item() > 0


def test_simnpo_matches_openunlearning_with_margin_inside():
    # OpenUnlearning: −(2/β)·logσ(β·(NLL − δ_OU)) with δ_OU = δ/β. β = 4, δ = 2 -> δ_OU = 0.5
    # item 0: NLL = log(6)/2 -> −(2/4)·logσ(4·(log(6)/2 − 0.5)) = 0.5·log(1 + e^(−(2·log 6 − 2)))
    # item 1: NLL = log 3    -> 0.5·log(1 + e^(−(4·log 3 − 2)))
    logits, batch = _example()
    loss, _ = simnpo_loss({"forget": SimpleNamespace(logits=logits)}, None, batch, beta=4.0, delta=2.0)
    item0 = 0.5 * math.log(1 + math.exp(-(2 * math.log(6) - 2)))
    item1 = 0.5 * math.log(1 + math.exp(-(4 * math.log(3) - 2)))
    assert loss.item() == pytest.approx((item0 + item1) / 2, rel=1e-6)
