"""rmu = act(h_ℓ(forget), c·u) + α·act(h_ℓ(retain), h_ℓ^ref(retain)); act = mean over items of the
mean over the item's answer tokens of mean_d (a − b)²."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.objectives.rmu import activation_loss, rmu_init_state, rmu_loss


def labels_only(labels: list[list[int]]) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor(labels)}


def test_activation_loss_by_hand():
    # answer positions are the set labels themselves (not shifted): item 0 -> t1, t2; item 1 -> t2
    a = torch.tensor([[[9.0, 9.0], [1.0, 1.0], [2.0, 0.0]],
                      [[0.0, 0.0], [5.0, 5.0], [3.0, 1.0]]])
    b = torch.zeros(2, 3, 2)
    # item 0: t1 (1 + 1)/2 = 1, t2 (4 + 0)/2 = 2 -> 3/2; item 1: t2 (9 + 1)/2 = 5 -> loss (3/2 + 5)/2
    assert activation_loss(a, b, torch.tensor([[-100, 4, 5], [-100, -100, 6]])).item() == pytest.approx(3.25)


def test_rmu_hand_computed():
    # u = (0.6, 0.8), c = 2 -> target (1.2, 1.6), layer 3
    # forget item 0 (answer t1, t2): t1 on target -> 0; t2 (2.2, 1.6) -> (1 + 0)/2 = 0.5 -> item 0.25
    # forget item 1 (answer t2): (1.2, 0.6) -> (0 + 1)/2 = 0.5 -> item 0.5;  forget = 0.375
    # retain item (answer t1, t2) vs ref: t1 diff (2, 0) -> 2, t2 equal -> 0 -> retain = 1
    # α = 0.5 -> loss = 0.375 + 0.5
    forget_h = torch.tensor([[[7.0, 7.0], [1.2, 1.6], [2.2, 1.6]],
                             [[0.0, 0.0], [9.0, 9.0], [1.2, 0.6]]], requires_grad=True)
    retain_h = torch.tensor([[[5.0, 5.0], [3.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    retain_ref = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])
    policy = {"forget": SimpleNamespace(hidden={3: forget_h}), "retain": SimpleNamespace(hidden={3: retain_h})}
    ref = {"retain": SimpleNamespace(hidden={3: retain_ref})}
    batch = {"forget": labels_only([[-100, 4, 5], [-100, -100, 6]]), "retain": labels_only([[-100, 1, 2]])}
    loss, logs = rmu_loss(policy, ref, batch, layer=3, steering_coeff=2.0, retain_weight=0.5,
                          state={"u": torch.tensor([0.6, 0.8])})
    assert loss.item() == pytest.approx(0.875, rel=1e-6)
    assert logs == {"rmu/forget_act": pytest.approx(0.375), "rmu/retain_act": pytest.approx(1.0)}
    # d/da of (1/B)·(1/n_i)·mean_d (a − b)² = (1/B)·(1/n_i)·(2/d)·(a − b): forget item 0 t2 -> (1/2)(1/2)(1)(1, 0)
    loss.backward()
    assert forget_h.grad[0, 2].tolist() == pytest.approx([0.25, 0.0])
    assert forget_h.grad[0, 0].abs().sum().item() == 0  # prompt position


def test_rmu_state_is_a_seeded_unit_vector_in_the_positive_orthant():
    a, b, other = rmu_init_state(None, 16, 3)["u"], rmu_init_state(None, 16, 3)["u"], rmu_init_state(None, 16, 4)["u"]
    assert a.shape == (16,) and torch.equal(a, b) and not torch.equal(a, other)
    assert a.norm().item() == pytest.approx(1.0, rel=1e-6)
    assert (a >= 0).all()
    # U[0,1)^d normalised: for d = 16 every entry is well below 1 and the vector is far from an axis
    assert a.max().item() < 0.6
