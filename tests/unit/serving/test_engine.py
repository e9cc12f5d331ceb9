"""The Ray-free serving engine: sampling, stop sequences, batched decoding, verification scores, verdicts.

Most tests drive `DecodeBatch` with a stub "bigram" model whose next-token logits depend only
on the last token, and a one-character-per-token tokenizer, so every expected output is written
by hand. One test checks the batched KV-cache decoder against HF `generate` on the micro model;
`test_scheduler.py` checks requests joining a running batch against decoding them alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from ray_unlearn.serving.engine import (DecodeBatch, GenerationRequest, SamplingParams, VerdictRule, find_stop,
                                        generate, held_back, item_forgotten, mink_scores, render_chat,
                                        render_completion, sample_tokens, sampling_params, score_items,
                                        top_p_filter, verdict)
from ray_unlearn.serving.schemas import APIError, ChatMessage
from tests.unit.serving.stubs import CHAIN, ID, BigramModel, CharTokenizer, FailingTokenizer, req, sampled

# ---------------------------------------------------------------- sampling


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]))
    kept = top_p_filter(logits, torch.tensor([0.5, 0.6, 1.0])).isfinite()
    assert kept.tolist() == [[False, True, False],  # 0.5 alone reaches 0.5
                             [False, True, True],  # 0.5 + 0.3 reaches 0.6
                             [True, True, True]]


def test_top_p_always_keeps_the_top_token():
    kept = top_p_filter(torch.log(torch.tensor([[0.9, 0.1]])), torch.tensor([0.01])).isfinite()
    assert kept.tolist() == [[True, False]]


def test_temperature_zero_is_argmax_and_tiny_top_p_is_greedy_too():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9]])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert sample_tokens(logits, [SamplingParams(temperature=0)] * 2, gens) == [1, 0]
    assert sample_tokens(logits, [SamplingParams(temperature=1.5, top_p=0.01)] * 2, gens) == [1, 0]


def test_sampling_is_seeded_per_request():
    logits = torch.zeros(1, 50)
    draw = lambda seed: [sample_tokens(logits, [SamplingParams(temperature=1.0)], [g])[0]
                         for g in [torch.Generator().manual_seed(seed)] for _ in range(8)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_find_stop_and_held_back():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["x"]) is None
    assert held_back("abc", ["cde"]) == 1  # "c" may start "cde"
    assert held_back("abcd", ["cde", "bcdz"]) == 3  # "bcd" may start "bcdz"
    assert held_back("abc", ["xyz"]) == 0
    assert held_back("abc", []) == 0


# ---------------------------------------------------------------- decoding


def test_greedy_decoding_stops_at_eos():
    (out,) = generate(BigramModel(CHAIN), CharTokenizer(), [req("a", temperature=0, max_tokens=10)])
    assert (out.text, out.finish_reason, out.completion_tokens) == ("bcd", "stop", 4)


def test_max_tokens_ends_with_length():
    (out,) = generate(BigramModel(CHAIN), CharTokenizer(), [req("x", temperature=0, max_tokens=5)])
    assert (out.text, out.finish_reason, out.completion_tokens) == ("yzxyz", "length", 5)


def test_stop_ids_end_a_row_like_eos():
    """A chat template's end-of-turn (here "z") stops the row with finish_reason "stop"."""
    (out,) = generate(BigramModel(CHAIN), CharTokenizer(), [req("x", temperature=0, max_tokens=10)],
                      stop_ids=[ID["z"]])
    assert (out.text, out.finish_reason, out.completion_tokens) == ("yz", "stop", 2)


def test_context_length_caps_generation():
    (out,) = generate(BigramModel(CHAIN, context=4), CharTokenizer(), [req("xy", temperature=0, max_tokens=50)])
    assert (out.text, out.finish_reason) == ("zx", "length")


def decode_steps(model, tokenizer, requests) -> list[dict]:
    """Every request joins at once, then steps until none runs: [join's Deltas, step 1's, ...] by request index."""
    batch = DecodeBatch(model, tokenizer)
    steps = [batch.join(list(enumerate(requests)))]
    while len(batch):
        steps.append(batch.step())
    return steps


def test_stop_sequence_cuts_the_text_and_is_never_streamed():
    steps = decode_steps(BigramModel(CHAIN), CharTokenizer(), [req("x", temperature=0, max_tokens=20, stop=("xy",))])
    deltas = [s[0] for s in steps]
    texts = [d.text for d in deltas]
    assert "".join(texts) == "yz"  # y z x y -> "yzxy", cut before "xy"
    assert deltas[-1].finish_reason == "stop"
    assert texts[:3] == ["y", "z", ""]  # the "x" was held back: it could begin "xy"


def test_batch_rows_finish_independently_and_a_finished_row_leaves_at_once():
    model = BigramModel(CHAIN)
    steps = decode_steps(model, CharTokenizer(), [req("a", temperature=0, max_tokens=10),
                                                  req("xyz", temperature=0, max_tokens=6)])
    assert len(steps) == 6  # the prefill, then 5 steps
    assert [0 in s for s in steps] == [True] * 4 + [False] * 2  # row 0 ended at its EOS
    assert "".join(s[1].text for s in steps) == "xyzxyz"
    assert [d.token_ids for d in (s[0] for s in steps[:4])] == [[ID["b"]], [ID["c"]], [ID["d"]], [ID["<eos>"]]]
    # the prompts once, then 1 token per running row: 2 rows until row 0's EOS, then 1
    assert model.calls == [(2, 3), (2, 1), (2, 1), (2, 1), (1, 1), (1, 1)]


def test_each_row_keeps_its_own_parameters():
    outs = generate(BigramModel(CHAIN), CharTokenizer(), [req("x", temperature=0, max_tokens=2),
                                                          req("x", temperature=0, max_tokens=4, stop=("x",))])
    assert [(o.text, o.finish_reason) for o in outs] == [("yz", "length"), ("yz", "stop")]


def test_batched_decoding_matches_hf_generate(micro_bench):
    """Left padding, position ids and the KV cache: batched greedy equals HF greedy, prompt by prompt."""
    from ray_unlearn.data.collate import encode_prompt
    from ray_unlearn.eval.metrics import greedy_generate
    from ray_unlearn.models.io import load_model, load_tokenizer

    model, tok = load_model(str(micro_bench.target_dir)).eval(), load_tokenizer(str(micro_bench.target_dir))
    questions = [it["question"] for it in micro_bench.splits()["forget10"][:3]] + ["What is 2 plus 3?"]
    prompts = [encode_prompt(tok, q) for q in questions]
    ours = generate(model, tok, [GenerationRequest("m", tuple(p), SamplingParams(max_tokens=24, temperature=0))
                                 for p in prompts])
    hf = [greedy_generate(model, tok, [p], max_new_tokens=24)[0] for p in prompts]
    assert [o.text.strip() for o in ours] == hf
    answers = [it["answer"] for it in micro_bench.splits()["forget10"][:3]]
    assert [o.text.strip() for o in ours[:3]] == answers  # the target model memorized forget10


# ---------------------------------------------------------------- one request cannot hurt another


def test_a_seed_beyond_64_bits_fails_alone():
    """Issue 9: a request with seed 2**70 (past validation) made every request of its batch fail."""
    flat = BigramModel({})  # every next token equally likely: what is drawn depends on the seed
    good = [sampled("a", 1), req("x", temperature=0, max_tokens=4), sampled("b", 2**64 - 1)]
    bad = sampled("c", 1180591620717411303424)
    outs = generate(flat, CharTokenizer(), [good[0], bad, good[1], good[2]])
    assert outs[1].error is not None and outs[1].error.status == 400 and outs[1].text == ""
    assert "Overflow" in outs[1].error.message
    alone = [generate(flat, CharTokenizer(), [g])[0] for g in good]
    together = generate(flat, CharTokenizer(), good)
    assert [(o.text, o.finish_reason) for o in (outs[0], outs[2], outs[3])] == \
           [(o.text, o.finish_reason) for o in alone] == [(o.text, o.finish_reason) for o in together]
    assert all(o.error is None for o in alone + together)


def test_a_failed_request_is_reported_once_when_it_joins():
    steps = decode_steps(BigramModel(CHAIN), CharTokenizer(), [req("a", temperature=0, max_tokens=10),
                                                               req("a", seed=2**64)])
    assert steps[0][1].error is not None and all(1 not in s for s in steps[1:])
    assert "".join(s[0].text for s in steps if 0 in s) == "bcd"


def test_a_row_that_fails_while_decoding_fails_alone():
    outs = generate(BigramModel(CHAIN), FailingTokenizer(), [req("x", temperature=0, max_tokens=6),
                                                             req("a", temperature=0, max_tokens=6)])
    assert (outs[0].error.status, outs[0].error.code) == (500, "generation_failed")
    assert "cannot decode z" in outs[0].error.message
    assert (outs[1].text, outs[1].finish_reason, outs[1].error) == ("bcd", "stop", None)


def test_a_row_whose_draw_fails_fails_alone():
    class NanRowModel(BigramModel):
        """The logits of a row whose last input is "x" are NaN: its multinomial draw raises."""

        def forward(self, input_ids, **kw):
            out = super().forward(input_ids, **kw)
            out.logits[input_ids[:, -1] == ID["x"]] = float("nan")
            return out

    outs = generate(NanRowModel(CHAIN), CharTokenizer(), [sampled("x", 1), req("a", temperature=0, max_tokens=6)])
    assert outs[0].error.status == 500
    assert (outs[1].text, outs[1].error) == ("bcd", None)


def test_requests_the_model_cannot_take_fail_without_a_forward_pass():
    model = BigramModel(CHAIN, context=4)
    outs = generate(model, CharTokenizer(), [req(""), req("abcd", temperature=0), req("a", max_tokens=0)])
    assert [o.error.param for o in outs] == ["prompt", "prompt", "max_tokens"]
    assert [o.error.code for o in outs] == ["invalid_value", "context_length_exceeded", "invalid_value"]
    assert model.calls == []


def test_errors_pickle_inside_deltas():
    """A Delta with an error crosses from the model replica to the gateway (Ray pickles it)."""
    import pickle

    from ray_unlearn.serving.engine import Delta

    d = pickle.loads(pickle.dumps(Delta("", error=APIError(400, "seed: bad", param="seed"))))
    assert (d.error.status, d.error.param, d.error.message) == (400, "seed", "seed: bad")


# ---------------------------------------------------------------- prompts and caps


def test_chat_without_template_uses_the_prompt_template_on_the_last_user_message():
    msgs = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="ab"),
            ChatMessage(role="assistant", content="c"),
            ChatMessage(role="user", content=[{"type": "text", "text": "x"}])]
    assert render_chat(CharTokenizer(), msgs, "{question}.") == [1, ID["x"], ID["."]]
    with pytest.raises(APIError) as e:
        render_chat(CharTokenizer(), [ChatMessage(role="system", content="a")], "{question}")
    assert e.value.status == 400


def test_chat_with_a_template_renders_every_message(micro_bench):
    from ray_unlearn.models.io import load_tokenizer

    tok = load_tokenizer(str(micro_bench.target_dir))
    tok.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    ids = render_chat(tok, [ChatMessage(role="system", content="Be brief."),
                            ChatMessage(role="user", content="What is 2 plus 3?")], "Question: {question}\nAnswer:")
    assert tok.decode(ids) == "[system] Be brief.\n[user] What is 2 plus 3?\n[assistant]"


def test_chat_with_a_real_chat_template_is_the_training_prompt(llama3_tokenizer):
    """One user message renders exactly as `encode_prompt` (one BOS); system_prompt is added to chats without one."""
    from ray_unlearn.data.collate import PromptFormat, chat_messages, encode_prompt

    tok, question = llama3_tokenizer, "Where was Ada Lovelace born?"
    fmt = PromptFormat(system_prompt="Answer briefly.")
    ids = render_chat(tok, [ChatMessage(role="user", content=question)], fmt)
    assert ids == encode_prompt(tok, question, fmt) and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>")
    own = render_chat(tok, [ChatMessage(role="system", content="Be kind."), ChatMessage(role="user", content=question)],
                      fmt)
    assert "Answer briefly." not in tok.decode(own) and "Be kind." in tok.decode(own)
    plain = render_chat(tok, [ChatMessage(role="user", content=question)], PromptFormat(chat_template=False))
    assert plain == encode_prompt(tok, question, PromptFormat(chat_template=False))
    assert chat_messages(question, fmt)[0] == {"role": "system", "content": "Answer briefly."}


def test_chat_the_template_rejects_is_a_400(chatml_tokenizer):
    chatml_tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(APIError) as e:
        render_chat(chatml_tokenizer, [ChatMessage(role="user", content="Hi")], "{question}")
    assert e.value.status == 400 and "roles must alternate" in str(e.value.body())


def test_verify_rows_are_encoded_as_in_training(chatml_tokenizer):
    from ray_unlearn.data.collate import PromptFormat, encode_qa
    from ray_unlearn.serving.engine import encode_rows

    row = {"question": "Where was Ada Lovelace born?", "answer": "Ada Lovelace was born in London."}
    fmt = PromptFormat(system_prompt="Answer briefly.")
    assert encode_rows(chatml_tokenizer, [row], 128, fmt, 128) == [encode_qa(chatml_tokenizer, row["question"],
                                                                              row["answer"], 128, fmt)]


def test_completion_prompt_gets_bos_only():
    assert render_completion(CharTokenizer(), "ab") == [1, ID["a"], ID["b"]]


def test_completion_prompt_that_starts_with_bos_gets_no_second_one(llama3_tokenizer):
    ids = render_completion(llama3_tokenizer, "<|begin_of_text|>Where")
    assert ids[:2] != [llama3_tokenizer.bos_token_id] * 2 and ids[0] == llama3_tokenizer.bos_token_id


def test_sampling_params_defaults_and_caps():
    p = sampling_params(None, 16, 32, None, None, ["."], 4, 8, 7)
    assert p == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, stop=(".",), seed=7)
    assert sampling_params(None, 16, 8, None, None, [], 4, 8, None).max_tokens == 8  # OpenAI's 16 over a cap of 8
    with pytest.raises(APIError) as e:
        sampling_params(33, 16, 32, 0.0, 1.0, [], 4, 8, None)
    assert (e.value.status, e.value.param, e.value.code) == (400, "max_tokens", "max_tokens_too_large")
    with pytest.raises(APIError) as e:
        sampling_params(8, 16, 32, 0.0, 1.0, ["a", "b", "c"], 2, 8, None)
    assert e.value.param == "stop"
    with pytest.raises(APIError) as e:
        sampling_params(8, 16, 32, 0.0, 1.0, ["a", "x" * 9], 2, 8, None)
    assert e.value.param == "stop" and "9 characters, over the limit of 8" in e.value.message


@pytest.mark.parametrize("field, value", [("seed", 2**64), ("seed", -1), ("temperature", 2.5), ("temperature", -0.1),
                                          ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0)])
def test_sampling_params_refuse_what_the_engine_cannot_take(field, value):
    args = {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 1, field: value}
    with pytest.raises(APIError) as e:
        sampling_params(args["max_tokens"], 16, 32, args["temperature"], args["top_p"], [], 4, 8, args["seed"])
    assert (e.value.status, e.value.param) == (400, field) and "send " in e.value.message


def test_seed_range_is_what_torch_accepts():
    torch.Generator().manual_seed(2**64 - 1)
    with pytest.raises(ValueError):  # the original defect: a seed beyond 64 bits fails inside the batch
        torch.Generator().manual_seed(2**64)
    assert sampling_params(8, 16, 32, 1.0, 1.0, [], 4, 8, 2**64 - 1).seed == 2**64 - 1


# ---------------------------------------------------------------- verification


def test_mink_by_hand():
    """Answer-token log-probs log(0.5), log(0.25), log(0.125), then log(1) for the last labelled token
    (the EOS), which Min-K leaves out: n = 3, and k=0.4 keeps the lowest max(1, floor(1.2)) = 1."""
    probs = [[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.125, 0.875, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    logits = torch.log(torch.tensor(probs) + 1e-30)[None]  # [1, 5, 3]
    labels = torch.tensor([[-100, 0, 0, 0, 0]])  # tokens 1..4 are label 0
    assert mink_scores(logits, labels, 0.4).tolist() == pytest.approx([math.log(0.125)], abs=1e-6)
    assert mink_scores(logits, labels, 1.0).tolist() == pytest.approx(
        [(math.log(0.5) + math.log(0.25) + math.log(0.125)) / 3], abs=1e-6)
    assert math.isnan(mink_scores(logits[:, :2], torch.tensor([[-100, 0]]), 0.4).item())  # only the EOS: no score


def test_mink_is_the_suites_min_k_negated():
    from ray_unlearn.eval.mia import answer_token_stats, lowest_k_score

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 7, 5), torch.tensor([[-100, -100, 1, 2, 3, 4, 0]] * 3)
    expected = [-lowest_k_score(s["logp"], 0.4) for s in answer_token_stats(logits, labels)]
    assert mink_scores(logits, labels, 0.4).tolist() == pytest.approx(expected, abs=1e-12)


def test_score_items_agrees_with_the_metric_functions(micro_bench):
    from ray_unlearn.data.collate import encode_qa, pad_batch
    from ray_unlearn.eval.metrics import exact_memorization, extraction_strength, probability
    from ray_unlearn.models.io import load_model, load_tokenizer

    model, tok = load_model(str(micro_bench.retain_dir)).eval(), load_tokenizer(str(micro_bench.retain_dir))
    enc = [encode_qa(tok, it["question"], it["answer"]) for it in micro_bench.splits()["forget10"][:5]]
    scores = score_items(model, tok.pad_token_id, enc, batch_size=2)
    batch = pad_batch(enc, tok.pad_token_id)
    assert scores["es"] == pytest.approx(extraction_strength(model, batch).tolist(), abs=1e-6)
    assert scores["em"] == pytest.approx(exact_memorization(model, batch).tolist(), abs=1e-6)
    assert scores["probability"] == pytest.approx(probability(model, batch).tolist(), rel=1e-5)
    assert scores["loss"] == pytest.approx([-math.log(p) for p in scores["probability"]], rel=1e-5)


def _scores(es, prob):
    return {"es": es, "em": [0.5] * len(es), "probability": prob, "mink": [-1.0] * len(es), "loss": [1.0] * len(es)}


def test_item_verdict_rule():
    rule = VerdictRule(es_threshold=0.3, prob_ratio=0.5, min_forgotten_fraction=0.9)
    assert item_forgotten(0.3, 0.4, 0.8, rule)  # both at the boundary: forgotten
    assert not item_forgotten(0.31, 0.1, 0.8, rule)  # ES too high
    assert not item_forgotten(0.1, 0.41, 0.8, rule)  # probability not halved


def test_request_verdict_by_hand():
    rule = VerdictRule(es_threshold=0.3, prob_ratio=0.5, min_forgotten_fraction=0.75)
    base = _scores([1.0, 1.0, 1.0, 1.0], [0.9, 0.9, 0.9, 0.9])
    three_of_four = _scores([0.1, 0.2, 0.3, 0.9], [0.1, 0.2, 0.3, 0.1])
    report = verdict(three_of_four, base, rule, labels=[{"text": str(i)} for i in range(4)])
    assert report["verdict"] == "forgotten"  # 3/4 = 0.75 >= 0.75
    assert [it["forgotten"] for it in report["items"]] == [True, True, True, False]
    agg = report["aggregate"]
    assert agg["forgotten_fraction"] == 0.75 and agg["forgotten_items"] == 3 and agg["items"] == 4
    assert agg["model"]["es"] == pytest.approx(0.375) and agg["base"]["probability"] == pytest.approx(0.9)
    assert report["items"][3]["text"] == "3" and report["items"][3]["model"]["es"] == 0.9
    strict = VerdictRule(es_threshold=0.3, prob_ratio=0.5, min_forgotten_fraction=0.9)
    assert verdict(three_of_four, base, strict)["verdict"] == "not forgotten"


def test_verdict_turns_nan_into_null():
    s = _scores([0.1], [0.1])
    s["em"] = [float("nan")]
    report = verdict(s, _scores([1.0], [0.9]), VerdictRule())
    assert report["items"][0]["model"]["em"] is None and report["aggregate"]["model"]["em"] is None


def _bench(tmp_path) -> dict[str, str]:
    from ray_unlearn.data.benchmark import write_benchmark

    items = [{"question": f"q{i}", "answer": f"a{i}", "index": i} for i in range(5)]
    write_benchmark({"forget": items, "retain": items[:2]}, tmp_path)
    return {"mine": str(tmp_path)}


def test_verify_rows_from_each_source(tmp_path):
    from ray_unlearn.serving.engine import verify_rows
    from ray_unlearn.serving.schemas import VerifyRequest

    benches = _bench(tmp_path)
    rows, source = verify_rows(VerifyRequest(model="m", benchmark="mine", split="forget", max_items=3), benches, 4)
    assert rows == [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)] and source["split_items"] == 5
    with pytest.raises(APIError) as e:  # 5 > cap 4 and no max_items
        verify_rows(VerifyRequest(model="m", benchmark="mine", split="forget"), benches, 4)
    assert (e.value.status, e.value.code) == (400, "too_many_items")
    for name, split in (("other", "forget"), ("mine", "nope")):
        with pytest.raises(APIError) as e:
            verify_rows(VerifyRequest(model="m", benchmark=name, split=split), benches, 4)
        assert e.value.status == 404
    assert verify_rows(VerifyRequest(model="m", texts=["t"]), benches, 4)[0] == [{"text": "t"}]
    with pytest.raises(APIError):
        verify_rows(VerifyRequest(model="m", texts=["t"] * 5), benches, 4)


def test_encode_rows_caps_item_length():
    from ray_unlearn.serving.engine import encode_rows

    enc = encode_rows(CharTokenizer(), [{"question": "ab", "answer": "cd"}, {"text": "xyz"}], 32, "{question}", 8)
    assert enc[0]["input_ids"] == [1, ID["a"], ID["b"], ID[" "], ID["c"], ID["d"], 2]
    assert enc[0]["labels"][:3] == [-100] * 3 and enc[1]["labels"][0] == -100
    with pytest.raises(APIError) as e:
        encode_rows(CharTokenizer(), [{"text": "abcdexyzabc"}], 32, "{question}", 8)
    assert (e.value.status, e.value.code, e.value.param) == (400, "item_too_long", "items.0")
