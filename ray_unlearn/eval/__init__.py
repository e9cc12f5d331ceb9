"""Evaluation: the metric registry (registry.py), per-item metrics (metrics.py), membership inference
(mia.py) and the benchmark suite that writes OpenUnlearning-format results (suite.py).

The names below are imported on first use, so that the light registry (plain data, read by the
config check) does not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "exact_memorization": "metrics", "extraction_strength": "metrics", "extraction_strength_generate": "metrics",
    "forget_quality": "metrics", "greedy_generate": "metrics", "model_utility": "metrics",
    "normalised_probability": "metrics", "probability": "metrics", "rouge_l_recall": "metrics",
    "truth_ratio": "metrics", "truth_ratio_forget": "metrics", "truth_ratio_retain": "metrics",
    "evaluate_model": "suite", "forget_truth_ratios": "suite", "summary": "suite", "write_eval": "suite",
    "References": "suite", "reference_losses": "suite", "references_from": "suite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ray_unlearn.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ray_unlearn.eval.{_EXPORTS[name]}"), name)
