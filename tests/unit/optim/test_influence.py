"""Influence unlearning's step on a quadratic whose Fisher is known by hand."""

from __future__ import annotations

import pytest
import torch

from ray_unlearn.config import OptimConfig
from ray_unlearn.optim import InfluenceStep, build_optimizer


def _per_item_grad(w: torch.nn.Parameter, x: list[float], y: float) -> None:
    """p.grad = grad of 0.5 * (w.x - y)^2 (one item's squared error)."""
    w.grad = None
    (0.5 * (w @ torch.tensor(x) - y) ** 2).backward()


def test_one_step_is_theta_plus_eta_times_the_damped_inverse_fisher_times_the_forget_gradient():
    """w = (1, 2). Retain items (x, y): ((1, 0), 0), ((0, 1), 1), ((1, 1), 1) have residuals 1, 1, 2, so their
    gradients are (1, 0), (0, 1), (2, 2) and the diagonal empirical Fisher is F = mean g*g = (5/3, 5/3).
    Forget item ((1, -1), 0): residual -1, grad NLL = (-1, 1). With eta = 0.1, lambda = 1/3 (F + lambda = 2):
    theta + eta * (F + lambda)^-1 * grad = (1, 2) + 0.05 * (-1, 1) = (0.95, 2.05)."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = InfluenceStep([w], lr=0.1, damping=1 / 3)
    retain = [([1.0, 0.0], 0.0), ([0.0, 1.0], 1.0), ([1.0, 1.0], 1.0)]
    opt.fold_weight = 1 / len(retain)  # batches of one item: B / K
    for x, y in retain:
        _per_item_grad(w, x, y)
        opt.fold_grad_squares()
    torch.testing.assert_close(opt.state[w]["fisher"], torch.tensor([5 / 3, 5 / 3]))
    _per_item_grad(w, [1.0, -1.0], 0.0)
    w.grad.neg_()  # the objective is ga = -NLL(forget): its gradient is -grad NLL
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.95, 2.05]))


def test_coordinates_without_a_gradient_do_not_move():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = InfluenceStep([a, b], lr=1.0, damping=1.0)
    a.grad = torch.tensor([1.0, -2.0])
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([0.0, 3.0]))  # F = 0: the step is -lr * g / damping
    assert torch.equal(b.detach(), torch.ones(2))


def test_built_from_the_config_with_eta_and_lambda():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(name="influence", lr=0.5, damping=0.25))
    assert isinstance(opt, InfluenceStep) and opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["damping"] == 0.25


def test_bad_damping_is_refused():
    from ray_unlearn.errors import UnlearnError

    with pytest.raises(UnlearnError, match=r"^optim.damping: must be > 0"):
        OptimConfig(name="influence", damping=0.0)
