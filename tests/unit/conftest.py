"""Tokenizers with chat templates, built locally (no hub): shared by the data, eval and serving tests.

- `llama3_tokenizer`: bos <|begin_of_text|>, written by its template AND added by its
  post-processor (the double-BOS trap); eos <|end_of_text|>; end-of-turn <|eot_id|>.
- `chatml_tokenizer` (Qwen style): no BOS; eos <|endoftext|>; end-of-turn <|im_end|> followed by
  a newline; a default system prompt in the template.
- `gpt2_tokenizer`: bos = eos = <|endoftext|>, no chat template.

Both chat tokenizers pre-tokenize like Llama 3 (newlines are pieces of their own), so text after
a generation prompt tokenizes the same alone or joined to it.
"""

from __future__ import annotations

import pytest

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


@pytest.fixture(name="llama3_tokenizer")
def _llama3_tokenizer():
    return llama3_tokenizer()


@pytest.fixture(name="chatml_tokenizer")
def _chatml_tokenizer():
    return chatml_tokenizer()


@pytest.fixture(name="gpt2_tokenizer")
def _gpt2_tokenizer():
    return gpt2_tokenizer()
