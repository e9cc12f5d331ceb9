"""Metric robustness: Pearson r by hand, undefined cells, the ranking, and `ray-unlearn robustness` on micro."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from ray_unlearn.errors import UnlearnError
from ray_unlearn.eval.robustness import correlations, pearson, ranking


def test_pearson_by_hand_and_undefined_cases():
    """x = (1, 2, 3, 4), y = (2, 4, 5, 9): dx = (-1.5, -.5, .5, 1.5), dy = (-3, -1, 0, 4); Σdxdy = 11, Σdx² = 5,
    Σdy² = 26, so r = 11 / √130."""
    c = pearson([1, 2, 3, 4], [2, 4, 5, 9])
    assert c["r"] == pytest.approx(11 / math.sqrt(130)) and c["n"] == 4 and c["note"] == "" and 0 < c["p"] < 1
    assert pearson([1, 2, 3], [3, 2, 1])["r"] == pytest.approx(-1.0)
    flat = pearson([1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5])
    assert flat["r"] is None and flat["p"] is None and flat["note"] == ("undefined: after the attack the values are "
                                                                       "constant (0.5 for every model)")
    assert pearson([7, 7, 7], [1, 2, 3])["note"].startswith("undefined: before the attack the values are constant")
    assert pearson([1, 2], [1, 3])["note"] == "undefined: 2 model(s) with values, 3 needed"


def test_correlations_skip_missing_values_and_ranking_orders_by_mean_then_min():
    def rec(es, es_after, prob, prob_after):
        return {"int4": {"extraction_strength": {"before": es, "after": es_after},
                         "forget_Q_A_Prob": {"before": prob, "after": prob_after}},
                "paraphrase": {"extraction_strength": {"before": es, "after": es_after},
                               "forget_Q_A_Prob": {"before": prob, "after": 0.3}}}

    population = [rec(1, 2, 1, 2), rec(2, 4, 2, 1), rec(3, 5, 3, 4), rec(4, 9, 4, 3), rec(5, None, float("nan"), 1)]
    table = correlations(population, ["int4", "paraphrase"], ["forget_Q_A_Prob", "extraction_strength"])
    es = table["extraction_strength"]
    assert es["int4"]["r"] == pytest.approx(11 / math.sqrt(130)) and es["int4"]["n"] == 4  # None after: skipped
    # prob (1, 2, 3, 4) -> (2, 1, 4, 3): dx = (-1.5, -.5, .5, 1.5), dy = (-.5, -1.5, 1.5, .5): Σdxdy = 3, Σdx² = Σdy² = 5,
    # r = 3 / 5
    assert table["forget_Q_A_Prob"]["int4"]["r"] == pytest.approx(0.6)
    assert table["forget_Q_A_Prob"]["paraphrase"]["r"] is None  # constant after
    ranked = ranking(table)
    assert [row["metric"] for row in ranked] == ["extraction_strength", "forget_Q_A_Prob"]
    assert ranked[1] == {"metric": "forget_Q_A_Prob", "mean_r": pytest.approx(0.6), "min_r": pytest.approx(0.6),
                         "defined": 1, "undefined": 1}
    assert [r["metric"] for r in ranking({"a": {"x": {"r": None}}, "b": {"x": {"r": -0.5}}})] == ["b", "a"]


def _fake_run(micro_bench, micro_config, path):
    """A finished run's directory without running one: its config and, as the unlearned model, the retain model
    (never trained on the forget set: the ideal unlearned model), so the mixing path spans target -> forgotten."""
    from ray_unlearn.config import dump_config

    path.mkdir(parents=True)
    dump_config(micro_config(f"output_dir={path}"), path / "config.yaml")
    shutil.copytree(micro_bench.retain_dir, path / "model")
    return path


def test_robustness_on_micro_correlates_every_metric_under_every_attack(micro_bench, micro_config, tmp_path,
                                                                      one_thread):
    from scipy.stats import pearsonr

    from ray_unlearn.eval.registry import METRICS
    from ray_unlearn.pipeline import robustness_job

    run = _fake_run(micro_bench, micro_config, tmp_path / "run")
    attacks = ["quantize_int4", "paraphrase"]
    result = robustness_job([str(run)], [f"eval.attacks=[{', '.join(attacks)}, scope]", "eval.max_items=6",
                                         "eval.batch_size=6", "eval.max_new_tokens=4",
                                         "eval.robustness_alphas=[0, 0.25, 0.5, 1]"])
    out = run / "robustness"
    assert json.loads((out / "robustness.json").read_text())["ranking"] == result["ranking"]
    population, table = result["population"], result["correlations"]
    assert [rec["alpha"] for rec in population] == [0, 0.25, 0.5, 1]  # scope is left out: not an attack on a model
    forget_metrics = [m.name for m in METRICS.values() if m.split == "forget"]
    assert "extraction_strength" in table and set(table) <= set(forget_metrics)
    assert set(table) == {k for rec in population for k in rec["attacks"]["paraphrase"]}
    for metric, by_attack in table.items():
        assert list(by_attack) == attacks
        for c in by_attack.values():
            assert (c["r"] is None and c["note"].startswith("undefined")) or -1 <= c["r"] <= 1
    pairs = [rec["attacks"]["paraphrase"]["extraction_strength"] for rec in population]
    expected = pearsonr([p["before"] for p in pairs], [p["after"] for p in pairs])[0]
    assert table["extraction_strength"]["paraphrase"]["r"] == pytest.approx(expected)
    # the plain forget ES falls along the mixing path: the population really spans forgetting
    assert pairs[0]["before"] > pairs[-1]["before"] + 0.3
    md = (out / "robustness.md").read_text()
    assert all(f"| {m} |" in md for m in table) and "| quantize_int4 | paraphrase |" in md
    assert (out / "robustness.png").stat().st_size > 10_000


def test_robustness_bad_input_is_one_line(micro_bench, micro_config, tmp_path):
    from ray_unlearn.cli import main
    from ray_unlearn.config import dump_config, load_config
    from ray_unlearn.pipeline import robustness_job

    (tmp_path / "empty").mkdir()
    with pytest.raises(UnlearnError, match=r"empty: no config.yaml; give the output_dir of a finished"):
        robustness_job([str(tmp_path / "empty")], [])
    assert main(["robustness", str(tmp_path / "empty")]) == 2
    (tmp_path / "search" / "tune").mkdir(parents=True)
    (tmp_path / "search" / "tune" / "search.yaml").write_text("{}")
    with pytest.raises(UnlearnError, match=r"search is a Tune search: robustness needs runs' unlearned models"):
        robustness_job([str(tmp_path / "search")], [])
    dump_config(micro_config(), tmp_path / "empty" / "config.yaml")
    with pytest.raises(UnlearnError, match=r"empty/model is missing: the run did not finish"):
        robustness_job([str(tmp_path / "empty")], [])
    run = _fake_run(micro_bench, micro_config, tmp_path / "run")
    other = _fake_run(micro_bench, micro_config, tmp_path / "other")
    dump_config(micro_config("data.forget_split=forget05"), other / "config.yaml")
    with pytest.raises(UnlearnError, match=r"other unlearned another target model or forget set than .*run"):
        robustness_job([str(run), str(other)], [])
    with pytest.raises(UnlearnError, match=r"^eval.attacks: robustness correlates metrics .* scope is not one"):
        robustness_job([str(run)], ["eval.attacks=[scope]"])
    with pytest.raises(UnlearnError, match=r"^eval.robustness_alphas: needs at least 4 distinct mixing ratios"):
        load_config(None, ["eval.robustness_alphas=[0, 0.5, 1, 1]"])
