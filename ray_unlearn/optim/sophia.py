"""SophiaG (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer"), as in the
authors' reference code (github.com/Liuhong99/Sophia, sophia.py), plus SOUL's variant.

Per parameter tensor, with g the gradient, m the momentum, h the diagonal Hessian EMA:

    update_hessian (every k steps):  h <- b2*h + (1-b2)*h_hat          (h_hat = g*g by default)
    step(bs):                         m <- b1*m + (1-b1)*g
                                      theta <- theta*(1 - lr*wd)
                                      theta <- theta - lr*sign(m)*min(|m| / (max(rho*bs*h, 0) + 1e-15), 1)

The max with 0 is the paper's max(gamma*h, eps) guard (Algorithm 3): Hutchinson's u*(Hu) can be negative,
and a negative h would otherwise make the ratio negative and unbounded (a step against the momentum of any
size). GNB's and the empirical h are never negative, so for them this is the reference code's rule exactly.
`bs` scales the Hessian: the reference feeds h_hat = g_hat*g_hat of a mean loss over B sampled
tokens and passes bs=B to step, so rho*bs*h is rho times the Gauss-Newton-Bartlett estimate
B*g_hat*g_hat. A coordinate is "clipped" when its ratio reaches 1 (it then moves by exactly lr);
`clip_rate` is the fraction of coordinates NOT clipped, which the authors log as `win_rate` and
keep near 0.1-0.5 by tuning rho.

SOUL (Jia et al. 2024, github.com/OPTML-Group/SOUL, src/optim/sophia.py): its `step()` calls
`update_hessian()` (h <- b2*h + (1-b2)*g*g with the unlearning gradient, every step) and then
`update_exp_avg()` (m <- b1*m + (1-b1)*g) before running the reference rule above, which folds g
into m a second time; the HF Trainer calls `step()` without bs, so bs = 5120. `soul_compat=True`
reproduces that: `update_hessian` also does m <- b1*m + (1-b1)*g, so with an update_hessian every
step (the empirical estimator) one step does

    h <- b2*h + (1-b2)*g*g ;  m <- b1^2*m + (1-b1^2)*g ;  theta as above with bs = 5120

i.e. the reference rule with an effective momentum b1^2 (0.81 for b1 = 0.9). The fixed bs and the
every-step empirical estimator come from `build_hessian_estimator` (see ray_unlearn.optim).
What this class does not reproduce: SOUL's `update_exp_avg` ignores `maximize` (here the fold
uses the same signed gradient as the step; SOUL never sets maximize), and SOUL's parameter groups
exempt biases and LayerNorm weights from weight decay (pass such groups to get the same).

Sharded parameters (FSDP2 DTensors) are updated shard by shard on each rank's local tensors (the
rule is elementwise), and `clip_rate` is counted over the whole model with one all-reduce.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ray_unlearn.parallel.base import dtensor_type, local_tensor

_EPS = 1e-15  # the reference's denominator guard


def _sophia_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, hessian: Tensor, *,
                    lr: float, beta1: float, rho: float, weight_decay: float, bs: float) -> Tensor:
    """`sophia_update` without the host sync: returns the not-clipped count as a 0-d tensor."""
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    param.mul_(1 - lr * weight_decay)
    ratio = (exp_avg.abs() / ((rho * bs * hessian).clamp_(min=0) + _EPS)).clamp(max=1)  # h < 0: a sign step
    param.addcmul_(exp_avg.sign(), ratio, value=-lr)
    return (ratio < 1).sum()


CHUNK = 1 << 22  # elements updated at once: bounds the update's temporaries (a ZeRO partition is one flat tensor)


def _chunks(tensors: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]]:
    """Matching flat slices of at most CHUNK elements of same-shaped contiguous tensors (else the tensors)."""
    n = tensors[0].numel()
    if n <= CHUNK or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [tuple(f[i:i + CHUNK] for f in flat) for i in range(0, n, CHUNK)]


def _fold_square_(h: Tensor, g: Tensor, beta2: float) -> None:
    """h <- b2*h + (1-b2)*(g*g) in place, squaring CHUNK elements at a time (bounded temporaries)."""
    for hc, gc in _chunks((h, g)):
        hc.mul_(beta2).add_(gc * gc, alpha=1 - beta2)


@torch.no_grad()
def sophia_update(param: Tensor, grad: Tensor, exp_avg: Tensor, hessian: Tensor, *,
                  lr: float, beta1: float, rho: float, weight_decay: float, bs: float) -> int:
    """One in-place SophiaG step on one tensor; returns how many coordinates were NOT clipped.

    param:   [*S]  updated in place
    grad:    [*S]  gradient g (already negated when maximizing)
    exp_avg: [*S]  momentum m, updated in place: m <- b1*m + (1-b1)*g
    hessian: [*S]  diagonal Hessian EMA h (read only)

    theta <- theta*(1 - lr*wd);  ratio = min(|m| / (max(rho*bs*h, 0) + 1e-15), 1);
    theta <- theta - lr*sign(m)*ratio.  Not clipped means ratio < 1.
    """
    return int(_sophia_update_(param, grad, exp_avg, hessian, lr=lr, beta1=beta1, rho=rho,
                               weight_decay=weight_decay, bs=bs))


class SophiaG(torch.optim.Optimizer):
    """SophiaG with the reference `update_hessian()` / `step(bs=...)` protocol (see module doc).

    Per-group hyperparameters: lr, betas=(b1, b2), rho, weight_decay, maximize.
    `soul_compat=True` makes `update_hessian` also fold the gradient into the momentum, as the
    SOUL code does (momentum updated twice per step). After each `step`, `clip_rate` holds the
    fraction of coordinates NOT clipped (ratio < 1); it is NaN before the first step.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), rho: float = 0.04,
                 weight_decay: float = 0.1, *, maximize: bool = False, soul_compat: bool = False):
        if not lr >= 0:
            raise ValueError(f"SophiaG: invalid lr {lr} (needs >= 0)")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"SophiaG: invalid betas {betas} (needs two values in [0, 1))")
        if not rho > 0:
            raise ValueError(f"SophiaG: invalid rho {rho} (needs > 0)")
        if not weight_decay >= 0:
            raise ValueError(f"SophiaG: invalid weight_decay {weight_decay} (needs >= 0)")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        self.soul_compat = soul_compat
        self.clip_rate = math.nan  # fraction of coordinates not clipped in the last step
        self.bs = 5120.0  # the Hessian scale of a step() called without bs (wrappers that own the step call it so)
        # sums clip_rate's counts over ranks when the params are plain tensors holding a partition of the
        # model (DeepSpeed ZeRO's flat partitions); DTensor shards are summed over their mesh without it
        self.sum_over_ranks: Callable[[Tensor], Tensor] | None = None

    def _state(self, p: Tensor) -> dict:
        """The state of `p`, created on first use: step count, momentum m and Hessian EMA h."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def init_state(self) -> None:
        """Create the state of every trainable param now, as a first step would (DeepSpeed ZeRO links its
        partitions to their optimizer state the first time it calls step)."""
        for p, _ in self._trainable():
            self._state(p)

    def _grad(self, p: Tensor, group: dict) -> Tensor:
        """g = p.grad, negated when the group maximizes."""
        return -p.grad if group["maximize"] else p.grad

    def _trainable(self) -> list[tuple[Tensor, dict]]:
        """(param, group) for every param of every group that requires grad, in order."""
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[Tensor] | None = None) -> None:
        """Fold a diagonal Hessian estimate into h: h <- b2*h + (1-b2)*h_hat.

        estimates=None is the reference protocol, h_hat = p.grad*p.grad for each param with a
        grad (squared CHUNK elements at a time: no copy of the gradients);
        otherwise `estimates` are aligned with the params (of all groups) that require grad, in
        order (a sharded param's estimate may be its local shard's). With soul_compat, also m <- b1*m + (1-b1)*g for each param with a grad.
        """
        pairs = self._trainable()
        if estimates is None:
            for p, group in pairs:
                if p.grad is not None:
                    _fold_square_(local_tensor(self._state(p)["hessian"]), local_tensor(p.grad), group["betas"][1])
                    self._fold_momentum(p, group)
            return
        if len(estimates) != len(pairs):
            raise ValueError(f"update_hessian: got {len(estimates)} estimates for {len(pairs)} trainable params")
        for (p, group), est in zip(pairs, estimates):
            if local_tensor(est).shape != local_tensor(p).shape:  # a sharded param's estimate: its shard's
                raise ValueError(f"update_hessian: estimate of shape {tuple(local_tensor(est).shape)} for a param "
                                 f"(part) of shape {tuple(local_tensor(p).shape)}")
            _, beta2 = group["betas"]
            local_tensor(self._state(p)["hessian"]).mul_(beta2).add_(local_tensor(est).to(p.dtype), alpha=1 - beta2)
            self._fold_momentum(p, group)

    def _fold_momentum(self, p: Tensor, group: dict) -> None:
        """soul_compat: m <- b1*m + (1-b1)*g when `p` has a grad (the SOUL code's second momentum fold)."""
        if self.soul_compat and p.grad is not None:
            beta1 = group["betas"][0]
            local_tensor(self._state(p)["exp_avg"]).mul_(beta1).add_(local_tensor(self._grad(p, group)), alpha=1 - beta1)

    @torch.no_grad()
    def fold_grad_squares(self) -> None:
        """h <- b2*h + (1-b2)*g*g from every trainable param's grad (g = 0 where there is none), in place,
        and nothing else: soul_compat's momentum fold is for the loss's gradient, and these are a
        Hessian estimator's (GNB's sampled-label gradient)."""
        for p, group in self._trainable():
            h = local_tensor(self._state(p)["hessian"])
            if p.grad is None:
                h.mul_(group["betas"][1])
            else:
                _fold_square_(h, local_tensor(p.grad), group["betas"][1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, bs: float | None = None):
        """One SophiaG step on every param with a grad (rule in `sophia_update`); sets clip_rate.
        bs=None uses `self.bs` (5120, SOUL's default, unless the caller set it)."""
        bs = self.bs if bs is None else bs
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kept, total, mesh = [], 0, None
        for group in self.param_groups:
            beta1, _ = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                mesh = getattr(p, "device_mesh", mesh)
                local = local_tensor(p)
                tensors = (local, local_tensor(self._grad(p, group)), local_tensor(state["exp_avg"]),
                           local_tensor(state["hessian"]))
                for param, grad, exp_avg, hessian in _chunks(tensors):
                    kept.append(_sophia_update_(param, grad, exp_avg, hessian, lr=group["lr"], beta1=beta1,
                                                rho=group["rho"], weight_decay=group["weight_decay"], bs=bs))
                total += local.numel()
        self._set_clip_rate(kept, total, mesh)
        return loss

    def _set_clip_rate(self, kept: list[Tensor], total: int, mesh) -> None:
        """clip_rate = not-clipped / all coordinates, summed over the shards of every rank (one host sync)."""
        if not kept:
            return
        counts = torch.stack([sum(k.to(kept[0].device) for k in kept).double(),
                              torch.tensor(float(total), dtype=torch.float64, device=kept[0].device)])
        if self.sum_over_ranks is not None:
            self.sum_over_ranks(counts)
        elif mesh is not None and dtensor_type() is not None:
            torch.distributed.all_reduce(counts, group=mesh.get_group())
        self.clip_rate = float(counts[0] / counts[1])
