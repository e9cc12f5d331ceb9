"""`ray-unlearn finetune` then `ray-unlearn run` on data the test writes itself (fictitious people in TOFU's
schema, not the built-in generator's): a fresh micro model fine-tuned on Ray Train memorizes the forget items
as the target and not as the retain model, and unlearning the target closes part of the forget-ES gap.

Measured (torch 2.13, CPU, one thread; the default recipe: 300 AdamW steps per model): forget ES target 1.0 vs
retain model 0.15 (answer probability 0.9994 vs 0.0002), the retain model's own retain ES 1.0; then 20 steps of
the default unlearning at optim.lr=5e-4 close all of the forget-ES gap (retain ES 1.0 -> 0.51; at 3e-4: 0.34 of
it; at the default 5e-5: none, these answers are memorized to p > 0.999)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_finetune import write_people

pytestmark = pytest.mark.slow


def test_finetune_then_run_on_own_data(tmp_path, ray_session, one_thread):
    from ray_unlearn.cli import main

    forget, retain = write_people(tmp_path, forget_people=2, retain_people=6)
    data = [f"data.forget_path={forget}", f"data.retain_path={retain}", "ray.num_workers=0", "eval.max_new_tokens=12"]
    assert main(["finetune", *data, f"output_dir={tmp_path / 'ft'}"]) == 0
    ft = tmp_path / "ft"
    memo = json.loads((ft / "memorization.json").read_text())
    target, retain_model = memo["target"], memo["retain"]
    assert (target["trained_on"], retain_model["trained_on"]) == (24, 18)
    assert target["forget"]["extraction_strength"] >= 0.9  # the target memorized the forget answers
    assert retain_model["forget"]["extraction_strength"] <= 0.4  # the retain model never saw them
    assert target["forget"]["probability"] > 10 * retain_model["forget"]["probability"]
    assert retain_model["retain"]["extraction_strength"] >= 0.9  # ... but learned its own data
    for name in ("target", "retain"):
        summary = json.loads((ft / "eval" / name / "CUSTOM_SUMMARY.json").read_text())
        assert summary["extraction_strength"] == pytest.approx(memo[name]["forget"]["extraction_strength"])
        assert (ft / name / "model.safetensors").is_file() and (ft / name / "tokenizer.json").is_file()
    assert "forget quality" in (ft / "report.md").read_text()
    assert (ft / "plots" / "memorization.png").read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "unlearn"
    assert main(["run", f"model.path={ft / 'target'}", f"model.retain_model={ft / 'retain'}", *data,
                 "train.max_steps=20", "optim.lr=5e-4", "eval.max_items=0", f"output_dir={out}"]) == 0
    s = json.loads((out / "eval" / "CUSTOM_SUMMARY.json").read_text())
    t = json.loads((out / "eval" / "target" / "CUSTOM_SUMMARY.json").read_text())
    r = json.loads((out / "eval" / "retain" / "CUSTOM_SUMMARY.json").read_text())
    closed = (t["extraction_strength"] - s["extraction_strength"]) / (t["extraction_strength"] - r["extraction_strength"])
    assert closed >= 0.5, (t, s, r)
    assert "forget_quality" in s and not any(k.startswith("mia_") for k in s)  # no holdout: MIA skipped
