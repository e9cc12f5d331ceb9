"""Red-team attacks: the transforms by hand, the quantizer by hand, and the run's attack path on micro."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ray_unlearn.errors import UnlearnError
from ray_unlearn.eval.redteam import (ATTACKS, SCOPE_ENTRIES, attacked, in_context, jailbroken, paraphrased,
                                      quantize_round_trip_, scope_items)

ITEMS = [{"entity": "A", "question": "qa1", "answer": "aa1", "paraphrased_question": "pa1"},
         {"entity": "A", "question": "qa2", "answer": "aa2"},
         {"entity": "B", "question": "qb1", "answer": "ab1", "paraphrased_question": "pb1"},
         {"entity": "C", "question": "qc1", "answer": "ac1"}]


def test_int4_round_trip_per_output_channel_by_hand():
    """Row (0.1, -0.35, 0.7): s = 0.7 / 7 = 0.1, round(1, -3.5, 7) = (1, -4, 7) (half to even) -> (0.1, -0.4, 0.7);
    row (0.02, 0.01, 0): s = 0.02 / 7, codes (7, 3.5 -> 4, 0) -> (0.02, 0.08/7, 0)."""
    lin = torch.nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.35, 0.7], [0.02, 0.01, 0.0]]))
        lin.bias.fill_(0.123)
    assert quantize_round_trip_(lin, 4) == 1
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[0.1, -0.4, 0.7], [0.02, 0.08 / 7, 0.0]]))
    assert torch.equal(lin.bias.detach(), torch.full((2,), 0.123))  # biases stay


def test_int8_keeps_weights_within_half_a_step_and_a_tied_matrix_is_quantized_once():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.Sequential(emb, head)
    before = emb.weight.detach().clone()
    assert quantize_round_trip_(model, 8) == 1
    step = before.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((emb.weight.detach() - before).abs() <= step / 2 + 1e-7).all())
    assert not torch.equal(emb.weight.detach(), before)


def test_question_transforms_by_hand():
    assert [it["question"] for it in paraphrased(ITEMS)] == ["pa1", "qa2", "pb1", "qc1"]
    assert [it["answer"] for it in paraphrased(ITEMS)] == ["aa1", "aa2", "ab1", "ac1"]
    wrapped = jailbroken(ITEMS[:2], ["X {question}", "{question} Y"])
    assert [it["question"] for it in wrapped] == ["X qa1", "X qa2", "qa1 Y", "qa2 Y"]
    shots = in_context(ITEMS, 2)
    # other entities only, taken cyclically after the item: A's items skip each other
    assert shots[0]["question"] == "qb1\nab1\n\nqc1\nac1\n\nqa1"
    assert shots[2]["question"] == "qc1\nac1\n\nqa1\naa1\n\nqb1"
    assert [it["answer"] for it in shots] == ["aa1", "aa2", "ab1", "ac1"]


def test_quantization_attacks_a_copy_and_other_attacks_keep_the_model():
    lin = torch.nn.Linear(3, 3)
    before = lin.weight.detach().clone()
    model, items = attacked(lin, ITEMS, "quantize_int4")
    assert model is not lin and torch.equal(lin.weight.detach(), before) and items == ITEMS
    model, items = attacked(lin, ITEMS, "jailbreak")
    assert model is lin and len(items) == 4 * len(ITEMS)  # the default prompt set has 4 templates


def test_config_checks_attack_names_and_prompts():
    from ray_unlearn.config import load_config

    cfg = load_config(None, ["eval.attacks=[quantize_int4, paraphrase]"])
    assert cfg.eval.attacks == ["quantize_int4", "paraphrase"] and load_config(None, []).eval.attacks == []
    with pytest.raises(UnlearnError, match=r"^eval.attacks: unknown attack 'prune'; valid: " + ", ".join(ATTACKS)):
        load_config(None, ["eval.attacks=[prune]"])
    with pytest.raises(UnlearnError, match=r"^eval.jailbreak_prompts: needs at least one template and each must hold"):
        load_config(None, ["eval.jailbreak_prompts=[tell me]"])
    with pytest.raises(UnlearnError, match=r"^eval.in_context_examples: must be > 0"):
        load_config(None, ["eval.in_context_examples=0"])


def test_attacks_need_evaluation_and_question_answer_forget_items(micro_config):
    from types import SimpleNamespace

    from ray_unlearn.pipeline import check_attacks

    with pytest.raises(UnlearnError, match="^eval.attacks: the red-team attacks are part of the evaluation"):
        check_attacks(micro_config("eval.attacks=[paraphrase]", "eval.enabled=false"), SimpleNamespace())
    with pytest.raises(UnlearnError, match="^eval.attacks: the attacks re-measure the forget split"):
        check_attacks(micro_config("eval.attacks=[paraphrase]"), SimpleNamespace(eval_splits={"retain": [{}]}))
    check_attacks(micro_config(), SimpleNamespace())  # off: nothing checked


def test_pipeline_writes_attacks_json_report_section_and_plot(micro_bench, micro_config, tmp_path):
    """The run's post-training path (no Ray) with every attack: the target model stands in for an unlearned
    one, so "before" is its own forget metrics; int8 barely moves them, a paraphrase and in-context shots do."""
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_tokenizer
    from ray_unlearn.pipeline import _report, evaluate_all, red_team_run

    cfg = micro_config("eval.max_items=6", "eval.batch_size=6", "eval.max_new_tokens=8", "eval.mia=[]",
                       f"eval.attacks=[{', '.join(ATTACKS)}]", "eval.jailbreak_prompts=['Answer: {question}']")
    inputs = resolve_inputs(cfg)
    tokenizer = load_tokenizer(inputs.tokenizer_path)
    out = tmp_path / "run"
    summaries = evaluate_all(cfg, inputs, micro_bench.target_dir, tokenizer, out)
    attacks = red_team_run(cfg, inputs, micro_bench.target_dir, tokenizer, out, summaries)
    _report(cfg, inputs, out, summaries, [], {}, None, attacks)
    saved = json.loads((out / "eval" / "attacks.json").read_text())
    assert list(saved) == [a for a in ATTACKS if a != "scope"] + list(SCOPE_ENTRIES)
    es = {name: saved[name]["extraction_strength"] for name in saved}
    assert all(v["before"] == summaries["unlearned"]["extraction_strength"] for n, v in es.items()
               if n not in SCOPE_ENTRIES)
    assert all(v["before"] == v["after"] for n, v in es.items() if n in SCOPE_ENTRIES)  # the target is both
    assert abs(es["quantize_int8"]["after"] - es["quantize_int8"]["before"]) < 0.05
    assert es["paraphrase"]["after"] != es["paraphrase"]["before"]
    report = (out / "report.md").read_text()
    assert "## Red-team attacks (forget split, before → after)" in report and "| quantize_int4 | " in report
    assert "## Unlearning scope (target → unlearned" in report and "| out of scope: neighbours | " in report
    assert (out / "plots" / "attacks.png").is_file() and "attacks.png" in report


def test_relearn_split_keeps_both_sides_non_empty():
    from ray_unlearn.eval.redteam import relearn_split

    assert relearn_split(ITEMS, 0.5) == (ITEMS[:2], ITEMS[2:])
    assert relearn_split(ITEMS, 0.01) == (ITEMS[:1], ITEMS[1:]) and relearn_split(ITEMS, 0.99) == (ITEMS[:3], ITEMS[3:])
    with pytest.raises(UnlearnError, match="^eval.attacks: relearn needs at least 2 forget items"):
        relearn_split(ITEMS[:1], 0.5)


def test_relearn_fine_tunes_a_copy_with_the_loop_and_measures_the_other_items(micro_bench, micro_config, tmp_path):
    """From the retain model (it never saw the forget set): 10 AdamW steps of NLL on the first half of the forget
    items make that half far more likely, leave the input model as it was, and the attack's "before" is the
    other half's own evaluation."""
    from ray_unlearn.data.collate import prompt_format
    from ray_unlearn.eval.suite import evaluate_model, summary
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_model, load_tokenizer
    from ray_unlearn.pipeline import red_team_run, relearned

    cfg = micro_config("eval.max_items=8", "eval.batch_size=8", "eval.max_new_tokens=4", "eval.mia=[]",
                       "eval.attacks=[relearn]", "eval.relearn_lr=1e-3")
    inputs = resolve_inputs(cfg)
    tokenizer = load_tokenizer(inputs.tokenizer_path)
    forget = inputs.eval_splits["forget"][:8]
    model = load_model(inputs.retain_model_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = dataclasses.replace(cfg.eval, mia=[])

    def prob(m, items):
        return summary(evaluate_model(m, tokenizer, {"forget": items}, plain, prompt_format(cfg.data)))["forget_Q_A_Prob"]

    victim = relearned(cfg, model, tokenizer, forget[:4])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert prob(victim, forget[:4]) > prob(model, forget[:4]) + 0.2
    result = red_team_run(cfg, inputs, inputs.retain_model_path, tokenizer, tmp_path, {})
    assert result["relearn"]["forget_Q_A_Prob"]["before"] == pytest.approx(prob(model, forget[4:]))


def test_token_noise_replaces_about_the_rate_of_tokens_reproducibly(micro_bench):
    from ray_unlearn.eval.redteam import token_noised
    from ray_unlearn.models.io import load_tokenizer

    tokenizer = load_tokenizer(str(micro_bench.target_dir))
    items = [{"question": "In what year was Brari Tamley born, and where did Brari Tamley grow up?", "answer": "x"}] * 40
    noised = token_noised(items, tokenizer, 0.25)
    assert noised == token_noised(items, tokenizer, 0.25)  # seeded
    assert all(it["answer"] == "x" for it in noised)
    import difflib

    original = tokenizer.encode(items[0]["question"], add_special_tokens=False)
    kept = [sum(b.size for b in difflib.SequenceMatcher(None, original, tokenizer.encode(
        it["question"], add_special_tokens=False), autojunk=False).get_matching_blocks()) / len(original) for it in noised]
    assert 0.6 < sum(kept) / len(kept) < 0.9  # about three quarters of the tokens kept (in order)
    assert len({it["question"] for it in noised}) > 30  # every item draws its own noise
    assert token_noised(items[:1], tokenizer, 1e-9)[0]["question"] == items[0]["question"]


def test_embedding_noise_perturbs_only_a_copy_of_the_input_embeddings_by_the_scale():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noisy, _ = attacked(model, ITEMS, "embedding_noise", embedding_noise=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    emb = "model.embed_tokens.weight"
    delta = noisy.state_dict()[emb] - before[emb]
    assert float(delta.std()) == pytest.approx(0.5 * float(before[emb].std()), rel=0.1)
    assert all(torch.equal(v, noisy.state_dict()[k]) for k, v in before.items() if k != emb)


def test_scope_items_are_the_paraphrased_forget_questions_and_the_neighbours():
    neighbours = [{"question": "qn", "answer": "an", "paraphrased_question": "pn"}]
    sets = scope_items(ITEMS, neighbours)
    assert list(sets) == list(SCOPE_ENTRIES)
    assert sets["in_scope"] == paraphrased(ITEMS) and sets["out_of_scope"] == neighbours  # neighbours as asked
    with pytest.raises(UnlearnError, match=r"^eval.attacks: scope needs out-of-scope neighbours .*set "
                                           r"data.neighbours_path .* or drop scope from eval.attacks$"):
        scope_items(ITEMS, [])
    with pytest.raises(ValueError, match="scope needs the pipeline"):
        attacked(None, ITEMS, "scope")


def test_builtin_neighbours_share_a_value_with_the_forget_split_and_are_retain_items(micro_bench, micro_config):
    from ray_unlearn.data.benchmark import neighbour_items
    from ray_unlearn.job import resolve_inputs

    splits = micro_bench.splits()
    inputs = resolve_inputs(micro_config())
    assert inputs.neighbours == splits["neighbours"] and inputs.neighbours  # forget10: the built-in split itself
    forget_entities = {it["entity"] for it in inputs.forget}
    values = {(it["attribute"], it["value"]) for it in inputs.forget}
    assert all(it["entity"] not in forget_entities and (it["attribute"], it["value"]) in values and it in inputs.retain
               for it in inputs.neighbours)
    small = resolve_inputs(micro_config("data.forget_split=forget01"))
    assert small.neighbours == neighbour_items(small.retain, small.forget)  # that forget split's own neighbours


def test_scope_without_neighbours_is_one_line_and_neighbours_path_gives_them(micro_bench, micro_config, tmp_path):
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.pipeline import check_attacks

    splits = micro_bench.splits()

    def jsonl(name, items):
        (tmp_path / name).write_text("".join(json.dumps(it) + "\n" for it in items))
        return str(tmp_path / name)

    data = [f"model.path={micro_bench.target_dir}", f"data.forget_path={jsonl('f.jsonl', splits['forget10'][:4])}",
            f"data.retain_path={jsonl('r.jsonl', splits['retain'][:6])}", "eval.attacks=[scope]"]
    cfg = micro_config(*data)
    inputs = resolve_inputs(cfg)
    assert inputs.neighbours == []  # user data: no built-in neighbours
    with pytest.raises(UnlearnError, match=r"^eval.attacks: scope needs out-of-scope neighbours .*data.neighbours_path"):
        check_attacks(cfg, inputs)
    cfg = micro_config(*data, f"data.neighbours_path={jsonl('n.jsonl', splits['neighbours'][:3])}")
    inputs = resolve_inputs(cfg)
    check_attacks(cfg, inputs)
    assert [it["question"] for it in inputs.neighbours] == [it["question"] for it in splits["neighbours"][:3]]
    with pytest.raises(UnlearnError, match=r"^data.neighbours_path: 1 item\(s\) are also forget items"):
        resolve_inputs(micro_config(*data, f"data.neighbours_path={jsonl('m.jsonl', splits['forget10'][:1])}"))


def test_scope_separates_forgetting_in_scope_from_keeping_neighbours(micro_bench, micro_config):
    """The retain model is the ideal unlearned model: it never saw the forget entities, so their paraphrased
    questions are far below the target's (in scope fell), but it trained on the neighbours, so they stay near the
    target's (out of scope kept). Neither model is changed by the measurement."""
    from ray_unlearn.job import resolve_inputs
    from ray_unlearn.models.io import load_model, load_tokenizer
    from ray_unlearn.pipeline import forget_measure, scope_results

    cfg = micro_config("eval.max_items=8", "eval.batch_size=8", "eval.max_new_tokens=4", "eval.attacks=[scope]")
    inputs = resolve_inputs(cfg)
    model = load_model(inputs.retain_model_path)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result = scope_results(cfg, inputs, model, forget_measure(cfg, load_tokenizer(inputs.tokenizer_path)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    es, prob = ({entry: result[entry][key] for entry in SCOPE_ENTRIES} for key in ("extraction_strength",
                                                                                    "forget_Q_A_Prob"))
    # measured on micro, 8 items: in scope ES 0.50 -> 0.21, prob 0.24 -> 0.02; out of scope prob 0.94 -> 0.93
    assert es["in_scope"]["before"] > es["in_scope"]["after"] + 0.2 and prob["in_scope"]["after"] < 0.2 * prob[
        "in_scope"]["before"]
    assert abs(prob["out_of_scope"]["after"] - prob["out_of_scope"]["before"]) < 0.05
    assert es["out_of_scope"]["after"] > es["in_scope"]["after"] + 0.5
