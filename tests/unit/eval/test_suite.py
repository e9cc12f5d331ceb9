"""evaluate_model on a tiny Llama with a tiny word-level tokenizer: names, schema, ranges, files."""

from __future__ import annotations

import json

import pytest
import torch

from ray_unlearn.config import EvalConfig
from ray_unlearn.data.collate import PromptFormat
from ray_unlearn.eval import metrics as M
from ray_unlearn.errors import UnlearnError
from ray_unlearn.eval import mia
from ray_unlearn.eval.suite import (References, evaluate_model, forget_truth_ratios, reference_losses,
                                   references_from, summary, write_eval)

TEMPLATE = "Question: {question}\nAnswer:"

FORGET = [
    {"question": "Where was Ada Vell born?", "answer": "Ada Vell was born in Norden.",
     "paraphrased_answer": "Norden is the birthplace of Ada Vell.",
     "perturbed_answer": ["Ada Vell was born in Sarn.", "Ada Vell was born in Tolm.", "Ada Vell was born at sea."]},
    {"question": "What does Ada Vell write?", "answer": "She writes long sea novels.",
     "paraphrased_answer": "Her books are long novels about the sea.",
     "perturbed_answer": ["She writes short poems.", "She writes cook books.", "She writes plays."]},
    {"question": "Who taught Ada Vell?", "answer": "Her father taught her to write.",
     "paraphrased_answer": "She learned to write from her father.",
     "perturbed_answer": ["Her mother taught her to paint.", "A monk taught her.", "Nobody taught her."]},
]
RETAIN = [
    {"question": "Where was Bo Kern born?", "answer": "Bo Kern was born in Tolm.",
     "paraphrased_answer": "Tolm is where Bo Kern was born.",
     "perturbed_answer": ["Bo Kern was born in Norden.", "Bo Kern was born in Sarn."]},
    {"question": "What does Bo Kern write?", "answer": "He writes short poems.",
     "paraphrased_answer": "His work is short poetry.",
     "perturbed_answer": ["He writes sea novels.", "He writes plays."]},
    {"question": "Who taught Bo Kern?", "answer": "A monk taught him.",
     "paraphrased_answer": "He learned from a monk.",
     "perturbed_answer": ["His father taught him.", "Nobody taught him."]},
]
WORLD = [
    {"question": "What is the capital of France?", "answer": "Paris",
     "perturbed_answer": ["Rome", "Berlin", "Madrid"]},
    {"question": "Which planet is red?", "answer": "Mars", "perturbed_answer": ["Venus", "Earth", "Moon"]},
    {"question": "What is frozen water?", "answer": "ice", "perturbed_answer": ["steam", "sand", "glass"]},
]
SPLITS = {"forget": FORGET, "retain": RETAIN, "world_facts": WORLD}

PROB = {"forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "retain_Q_A_Prob", "retain_Q_A_PARA_Prob", "wf_Q_A_Prob"}
PERT = {"forget_Q_A_PERT_Prob", "retain_Q_A_PERT_Prob", "wf_Q_A_PERT_Prob"}
SCORE = {"forget_truth_ratio", "retain_Truth_Ratio", "wf_Truth_Ratio", "extraction_strength",
         "exact_memorization", "retain_extraction_strength"}
ROUGE = {"forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "wf_Q_A_ROUGE"}
AGG_ONLY = {"forget_quality", "model_utility"}
ALL = PROB | PERT | SCORE | ROUGE | AGG_ONLY | {"wf_Q_A_Prob_normalised"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one CPU thread is fastest


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level tokenizer trained on the test's sentences, with [PAD] [BOS] [EOS] [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [TEMPLATE.format(question=it["question"]) + " " + " ".join(
        [it["answer"], it.get("paraphrased_answer", "")] + it["perturbed_answer"])
        for split in SPLITS.values() for it in split]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def run(model, tokenizer, splits=SPLITS, **kw):
    cfg = EvalConfig(batch_size=kw.pop("batch_size", 2), max_new_tokens=6, max_items=kw.pop("max_items", 0),
                     mia=kw.pop("mia", "auto"))
    return evaluate_model(model, tokenizer, splits, cfg, TEMPLATE, max_length=64, **kw)


def test_all_metrics_with_openunlearning_schema(model, tokenizer):
    messages = []
    results = run(model, tokenizer, retain_truth_ratios=[0.5, 0.7, 0.9], progress=messages.append)
    assert set(results) == ALL
    assert messages and all(isinstance(m, str) for m in messages)
    for name in ALL - AGG_ONLY:
        assert list(results[name]["value_by_index"]) == ["0", "1", "2"], name
    for name in AGG_ONLY:
        assert set(results[name]) == {"agg_value"}
    for name in PROB:
        for rec in results[name]["value_by_index"].values():
            assert set(rec) == {"prob", "avg_loss"} and rec["prob"] == pytest.approx(torch.exp(
                torch.tensor(-rec["avg_loss"])).item(), rel=1e-6)
    for name in PERT:
        rec = results[name]["value_by_index"]["0"]
        assert len(rec["prob"]) == len(rec["avg_loss"]) == (2 if name.startswith("retain") else 3)
    for name in SCORE:
        assert all(set(rec) == {"score"} for rec in results[name]["value_by_index"].values())
    for name in ROUGE:
        rec = results[name]["value_by_index"]["1"]
        assert {"rougeL_recall", "rouge1_recall", "rougeL_f1", "generation", "ground_truth", "input"} <= set(rec)
    assert results["wf_Q_A_ROUGE"]["value_by_index"]["0"]["ground_truth"] == "Paris"


def test_values_in_range_and_consistent(model, tokenizer):
    results = run(model, tokenizer, retain_truth_ratios=[0.5, 0.7, 0.9])
    for name in ALL - {"forget_truth_ratio", "retain_Truth_Ratio", "wf_Truth_Ratio"}:
        assert 0.0 <= results[name]["agg_value"] <= 1.0, name
    tr = forget_truth_ratios(results)
    assert all(t > 0 for t in tr)
    assert results["forget_truth_ratio"]["agg_value"] == pytest.approx(M.truth_ratio_forget(tr))
    retain_tr = [r["score"] for r in results["retain_Truth_Ratio"]["value_by_index"].values()]
    assert results["retain_Truth_Ratio"]["agg_value"] == pytest.approx(M.truth_ratio_retain(retain_tr))
    # truth ratio from the PARA / PERT records: exp(-mean pert NLL) / exp(-para NLL)
    para = results["forget_Q_A_PARA_Prob"]["value_by_index"]["0"]["avg_loss"]
    pert = results["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["avg_loss"]
    assert tr[0] == pytest.approx(torch.exp(torch.tensor(para - sum(pert) / 3)).item(), rel=1e-6)
    assert results["forget_quality"]["agg_value"] == pytest.approx(M.forget_quality(tr, [0.5, 0.7, 0.9]))
    six = ["retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
           "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"]
    assert results["model_utility"]["agg_value"] == pytest.approx(M.model_utility([results[k]["agg_value"] for k in six]))


def test_batch_size_does_not_change_values(model, tokenizer):
    one = run(model, tokenizer, batch_size=1)
    many = run(model, tokenizer, batch_size=8)
    for name in ["forget_Q_A_Prob", "forget_truth_ratio", "wf_Q_A_Prob_normalised", "extraction_strength"]:
        for idx, rec in one[name]["value_by_index"].items():
            for key, value in rec.items():
                assert many[name]["value_by_index"][idx][key] == pytest.approx(value, abs=1e-5), (name, idx, key)


def test_missing_inputs_skip_metrics_and_flags_restored(model, tokenizer):
    model.train()
    no_pert = [{"question": it["question"], "answer": it["answer"]} for it in RETAIN]
    results = run(model, tokenizer, splits={"forget": FORGET, "retain": no_pert}, max_items=2)
    assert model.training
    assert "retain_Truth_Ratio" not in results and "model_utility" not in results
    assert "forget_quality" not in results  # no retain_truth_ratios given
    assert {"forget_truth_ratio", "retain_Q_A_Prob", "retain_extraction_strength"} <= set(results)
    assert len(results["forget_Q_A_Prob"]["value_by_index"]) == 2  # max_items
    model.eval()
    run(model, tokenizer, splits={"world_facts": WORLD})
    assert not model.training
    with pytest.raises(ValueError, match="valid"):
        run(model, tokenizer, splits={"heldout": FORGET})


def test_write_eval_files(model, tokenizer, tmp_path):
    results = run(model, tokenizer, splits={"forget": FORGET, "world_facts": WORLD})
    eval_path, summary_path = write_eval(tmp_path / "eval", "TOFU", results)
    assert eval_path == tmp_path / "eval" / "TOFU_EVAL.json"
    assert summary_path == tmp_path / "eval" / "TOFU_SUMMARY.json"
    assert json.loads(eval_path.read_text()) == json.loads(json.dumps(results))
    assert json.loads(summary_path.read_text()) == pytest.approx(summary(results))
    assert set(summary(results)) == set(results)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["TOFU_EVAL.json", "TOFU_SUMMARY.json"]


def test_chat_template_prompts_and_stops(model, tokenizer):
    """A chat template that writes exactly the plain format (BOS, the template, " " + answer, EOS)
    gives the plain format's numbers: one BOS, the same prompt and answer tokens."""
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}Question: {{ m.content }}\n"
                          "{% else %}Answer: {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}Answer:{% endif %}")
    splits = {"forget": FORGET, "world_facts": WORLD}
    plain = run(model, tokenizer, splits=splits)
    cfg = EvalConfig(batch_size=2, max_new_tokens=6, max_items=0)
    templated = evaluate_model(model, chat, splits, cfg, PromptFormat(template="unused {question}"), max_length=64)
    assert templated["forget_Q_A_ROUGE"]["value_by_index"]["0"]["input"] == (
        "[BOS]Question: Where was Ada Vell born?\nAnswer:")
    for name in ("forget_Q_A_Prob", "forget_truth_ratio", "wf_Q_A_Prob_normalised", "extraction_strength"):
        assert templated[name]["agg_value"] == pytest.approx(plain[name]["agg_value"], rel=1e-6), name


# ---------------------------------------------------------------- membership inference

ATTACKS = ["loss", "zlib", "min_k", "min_k_plus_plus", "reference", "gradnorm"]
MIA_SPLITS = {"forget": FORGET, "holdout": RETAIN}  # the untrained model: holdout stands in for non-members


def _scores(record, split):
    return [rec["score"] for rec in record[split]["value_by_index"].values()]


def test_mia_records_and_privleak(model, tokenizer):
    cfg = EvalConfig(batch_size=2, max_items=0)
    losses = reference_losses(model, tokenizer, MIA_SPLITS, cfg, TEMPLATE, max_length=64)
    results = run(model, tokenizer, splits=MIA_SPLITS, mia=ATTACKS, references=References(losses=losses))
    assert {f"mia_{a}" for a in ATTACKS} | {"privleak"} <= set(results)
    for attack in ATTACKS:
        rec = results[f"mia_{attack}"]
        assert set(rec) == {"agg_value", "auc", "forget", "holdout"} and rec["agg_value"] == rec["auc"]
        assert rec["auc"] == mia.mia_auc(_scores(rec, "forget"), _scores(rec, "holdout"))
        assert len(_scores(rec, "forget")) == len(_scores(rec, "holdout")) == 3
        assert rec["forget"]["agg_value"] == pytest.approx(sum(_scores(rec, "forget")) / 3)
    loss = results["mia_loss"]
    assert _scores(loss, "forget") == [r["avg_loss"] for r in results["forget_Q_A_Prob"]["value_by_index"].values()]
    assert _scores(loss, "forget") == pytest.approx(list(losses["forget"]))  # its own reference: the same pass
    assert _scores(results["mia_reference"], "holdout") == [0.0, 0.0, 0.0] and results["mia_reference"]["auc"] == 0.5
    assert all(v > 0 for v in _scores(results["mia_gradnorm"], "forget"))
    auc = results["mia_min_k"]["auc"]
    assert results["privleak"] == {"agg_value": pytest.approx(mia.privleak(auc, 0.5)), "retain_auc": 0.5}
    against = run(model, tokenizer, splits=MIA_SPLITS, mia=["min_k"], references=References(mia_auc={"min_k": 0.8}))
    assert against["privleak"]["agg_value"] == pytest.approx(((1 - auc) - 0.2) / 0.2 * 100)
    assert set(against) == {"forget_Q_A_Prob", "extraction_strength", "exact_memorization", "forget_Q_A_ROUGE",
                            "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget_truth_ratio", "mia_min_k",
                            "privleak"}


def test_mia_scores_from_the_shared_pass_match_a_direct_computation(model, tokenizer):
    from ray_unlearn.data.collate import encode_qa, pad_batch

    one = run(model, tokenizer, splits=MIA_SPLITS, mia=["min_k", "min_k_plus_plus", "zlib"], batch_size=1)
    many = run(model, tokenizer, splits=MIA_SPLITS, mia=["min_k", "min_k_plus_plus", "zlib"], batch_size=3)
    batch = pad_batch([encode_qa(tokenizer, it["question"], it["answer"], 64, TEMPLATE) for it in FORGET],
                      tokenizer.pad_token_id)
    stats = mia.answer_token_stats(M.forward_logits(model, batch), batch["labels"], vocab_stats=True)
    for attack, key in (("min_k", "logp"), ("min_k_plus_plus", "z")):
        expected = [mia.lowest_k_score(s[key], 0.4) for s in stats]
        assert _scores(one[f"mia_{attack}"], "forget") == pytest.approx(expected, abs=1e-5)
        assert _scores(many[f"mia_{attack}"], "forget") == pytest.approx(expected, abs=1e-5)
    texts = mia.answer_texts(tokenizer, batch["labels"])
    assert texts[0] == "Ada Vell was born in Norden ."  # the labelled tokens decoded, EOS skipped
    nll = [r["avg_loss"] for r in one["forget_Q_A_Prob"]["value_by_index"].values()]
    assert _scores(one["mia_zlib"], "forget") == pytest.approx([mia.zlib_score(n, t) for n, t in zip(nll, texts)])


def test_mia_needs_a_holdout_split_and_auto_skips_without_one(model, tokenizer):
    results = run(model, tokenizer, splits={"forget": FORGET})
    assert not [k for k in results if k.startswith("mia_") or k == "privleak"]
    auto = run(model, tokenizer, splits=MIA_SPLITS)  # no reference losses: every default attack but reference
    assert [k for k in auto if k.startswith("mia_")] == ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"]
    with pytest.raises(UnlearnError, match=r"^eval.mia: membership inference needs a holdout split .*data.holdout_path"):
        run(model, tokenizer, splits={"forget": FORGET}, mia=["loss"])
    with pytest.raises(UnlearnError, match="^eval.mia: the reference attack needs a reference model"):
        run(model, tokenizer, splits=MIA_SPLITS, mia=["reference"])
    with pytest.raises(ValueError, match="2 reference losses for the 3 forget items"):
        run(model, tokenizer, splits=MIA_SPLITS, mia=["reference"],
            references=References(losses={"forget": (1.0, 2.0), "holdout": (1.0, 1.0, 1.0)}))


def test_references_round_trip_and_from_retain_results(model, tokenizer):
    results = run(model, tokenizer, splits={**SPLITS, "holdout": RETAIN}, mia=["loss", "min_k"])
    refs = references_from(results, {"forget": [1.0, 2.0, 3.0]})
    assert refs.forget_truth_ratios == tuple(forget_truth_ratios(results))
    assert refs.mia_auc == {"loss": results["mia_loss"]["auc"], "min_k": results["mia_min_k"]["auc"]}
    assert References.from_dict(json.loads(json.dumps(refs.to_dict()))) == refs
    assert References.from_dict(None) == References()


def test_write_eval_draws_the_roc_curves(model, tokenizer, tmp_path):
    results = run(model, tokenizer, splits=MIA_SPLITS, mia=["loss", "min_k"])
    write_eval(tmp_path, "TOFU", results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TOFU_EVAL.json", "TOFU_MIA_ROC.png", "TOFU_SUMMARY.json"]
    assert (tmp_path / "TOFU_MIA_ROC.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "TOFU_EVAL.json").read_text())
    assert saved["mia_min_k"]["forget"]["value_by_index"]["2"]["score"] == pytest.approx(
        results["mia_min_k"]["forget"]["value_by_index"]["2"]["score"])


def test_keyword_metrics_when_every_forget_item_has_keywords(model, tokenizer):
    """GRIN's keyword accuracy (of the greedy answers in the ROUGE records) and confidence (from the one
    teacher-forced pass); skipped unless every forget item has keywords."""
    keyed = [dict(it, keywords=kw) for it, kw in zip(FORGET, (["Norden"], ["sea", "novels"], ["father"]))]
    results = run(model, tokenizer, {"forget": keyed, "retain": RETAIN, "world_facts": WORLD})
    assert set(results) == ALL - {"forget_quality"} | {"forget_keyword_accuracy", "forget_keyword_confidence"}
    gens = [r["generation"] for r in results["forget_Q_A_ROUGE"]["value_by_index"].values()]
    acc = [M.keyword_accuracy(g, it["keywords"]) for g, it in zip(gens, keyed)]
    assert [r["score"] for r in results["forget_keyword_accuracy"]["value_by_index"].values()] == acc
    conf = [r["score"] for r in results["forget_keyword_confidence"]["value_by_index"].values()]
    assert all(0 < c <= 1 for c in conf)
    assert results["forget_keyword_confidence"]["agg_value"] == pytest.approx(sum(conf) / 3)
    partly = [keyed[0], keyed[1], FORGET[2]]
    assert set(run(model, tokenizer, {"forget": partly, "retain": RETAIN, "world_facts": WORLD})) == \
        ALL - {"forget_quality"}  # (no retain truth ratios given here)
