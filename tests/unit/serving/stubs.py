"""Stand-ins for a tokenizer and a model, so that decoding outputs can be written by hand."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ray_unlearn.serving.engine import GenerationRequest, SamplingParams

VOCAB = ["<pad>", "<bos>", "<eos>"] + list("abcdexyz .")
ID = {c: i for i, c in enumerate(VOCAB)}


class CharTokenizer:
    """One token per character; ids 0-2 are pad, bos, eos."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ID[c] for c in text]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i < 3))


class BigramModel(torch.nn.Module):
    """Next-token logits = table[last token]; `chain` maps a character to the next one (greedy path).

    Its KV cache is a real `DynamicCache` holding the input ids (one head, width 1), so rows can join and
    leave it as they do a transformer's."""

    def __init__(self, chain: dict[str, str], context: int = 64) -> None:
        super().__init__()
        table = torch.full((len(VOCAB), len(VOCAB)), -10.0)
        for a, b in chain.items():
            table[ID[a], ID[b]] = 10.0
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        from transformers import DynamicCache

        self.calls.append(input_ids.shape)
        cache = DynamicCache() if past_key_values is None else past_key_values
        kv = input_ids[:, None, :, None].float()
        cache.update(kv, kv, 0)
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=cache)


def req(prompt: str, **params) -> GenerationRequest:
    return GenerationRequest("m", tuple(ID[c] for c in prompt), SamplingParams(**params))


CHAIN = {"a": "b", "b": "c", "c": "d", "d": "<eos>", "x": "y", "y": "z", "z": "x"}


class FailingTokenizer(CharTokenizer):
    """Decoding "z" raises: a row that samples it fails while decoding."""

    def decode(self, ids, **kw) -> str:
        if ID["z"] in ids:
            raise RuntimeError("cannot decode z")
        return super().decode(ids, **kw)


def sampled(prompt: str, seed: int, **params) -> GenerationRequest:
    return req(prompt, temperature=1.0, max_tokens=6, seed=seed, **params)


def sampled(prompt: str, seed: int, **params) -> GenerationRequest:
    return req(prompt, temperature=1.0, max_tokens=6, seed=seed, **params)
