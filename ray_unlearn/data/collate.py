"""Tokenize question/answer pairs with the prompt tokens masked, and pad them into batches.

An encoded item is `{"input_ids": list[int], "labels": list[int]}`; labels are -100 on the
prompt, so only answer tokens (and the closing EOS) are scored. The prompt and the answer are
tokenized separately and concatenated, so the answer's tokens never depend on the prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ray_unlearn.logprobs import IGNORE_INDEX

DEFAULT_PROMPT = "Question: {question}\nAnswer:"


def encode_qa(tokenizer: Any, question: str, answer: str, max_length: int = 128,
              prompt_template: str = DEFAULT_PROMPT) -> dict[str, list[int]]:
    """Encode one (question, answer) pair; the answer gets a leading space and a closing EOS.

    Truncation cuts the answer's end, never the prompt; at least one answer token is kept.
    """
    prompt_ids = list(tokenizer(prompt_template.format(question=question), add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    answer_ids = list(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer_ids.append(tokenizer.eos_token_id)
    room = max(1, max_length - len(prompt_ids))
    answer_ids = answer_ids[:room]
    return {"input_ids": prompt_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_prompt(tokenizer: Any, question: str, prompt_template: str = DEFAULT_PROMPT) -> list[int]:
    """Token ids of the prompt alone (what generation starts from)."""
    ids = list(tokenizer(prompt_template.format(question=question), add_special_tokens=False)["input_ids"])
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


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
