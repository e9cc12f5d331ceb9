"""benchmarks/real_model.py's judging: keyword hits, the NLL of answers under a model (checked by hand on a
random-init ChatML model), the original model's row and the table."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import real_model  # noqa: E402

from ray_unlearn.data.collate import PromptFormat, encode_qa  # noqa: E402


def test_a_fact_is_named_by_any_of_its_forms_as_a_whole_word():
    assert real_model.hits("The capital of France is Paris.", "Paris")
    assert not real_model.hits("It is a Parisian suburb.", "Paris")
    assert real_model.hits("La capital es Bogotá.", "Bogotá|Bogota")
    assert real_model.hits("It is Bogota.", "Bogotá|Bogota")
    assert not real_model.hits("Water boils at 100 degrees.", "0|zero")  # "0" inside "100" is no hit
    assert real_model.hits("It freezes at 0 degrees.", "0|zero")
    assert real_model.hits("It is made of CARBON DIOXIDE", "carbon dioxide|CO2")


@pytest.fixture(scope="module")
def judge(family_model) -> real_model.Judge:
    return real_model.Judge(family_model("qwen2", False), PromptFormat())


def test_nll_is_the_mean_over_answer_tokens_of_minus_log_p(judge):
    question, answer = "Where was Ada Lovelace born?", "London."
    item = encode_qa(judge.tokenizer, question, answer, 256, PromptFormat())
    ids = torch.tensor([item["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(judge.original(input_ids=ids).logits[0].double(), dim=-1)
    scored = [(t, tok) for t, (tok, label) in enumerate(zip(item["input_ids"], item["labels"])) if label != -100]
    by_hand = -sum(float(logp[t - 1, tok]) for t, tok in scored) / len(scored)
    assert len(scored) >= 2  # the answer's tokens and the template's end-of-turn
    assert judge.nll([question], [answer]) == pytest.approx(by_hand, rel=1e-5)
    # two items: the mean over all their answer tokens; an empty answer is skipped
    other = encode_qa(judge.tokenizer, "Who?", "Alan Turing", 256, PromptFormat())
    n_other = sum(label != -100 for label in other["labels"])
    both = judge.nll([question, "Who?", "Why?"], [answer, "Alan Turing", " "])
    alone = judge.nll(["Who?"], ["Alan Turing"])
    assert both == pytest.approx((by_hand * len(scored) + alone * n_other) / (len(scored) + n_other), rel=1e-5)


def test_the_original_models_row_is_its_own_answers(judge):
    facts = {"forget": [{"question": "Capital of France?", "answer": "Paris.", "keyword": "Paris"}],
             "retain": [{"question": "Capital of Peru?", "answer": "It is Lima.", "keyword": "Lima"},
                        {"question": "Capital of Chile?", "answer": "", "keyword": "Santiago"}],
             "unrelated": [{"question": "Symbol of gold?", "answer": "Au", "keyword": "Au"}]}
    row = real_model.judge_model(judge, None, facts)
    assert (row["forget"], row["retain"], row["unrelated"]) == (1.0, 0.5, 1.0)
    assert (row["retain_empty"], row["forget_empty"]) == (0.5, 0.0)
    assert row["forget_fluency"] == pytest.approx(judge.nll(["Capital of France?"], ["Paris."]))
    assert math.isfinite(row["retain_fluency"])


def test_table_rows():
    ok = {"run": "defaults", "step": 10, "forget": 0.125, "retain": 0.9, "unrelated": 1.0, "forget_empty": 0.0,
          "retain_empty": 0.1, "unrelated_empty": 0.0, "forget_fluency": 2.5, "retain_fluency": 0.3,
          "unrelated_fluency": 1.0}
    text = real_model.table([ok, {"run": "lr 1e-5", "error": "error: boom"}])
    lines = text.splitlines()
    assert lines[2] == "| defaults | 10 | 12% | 90% | 100% | 10% | 2.50 |"
    assert lines[3] == "| lr 1e-5 | failed: error: boom | | | | | |"
