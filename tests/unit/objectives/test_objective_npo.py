"""npo = mean −(2/β)·logσ(−β(logπ_θ(y_f) − logπ_ref(y_f))), summed answer log-probs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.npo import npo_loss

L2 = math.log(2.0)  # logits [L2, 0, 0] -> p = (1/2, 1/4, 1/4)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_npo_hand_computed():
    # β = 1/2. ref: all uniform.
    # item 0, labels [-, 0, 1]: logπ_θ = log(1/2) + log(1/3) = −log 6; logπ_ref = −log 9
    #   log ratio = log(9/6) = log 1.5;  loss_0 = −(2/β)·logσ(−β·log 1.5) = 4·log(1 + 1.5^(1/2))
    # item 1, labels [-, 2, -]: θ uniform at t0 too -> log ratio 0; loss_1 = 4·log 2
    policy = torch.tensor([[[L2, 0, 0], [0, 0, 0], [0, 7, 0]],
                           [[0, 0, 0], [5, 0, 0], [0, 0, 5]]], requires_grad=True)
    ref = torch.zeros(2, 3, 3)
    batch = {"forget": stream([[-100, 0, 1], [-100, 2, -100]])}
    loss, logs = npo_loss({"forget": SimpleNamespace(logits=policy)},
                          {"forget": SimpleNamespace(logits=ref)}, batch, beta=0.5)
    expected = (4 * math.log(1 + math.sqrt(1.5)) + 4 * math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs == {"npo/log_ratio": pytest.approx(math.log(1.5) / 2, rel=1e-6)}
    # descent lowers the forget token's logit
    loss.backward()
    assert policy.grad[0, 0, 0].item() > 0


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_npo_at_reference_is_two_over_beta_log_two(beta):
    # θ = ref -> log ratio 0 -> −(2/β)·logσ(0) = (2/β)·log 2
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    batch = {"forget": stream([[-100, 1, 2, 3], [-100, -100, 4, -100]])}
    out = {"forget": SimpleNamespace(logits=logits)}
    loss, _ = npo_loss(out, out, batch, beta=beta)
    assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
