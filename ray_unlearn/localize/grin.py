"""GRIN (Anjarlekar & Pombra, 2025): find the entries that carry the forget set, perturb them, train only them.

1. Importance, per trained entry: GRI = |mean forget gradient| / (|mean retain gradient| + eps), the mean
   gradients of the token-mean NLL over global batches covering each split (reduced over every worker
   like a training gradient, so they do not depend on the worker count).
2. Selection: the top `fraction` of GRI over the whole model (global) or within each tensor (per_tensor).
   The threshold is found exactly by bisection on the float32 bit patterns of the scores (non-negative
   floats order like their bits) with counts summed over ranks, so sharded scores need no gather and
   every rank ends with the same threshold.
3. Noise, once: selected entries += noise * std(tensor) * z, z ~ N(0, 1) drawn for the whole tensor from a
   generator seeded by (seed, tensor name), each rank keeping its shard's part: the same at every scale.
4. Fine-tuning with any objective and optimizer in which unselected entries do not move at all: their
   gradients are zeroed before clipping (so the norm, momentum and Hessian estimates see only the
   selected entries) and, after every optimizer step, they are set back to their values before the run
   (weight decay and any optimizer rule that moves a zero-gradient entry are undone bit for bit).

Choices the paper leaves open (DESIGN.md §6) and ours: |mean gradient| over the set (not the mean of
|per-sample gradients|), eps = 1e-8, p = 0.01 global, noise std 0.01 x the tensor's std, mask kept for the
whole fine-tune. Pure PyTorch: the reductions come in as a callable.
"""

from __future__ import annotations

import re
import zlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from ray_unlearn.errors import UnlearnError
from ray_unlearn.parallel.base import local_part, local_tensor

LOCALIZE_FILE = "localize.safetensors"  # in a checkpoint: the selection mask of each trained tensor (uint8)
INF_BITS = 0x7F800000  # float32 +inf as int32: the largest bit pattern a non-negative score can have

SumFn = Callable[[Tensor], Tensor]


def gradient_ratio(g_forget: Tensor, g_retain: Tensor, eps: float, inplace: bool = False) -> Tensor:
    """GRI = |g_forget| / (|g_retain| + eps), elementwise, in float32; `inplace` writes it into both float32
    inputs' memory (g_forget holds the result, g_retain |g_retain| + eps) instead of two new tensors."""
    if inplace and g_forget.dtype == g_retain.dtype == torch.float32:
        return g_forget.abs_().div_(g_retain.abs_().add_(eps))
    return g_forget.float().abs().div_(g_retain.float().abs().add_(eps))


def top_fraction(scores: Sequence[Tensor], sizes: Sequence[int], fraction: float, per_tensor: bool,
                 all_reduce_sum_: SumFn = lambda t: t) -> list[Tensor]:
    """Boolean masks of the entries whose score is among the top `fraction` (k = max(1, round(fraction * n))
    of the n entries of the model, or of each tensor when `per_tensor`); ties at the threshold are all kept,
    so a group may select a few more than k.

    `scores` are this rank's parts of tensors of `sizes` entries in all; `all_reduce_sum_` sums a count
    vector over the ranks holding the other parts (identity when each rank holds whole tensors). Every rank
    must call it with its parts of the same tensors."""
    bits = [s.float().contiguous().view(torch.int32) for s in scores]
    for s, b in zip(scores, bits):
        if bool(((b < 0) | (b > INF_BITS)).any()):
            raise UnlearnError("localize: an importance score is negative or NaN (a non-finite gradient on the forget "
                               "or retain data); check the data or the model's weights")
    groups = list(range(len(bits))) if per_tensor else [0] * len(bits)
    n_groups = len(bits) if per_tensor else 1
    totals = [0] * n_groups
    for g, n in zip(groups, sizes):
        totals[g] += int(n)
    k = [max(1, round(fraction * n)) for n in totals]
    lo, hi = [0] * n_groups, [INF_BITS + 1] * n_groups  # count(bits >= lo) >= k; count(bits >= hi) < k
    device = bits[0].device if bits else torch.device("cpu")
    while any(h - low > 1 for low, h in zip(lo, hi)):  # the same iterations on every rank: counts are summed
        mid = [(low + h) // 2 for low, h in zip(lo, hi)]
        counts = torch.zeros(n_groups, dtype=torch.int64, device=device)
        for g, b in zip(groups, bits):
            counts[g] += (b >= mid[g]).sum()
        counts = all_reduce_sum_(counts).tolist()
        for g in range(n_groups):
            if counts[g] >= k[g]:
                lo[g] = mid[g]
            else:
                hi[g] = mid[g]
    return [b >= lo[g] for g, b in zip(groups, bits)]


def noise_seed(seed: int, name: str) -> int:
    """The generator seed of a tensor's noise: (run seed, tensor name), never the rank."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


@torch.no_grad()
def perturb(params: Sequence[Tensor], names: Sequence[str], masks: Sequence[Tensor], scale: float, seed: int,
            all_reduce_sum_: SumFn = lambda t: t) -> None:
    """Selected entries += scale * std(tensor) * z in place, z ~ N(0, 1) over the whole tensor (population
    std of the whole tensor, its sums in float64, `all_reduce_sum_` summing them over the shards of sharded
    params); unselected entries untouched."""
    for p, name, mask in zip(params, names, masks):
        part = local_tensor(p)
        sums = torch.stack([torch.sum(part, dtype=torch.float64),
                            torch.linalg.vector_norm(part, dtype=torch.float64).square()])
        all_reduce_sum_(sums)
        mean, mean_sq = (sums / p.numel()).tolist()
        std = max(mean_sq - mean * mean, 0.0) ** 0.5
        gen = torch.Generator().manual_seed(noise_seed(seed, name))
        z = local_part(p, torch.randn(tuple(p.shape), generator=gen)).to(part.device)
        part.copy_(torch.where(mask, part + (z * (scale * std)).to(part.dtype), part))


class MaskedUpdates:
    """Keeps every unselected entry of `params` at its value when built: `mask_grads` before the clip and
    step, `restore` after it. Holds this rank's part of each mask and of each tensor's frozen values."""

    def __init__(self, params: Sequence[Tensor], masks: Sequence[Tensor]):
        self.params = list(params)
        self.masks = [m.to(local_tensor(p).device) for p, m in zip(self.params, masks)]
        self.fixed = [~m for m in self.masks]
        self.frozen = [local_tensor(p).detach().clone() for p in self.params]

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of unselected entries."""
        for p, fixed in zip(self.params, self.fixed):
            if p.grad is not None:
                local_tensor(p.grad).masked_fill_(fixed, 0)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every unselected entry back to its frozen value (exactly)."""
        for p, fixed, frozen in zip(self.params, self.fixed, self.frozen):
            part = local_tensor(p)
            part.copy_(torch.where(fixed, frozen, part))

    def counts(self) -> list[int]:
        """Selected entries of each tensor on this rank."""
        return [int(m.sum()) for m in self.masks]


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> str:
    """A parameter's decoder layer ("3") from its name, or "other" (embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return m.group(1) if m else "other"


def module_type_of(name: str) -> str:
    """The kind of module a parameter belongs to: its module's own name (q_proj, down_proj, c_attn,
    embed_tokens, input_layernorm, ...), with .bias kept apart."""
    parts = name.split(".")
    kind = parts[-2] if len(parts) >= 2 else parts[0]
    return f"{kind}.bias" if parts[-1] == "bias" else kind


def summarize_masks(masks: dict[str, Tensor]) -> dict:
    """`selection_summary` of whole masks (a checkpoint's LOCALIZE_FILE)."""
    return selection_summary({n: int(m.sum()) for n, m in masks.items()}, {n: m.numel() for n, m in masks.items()})


def selection_summary(selected: dict[str, int], sizes: dict[str, int]) -> dict:
    """Where the selection fell: totals, and selected / total entries per tensor, per decoder layer and per
    module type (what the report plots)."""
    def group(key: Callable[[str], str]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, n in sizes.items():
            g = out.setdefault(key(name), {"selected": 0, "total": 0})
            g["selected"] += selected[name]
            g["total"] += n
        for g in out.values():
            g["fraction"] = g["selected"] / g["total"] if g["total"] else 0.0
        return out

    total, chosen = sum(sizes.values()), sum(selected.values())
    layers = group(layer_of)
    order = sorted((k for k in layers if k != "other"), key=int) + (["other"] if "other" in layers else [])
    return {"selected": chosen, "total": total, "fraction": chosen / total if total else 0.0,
            "layers": {k: layers[k] for k in order}, "modules": dict(sorted(group(module_type_of).items())),
            "tensors": {name: {"selected": selected[name], "total": n} for name, n in sizes.items()}}
