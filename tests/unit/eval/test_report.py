"""report.md's membership-inference section (eval/report.py: mia_section, write_report)."""

from __future__ import annotations

from pathlib import Path

from ray_unlearn.eval.registry import MIA_ATTACKS
from ray_unlearn.eval.report import mia_section, write_report


def test_mia_section_has_an_auc_row_per_attack_privleak_and_the_roc_plot(tmp_path: Path):
    summaries = {"target": {"mia_loss": 0.98, "mia_min_k": 1.0, "privleak": -100.0},
                 "unlearned": {"mia_loss": 0.5, "mia_min_k": 0.25, "privleak": 50.0},
                 "retain": {"mia_loss": 0.5, "mia_min_k": 0.5}}
    rocs = [tmp_path / "eval" / "BENCH_MIA_ROC.png", tmp_path / "eval" / "target" / "BENCH_MIA_ROC.png"]
    section = mia_section(summaries, rocs)
    title, rows, *images = section
    assert title == "Membership inference (forget = members, holdout = non-members)" and images == rocs
    assert rows[0] == ["AUC per attack", "target", "unlearned", "retain"]
    assert rows[1] == [f"LOSS: {MIA_ATTACKS['loss'].score}", "0.9800", "0.5000", "0.5000"]
    assert rows[2] == [f"Min-K: {MIA_ATTACKS['min_k'].score}", "1.0000", "0.2500", "0.5000"]
    assert rows[3][0].startswith("privleak") and rows[3][1:] == ["-100.0000", "50.0000", "–"]
    report = write_report(tmp_path, summaries, {}, {}, [], [section]).read_text()
    body = report.split("## Membership inference (forget = members, holdout = non-members)\n")[1].split("\n## ")[0]
    assert "| Min-K: " in body and body.rstrip().endswith("![eval/BENCH_MIA_ROC.png](eval/BENCH_MIA_ROC.png)\n\n"
                                                          "![eval/target/BENCH_MIA_ROC.png](eval/target/BENCH_MIA_ROC.png)")
    assert mia_section({"target": {"extraction_strength": 0.9}}) is None  # no attack ran: no section
    assert len(mia_section(summaries)) == 2  # no ROC file: the table alone
