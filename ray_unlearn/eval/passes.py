"""Splitting one evaluation's model passes over workers, and putting their outputs back together.

The suite's model passes (`suite._teacher_forced`: one teacher-forced forward per batch; `suite._generate`:
greedy answers; GradNorm: one backward per item) are per item, so a split's items can be scored by several
workers that each hold the model (`eval.num_workers`; the Ray actors are in `ray_unlearn.distributed`). Each
worker takes a contiguous span of whole batches, so it forms exactly the batches one process would (the same
padding, the same items side by side) and the outputs, concatenated in order, are the single-process ones.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def batch_spans(n_items: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """[start, end) spans of `n_items` for up to `workers` workers: contiguous, each of whole batches of
    `batch_size` (but the last), as even as whole batches allow; no empty span."""
    batches = -(-n_items // batch_size)
    per, extra = divmod(batches, max(1, workers))
    spans, start = [], 0
    for w in range(max(1, workers)):
        count = per + (1 if w < extra else 0)
        if count == 0:
            break
        end = min(n_items, start + count * batch_size)
        spans.append((start, end))
        start = end
    return spans


def merge_outputs(parts: Sequence[Any]) -> Any:
    """The workers' outputs in span order as one: lists and arrays concatenated, dicts key by key."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: merge_outputs([p[k] for p in parts]) for k in first}
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    return [x for p in parts for x in p]


def cut(values: Sequence[Any] | None, spans: Sequence[tuple[int, int]]) -> list[Any]:
    """`values` cut at `spans` (None stays None for every span)."""
    return [None if values is None else list(values[a:b]) for a, b in spans]
