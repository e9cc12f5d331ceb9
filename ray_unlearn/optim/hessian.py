"""Diagonal Hessian estimators for Sophia: each returns (h_hat per trainable param, bs).

`bs` is the scale Sophia's step puts on h (rho*bs*h), so each estimator returns the scale that
makes rho*bs*h_hat an estimate of the diagonal Hessian (or Gauss-Newton matrix) of the loss:

- gnb (Sophia-G, Gauss-Newton-Bartlett): y_hat ~ softmax(f(x)) at the B scored token positions,
  g_hat = grad of (1/B) sum_b CE(f(x_b), y_hat_b);  h_hat = g_hat*g_hat, bs = B
  (so bs*h_hat = B*g_hat*g_hat, the paper's estimator; the reference passes bs = tokens per batch).
- hutchinson (Sophia-H): u ~ N(0, I), h_hat = u * (H u) by double backward; E[h_hat] = diag(H); bs = 1.
- empirical (the SOUL code): h_hat = g*g of the unlearning gradient itself, every step; bs = 5120
  (the default of SOUL's `step(bs=5120)`, which its HF Trainer never overrides).

No estimator writes `p.grad`: gnb and hutchinson use `torch.autograd.grad`. Pass the unwrapped
model (not a DDP wrapper); averaging the estimates across ranks is the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ray_unlearn.errors import UnlearnError
from ray_unlearn.logprobs import shifted

SOUL_BS = 5120.0  # SOUL's SophiaG.step default, used by its trainer
KINDS = ("gnb", "hutchinson", "empirical")


def _grads_or_zeros(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> list[Tensor]:
    """autograd.grad(..., allow_unused=True) output with None replaced by zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def gnb_estimate(model: torch.nn.Module, inputs: dict[str, Tensor]) -> tuple[list[Tensor], float]:
    """Gauss-Newton-Bartlett estimate on one batch: ([g_hat*g_hat per trainable param], B).

    logits = model(input_ids, attention_mask).logits; at the B scored positions (labels != -100,
    shifted by one as in `logprobs.shifted`) sample y_hat ~ softmax(logits) and take
    g_hat = grad_theta (1/B) sum_b CE(logits_b, y_hat_b) via torch.autograd.grad.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
    logits, _, mask = shifted(logits, inputs["labels"])
    scored = logits[mask].float()  # [B, V]
    if scored.shape[0] == 0:
        raise UnlearnError("gnb Hessian estimate: the forget batch has no scored (labels != -100) tokens; "
                           "check the forget data or use optim.hessian=empirical")
    with torch.no_grad():
        y_hat = torch.multinomial(torch.softmax(scored, dim=-1), num_samples=1).squeeze(1)  # [B]
    loss = F.cross_entropy(scored, y_hat)
    g_hat = _grads_or_zeros(torch.autograd.grad(loss, params, allow_unused=True), params)
    return [g * g for g in g_hat], float(scored.shape[0])


def hutchinson_estimate(params: list[Tensor], loss: Tensor) -> tuple[list[Tensor], float]:
    """Hutchinson estimate of diag(H) of `loss`: ([u * (H u) per param], 1.0), u ~ N(0, I).

    H u = grad_theta (grad_theta loss . u), by a double backward (create_graph=True), so `loss`'s
    graph must be twice differentiable: build it under `sdpa_kernel(SDPBackend.MATH)` when the model
    uses scaled_dot_product_attention (`HessianEstimator.estimate` does).
    """
    grads = _grads_or_zeros(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params)
    us = [torch.randn_like(p) for p in params]
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

    def estimate(self, model: torch.nn.Module, inputs: dict[str, Tensor],
                 loss_fn: Callable[[], Tensor]) -> tuple[list[Tensor], float]:
        """(estimates aligned with model's trainable params, bs = bs_override or the estimator's)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.kind == "gnb":
            ests, bs = gnb_estimate(model, inputs)
        elif self.kind == "hutchinson":
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
                loss = loss_fn()
            ests, bs = hutchinson_estimate(params, loss)
        else:
            ests, bs = empirical_estimate(params)
        return ests, float(self.bs_override or bs)
