"""Tokenize question/answer pairs with the prompt tokens masked, and pad them into batches.

An encoded item is `{"input_ids": list[int], "labels": list[int]}`; labels are -100 on the
prompt, so only answer tokens (and the closing end-of-turn or EOS) are scored. The prompt and the
answer are tokenized separately and concatenated, so the answer's tokens never depend on the
prompt, and the prompt's tokens are exactly `encode_prompt`'s (what generation starts from).

A `PromptFormat` says how a question becomes a prompt, for training, evaluation, the benchmark
builder and serving alike:

- with a chat template (the tokenizer's, when `chat_template` is "auto" and it has one, or
  True): the prompt is the template applied to [system?, user: question] with the generation
  prompt, tokenized without added special tokens (the template writes BOS where the model
  expects it). The answer is what the template writes after that prompt for the assistant
  turn (the full conversation rendered, the prompt's text cut off), up to and including its
  end-of-turn token (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `<|end|>`: the first special
  token after the answer's text); whatever the template writes after it (whitespace, Phi-3's EOS
  after the last turn) is dropped, as generation stops there. EOS closes the answer only when the
  template writes no special token after the answer's text. `template` is not used.
- without one: `template` around the question, BOS first (when the tokenizer has one and the
  prompt does not already start with it), then " " + answer and EOS, as the built-in
  benchmark's models were trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ray_unlearn.config import chat_template_setting
from ray_unlearn.errors import UnlearnError
from ray_unlearn.logprobs import IGNORE_INDEX

DEFAULT_PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt (see the module docstring)."""

    template: str = DEFAULT_PROMPT          # prompt around {question} when no chat template is used
    chat_template: str | bool = "auto"      # "auto": the tokenizer's when it has one; True: required; False: never
    system_prompt: str = ""                 # system message of chat-template prompts; "" = none
    setting: str = field(default="data.", compare=False)  # config prefix of these fields, named in errors

    def __post_init__(self) -> None:
        key = f"{self.setting}chat_template"
        object.__setattr__(self, "chat_template", chat_template_setting(key, self.chat_template))


PLAIN = PromptFormat()


def prompt_format(section: Any, prefix: str = "data.") -> PromptFormat:
    """The PromptFormat of a config section with prompt_template, chat_template and system_prompt
    fields (`JobConfig.data`, or `ServeConfig` with prefix "")."""
    return PromptFormat(section.prompt_template, section.chat_template, section.system_prompt, prefix)


def as_prompt_format(fmt: PromptFormat | str) -> PromptFormat:
    """A PromptFormat as is; a bare template string as PromptFormat(template) (chat template: auto)."""
    return fmt if isinstance(fmt, PromptFormat) else PromptFormat(template=fmt)


def uses_chat_template(tokenizer: Any, fmt: PromptFormat) -> bool:
    """Whether prompts for `tokenizer` go through its chat template; `chat_template: true` without one raises."""
    has_one = bool(getattr(tokenizer, "chat_template", None))
    if fmt.chat_template is True and not has_one:
        raise UnlearnError(f"{fmt.setting}chat_template is true but the tokenizer has no chat template; set "
                           f"{fmt.setting}chat_template=auto (or false) to use {fmt.setting}prompt_template")
    return has_one and fmt.chat_template is not False


def chat_messages(question: str, fmt: PromptFormat) -> list[dict[str, str]]:
    """The conversation a question is asked in: the system prompt (if any), then the question as the user."""
    system = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    return system + [{"role": "user", "content": question}]


def render_chat_text(tokenizer: Any, messages: Sequence[dict[str, str]], fmt: PromptFormat,
                     generation_prompt: bool = True) -> str:
    """The chat template applied to `messages` (as text), plus the generation prompt by default."""
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001 - templates raise what they like (jinja2, raise_exception)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"the tokenizer's chat template failed ({first}); check {fmt.setting}system_prompt "
                           f"or set {fmt.setting}chat_template=false") from None


def render_prompt(tokenizer: Any, question: str, fmt: PromptFormat | str = PLAIN) -> str:
    """The prompt text of a question (the chat template's, else `fmt.template`'s), without added BOS."""
    fmt = as_prompt_format(fmt)
    if uses_chat_template(tokenizer, fmt):
        return render_chat_text(tokenizer, chat_messages(question, fmt), fmt)
    return fmt.template.format(question=question)


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """BOS + ids, unless the tokenizer has no BOS or the ids already start with it."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]], fmt: PromptFormat) -> list[int]:
    """Token ids of a chat's generation prompt: the rendered text, no special tokens added."""
    return _tokens(tokenizer, render_chat_text(tokenizer, messages, fmt))


def encode_prompt(tokenizer: Any, question: str, fmt: PromptFormat | str = PLAIN) -> list[int]:
    """Token ids of the prompt alone (what generation starts from)."""
    fmt = as_prompt_format(fmt)
    if uses_chat_template(tokenizer, fmt):
        return chat_prompt_ids(tokenizer, chat_messages(question, fmt), fmt)
    return _with_bos(tokenizer, _tokens(tokenizer, fmt.template.format(question=question)))


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (named ones and added tokens marked special)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {i for i, tok in added.items() if getattr(tok, "special", False)}


def special_tokens(tokenizer: Any) -> set[str]:
    """Texts of the tokenizer's special tokens (named ones and added tokens marked special)."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {t for t in texts | {tok.content for tok in added.values() if getattr(tok, "special", False)} if t}


def through_end_of_turn(tokenizer: Any, text: str, content: str) -> str:
    """`text` up to and including the first special token after `content` in it (the turn's end); all of
    `text` when `content` is not in it or no special token follows it."""
    start = text.find(content)
    if start < 0:
        return text
    after = start + len(content)
    hits = [(i, -len(tok)) for tok in special_tokens(tokenizer) if (i := text.find(tok, after)) >= 0]
    if not hits:
        return text
    start, minus_length = min(hits)  # the earliest, the longest of those starting there
    return text[:start - minus_length]


def chat_answer_text(tokenizer: Any, question: str, answer: str, fmt: PromptFormat) -> str:
    """What the chat template writes after the generation prompt for `answer`: the assistant turn's
    content and end-of-turn, without what the template may write after it (whitespace, an EOS)."""
    messages = chat_messages(question, fmt)
    prompt = render_chat_text(tokenizer, messages, fmt)
    full = render_chat_text(tokenizer, messages + [{"role": "assistant", "content": answer}], fmt,
                            generation_prompt=False)
    if not full.startswith(prompt):
        raise UnlearnError(f"the tokenizer's chat template renders an answered conversation that does not start "
                           f"with its generation prompt; set {fmt.setting}chat_template=false and a "
                           f"{fmt.setting}prompt_template")
    return through_end_of_turn(tokenizer, full[len(prompt):], answer).rstrip()


def answer_ids(tokenizer: Any, question: str, answer: str, fmt: PromptFormat | str = PLAIN) -> list[int]:
    """Token ids of the answer as generation would produce them after `encode_prompt`, with the
    token it stops on: the template's end-of-turn, else EOS (the module docstring has the rules)."""
    fmt, answer = as_prompt_format(fmt), answer.strip()
    eos = tokenizer.eos_token_id
    if not uses_chat_template(tokenizer, fmt):
        return _tokens(tokenizer, " " + answer) + ([eos] if eos is not None else [])
    ids = _tokens(tokenizer, chat_answer_text(tokenizer, question, answer, fmt))
    if eos is not None and (not ids or ids[-1] not in special_ids(tokenizer)):
        ids.append(eos)
    return ids


def encode_qa(tokenizer: Any, question: str, answer: str, max_length: int = 128,
              fmt: PromptFormat | str = PLAIN) -> dict[str, list[int]]:
    """Encode one (question, answer) pair: prompt ids (labels -100) + answer ids (labels = ids).

    Truncation cuts the answer's end, never the prompt; at least one answer token is kept.
    """
    prompt_ids = encode_prompt(tokenizer, question, fmt)
    room = max(1, max_length - len(prompt_ids))
    answer = answer_ids(tokenizer, question, answer, fmt)[:room]
    return {"input_ids": prompt_ids + answer, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer}


def stop_token_ids(tokenizer: Any, fmt: PromptFormat | str = PLAIN) -> list[int]:
    """Ids generation stops on: EOS, and with a chat template its end-of-turn token (the special
    token that closes a rendered answer)."""
    ids = {tokenizer.eos_token_id} - {None}
    closing = answer_ids(tokenizer, "Hi", "Hello.", fmt)[-1:]
    if closing and closing[0] in special_ids(tokenizer) | ids:
        ids.add(closing[0])
    return sorted(ids)


def encode_text(tokenizer: Any, text: str, max_length: int = 128) -> dict[str, list[int]]:
    """Encode a plain document (the text-corpus setting): every token but the first is scored."""
    ids = list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}


def pad_batch(items: Sequence[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad encoded items to one length: {input_ids, attention_mask, labels} as [B, T] tensors.

    Right padding for teacher-forced scoring; `left=True` for generation from prompts.
    """
    width = max(len(it["input_ids"]) for it in items)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for it in items:
        ids = list(it["input_ids"])
        labels = list(it.get("labels", [IGNORE_INDEX] * len(ids)))
        pad = width - len(ids)
        if left:
            out["input_ids"].append([pad_id] * pad + ids)
            out["attention_mask"].append([0] * pad + [1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * pad + labels)
        else:
            out["input_ids"].append(ids + [pad_id] * pad)
            out["attention_mask"].append([1] * len(ids) + [0] * pad)
            out["labels"].append(labels + [IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
