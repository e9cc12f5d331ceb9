"""build_optimizer / build_hessian_estimator from OptimConfig."""

import pytest
import torch

from ray_unlearn.config import OptimConfig
from ray_unlearn.errors import UnlearnError
from ray_unlearn.optim import OPTIMIZERS, HessianEstimator, SophiaG, build_hessian_estimator, build_optimizer


def _params():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    return list(model.parameters())


def _in_optimizer(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def test_registry_names():
    assert list(OPTIMIZERS) == ["adamw", "sophia", "influence"]


def test_adamw():
    params = _params()
    opt = build_optimizer(params, OptimConfig(name="adamw", lr=3e-4, weight_decay=0.01, betas=[0.8, 0.99]))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.8, 0.99), 0.01)
    assert _in_optimizer(opt) == [p for p in params if p.requires_grad]  # frozen weight left out
    assert build_hessian_estimator(OptimConfig(name="adamw")) is None


def test_sophia():
    params = _params()
    cfg = OptimConfig(name="sophia", lr=1e-5, rho=0.05, weight_decay=0.2, betas=[0.9, 0.95], soul_compat=True)
    opt = build_optimizer(params, cfg)
    assert isinstance(opt, SophiaG) and opt.soul_compat
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["rho"], group["weight_decay"]) == (1e-5, (0.9, 0.95), 0.05, 0.2)
    assert len(_in_optimizer(opt)) == 3


def test_param_groups_are_filtered():
    params = _params()
    opt = build_optimizer([{"params": params[:2], "weight_decay": 0.0}, {"params": params[2:]}],
                          OptimConfig(name="sophia"))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnlearnError, match="'sgd'.*adamw, sophia"):
        build_optimizer(_params(), OptimConfig(name="sgd"))
    with pytest.raises(UnlearnError, match="adamw, sophia"):
        build_hessian_estimator(OptimConfig(name="sgd"))


def test_no_trainable_params():
    frozen = [torch.nn.Parameter(torch.ones(2), requires_grad=False)]
    with pytest.raises(UnlearnError, match="requires grad"):
        build_optimizer(frozen, OptimConfig(name="adamw"))


def test_hessian_estimator_from_config():
    assert build_hessian_estimator(OptimConfig(hessian="gnb", hessian_interval=7, bs=0)) == HessianEstimator(
        "gnb", 7, 0.0)
    assert build_hessian_estimator(OptimConfig(hessian="hutchinson", bs=32)) == HessianEstimator(
        "hutchinson", 10, 32.0)
    # soul_compat: the SOUL code's empirical g*g every step with bs 5120, whatever else is set
    soul = build_hessian_estimator(OptimConfig(hessian="gnb", hessian_interval=7, bs=32, soul_compat=True))
    assert soul == HessianEstimator("empirical", 1, 5120.0)
    assert soul.due(3)
