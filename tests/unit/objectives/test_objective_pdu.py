"""pdu = γ·L_f + λ·(L_r − ε), L_f = mean over forget answer positions of (max_v z − mean_v z)²,
L_r = NLL(retain); λ <- max(0, λ + η·(L_r − ε)) after every step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.pdu import pdu_init_state, pdu_loss, pdu_update_state
from ray_unlearn.config import PDUSettings

L2 = math.log(2.0)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_pdu_hand_computed():
    # forget, labels [-, 1, 2, -]: scored t0 [3, 0, 0] -> (3 − 1)² = 4; t1 [0, 3, 3] -> (3 − 2)² = 1; L_f = 5/2
    #   (t2 and t3 are not scored and would add a lot)
    # retain, labels [-, 0]: t0 [L2, 0, 0] -> L_r = log 2
    # γ = 2, λ = 3, ε = 0.3 -> loss = 5 + 3·(log 2 − 0.3)
    forget = torch.tensor([[[3.0, 0, 0], [0, 3, 3], [90, 0, 0], [0, 0, 60]]], requires_grad=True)
    retain = torch.tensor([[[L2, 0, 0], [40, 0, 0]]], requires_grad=True)
    batch = {"forget": stream([[-100, 1, 2, -100]]), "retain": stream([[-100, 0]])}
    policy = {"forget": SimpleNamespace(logits=forget), "retain": SimpleNamespace(logits=retain)}
    state = {"lambda": torch.tensor(3.0, dtype=torch.float64)}
    loss, logs = pdu_loss(policy, None, batch, gamma=2.0, retain_eps=0.3, state=state)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(5 + 3 * (L2 - 0.3), rel=1e-6)
    assert logs == {"pdu/forget_loss": pytest.approx(2.5), "pdu/retain_loss": pytest.approx(L2, rel=1e-6),
                    "pdu/lambda": 3.0}
    loss.backward()
    # L_f at t0: d/dz of γ·(1/2)·(max − mean)² = γ·(1/2)·2·(max − mean)·(onehot(argmax) − 1/3)
    #   = 2·(1/2)·2·2·(2/3, −1/3, −1/3)
    assert forget.grad[0, 0].tolist() == pytest.approx([8 / 3, -4 / 3, -4 / 3], rel=1e-6)
    # λ scales the retain gradient: λ·(p − onehot(y)) = 3·(1/2 − 1, 1/4, 1/4)
    assert retain.grad[0, 0].tolist() == pytest.approx([-1.5, 0.75, 0.75], rel=1e-6)


def test_dual_update_by_hand():
    s = PDUSettings(dual_init=100.0, dual_step_size=5.0, retain_eps=0.3)
    lam = pdu_init_state(s, 8, 0)["lambda"]
    assert lam.dtype == torch.float64 and lam.item() == 100.0
    step = lambda lam, lr: pdu_update_state({"lambda": torch.tensor(lam, dtype=torch.float64)}, s,
                                            {"pdu/retain_loss": lr})["lambda"].item()
    assert step(3.0, 0.5) == pytest.approx(3.0 + 5 * 0.2)   # retain loss above ε: λ grows
    assert step(3.0, 0.1) == pytest.approx(3.0 - 5 * 0.2)   # below ε: λ shrinks
    assert step(0.5, 0.1) == 0.0                            # ... but never below 0
