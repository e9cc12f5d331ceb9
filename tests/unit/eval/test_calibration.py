"""Model-mixing calibration: bisection, mixing, architecture checks, and a run on the micro benchmark."""

from __future__ import annotations

import pytest
import torch

from ray_unlearn.errors import UnlearnError
from ray_unlearn.eval.calibration import bisect_largest, calibrate, check_calibration_inputs, mix_state


def test_bisection_on_a_known_monotone_curve():
    # f(x) = x, ok while f <= 0.3: hi=1 fails; 0.5 fails; 0.25 passes; 0.375 fails -> 0.25 (by hand)
    x, points = bisect_largest(lambda a: a, lambda y: y <= 0.3, steps=3)
    assert x == 0.25
    assert [p[0] for p in points] == [1.0, 0.5, 0.25, 0.375]
    # a step curve with its boundary at 0.6: 6 steps end within 1/64 below it
    x, points = bisect_largest(lambda a: 1.0 if a <= 0.6 else 0.0, lambda y: y >= 0.5, steps=6)
    assert x == 38 / 64 and x <= 0.6 < x + 1 / 64
    assert len(points) == 7  # hi, then one point per step; lo is assumed to pass and never evaluated


def test_bisection_takes_hi_when_it_passes():
    x, points = bisect_largest(lambda a: a, lambda y: True, steps=5)
    assert x == 1.0 and points == [(1.0, 1.0)]
    with pytest.raises(UnlearnError, match="steps must be >= 1"):
        bisect_largest(lambda a: a, lambda y: True, steps=0)


def test_mix_state_by_hand():
    target = {"w": torch.tensor([0.0, 2.0, -4.0]), "b": torch.tensor([1.0], dtype=torch.bfloat16),
              "ids": torch.tensor([3, 4])}
    unlearned = {"w": torch.tensor([4.0, 2.0, 0.0]), "b": torch.tensor([3.0], dtype=torch.bfloat16),
                 "ids": torch.tensor([9, 9])}
    mixed = mix_state(target, unlearned, 0.25)
    assert mixed["w"].tolist() == [1.0, 2.0, -3.0]  # 0.75·t + 0.25·u
    assert mixed["b"].dtype == torch.bfloat16 and mixed["b"].tolist() == [1.5]
    assert mixed["ids"].tolist() == [3, 4]  # non-floating: the target's
    assert mix_state(target, unlearned, 0.0)["w"].tolist() == target["w"].tolist()
    assert mix_state(target, unlearned, 1.0)["w"].tolist() == unlearned["w"].tolist()
    assert target["w"].tolist() == [0.0, 2.0, -4.0]  # inputs untouched


def test_architecture_mismatch_is_one_line():
    t = {"w": torch.zeros(2, 3)}
    shape = r"^model mixing: .*differ in architecture \('w': shape \(2, 3\) vs \(3, 2\)\)$"
    with pytest.raises(UnlearnError, match=shape):
        mix_state(t, {"w": torch.zeros(3, 2)}, 0.5)
    with pytest.raises(UnlearnError, match=r"^model mixing: .*'v' missing from the target model"):
        mix_state(t, {"w": torch.zeros(2, 3), "v": torch.zeros(1)}, 0.5)
    with pytest.raises(UnlearnError, match="differ in architecture"):
        calibrate(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2), lambda m: {})
    with pytest.raises(UnlearnError, match="differ in architecture .Linear vs Conv1d"):
        calibrate(torch.nn.Linear(2, 3), torch.nn.Conv1d(2, 3, 1), lambda m: {})


def test_calibration_without_a_target_is_refused_before_any_work():
    calls = []
    with pytest.raises(UnlearnError, match="^model mixing: calibration needs the target model"):
        calibrate(None, torch.nn.Linear(2, 2), lambda m: calls.append(m) or {})
    assert calls == []
    with pytest.raises(UnlearnError, match="^eval.calibrate: model-mixing calibration needs the target model"):
        check_calibration_inputs(False, ["forget", "retain"])
    with pytest.raises(UnlearnError, match="^eval.calibrate: calibration needs a retain split"):
        check_calibration_inputs(True, ["forget"])


def test_calibrate_on_a_synthetic_linear_model():
    """Retain ES = 1 - α·w (w the mixed weight); the bar 0.9 × 1 holds up to α = 0.1 exactly."""
    target, unlearned = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(target.weight)
    torch.nn.init.ones_(unlearned.weight)
    seen = []

    def evaluate(model):
        w = float(model.weight.detach())
        seen.append(w)
        return {"retain_extraction_strength": 1.0 - w, "extraction_strength": 1.0 - 2 * w}

    out = calibrate(target, unlearned, evaluate, tau=0.9, steps=6)
    assert out["target_retain_es"] == 1.0 and out["threshold"] == pytest.approx(0.9)
    assert out["alpha"] == 6 / 64 and out["alpha"] <= 0.1 < out["alpha"] + out["resolution"]
    assert out["calibrated"]["extraction_strength"] == pytest.approx(1 - 2 * 6 / 64)
    assert [p["alpha"] for p in out["curve"]] == sorted(p["alpha"] for p in out["curve"])
    assert len(seen) == 8  # α = 0, 1, then 6 steps
    assert float(target.weight.detach()) == 0.0 and float(unlearned.weight.detach()) == 1.0  # models untouched
    # α = 1 meets the bar: α = 1, calibrated = the unlearned model's summary (known summaries are reused)
    raw = {"retain_extraction_strength": 0.95, "extraction_strength": 0.1}
    out = calibrate(target, unlearned, lambda m: pytest.fail("evaluated a known point"), tau=0.9, steps=6,
                    known={0.0: {"retain_extraction_strength": 1.0}, 1.0: raw})
    assert out["alpha"] == 1.0 and out["calibrated"] == raw


def test_config_switches():
    from ray_unlearn.config import load_config

    cfg = load_config(None)
    assert (cfg.eval.calibrate, cfg.eval.calibration_tau, cfg.eval.calibration_steps) == (False, 0.9, 6)
    with pytest.raises(UnlearnError, match=r"^eval.calibration_tau: must be in \(0, 1\], got 1.5$"):
        load_config(None, ["eval.calibration_tau=1.5"])
    with pytest.raises(UnlearnError, match=r"^eval.calibration_steps: must be > 0, got 0$"):
        load_config(None, ["eval.calibration_steps=0"])


@pytest.mark.usefixtures("one_thread")
def test_calibrate_micro_target_against_retain_model(micro_bench, micro_config, tmp_path):
    """The micro target mixed with the micro retain model (as a stand-in unlearned model), few items."""
    from ray_unlearn.config import EvalConfig
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.report import plot_calibration
    from ray_unlearn.eval.suite import evaluate_model, summary
    from ray_unlearn.models.io import load_model, load_tokenizer

    cfg = micro_config()
    splits = {"forget": micro_bench.splits()["forget10"], "retain": micro_bench.splits()["retain"]}
    tokenizer = load_tokenizer(str(micro_bench.target_dir))
    ecfg = EvalConfig(max_items=4, batch_size=4, max_new_tokens=4, mia=[])

    def evaluate(model):
        return summary(evaluate_model(model, tokenizer, splits, ecfg, prompt_format(cfg.data), cfg.data.max_length))

    target, retain = load_model(str(micro_bench.target_dir)), load_model(str(micro_bench.retain_dir))
    # the retain model keeps the target's retain ES: α = 1, calibrated = its own (raw) summary
    raw = evaluate(retain)
    out = calibrate(target, retain, evaluate, tau=0.9, steps=4)
    assert out["alpha"] == 1.0 and out["calibrated"] == raw
    assert out["curve"][-1] == {"alpha": 1.0, "retain_es": raw["retain_extraction_strength"],
                                "forget_es": raw["extraction_strength"]}

    # a same-architecture model that knows nothing (random init): the bar is crossed inside (0, 1)
    torch.manual_seed(0)
    blank = type(target)(target.config)
    out = calibrate(target, blank, evaluate, tau=0.9, steps=4)
    alpha, res = out["alpha"], out["resolution"]
    assert 0.0 <= alpha < 1.0 and res == 1 / 16
    by_alpha = {p["alpha"]: p for p in out["curve"]}
    assert by_alpha[alpha]["retain_es"] >= out["threshold"]  # the bar holds at α ...
    assert by_alpha[alpha + res]["retain_es"] < out["threshold"]  # ... and fails just above it
    assert out["calibrated"]["retain_extraction_strength"] == by_alpha[alpha]["retain_es"]
    forget_metrics = {"extraction_strength", "exact_memorization", "forget_Q_A_Prob", "forget_truth_ratio"}
    assert forget_metrics <= set(out["calibrated"])
    assert plot_calibration(out, tmp_path / "calibration.png").is_file()


@pytest.mark.usefixtures("one_thread")
def test_pipeline_writes_calibration_json_report_column_and_plot(micro_bench, micro_config, tmp_path):
    """The run's post-training path (no Ray): evaluate_all, calibrate_run, _report."""
    import json

    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_model, load_tokenizer
    from ray_unlearn.pipeline import _report, calibrate_run, calibration_label, check_calibration, evaluate_all

    cfg = micro_config("eval.max_items=4", "eval.batch_size=4", "eval.max_new_tokens=4", "eval.mia=[]",
                       "eval.calibrate=true", "eval.calibration_steps=3")
    inputs = resolve_inputs(cfg)
    check_calibration(cfg, inputs)
    target = load_model(inputs.model_path)
    unlearned = tmp_path / "unlearned"
    torch.manual_seed(0)
    type(target)(target.config).save_pretrained(unlearned)  # a stand-in unlearned model that knows nothing
    tokenizer = load_tokenizer(inputs.tokenizer_path)
    out = tmp_path / "run"
    refs = {}
    summaries = evaluate_all(cfg, inputs, unlearned, tokenizer, out, refs_out=refs)
    result = calibrate_run(cfg, inputs, unlearned, tokenizer, out, summaries, refs["refs"])
    _report(cfg, inputs, out, summaries, [], {}, result)
    saved = json.loads((out / "eval" / "calibration.json").read_text())
    assert saved["alpha"] == result["alpha"] and 0 <= saved["alpha"] < 1 and saved["steps"] == 3
    assert {p["alpha"] for p in saved["curve"]} >= {0.0, 1.0, saved["alpha"]}
    label = calibration_label(result["alpha"])
    assert summaries[label] == result["calibrated"] and "forget_quality" in result["calibrated"]  # retain refs used
    report = (out / "report.md").read_text()
    assert f"| {label} |" in report and "- calibration: α=" in report
    assert (out / "plots" / "calibration.png").is_file() and "calibration.png" in report


def test_pipeline_refuses_calibration_without_evaluation_or_target(micro_config):
    from types import SimpleNamespace

    from ray_unlearn.pipeline import check_calibration

    cfg = micro_config("eval.calibrate=true", "eval.enabled=false")
    with pytest.raises(UnlearnError, match="^eval.calibrate: calibration is part of the evaluation"):
        check_calibration(cfg, SimpleNamespace(model_path="m", eval_splits={"retain": []}))
    cfg = micro_config("eval.calibrate=true")
    with pytest.raises(UnlearnError, match="^eval.calibrate: model-mixing calibration needs the target model"):
        check_calibration(cfg, SimpleNamespace(model_path="", eval_splits={"retain": []}))
    check_calibration(micro_config(), SimpleNamespace(model_path="", eval_splits={}))  # off: nothing checked
