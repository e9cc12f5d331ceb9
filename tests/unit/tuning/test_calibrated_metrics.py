"""Tune can search calibrated metrics: the names, the checks before Ray starts, and a trial's evaluation
running model-mixing calibration (the evaluator of `ray_unlearn.train`, called in this process)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.config import load_config
from ray_unlearn.errors import UnlearnError


def test_calibrated_names_are_known_and_checked_against_the_strategy_and_splits():
    from ray_unlearn.tune import calibrates, check_calibrated_metrics, check_metric_names, check_metrics_available

    cfg = load_config(None, ["tune.metrics={calibrated_extraction_strength: min, model_utility: max}"])
    check_metric_names(cfg)
    assert calibrates(cfg) and not calibrates(load_config(None, []))
    check_metrics_available(cfg, {"extraction_strength": 0.9, "model_utility": 0.5}, True)
    with pytest.raises(UnlearnError, match=r"^tune.metrics.calibrated_forget_quality needs a retain model"):
        check_metrics_available(load_config(None, ["tune.metrics={calibrated_forget_quality: max}"]), {}, False)
    with pytest.raises(UnlearnError, match=r"^tune.metrics.calibrated_extraction_strenght: not a metric"):
        check_metric_names(load_config(None, ["tune.metrics={calibrated_extraction_strenght: min}"]))
    inputs = SimpleNamespace(model_path="target", eval_splits={"forget": [{}], "retain": [{}]})
    check_calibrated_metrics(cfg, inputs)
    check_calibrated_metrics(load_config(None, ["ray.strategy=fsdp2"]), inputs)  # nothing calibrated: no check
    sharded = load_config(None, ["tune.metrics={calibrated_extraction_strength: min}", "ray.strategy=fsdp2"])
    with pytest.raises(UnlearnError, match=r"^tune.metrics: calibrated metrics mix the trial's full weights .*"
                                           r"ray.strategy=fsdp2 shards them; use ray.strategy=ddp"):
        check_calibrated_metrics(sharded, inputs)
    with pytest.raises(UnlearnError, match=r"^eval.calibrate: calibration needs a retain split"):
        check_calibrated_metrics(cfg, SimpleNamespace(model_path="target", eval_splits={"forget": [{}]}))


def test_a_calibrating_trial_reports_the_metrics_at_the_calibrated_alpha(micro_bench, micro_config, monkeypatch,
                                                                      one_thread):
    """The trial's model: the target with Gaussian noise on every weight (0.5 x each tensor's std), which
    wrecks retain ES, so calibration picks an α < 1 that keeps retain ES >= 0.9 x the target's. With the
    target's summary given, the evaluations are the trial's own plus one per bisection step."""
    from ray_unlearn.eval import suite
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_model, load_tokenizer
    from ray_unlearn.pipeline import evaluate_models
    from ray_unlearn.train import _evaluator

    cfg = micro_config("eval.max_items=6", "eval.batch_size=6", "eval.max_new_tokens=4", "eval.mia=[]",
                       "eval.calibration_steps=3", "tune.metrics={calibrated_extraction_strength: min}")
    inputs = resolve_inputs(cfg)
    tokenizer = load_tokenizer(inputs.tokenizer_path)
    target_summary = evaluate_models(cfg, inputs, tokenizer, {"target": lambda: load_model(inputs.model_path)})[0][
        "target"]
    model = load_model(inputs.model_path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.float().std())
    calls = []
    real = suite.evaluate_model
    monkeypatch.setattr(suite, "evaluate_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    evaluate = _evaluator(cfg, inputs, tokenizer, {"evaluate_at_end": True, "calibrate": True,
                                                   "target_summary": target_summary})
    metrics = evaluate(model, 5)
    assert len(calls) == 1 + 3
    alpha = metrics["calibration_alpha"]
    assert 0 < alpha < 1 and metrics["retain_extraction_strength"] < 0.9 * target_summary["retain_extraction_strength"]
    assert metrics["calibrated_retain_extraction_strength"] >= 0.9 * target_summary["retain_extraction_strength"]
    assert metrics["calibrated_extraction_strength"] != metrics["extraction_strength"]
    assert {f"calibrated_{k}" for k in target_summary} <= set(metrics)
    plain = _evaluator(cfg, inputs, tokenizer, {"evaluate_at_end": True})(model, 5)
    assert "calibration_alpha" not in plain and plain == {k: v for k, v in metrics.items() if k in plain}
