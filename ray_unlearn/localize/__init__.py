"""Localized unlearning: which entries of the model may move (GRIN)."""

from ray_unlearn.localize.grin import (LOCALIZE_FILE, MaskedUpdates, gradient_ratio, perturb, selection_summary,
                                       summarize_masks, top_fraction)

__all__ = ["LOCALIZE_FILE", "MaskedUpdates", "gradient_ratio", "perturb", "selection_summary", "summarize_masks",
           "top_fraction"]
