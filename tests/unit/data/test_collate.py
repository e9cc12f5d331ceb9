"""Prompt formats, token by token, on locally built tokenizers (tests/conftest.py, no hub): a
Llama-3-style chat tokenizer whose post-processor also adds BOS (the double-BOS trap), a
ChatML/Qwen-style one without BOS (and a default system prompt in its template), Gemma- and
Phi-3-style ones (Phi-3's template writes EOS after the last turn), a Mistral-style SentencePiece-like
one, and a GPT-2-style one without a chat template (the plain prompt_template path of the built-in
benchmark).

"Generation" is checked as: the rendered conversation's text, tokenized as a whole, equals
prompt ids + answer ids (the pre-tokenizer splits at newlines and special tokens, so the
prompt/answer boundary is stable), and the answer decodes to the answer plus the end-of-turn.
"""

from __future__ import annotations

import pytest

from ray_unlearn.config import load_config
from ray_unlearn.data.collate import (DEFAULT_PROMPT, PromptFormat, answer_ids, encode_prompt, encode_qa,
                                      prompt_format, render_prompt, stop_token_ids)
from ray_unlearn.errors import UnlearnError
from ray_unlearn.logprobs import IGNORE_INDEX

QUESTION, ANSWER = "Where was Ada Lovelace born?", "Ada Lovelace was born in London."

# byte-level tokenizers: the rendered conversation tokenizes the same as prompt + answer
END_OF_TURN = {"llama3_tokenizer": "<|eot_id|>", "chatml_tokenizer": "<|im_end|>", "gemma_tokenizer": "<end_of_turn>",
               "phi3_tokenizer": "<|end|>"}


def _tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- chat templates


SYSTEM_ROLE = {"llama3_tokenizer", "chatml_tokenizer", "phi3_tokenizer"}  # Gemma's template refuses system messages


@pytest.mark.parametrize("name, system", [(name, system) for name in sorted(END_OF_TURN)
                                          for system in ("", "Answer briefly.") if not system or name in SYSTEM_ROLE])
def test_chat_encoding_token_by_token(name: str, system: str, request: pytest.FixtureRequest) -> None:
    tok, fmt, end_of_turn = request.getfixturevalue(name), PromptFormat(system_prompt=system), END_OF_TURN[name]
    prompt = encode_prompt(tok, QUESTION, fmt)
    answer = answer_ids(tok, QUESTION, ANSWER, fmt)
    enc = encode_qa(tok, QUESTION, ANSWER, max_length=512, fmt=fmt)
    assert enc["input_ids"] == prompt + answer
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert tok.decode(answer, skip_special_tokens=False) == ANSWER + end_of_turn
    assert answer[-1] == tok.convert_tokens_to_ids(end_of_turn)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUESTION}]
    rendered = tok.apply_chat_template(messages + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    through_answer = rendered[:rendered.index(ANSWER + end_of_turn) + len(ANSWER + end_of_turn)]
    assert prompt + answer == _tokens(tok, through_answer)  # what generation after the prompt writes
    assert tok.decode(prompt, skip_special_tokens=False) == render_prompt(tok, QUESTION, fmt)


def test_answer_ends_at_the_end_of_turn_not_at_the_eos_written_after_the_conversation(phi3_tokenizer) -> None:
    """Phi-3's template closes an answered conversation with EOS after the turn's <|end|>; generation stops
    at <|end|>, so the answer (what is trained and scored) ends there and <|end|> is a stop id."""
    tok = phi3_tokenizer
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    assert tok.apply_chat_template(messages, tokenize=False).endswith(f"{ANSWER}<|end|>\n<|endoftext|>")
    answer = answer_ids(tok, QUESTION, ANSWER)
    assert tok.decode(answer, skip_special_tokens=False) == ANSWER + "<|end|>"
    assert tok.eos_token_id not in answer
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")})


def test_sentencepiece_style_answer_is_tokenized_as_its_own_turn(mistral_tokenizer) -> None:
    """Mistral's template joins the answer to "[/INST]"; the answer is tokenized alone (a word-start
    piece first, as Mistral's own tokenization of turns does), with BOS once and </s> closing it."""
    tok = mistral_tokenizer
    prompt, answer = encode_prompt(tok, QUESTION), answer_ids(tok, QUESTION, ANSWER)
    assert prompt.count(tok.bos_token_id) == 1 and prompt[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(answer)[0] == "\u2581Ada" and answer[-1] == tok.eos_token_id
    assert tok.decode(prompt + answer, skip_special_tokens=False) == f"<s>[INST] {QUESTION} [/INST] {ANSWER}</s>"
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_llama3_prompt_has_one_bos_although_template_and_tokenizer_both_add_it(llama3_tokenizer) -> None:
    tok = llama3_tokenizer
    bos = tok.bos_token_id
    rendered = render_prompt(tok, QUESTION)
    assert tok(rendered)["input_ids"][:2] == [bos, bos]  # the trap: the template's BOS plus the tokenizer's
    prompt = encode_prompt(tok, QUESTION)
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert tok.decode(prompt, skip_special_tokens=False) == (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chatml_prompt_has_no_bos_and_the_templates_default_system_prompt(chatml_tokenizer) -> None:
    tok = chatml_tokenizer
    assert tok.bos_token_id is None
    assert tok.decode(encode_prompt(tok, QUESTION), skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    fmt = PromptFormat(system_prompt="Answer briefly.")
    assert render_prompt(tok, QUESTION, fmt).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")


def test_chat_template_ignores_prompt_template(llama3_tokenizer) -> None:
    tok = llama3_tokenizer
    assert encode_prompt(tok, QUESTION, PromptFormat(template="Q: {question} A:")) == encode_prompt(tok, QUESTION)


def test_truncation_keeps_the_prompt_and_cuts_the_answer(chatml_tokenizer) -> None:
    tok = chatml_tokenizer
    prompt = encode_prompt(tok, QUESTION)
    enc = encode_qa(tok, QUESTION, ANSWER, max_length=len(prompt) + 2)
    assert enc["input_ids"] == prompt + answer_ids(tok, QUESTION, ANSWER)[:2]
    assert len(encode_qa(tok, QUESTION, ANSWER, max_length=1)["input_ids"]) == len(prompt) + 1


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_stop_ids_are_eos_and_the_end_of_turn(name: str, request: pytest.FixtureRequest) -> None:
    tok, end_of_turn = request.getfixturevalue(name), END_OF_TURN[name]
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids(end_of_turn)})
    assert stop_token_ids(tok, PromptFormat(chat_template=False)) == [tok.eos_token_id]


def test_chat_template_false_uses_the_plain_prompt_template(llama3_tokenizer) -> None:
    tok = llama3_tokenizer
    fmt = PromptFormat(chat_template=False)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    expected = [bos] + _tokens(tok, DEFAULT_PROMPT.format(question=QUESTION)) + _tokens(tok, " " + ANSWER) + [eos]
    assert encode_qa(tok, QUESTION, ANSWER, max_length=512, fmt=fmt)["input_ids"] == expected


def test_template_without_an_end_token_gets_eos(chatml_tokenizer) -> None:
    tok = chatml_tokenizer
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    answer = answer_ids(tok, QUESTION, ANSWER)
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == " " + ANSWER


# ---------------------------------------------------------------- no chat template


def test_without_chat_template_the_encoding_is_todays(gpt2_tokenizer) -> None:
    """[BOS] + prompt_template's tokens, " " + answer's tokens + [EOS] (the built-in benchmark's encoding)."""
    tok = gpt2_tokenizer
    for setting in ("auto", False):
        fmt = PromptFormat(chat_template=setting)
        prompt = [tok.bos_token_id] + _tokens(tok, DEFAULT_PROMPT.format(question=QUESTION))
        answer = _tokens(tok, " " + ANSWER) + [tok.eos_token_id]
        assert encode_prompt(tok, QUESTION, fmt) == prompt
        assert encode_qa(tok, QUESTION, ANSWER, 512, fmt) == {"input_ids": prompt + answer,
                                                               "labels": [IGNORE_INDEX] * len(prompt) + answer}
        assert prompt + answer == [tok.bos_token_id] + _tokens(tok, DEFAULT_PROMPT.format(question=QUESTION) + " "
                                                               + ANSWER) + [tok.eos_token_id]
    assert stop_token_ids(tok) == [tok.eos_token_id]
    assert encode_qa(tok, QUESTION, ANSWER, 512, DEFAULT_PROMPT) == encode_qa(tok, QUESTION, ANSWER, 512)


def test_plain_template_that_starts_with_bos_gets_no_second_one(gpt2_tokenizer) -> None:
    tok = gpt2_tokenizer
    prompt = encode_prompt(tok, QUESTION, PromptFormat(template="<|endoftext|>Q: {question}\nA:"))
    assert prompt[:2] != [tok.bos_token_id] * 2 and prompt[0] == tok.bos_token_id


def test_chat_template_true_without_one_is_a_one_line_error(gpt2_tokenizer) -> None:
    with pytest.raises(UnlearnError) as e:
        encode_prompt(gpt2_tokenizer, QUESTION, PromptFormat(chat_template=True))
    msg = str(e.value)
    assert "\n" not in msg and "data.chat_template=auto" in msg
    with pytest.raises(UnlearnError, match="^chat_template is true.*chat_template=auto"):
        encode_qa(gpt2_tokenizer, QUESTION, ANSWER, fmt=PromptFormat(chat_template=True, setting=""))


def test_failing_template_is_a_one_line_error(chatml_tokenizer) -> None:
    tok = chatml_tokenizer
    tok.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(UnlearnError, match="System role not supported.*chat_template=false") as e:
        encode_prompt(tok, QUESTION)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- config


def test_prompt_format_from_config() -> None:
    cfg = load_config(None, ["data.chat_template=false", "data.system_prompt=Be brief."])
    assert prompt_format(cfg.data) == PromptFormat(DEFAULT_PROMPT, False, "Be brief.")
    assert load_config(None).data.chat_template == "auto"
    assert load_config(None, ["data.chat_template=true"]).data.chat_template is True
    assert load_config(None, ["data.chat_template='false'"]).data.chat_template is False


@pytest.mark.parametrize("value", ["sometimes", "1", "[auto]"])
def test_bad_chat_template_setting_is_an_error(value: str) -> None:
    with pytest.raises(UnlearnError, match="data.chat_template"):
        load_config(None, [f"data.chat_template={value}"])
    with pytest.raises(UnlearnError, match="chat_template"):
        PromptFormat(chat_template="sometimes")
