"""ce_u = mean over forget answer positions (first answer token left out) of
CE(z, softmax(z.detach() with the true token at −inf))."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.ce_u import ce_u_loss, skip_first_answer_tokens

L2, L3 = math.log(2.0), math.log(3.0)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_skip_first_answer_tokens_by_hand():
    labels = torch.tensor([[-100, -100, 4, 5, 6], [-100, 7, 8, -100, -100]])
    assert skip_first_answer_tokens(labels, 1).tolist() == [[-100, -100, -100, 5, 6], [-100, -100, 8, -100, -100]]
    assert skip_first_answer_tokens(labels, 2).tolist() == [[-100, -100, -100, -100, 6], [-100] * 5]
    assert skip_first_answer_tokens(labels, 0).tolist() == labels.tolist()


# labels [-, 0, 1, 2]: answer tokens 0, 1, 2 predicted by logits at t0, t1, t2
#   t0 uniform, true 0: q = softmax([−inf, 0, 0]) = (0, 1/2, 1/2); log p = log(1/3) -> CE = log 3
#   t1 uniform, true 1: q = (1/2, 0, 1/2) -> CE = log 3
#   t2 [L2, 0, 0], true 2: q = softmax([L2, 0, −inf]) = (2/3, 1/3, 0); log p = (log 1/2, log 1/4, log 1/4)
#       CE = 2/3·log 2 + 1/3·log 4 = 4/3·log 2
#   t3 is past the answer (not scored)
LOGITS = [[[0, 0, 0], [0, 0, 0], [L2, 0, 0], [7, 7, 0]]]
BATCH = {"forget": stream([[-100, 0, 1, 2]])}


def test_ce_u_skips_the_first_answer_token():
    z = torch.tensor(LOGITS, requires_grad=True)
    loss, logs = ce_u_loss({"forget": SimpleNamespace(logits=z)}, None, BATCH, skip_first=1)
    assert loss.item() == pytest.approx((L3 + 4 / 3 * L2) / 2, rel=1e-6)
    assert logs == {}
    # dCE/dz = p − q (q a constant): at t1 the true token's logit gets (1/3 − 0)/2 = 1/6, pushing it down
    loss.backward()
    assert z.grad[0, 1].tolist() == pytest.approx([(1 / 3 - 1 / 2) / 2, 1 / 6, (1 / 3 - 1 / 2) / 2], rel=1e-6)
    assert z.grad[0, 0].abs().sum().item() == 0  # the skipped first answer token


def test_ce_u_without_skipping():
    z = torch.tensor(LOGITS)
    loss, _ = ce_u_loss({"forget": SimpleNamespace(logits=z)}, None, BATCH, skip_first=0)
    assert loss.item() == pytest.approx((L3 + L3 + 4 / 3 * L2) / 3, rel=1e-6)
