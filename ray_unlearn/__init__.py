"""ray_unlearn: distributed LLM unlearning (SOUL, GRIN and first-order methods) on Ray."""

__version__ = "0.1.0"
