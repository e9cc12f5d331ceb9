"""The built-in benchmark's tokenizer and small Llama-architecture models, trained from scratch.

`train_tokenizer` fits a byte-level BPE on the benchmark's text; `train_memorizer` trains a
fresh LlamaForCausalLM on (question, answer) pairs until it has memorized them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ray_unlearn.data.collate import DEFAULT_PROMPT, PromptFormat, encode_qa, pad_batch
from ray_unlearn.logprobs import batch_nll

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


@dataclass(frozen=True)
class TinySpec:
    """Architecture and training recipe of one benchmark size."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    epochs: int
    batch_size: int
    lr: float


MODEL_SIZES: dict[str, TinySpec] = {
    "micro": TinySpec(vocab_size=768, hidden=64, layers=2, heads=4, intermediate=192,
                      epochs=30, batch_size=64, lr=5e-3),
    "small": TinySpec(vocab_size=1024, hidden=128, layers=3, heads=4, intermediate=384,
                      epochs=20, batch_size=64, lr=4e-3),
    "medium": TinySpec(vocab_size=2048, hidden=256, layers=4, heads=8, intermediate=768,
                       epochs=20, batch_size=64, lr=2e-3),
}


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer fitted on `texts`, wrapped as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=512,
                                   clean_up_tokenization_spaces=False)


def new_llama(spec: TinySpec, tokenizer: Any, seed: int) -> Any:
    """A randomly initialised LlamaForCausalLM of the given spec."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                         intermediate_size=spec.intermediate, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def train_memorizer(spec: TinySpec, tokenizer: Any, pairs: Sequence[tuple[str, str]], seed: int,
                    prompt_template: str = DEFAULT_PROMPT,
                    on_step: Callable[[int, int, float], None] | None = None) -> Any:
    """Train a fresh model on answer tokens of `pairs` for spec.epochs epochs (AdamW, cosine LR);
    the built-in tokenizer has no chat template, so pairs are encoded with `prompt_template`."""
    model = new_llama(spec, tokenizer, seed)
    fmt = PromptFormat(template=prompt_template, chat_template=False)
    encoded = [encode_qa(tokenizer, q, a, max_length=128, fmt=fmt) for q, a in pairs]
    steps_per_epoch = math.ceil(len(encoded) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = random.Random(seed)
    model.train()
    step = 0
    for _ in range(spec.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order), spec.batch_size):
            batch = pad_batch([encoded[j] for j in order[i:i + spec.batch_size]], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = batch_nll(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None:
                on_step(step, total, loss.item())
    model.eval()
    return model
