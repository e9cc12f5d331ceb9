"""The metric registry: its names are what the suite writes and what Tune, the report and pareto.md use;
the registry-driven suite reproduces the pre-registry summaries on the micro benchmark, and its
membership-inference metrics separate the target model from the retain model there."""

from __future__ import annotations

import hashlib

import pytest

from ray_unlearn.eval import registry
from ray_unlearn.eval.registry import MIA_ATTACKS, METRICS, mia_metric_name

# Summaries of the micro benchmark's retain and target models (seed 0) written by the suite BEFORE the
# registry refactor: main at e17d5ba, evaluate_model on resolve_inputs(benchmark.size=micro).eval_splits
# (forget10, retain, world_facts), eval.max_items=20, batch_size=32, one CPU thread; the retain model
# first, its forget truth ratios giving the target's forget quality. With eval.max_items=0 the full
# EVAL files (value_by_index included) were identical too, checked once by hand. They hold for the
# weights below.
PRE_REGISTRY = {
    "retain": {
        "forget_Q_A_Prob": 0.04672767750290106, "extraction_strength": 0.17737470862470864,
        "exact_memorization": 0.5470711233211233, "forget_Q_A_ROUGE": 0.49900793650793646,
        "forget_Q_A_PARA_Prob": 0.026764033117891696, "forget_Q_A_PERT_Prob": 0.029857936632313852,
        "forget_truth_ratio": 0.8150822870733772, "retain_Q_A_Prob": 0.9476230076535588,
        "retain_extraction_strength": 1.0, "retain_Q_A_ROUGE": 1.0, "retain_Q_A_PARA_Prob": 0.3045654706985822,
        "retain_Q_A_PERT_Prob": 0.17683841911793968, "retain_Truth_Ratio": 0.41638808267380656,
        "wf_Q_A_Prob": 0.9424877616431825, "wf_Q_A_ROUGE": 1.0, "wf_Q_A_PERT_Prob": 0.22948445717404842,
        "wf_Truth_Ratio": 0.7672770369530475, "wf_Q_A_Prob_normalised": 0.4834016039669736,
        "model_utility": 0.679589343276865,
    },
    "target": {
        "forget_Q_A_Prob": 0.9817427576373905, "extraction_strength": 1.0, "exact_memorization": 1.0,
        "forget_Q_A_ROUGE": 1.0, "forget_Q_A_PARA_Prob": 0.2890854762863751,
        "forget_Q_A_PERT_Prob": 0.15425686424058613, "forget_truth_ratio": 0.49636602151383863,
        "retain_Q_A_Prob": 0.9486071910726178, "retain_extraction_strength": 0.9057142857142857,
        "retain_Q_A_ROUGE": 0.9207341269841269, "retain_Q_A_PARA_Prob": 0.28130232873373895,
        "retain_Q_A_PERT_Prob": 0.1491573461579934, "retain_Truth_Ratio": 0.4711790096230457,
        "wf_Q_A_Prob": 0.9527600318475979, "wf_Q_A_ROUGE": 0.99, "wf_Q_A_PERT_Prob": 0.19163114379815055,
        "wf_Truth_Ratio": 0.8099113293313215, "wf_Q_A_Prob_normalised": 0.5318465754099545,
        "forget_quality": 1.4334782434603487e-07, "model_utility": 0.7153375855791748,
    },
}
WEIGHTS_SHA256 = {"target": "d194d738d75e2331", "retain": "151fdaca61e986b3"}  # model.safetensors, first 16 hex


def test_every_registered_metric_has_a_handler_and_every_attack_a_score():
    from ray_unlearn.eval.suite import ATTACK_SCORES, HANDLERS

    assert {m.handler for m in METRICS.values()} == set(HANDLERS)
    assert set(ATTACK_SCORES) == set(MIA_ATTACKS)
    assert [m.name for m in METRICS.values() if m.attack] == [mia_metric_name(a) for a in MIA_ATTACKS]
    assert all(set(m.needs.metrics) <= set(METRICS) for m in METRICS.values())
    assert all(set(m.needs.splits) <= set(registry.EVAL_SPLITS) for m in METRICS.values())


def test_tune_report_and_pareto_take_their_names_from_the_registry():
    from ray_unlearn.eval.report import KEY_METRICS
    from ray_unlearn.tune import known_metrics
    from ray_unlearn.tuning.pareto import MARKDOWN_METRICS

    assert known_metrics() == set(METRICS) | set(registry.calibrated_metric_names())
    assert registry.calibrated_metric_names() == ["calibration_alpha"] + [f"calibrated_{m}" for m in METRICS]
    assert registry.calibrated_base("calibrated_extraction_strength") == "extraction_strength"
    assert registry.calibrated_base("calibration_alpha") == "calibration_alpha"
    assert registry.calibrated_base("extraction_strength") is None
    assert {"mia_min_k", "mia_gradnorm", "privleak", "forget_quality"} <= known_metrics()
    assert KEY_METRICS == [(name, METRICS[name].label) for name in registry.REPORT_ROWS]
    assert all(label for _, label in KEY_METRICS)
    assert KEY_METRICS[:3] == [("extraction_strength", "forget ES"), ("exact_memorization", "forget EM"),
                               ("forget_Q_A_Prob", "forget prob")]  # the labels the report had before
    assert set(MARKDOWN_METRICS) <= set(METRICS)


def test_attack_selection():
    every = tuple(MIA_ATTACKS)
    assert registry.selected_attacks("auto", True, True, True) == ("loss", "zlib", "min_k", "min_k_plus_plus",
                                                                    "reference")  # gradnorm only when asked
    assert registry.selected_attacks("auto", True, True, False) == ("loss", "zlib", "min_k", "min_k_plus_plus")
    assert registry.selected_attacks("auto", True, False, True) == ()
    assert registry.selected_attacks(list(every), True, True, True) == every
    assert registry.selected_attacks([], False, False, False) == ()


def _weights(bench, name):
    return hashlib.sha256((getattr(bench, f"{name}_dir") / "model.safetensors").read_bytes()).hexdigest()[:16]


@pytest.mark.usefixtures("one_thread")
def test_micro_summaries_equal_the_pre_registry_values_and_mia_separates(micro_bench, micro_config):
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_model, load_tokenizer
    from ray_unlearn.pipeline import evaluate_models

    if any(_weights(micro_bench, n) != WEIGHTS_SHA256[n] for n in WEIGHTS_SHA256):
        pytest.skip("this machine built other micro weights than the ones the values were frozen on")
    cfg = micro_config("eval.max_items=20")  # eval.mia=auto: every attack but gradnorm
    inputs = resolve_inputs(cfg)
    models = {"target": lambda: load_model(inputs.model_path), "retain": lambda: load_model(inputs.retain_model_path)}
    summaries, refs = evaluate_models(cfg, inputs, load_tokenizer(inputs.tokenizer_path), models)
    mia_keys = {mia_metric_name(a) for a in ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")} | {"privleak"}
    for name, before in PRE_REGISTRY.items():
        keyword_keys = {"forget_keyword_accuracy", "forget_keyword_confidence"}  # the built-in items have keywords
        assert set(summaries[name]) == set(before) | mia_keys | keyword_keys, name  # the old keys, plus the new ones
        assert {k: summaries[name][k] for k in before} == pytest.approx(before, rel=1e-9, abs=1e-12), name
    target, retain = summaries["target"], summaries["retain"]
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus", "reference"):
        assert target[mia_metric_name(attack)] > 0.95, attack  # forget10 memorized: far from the holdout
        assert abs(retain[mia_metric_name(attack)] - 0.5) < 0.1, attack  # never trained on either
    assert retain["mia_reference"] == 0.5  # its own reference: every score exactly 0
    assert refs.mia_auc["min_k"] == retain["mia_min_k"]
    assert target["privleak"] == pytest.approx(((1 - target["mia_min_k"]) - (1 - retain["mia_min_k"]))
                                               / (1 - retain["mia_min_k"]) * 100, rel=1e-6)
    assert target["privleak"] < -90


@pytest.mark.usefixtures("one_thread")
def test_a_given_reference_model_is_scored_once_and_used(micro_bench, micro_config):
    """eval.mia_reference_model = the target itself: the target's reference scores are all 0 (AUC 0.5)."""
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_model, load_tokenizer
    from ray_unlearn.pipeline import evaluate_models

    cfg = micro_config("eval.max_items=6", "eval.mia=[reference, min_k]",
                       f"eval.mia_reference_model={micro_bench.target_dir}")
    inputs = resolve_inputs(cfg)
    assert inputs.mia_reference_path == str(micro_bench.target_dir)
    results = {}
    summaries, refs = evaluate_models(cfg, inputs, load_tokenizer(inputs.tokenizer_path),
                                      {"target": lambda: load_model(inputs.model_path)},
                                      on_result=results.__setitem__)
    assert {k: len(v) for k, v in refs.losses.items()} == {"forget": 6, "holdout": 6}
    scores = results["target"]["mia_reference"]
    assert [r["score"] for s in ("forget", "holdout") for r in scores[s]["value_by_index"].values()] == [0.0] * 12
    assert summaries["target"]["mia_reference"] == 0.5
    assert summaries["target"]["privleak"] == pytest.approx(
        ((1 - summaries["target"]["mia_min_k"]) - 0.5) / 0.5 * 100)  # no retain model: OpenUnlearning's 0.5


def test_report_rows_show_mia_and_privleak():
    from ray_unlearn.eval.report import comparison_rows

    rows = comparison_rows({"target": {"mia_min_k": 1.0, "privleak": -100.0}, "retain": {"mia_min_k": 0.5}})
    assert rows == [["MIA AUC Min-K", "1.0000", "0.5000"], ["privleak", "-100.0000", "–"]]
