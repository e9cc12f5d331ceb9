"""Prompt formats, token by token, on locally built tokenizers (no hub): a Llama-3-style chat
tokenizer whose post-processor also adds BOS (the double-BOS trap), a ChatML/Qwen-style one
without BOS (and a default system prompt in its template), and a GPT-2-style one without a chat
template (the plain prompt_template path the built-in benchmark uses).

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

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

# Llama 3's pre-tokenization: newlines are their own pieces, so text after "\n\n" splits the same alone or joined.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = ["Where was Ada Lovelace born?", "Ada Lovelace was born in London.", "What is the capital of France?",
          "Paris is the capital of France.", "You are a helpful assistant.", "Answer briefly.",
          "user assistant system", "Question: Answer:", "I don't know.", "header\n\nbody\n\nmore\n\n", "a\nb\n"]

QUESTION, ANSWER = "Where was Ada Lovelace born?", "Ada Lovelace was born in London."


def _bpe(special: list[str], split_like_llama3: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split_like_llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def llama3_tokenizer():
    """bos <|begin_of_text|> (written by the template AND added by the post-processor), eos
    <|end_of_text|>, end-of-turn <|eot_id|>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _bpe(special, split_like_llama3=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  additional_special_tokens=special[2:])
    out.chat_template = LLAMA3_TEMPLATE
    return out


def chatml_tokenizer():
    """No BOS, eos <|endoftext|>, end-of-turn <|im_end|> followed by a newline in the template."""
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    out = PreTrainedTokenizerFast(tokenizer_object=_bpe(special, split_like_llama3=True), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=special[1:])
    out.chat_template = CHATML_TEMPLATE
    return out


def gpt2_tokenizer():
    """bos = eos = <|endoftext|>, no chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"], split_like_llama3=False),
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")


CHAT = {"llama3": (llama3_tokenizer, "<|eot_id|>"), "chatml": (chatml_tokenizer, "<|im_end|>")}


def _tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- chat templates


@pytest.mark.parametrize("system", ["", "Answer briefly."])
@pytest.mark.parametrize("name", sorted(CHAT))
def test_chat_encoding_token_by_token(name: str, system: str) -> None:
    make, end_of_turn = CHAT[name]
    tok, fmt = make(), PromptFormat(system_prompt=system)
    prompt = encode_prompt(tok, QUESTION, fmt)
    answer = answer_ids(tok, QUESTION, ANSWER, fmt)
    enc = encode_qa(tok, QUESTION, ANSWER, max_length=512, fmt=fmt)
    assert enc["input_ids"] == prompt + answer
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert tok.decode(answer, skip_special_tokens=False) == ANSWER + end_of_turn
    assert answer[-1] == tok.convert_tokens_to_ids(end_of_turn)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUESTION}]
    rendered = tok.apply_chat_template(messages + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    assert prompt + answer == _tokens(tok, rendered.rstrip("\n"))  # what generation after the prompt writes
    assert tok.decode(prompt, skip_special_tokens=False) == render_prompt(tok, QUESTION, fmt)


def test_llama3_prompt_has_one_bos_although_template_and_tokenizer_both_add_it() -> None:
    tok = llama3_tokenizer()
    bos = tok.bos_token_id
    rendered = render_prompt(tok, QUESTION)
    assert tok(rendered)["input_ids"][:2] == [bos, bos]  # the trap: the template's BOS plus the tokenizer's
    prompt = encode_prompt(tok, QUESTION)
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert tok.decode(prompt, skip_special_tokens=False) == (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chatml_prompt_has_no_bos_and_the_templates_default_system_prompt() -> None:
    tok = chatml_tokenizer()
    assert tok.bos_token_id is None
    assert tok.decode(encode_prompt(tok, QUESTION), skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    fmt = PromptFormat(system_prompt="Answer briefly.")
    assert render_prompt(tok, QUESTION, fmt).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")


def test_chat_template_ignores_prompt_template() -> None:
    tok = llama3_tokenizer()
    assert encode_prompt(tok, QUESTION, PromptFormat(template="Q: {question} A:")) == encode_prompt(tok, QUESTION)


def test_truncation_keeps_the_prompt_and_cuts_the_answer() -> None:
    tok = chatml_tokenizer()
    prompt = encode_prompt(tok, QUESTION)
    enc = encode_qa(tok, QUESTION, ANSWER, max_length=len(prompt) + 2)
    assert enc["input_ids"] == prompt + answer_ids(tok, QUESTION, ANSWER)[:2]
    assert len(encode_qa(tok, QUESTION, ANSWER, max_length=1)["input_ids"]) == len(prompt) + 1


@pytest.mark.parametrize("name", sorted(CHAT))
def test_stop_ids_are_eos_and_the_end_of_turn(name: str) -> None:
    make, end_of_turn = CHAT[name]
    tok = make()
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids(end_of_turn)})
    assert stop_token_ids(tok, PromptFormat(chat_template=False)) == [tok.eos_token_id]


def test_chat_template_false_uses_the_plain_prompt_template() -> None:
    tok = llama3_tokenizer()
    fmt = PromptFormat(chat_template=False)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    expected = [bos] + _tokens(tok, DEFAULT_PROMPT.format(question=QUESTION)) + _tokens(tok, " " + ANSWER) + [eos]
    assert encode_qa(tok, QUESTION, ANSWER, max_length=512, fmt=fmt)["input_ids"] == expected


def test_template_without_an_end_token_gets_eos() -> None:
    tok = chatml_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    answer = answer_ids(tok, QUESTION, ANSWER)
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == " " + ANSWER


# ---------------------------------------------------------------- no chat template


def test_without_chat_template_the_encoding_is_todays() -> None:
    """[BOS] + prompt_template's tokens, " " + answer's tokens + [EOS] (the built-in benchmark's encoding)."""
    tok = gpt2_tokenizer()
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


def test_plain_template_that_starts_with_bos_gets_no_second_one() -> None:
    tok = gpt2_tokenizer()
    prompt = encode_prompt(tok, QUESTION, PromptFormat(template="<|endoftext|>Q: {question}\nA:"))
    assert prompt[:2] != [tok.bos_token_id] * 2 and prompt[0] == tok.bos_token_id


def test_chat_template_true_without_one_is_a_one_line_error() -> None:
    with pytest.raises(UnlearnError) as e:
        encode_prompt(gpt2_tokenizer(), QUESTION, PromptFormat(chat_template=True))
    msg = str(e.value)
    assert "\n" not in msg and "data.chat_template=auto" in msg
    with pytest.raises(UnlearnError, match="^chat_template is true.*chat_template=auto"):
        encode_qa(gpt2_tokenizer(), QUESTION, ANSWER, fmt=PromptFormat(chat_template=True, setting=""))


def test_failing_template_is_a_one_line_error() -> None:
    tok = chatml_tokenizer()
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
