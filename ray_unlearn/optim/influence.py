"""Influence unlearning: the one-shot Newton step that SOUL generalizes into an iterative process.

    theta <- theta + eta * (F + lambda*I)^-1 * grad NLL(forget)

with F the diagonal empirical Fisher of the retain loss and lambda a damping. Written as an optimizer
so that it runs in the same loop, under every strategy, as Sophia and AdamW do: the loop first folds
the Fisher in (`fold_grad_squares`, once per retain batch, over the whole retain split), then each
`step` is a Fisher-preconditioned descent step on the unlearning objective, so with `ga`
(loss = -NLL(forget)) the step is the influence update above. One step over the whole forget set
(train.max_steps=1, train.global_batch_size = the forget items) is the classic one-shot form; more
steps iterate it with the Fisher held fixed.

The Fisher is estimated from global-batch gradients: F = mean over the retain batches k of
B * g_k * g_k, where g_k is the gradient of the token-mean retain NLL over the B items of batch k
(every rank, every micro-batch, reduced like a training gradient). With one item per batch that is
the per-item empirical Fisher; for larger batches it estimates it where the retain loss is near a
minimum (E[B*g_k*g_k] = F + (B-1)*E[g]^2 for independent items), the same scaling as Sophia's GNB estimate, and it does not
depend on how the batch is split over workers. The rule is elementwise, so under FSDP2 and ZeRO each
rank updates its own shard or partition.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ray_unlearn.parallel.base import local_tensor


class InfluenceStep(torch.optim.Optimizer):
    """theta <- theta - lr * g / (F + damping) per coordinate, F folded in by `fold_grad_squares`.

    `fold_weight` scales each fold (the loop sets it to B / K, so the folds sum to the mean of
    B * g_k^2 over the K retain batches of B items).
    """

    def __init__(self, params, lr: float = 1e-5, damping: float = 1e-4):
        if not lr > 0:
            raise ValueError(f"InfluenceStep: invalid lr {lr} (needs > 0)")
        if not damping > 0:
            raise ValueError(f"InfluenceStep: invalid damping {damping} (needs > 0)")
        super().__init__(params, dict(lr=lr, damping=damping))
        self.fold_weight = 1.0

    def _fisher(self, p: Tensor) -> Tensor:
        """The diagonal Fisher of `p` (zeros on first use), its rank-local part."""
        state = self.state[p]
        if not state:
            state["fisher"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return local_tensor(state["fisher"])

    @torch.no_grad()
    def fold_grad_squares(self) -> None:
        """F <- F + fold_weight * g*g from every param's grad (the reduced gradient of one retain batch)."""
        for group in self.param_groups:
            for p in group["params"]:
                fisher = self._fisher(p)
                if p.grad is not None:
                    g = local_tensor(p.grad)
                    fisher.addcmul_(g, g, value=self.fold_weight)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One Fisher-preconditioned step on every param with a grad: theta -= lr * g / (F + damping)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    local_tensor(p).addcdiv_(local_tensor(p.grad), self._fisher(p) + group["damping"],
                                             value=-group["lr"])
        return loss
