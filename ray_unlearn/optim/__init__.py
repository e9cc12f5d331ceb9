"""Optimizers (AdamW, Sophia/SOUL) and Sophia's Hessian estimators, built from `OptimConfig`.

The loop, per optimizer step: backward of the unlearning loss, grad clipping, then
`if est and est.due(step): ests, bs = est.estimate(module, forget_inputs, loss_fn);
opt.update_hessian(ests)`, then `opt.step(bs=bs)` (Sophia) or `opt.step()` (AdamW).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ray_unlearn.config import OptimConfig
from ray_unlearn.errors import UnlearnError
from ray_unlearn.optim.hessian import (SOUL_BS, HessianEstimator, empirical_estimate, gnb_estimate,
                                       hutchinson_estimate)
from ray_unlearn.optim.influence import InfluenceStep
from ray_unlearn.optim.sophia import SophiaG, sophia_update

__all__ = ["OPTIMIZERS", "SOUL_BS", "HessianEstimator", "InfluenceStep", "SophiaG", "build_hessian_estimator", "build_optimizer",
           "empirical_estimate", "gnb_estimate", "hutchinson_estimate", "sophia_update"]


def _adamw(params: list, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW(lr, betas, weight_decay) from the config."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _sophia(params: list, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SophiaG(lr, betas, rho, weight_decay, soul_compat) from the config."""
    return SophiaG(params, lr=cfg.lr, betas=tuple(cfg.betas), rho=cfg.rho, weight_decay=cfg.weight_decay,
                   soul_compat=cfg.soul_compat)


def _influence(params: list, cfg: OptimConfig) -> torch.optim.Optimizer:
    """InfluenceStep(lr = eta, damping = lambda) from the config (the loop folds the retain Fisher in first)."""
    return InfluenceStep(params, lr=cfg.lr, damping=cfg.damping)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "sophia": _sophia,
                                                               "influence": _influence}


def _trainable(params: Iterable[Any]) -> list:
    """Keep only params with requires_grad; param-group dicts are filtered group by group."""
    out = []
    for item in params:
        if isinstance(item, dict):
            kept = [p for p in item["params"] if p.requires_grad]
            if kept:
                out.append({**item, "params": kept})
        elif item.requires_grad:
            out.append(item)
    return out


def build_optimizer(params: Iterable[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    """`cfg.name`'s optimizer over the params that require grad (params or param-group dicts)."""
    if cfg.name not in OPTIMIZERS:
        raise UnlearnError(f"optim.name: unknown optimizer {cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
    trainable = _trainable(params)
    if not trainable:
        raise UnlearnError("optimizer: no parameter requires grad; unfreeze some parameters of the model")
    return OPTIMIZERS[cfg.name](trainable, cfg)


def build_hessian_estimator(cfg: OptimConfig) -> HessianEstimator | None:
    """Sophia's Hessian estimator from the config; None for first-order optimizers.

    soul_compat reproduces the SOUL code: the empirical g*g estimate every step with bs = 5120,
    whatever optim.hessian / hessian_interval / bs say. Otherwise bs = optim.bs or the estimator's.
    """
    if cfg.name not in OPTIMIZERS:
        raise UnlearnError(f"optim.name: unknown optimizer {cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.name != "sophia":
        return None
    if cfg.soul_compat:
        return HessianEstimator(kind="empirical", interval=1, bs_override=SOUL_BS)
    return HessianEstimator(kind=cfg.hessian, interval=cfg.hessian_interval, bs_override=float(cfg.bs))
