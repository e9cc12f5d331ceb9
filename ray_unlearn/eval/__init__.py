"""Evaluation: per-item metrics (metrics.py) and the benchmark suite that writes OpenUnlearning-format results (suite.py)."""

from ray_unlearn.eval.metrics import (
    exact_memorization,
    extraction_strength,
    extraction_strength_generate,
    forget_quality,
    greedy_generate,
    model_utility,
    normalised_probability,
    probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_forget,
    truth_ratio_retain,
)
from ray_unlearn.eval.suite import evaluate_model, forget_truth_ratios, summary, write_eval

__all__ = [
    "evaluate_model", "exact_memorization", "extraction_strength", "extraction_strength_generate",
    "forget_quality", "forget_truth_ratios", "greedy_generate", "model_utility", "normalised_probability",
    "probability", "rouge_l_recall", "summary", "truth_ratio", "truth_ratio_forget", "truth_ratio_retain",
    "write_eval",
]
