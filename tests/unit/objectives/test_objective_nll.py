"""nll = NLL(train), token-mean over the train stream's answer tokens (fine-tuning, not unlearning)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.nll import nll_loss

L2 = math.log(2.0)  # logits [L2, 0, 0] -> p = (1/2, 1/4, 1/4)


def stream(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    labels_t = torch.tensor(labels)
    return {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t), "labels": labels_t}


def test_nll_hand_computed_over_the_train_stream_only():
    # item 0, labels [-, 0, 2]: t0 [L2,0,0] -> p(0) = 1/2; t1 uniform -> p(2) = 1/3
    # item 1, labels [-, -, 1]: t1 [0, L2, 0] -> p(1) = 1/2
    # token mean over the 3 answer tokens: (log 2 + log 3 + log 2) / 3
    logits = torch.tensor([[[L2, 0, 0], [0, 0, 0], [5, 5, 5]],
                           [[0, 0, 0], [0, L2, 0], [5, 0, 0]]], requires_grad=True)
    forget = torch.zeros(2, 3, 3, requires_grad=True)  # another stream: never read
    batch = {"train": stream([[-100, 0, 2], [-100, -100, 1]]), "forget": stream([[-100, 1, 1], [-100, 1, 1]])}
    loss, logs = nll_loss({"train": SimpleNamespace(logits=logits), "forget": SimpleNamespace(logits=forget)},
                          None, batch)
    assert loss.item() == pytest.approx((2 * math.log(2) + math.log(3)) / 3, rel=1e-6)
    assert logs == {}
    # dNLL/dz_label = −(1 − p)/N: item 1's label at t1 has p = 1/2, N = 3 answer tokens
    loss.backward()
    assert logits.grad[1, 1, 1].item() == pytest.approx(-(1 - 0.5) / 3, rel=1e-5)
    assert forget.grad is None
