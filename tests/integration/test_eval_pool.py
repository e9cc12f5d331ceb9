"""eval.num_workers (issue 8 point 7): the evaluation's model passes on Ray actors give the single-process
results, item by item, on the micro benchmark: every split's teacher-forced pass, the greedy generations
(ROUGE), the truth-ratio passes and every MIA score, GradNorm's backward passes included."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def test_actors_give_the_single_process_results(micro_bench, bench_cache, ray_session):
    from ray_unlearn.config import load_config
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.distributed import eval_pools
    from ray_unlearn.eval.suite import evaluate_model, reference_losses
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_model, load_tokenizer

    cfg = load_config(None, ["benchmark.size=micro", f"benchmark.cache_dir={bench_cache}", "eval.max_items=10",
                             "eval.batch_size=4", "eval.max_new_tokens=8", "eval.num_workers=2",
                             "eval.mia=[loss, zlib, min_k, min_k_plus_plus, gradnorm]"])
    inputs = resolve_inputs(cfg)
    tokenizer, fmt = load_tokenizer(inputs.tokenizer_path), prompt_format(cfg.data)
    model = load_model(inputs.model_path)
    alone = evaluate_model(model, tokenizer, inputs.eval_splits, cfg.eval, fmt, cfg.data.max_length)
    losses = reference_losses(model, tokenizer, inputs.eval_splits, cfg.eval, fmt, cfg.data.max_length)
    with eval_pools(2, dtype="float32", trust_remote_code=False, tokenizer_path=inputs.tokenizer_path, fmt=fmt,
                    max_length=cfg.data.max_length, batch_size=4, max_new_tokens=8) as open_pool:
        pool = open_pool(inputs.model_path)
        spread = evaluate_model(None, tokenizer, inputs.eval_splits, cfg.eval, fmt, cfg.data.max_length, pool=pool)
        spread_losses = reference_losses(None, tokenizer, inputs.eval_splits, cfg.eval, fmt, cfg.data.max_length,
                                         pool=pool)
    assert {"extraction_strength", "forget_Q_A_ROUGE", "forget_truth_ratio", "mia_gradnorm", "mia_min_k"} <= set(alone)
    assert alone.keys() == spread.keys()
    for name in alone:
        assert _same(alone[name], spread[name]), name
    assert losses == spread_losses
