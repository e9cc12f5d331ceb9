"""Diagonal Hessian estimators for Sophia: each returns (h_hat per trainable param, bs).

`bs` is the scale Sophia's step puts on h (rho*bs*h), so each estimator returns the scale that
makes rho*bs*h_hat an estimate of the diagonal Hessian (or Gauss-Newton matrix) of the loss:

- gnb (Sophia-G, Gauss-Newton-Bartlett): y_hat ~ softmax(f(x)) at the B scored token positions,
  g_hat = grad of (1/B) sum_b CE(f(x_b), y_hat_b);  h_hat = g_hat*g_hat, bs = B
  (so bs*h_hat = B*g_hat*g_hat, the paper's estimator; the reference passes bs = tokens per batch).
- hutchinson (Sophia-H): u ~ N(0, I), h_hat = u * (H u); E[h_hat] = diag(H); bs = 1. H u by a double
  backward (exact; every parameter whole on each rank: ddp or a world of one), or by a central difference
  of two gradients, (g(theta + eps*u) - g(theta - eps*u)) / (2*eps), taken through the wrapped model and
  reduced like a training gradient: any strategy, sharded ones included (`optim.hvp`).
- empirical (the SOUL code): h_hat = g*g of the unlearning gradient itself, every step; bs = 5120
  (the default of SOUL's `step(bs=5120)`, which its HF Trainer never overrides).

The loop uses the global-batch forms (DESIGN.md §10): `gnb_backward` (+ the strategy's fold) and
`global_hutchinson_estimate` estimate over every micro-batch of every rank of one optimizer step,
reduced like a training gradient, so the estimate is the same for any split of the global batch
into workers x accumulation steps. GNB's sampled labels are keyed by (seed, step, item index) and
Hutchinson's probes by (seed, step), never by rank. `gnb_estimate` and `hutchinson_estimate` are
the one-batch building blocks (no `p.grad` written: they use `torch.autograd.grad`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ray_unlearn.errors import UnlearnError
from ray_unlearn.logprobs import IGNORE_INDEX, shifted
from ray_unlearn.parallel.base import local_part, local_tensor

SOUL_BS = 5120.0  # SOUL's SophiaG.step default, used by its trainer
KINDS = ("gnb", "hutchinson", "empirical")


def _grads_or_zeros(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> list[Tensor]:
    """autograd.grad(..., allow_unused=True) output with None replaced by zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def sample_gnb_labels(logits: Tensor, labels: Tensor, keys: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """(scored logits [N, V] in fp32, labels y_hat [N] sampled from softmax of them) at the N scored
    positions (labels != -100, shifted by one). With `keys`, item b's samples come from a generator
    seeded by keys[b] (any partition of a batch draws the same labels); else from the global RNG.
    """
    logits, _, mask = shifted(logits, labels)
    if keys is None:
        scored = logits[mask].float()
        with torch.no_grad():
            return scored, torch.multinomial(torch.softmax(scored, dim=-1), num_samples=1).squeeze(1)
    rows, ys = [], []
    for b, key in enumerate(keys):
        scored = logits[b][mask[b]].float()  # [n_b, V]
        gen = torch.Generator(device=scored.device).manual_seed(int(key))
        with torch.no_grad():
            ys.append(torch.multinomial(torch.softmax(scored, dim=-1), num_samples=1, generator=gen).squeeze(1)
                      if scored.shape[0] else torch.zeros(0, dtype=torch.long, device=scored.device))
        rows.append(scored)
    return torch.cat(rows), torch.cat(ys)


def gnb_estimate(model: torch.nn.Module, inputs: dict[str, Tensor]) -> tuple[list[Tensor], float]:
    """Gauss-Newton-Bartlett estimate on one batch: ([g_hat*g_hat per trainable param], B).

    logits = model(input_ids, attention_mask).logits; at the B scored positions (labels != -100,
    shifted by one as in `logprobs.shifted`) sample y_hat ~ softmax(logits) and take
    g_hat = grad_theta (1/B) sum_b CE(logits_b, y_hat_b) via torch.autograd.grad.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
    scored, y_hat = sample_gnb_labels(logits, inputs["labels"])
    if scored.shape[0] == 0:
        raise UnlearnError("gnb Hessian estimate: the forget batch has no scored (labels != -100) tokens; "
                           "check the forget data or use optim.hessian=empirical")
    loss = F.cross_entropy(scored, y_hat)
    g_hat = _grads_or_zeros(torch.autograd.grad(loss, params, allow_unused=True), params)
    return [g * g for g in g_hat], float(scored.shape[0])


def hutchinson_estimate(params: list[Tensor], loss: Tensor,
                        probes: list[Tensor] | None = None) -> tuple[list[Tensor], float]:
    """Hutchinson estimate of diag(H) of `loss`: ([u * (H u) per param], 1.0), u ~ N(0, I)
    (drawn from the global RNG, or the given `probes`).

    H u = grad_theta (grad_theta loss . u), by a double backward (create_graph=True), so `loss`'s
    graph must be twice differentiable: build it under `sdpa_kernel(SDPBackend.MATH)` when the model
    uses scaled_dot_product_attention (`HessianEstimator.estimate` does).
    """
    grads = _grads_or_zeros(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params)
    us = probes if probes is not None else [torch.randn_like(p) for p in params]
    live = [i for i, g in enumerate(grads) if g.requires_grad]  # a grad free of theta has H = 0
    hu = [torch.zeros_like(p) for p in params]
    if live:
        out = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[us[i] for i in live],
                                  allow_unused=True)
        hu = _grads_or_zeros(out, params)
    return [(u * h).detach() for u, h in zip(us, hu)], 1.0


def empirical_estimate(params: list[Tensor]) -> tuple[list[Tensor], float]:
    """The SOUL code's estimate: ([p.grad * p.grad per param], 5120.0); zeros where grad is None."""
    return [torch.zeros_like(p) if p.grad is None else p.grad * p.grad for p in params], SOUL_BS


@dataclass
class HessianEstimator:
    """When and how the loop refreshes Sophia's Hessian.

    kind: gnb | hutchinson | empirical; interval: every k optimizer steps (empirical: every step);
    bs_override: the bs passed to Sophia's step, 0 = the estimator's own scale.
    """

    kind: str
    interval: int = 10
    bs_override: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnlearnError(f"optim.hessian: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.interval < 1:
            raise UnlearnError(f"optim.hessian_interval: must be >= 1, got {self.interval}")

    def due(self, step: int) -> bool:
        """Whether to estimate before optimizer step `step` (steps already taken): step % k == 0.

        The first step (0) always gets an estimate, so Sophia never starts from h = 0.
        """
        return self.kind == "empirical" or step % self.interval == 0


def token_mean_backward(model: torch.nn.Module, batches: Sequence[dict[str, Tensor]], strategy: Any,
                        targets: Callable[[int, Tensor, dict[str, Tensor]], tuple[Tensor, Tensor]]) -> float:
    """Backward of the token-mean cross-entropy over a global batch; returns B, the scored tokens of every rank.

    `batches` are this rank's micro-batches; targets(i, logits, batch) -> (scored logits [N, V], labels [N]) of
    micro-batch i. Backward goes through the wrapped `model`, so the strategy reduces the gradient like a
    training gradient (all-reduce for ddp, reduce-scatter into shards for fsdp2, into the partitions of the
    ZeRO optimizer for deepspeed): it is the gradient of (1/B) * sum of CE over the B tokens of all ranks,
    for any split of the batch into workers x micro-batches. The gradients must be clear on entry.
    """
    local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    total = float(strategy.all_reduce_sum_(torch.tensor([float(local)], device=batches[0]["labels"].device)))
    if total == 0:
        return 0.0
    scale = strategy.grad_average_factor / total  # the reduction averages over ranks; undo it
    for i, batch in enumerate(batches):
        with strategy.accumulate(model, sync=i == len(batches) - 1):
            logits = strategy.forward(model, batch["input_ids"], batch["attention_mask"])
            scored, y = targets(i, logits, batch)
            strategy.backward(model, F.cross_entropy(scored, y, reduction="sum") * scale)
    return total


def gnb_backward(model: torch.nn.Module, batches: Sequence[dict[str, Tensor]], keys: Sequence[Sequence[int]],
                 strategy: Any) -> float:
    """The backward passes of GNB over a global batch; returns B, the scored tokens of every rank.

    Leaves g_hat = grad (1/B) sum CE(f(x), y_hat) over the B scored tokens of all `batches` (this rank's
    micro-batches), reduced like a training gradient (`token_mean_backward`); `strategy.fold_grad_squares`
    then folds g_hat*g_hat into Sophia's h. keys[i][b] seeds item b of batch i's labels.
    """
    total = token_mean_backward(model, batches, strategy,
                                lambda i, logits, batch: sample_gnb_labels(logits, batch["labels"], keys[i]))
    if total == 0:
        raise UnlearnError("gnb Hessian estimate: the forget batch has no scored (labels != -100) tokens; "
                           "check the forget data or use optim.hessian=empirical")
    return total


def nll_backward(model: torch.nn.Module, batches: Sequence[dict[str, Tensor]], strategy: Any) -> float:
    """Backward of the token-mean NLL of the true labels over a global batch (influence unlearning's retain
    Fisher folds its square); returns the scored tokens of every rank."""

    def true_labels(i: int, logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits, targets, mask = shifted(logits, batch["labels"])
        return logits[mask].float(), targets[mask]

    return token_mean_backward(model, batches, strategy, true_labels)


def global_gnb_estimate(model: torch.nn.Module, params: list[Tensor], batches: Sequence[dict[str, Tensor]],
                        keys: Sequence[Sequence[int]], strategy: Any) -> tuple[list[Tensor], float]:
    """GNB over a global batch: ([g_hat*g_hat per param], B), for strategies whose reduced gradients
    land in `p.grad` of `params` (ddp, fsdp2): `gnb_backward`, then the squares. `p.grad` must be None
    on entry and is None again on return."""
    total = gnb_backward(model, batches, keys, strategy)
    estimates = [torch.zeros_like(p) if p.grad is None else p.grad * p.grad for p in params]
    for p in params:
        p.grad = None
    return estimates, total


def whole_probes(params: list[Tensor], probe_seed: int,
                 shapes: Sequence[torch.Size] | None = None) -> Iterator[Tensor]:
    """Hutchinson's u ~ N(0, I): one whole tensor per parameter (of `shapes`, default the parameters' own), in
    order, one at a time, from a generator seeded by `probe_seed`: the same on every rank and strategy."""
    device = local_tensor(params[0]).device
    gen = torch.Generator(device=device).manual_seed(int(probe_seed))
    for p, shape in zip(params, shapes or [p.shape for p in params]):
        yield torch.randn(shape, generator=gen, device=device, dtype=p.dtype)


def probe_vectors(params: list[Tensor], probe_seed: int) -> list[Tensor]:
    """`whole_probes`, each cut to this rank's part of its parameter (`local_part`: a DTensor's shard)."""
    return [local_part(p, u) for p, u in zip(params, whole_probes(params, probe_seed))]


def global_hutchinson_estimate(params: list[Tensor], loss_fns: Sequence[Callable[[], Tensor]], probe_seed: int,
                               strategy: Any) -> tuple[list[Tensor], float]:
    """Hutchinson over a global batch: ([u * (H u) per param], 1.0) for the mean loss of all micro-batches
    on every rank, H u by a double backward. u comes from `probe_vectors`; each loss_fns[i]() is micro-batch
    i's loss on the unwrapped model (full parameters: ddp only). u*(Hu) is linear in H, so the
    per-micro-batch estimates are averaged, then averaged over ranks.
    """
    probes = probe_vectors(params, probe_seed)
    total = [torch.zeros_like(p) for p in params]
    for loss_fn in loss_fns:
        # the fused attention kernels have no double backward; the backward passes stay inside too, so that
        # activation checkpointing recomputes the forward with the same kernel
        with sdpa_kernel(SDPBackend.MATH):
            estimates, _ = hutchinson_estimate(params, loss_fn(), probes)
        for t, e in zip(total, estimates):
            t.add_(e, alpha=1 / len(loss_fns))
    strategy.all_reduce_mean_(total)
    return total, 1.0


def global_hutchinson_difference(model: torch.nn.Module, params: list[Tensor], batches: Sequence[Any],
                                 loss_fn: Callable[[torch.nn.Module, Any], Tensor], probe_seed: int, eps: float,
                                 strategy: Any) -> tuple[list[Tensor], float]:
    """Hutchinson over a global batch with H u as a central difference: ([u * (g+ - g-) / (2 eps) per param,
    this rank's part], 1.0), g+- the gradient at theta +- eps*u of the mean of loss_fn(model, batch) over the
    micro-batches of every rank, taken through the wrapped `model` (so it runs under any strategy whose reduced
    gradients land in `p.grad`: shards are perturbed and read in place).

    Each micro-batch's difference is formed before any reduction: its gradient at theta + eps*u accumulates
    unsynced, the negated one at theta - eps*u joins it (the two are close, so the subtraction is exact),
    and only then is the difference reduced and summed over micro-batches. Summing g+ and g- separately would
    put the reductions' rounding, which depends on the worker count, into the difference amplified 1/(2 eps)
    times. Against the double backward's exact H u the error is O(eps^2) from curvature plus O(float32 eps / eps)
    from rounding: about 4e-5 of |u*(Hu)| at eps = 1e-4 on the benchmark models (a probe's own noise is O(1)).
    The parameters are restored bit for bit; `p.grad` must be None on entry and is None again on return.
    """
    probes = probe_vectors(params, probe_seed)
    saved = [local_tensor(p).detach().clone() for p in params]
    total = [torch.zeros_like(s) for s in saved]

    def move(sign: float) -> None:
        with torch.no_grad():
            for p, s, u in zip(params, saved, probes):
                local_tensor(p).copy_(s).add_(u, alpha=sign * eps)

    try:
        for batch in batches:
            for sign in (1.0, -1.0):
                move(sign)
                with strategy.accumulate(model, sync=sign < 0):
                    strategy.backward(model, loss_fn(model, batch) * (sign / len(batches)))
            for t, p in zip(total, params):
                if p.grad is not None:
                    t.add_(local_tensor(p.grad))
                p.grad = None
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                local_tensor(p).copy_(s)
    return [u * t.div_(2 * eps) for u, t in zip(probes, total)], 1.0
