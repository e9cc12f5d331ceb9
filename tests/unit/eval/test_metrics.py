"""Per-item metrics against hand-computed values, and teacher-forced vs generated extraction strength."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ray_unlearn.data.collate import pad_batch
from ray_unlearn.eval import metrics as M

IGN = -100
STEPS = 80  # the 3 sequences are memorized (ES = 1) after ~40 Adam steps


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one CPU thread is fastest


class BigramLM(nn.Module):
    """Logits at position t depend only on token t: logits = table[input_ids]. NLL/argmax known by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids])


def successor_lm(successor: dict[int, int], vocab: int = 8) -> BigramLM:
    """Bigram model whose argmax after token t is successor[t] (logit 5 vs 0)."""
    table = torch.zeros(vocab, vocab)
    for t, s in successor.items():
        table[t, s] = 5.0
    return BigramLM(table)


def batch_of(*items: tuple[list[int], list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of (input_ids, labels) pairs, pad id 0."""
    return pad_batch([{"input_ids": ids, "labels": lab} for ids, lab in items], pad_id=0)


# ---------------------------------------------------------------- probability


def test_probability_two_token_answer():
    # Row t of the table is log P(. | t). Sequence [bos=0, q=1, a=2, eos=3]; answer = (2, 3).
    # P(2 | 1) = 0.5, P(3 | 2) = 0.25 -> mean NLL = (ln 2 + ln 4) / 2 = 1.5 ln 2
    # -> probability = 2 ** -1.5 = 0.353553...
    probs = torch.full((4, 4), 0.25)
    probs[1] = torch.tensor([0.1, 0.1, 0.5, 0.3])
    model = BigramLM(probs.log())
    batch = batch_of(([0, 1, 2, 3], [IGN, IGN, 2, 3]))
    assert M.probability(model, batch).item() == pytest.approx(2 ** -1.5, abs=1e-6)


# ---------------------------------------------------------------- EM / ES

# Sequence [bos=0, q=1, y=2 3 4 5, eos=7]; the bigram argmax is succ[t]:
#   after 1 -> 6 (label 2: miss), after 2 -> 6 (label 3: miss),
#   after 3 -> 4 (hit),          after 4 -> 5 (hit),
#   after 5 -> 6 (label 7 = EOS: miss, but excluded).
HALF = ([0, 1, 2, 3, 4, 5, 7], [IGN, IGN, 2, 3, 4, 5, 7])


def test_em_es_second_half_memorized():
    model = successor_lm({1: 6, 2: 6, 3: 4, 4: 5, 5: 6})
    batch = batch_of(HALF)
    # kept answer = 4 tokens (EOS excluded); hits at the last 2.
    assert M.exact_memorization(model, batch).item() == pytest.approx(2 / 4)   # with EOS it would be 2/5
    assert M.extraction_strength(model, batch).item() == pytest.approx(1 - 2 / 4)  # k* = 2


def test_em_es_ignore_the_eos_prediction():
    # Every answer token predicted, the EOS not: EM = ES = 1 (the EOS miss does not count).
    model = successor_lm({1: 2, 2: 3, 3: 4, 4: 5, 5: 6})
    batch = batch_of(HALF)
    assert M.exact_memorization(model, batch).item() == pytest.approx(1.0)
    assert M.extraction_strength(model, batch).item() == pytest.approx(1.0)


def test_es_floor_is_one_over_length_like_openunlearning():
    # Nothing predicted except the (excluded) EOS: EM = 0; OpenUnlearning searches k < |y| = 4,
    # so k* = 3 and ES = 1 - 3/4 = 0.25. Only the last kept token predicted: also k* = 3.
    nothing = successor_lm({1: 6, 2: 6, 3: 6, 4: 6, 5: 7})
    last_only = successor_lm({1: 6, 2: 6, 3: 6, 4: 5, 5: 6})
    batch = batch_of(HALF)
    assert M.exact_memorization(nothing, batch).item() == 0.0
    assert M.extraction_strength(nothing, batch).item() == pytest.approx(0.25)
    assert M.exact_memorization(last_only, batch).item() == pytest.approx(0.25)
    assert M.extraction_strength(last_only, batch).item() == pytest.approx(0.25)


def test_em_nan_and_es_zero_without_answer_tokens():
    model = successor_lm({1: 7})
    batch = batch_of(([0, 1, 7], [IGN, IGN, 7]))  # only the EOS is labelled
    assert math.isnan(M.exact_memorization(model, batch).item())
    assert M.extraction_strength(model, batch).item() == 0.0


def test_padding_does_not_change_per_item_values():
    torch.manual_seed(0)
    model = BigramLM(torch.randn(8, 8))
    short = ([0, 1, 2, 3, 7], [IGN, IGN, 2, 3, 7])
    long = ([0, 1, 1, 5, 4, 3, 2, 6, 7], [IGN, IGN, IGN, IGN, 4, 3, 2, 6, 7])
    for fn in (M.probability, M.exact_memorization, M.extraction_strength):
        alone = fn(model, batch_of(short))
        padded = fn(model, batch_of(long, short))
        assert padded[1].item() == pytest.approx(alone[0].item(), abs=1e-5)


# ---------------------------------------------------------------- helpers on precomputed values


def test_truth_ratio_and_aggregates():
    # item 0: P_c = exp(-ln 2) = 0.5; wrong NLLs (ln 4, ln 4) -> P_w = 0.25 -> tr = 0.5
    # item 1: P_c = 0.25; wrong NLLs (ln 2, ln 8), mean 2 ln 2 -> P_w = 0.25 -> tr = 1.0
    ln = math.log
    tr = M.truth_ratio(torch.tensor([ln(2), ln(4)]), torch.tensor([[ln(4), ln(4)], [ln(2), ln(8)]]))
    assert tr.tolist() == pytest.approx([0.5, 1.0], abs=1e-8)
    # forget ("closer_to_1_better"): mean(min(0.5, 2), min(1, 1)) = (0.5 + 1) / 2 = 0.75
    assert M.truth_ratio_forget(tr) == pytest.approx(0.75, abs=1e-8)
    # retain ("true_better"): mean(max(0, 1 - 0.5), max(0, 1 - 1)) = 0.25; tr = 3 -> max(0, -2) = 0
    assert M.truth_ratio_retain(tr) == pytest.approx(0.25, abs=1e-8)
    assert M.truth_ratio_retain([3.0]) == 0.0
    assert M.truth_ratio_forget([4.0]) == pytest.approx(0.25)  # min(4, 1/4)


def test_normalised_probability():
    # 0.5 / (0.5 + 0.25 + 0.25) = 0.5 ; 0.2 / (0.2 + 0.1 + 0.3 + 0.4) = 0.2
    out = M.normalised_probability(torch.tensor([0.5, 0.2]), torch.tensor([[0.25, 0.25, 0.0], [0.1, 0.3, 0.4]]))
    assert out.tolist() == pytest.approx([0.5, 0.2], abs=1e-8)


def test_model_utility_harmonic_mean():
    assert M.model_utility([0.5, 1.0]) == pytest.approx(2 / 3)  # 2 / (1/0.5 + 1/1)
    assert M.model_utility([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        M.model_utility([])


def test_forget_quality_ks_pvalue():
    same = [0.1, 0.4, 0.7, 0.9, 1.3]
    assert M.forget_quality(same, same) == pytest.approx(1.0)
    low, high = [i / 20 for i in range(20)], [10 + i / 20 for i in range(20)]
    assert M.forget_quality(low, high) < 1e-9


def test_rouge_l_recall():
    # LCS("the cat sat", "the cat sat on the mat") = 3 of the reference's 6 tokens
    assert M.rouge_l_recall(["the cat sat", "", "the mat"], ["the cat sat on the mat"] * 3) == \
        pytest.approx([0.5, 0.0, 2 / 6])
    assert M.rouge_l_recall(["cats running"], ["cat runs"]) == [1.0]  # stemmed


# ---------------------------------------------------------------- extraction strength: forward vs generate


def tiny_llama(seed: int = 0, vocab: int = 40):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def greedy_tail(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, by full forward passes (no KV cache)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_es_forward_equals_generate_on_random_llama():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    items = []
    for i in range(6):  # answer = random head of length i + the model's own greedy tail + EOS
        prompt = [1] + torch.randint(3, 40, (3 + i % 3,), generator=gen).tolist()
        head = torch.randint(3, 40, (i,), generator=gen).tolist()
        answer = head + greedy_tail(model, prompt + head, 5) + [2]
        items.append((prompt + answer, [IGN] * len(prompt) + answer))
    batch = batch_of(*items)
    forward = M.extraction_strength(model, batch)
    generated = M.extraction_strength_generate(model, batch)
    assert forward.tolist() == pytest.approx(generated.tolist(), abs=1e-6)
    assert len(set(forward.tolist())) >= 3  # a spread of k*, not only the floor
    assert forward[0].item() == pytest.approx(1.0)  # no random head: fully extractable


def test_es_forward_equals_generate_on_memorized_llama():
    model = tiny_llama(seed=3).train()
    gen = torch.Generator().manual_seed(2)
    seqs = [[1] + torch.randint(3, 40, (9,), generator=gen).tolist() + [2] for _ in range(3)]
    items = [(s, [IGN] * 4 + s[4:]) for s in seqs]
    batch = batch_of(*items)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    forward = M.extraction_strength(model, batch)
    assert forward.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert M.extraction_strength_generate(model, batch).tolist() == pytest.approx(forward.tolist())
    # A wrong first answer token breaks only the prefix: ES is still high and both views agree.
    s = list(seqs[0])
    s[4] = 3 if s[4] != 3 else 4
    probe = batch_of((s, [IGN] * 4 + s[4:]))
    assert M.extraction_strength(model, probe).item() == pytest.approx(
        M.extraction_strength_generate(model, probe).item())


def test_greedy_generate_stops_at_eos():
    model = tiny_llama()
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0,
                          decode=lambda ids, **kw: " ".join(str(i) for i in ids))
    texts = M.greedy_generate(model, tok, [[1, 5, 6], [1, 7]], max_new_tokens=4)
    assert len(texts) == 2 and all(len(t.split()) <= 4 for t in texts)
    def eos_first(module, inputs, logits):  # EOS always the argmax -> empty answers
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(2), logits.shape[-1])

    model.lm_head.register_forward_hook(eos_first)
    assert M.greedy_generate(model, tok, [[1, 5, 6], [1, 7]], max_new_tokens=4) == ["", ""]


def test_greedy_generate_stops_at_any_stop_id():
    """A chat template's end-of-turn (here id 9) ends an answer as EOS does."""
    model = tiny_llama()
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0, decode=lambda ids, **kw: " ".join(str(i) for i in ids))

    def nine_first(module, inputs, logits):
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(9), logits.shape[-1])

    model.lm_head.register_forward_hook(nine_first)
    assert M.greedy_generate(model, tok, [[1, 5, 6]], max_new_tokens=3) == ["9 9 9"]
    assert M.greedy_generate(model, tok, [[1, 5, 6]], max_new_tokens=3, stop_ids=[2, 9]) == [""]


# ---------------------------------------------------------------- keywords (GRIN)


def test_keyword_accuracy_counts_whole_words_case_insensitively():
    from ray_unlearn.eval.metrics import keyword_accuracy

    assert keyword_accuracy("She won the velmar prize in 1990.", ["Velmar", "Prize"]) == 1.0
    assert keyword_accuracy("She won the Velmar Award.", ["Velmar", "Prize"]) == 0.5
    assert keyword_accuracy("Alsoran won nothing.", ["Also"]) == 0.0  # a word, not a substring of one
    assert keyword_accuracy("Born in New York, 1990", ["New York"]) == 1.0  # a phrase


def test_item_keywords_from_a_list_or_a_string():
    from ray_unlearn.eval.metrics import item_keywords

    assert item_keywords({"keywords": ["Velmar", " ", "Prize"]}) == ["Velmar", "Prize"]
    assert item_keywords({"keywords": "Velmar"}) == ["Velmar"]
    assert item_keywords({"question": "q"}) == []


def test_keyword_tokens_are_those_spelling_the_keyword(gpt2_tokenizer):
    """Each token's characters in the decoded answer, against the keyword's match; the confidence is the
    geometric mean of those tokens' probabilities."""
    import math

    from ray_unlearn.eval.metrics import keyword_confidence, keyword_token_mask

    ids = gpt2_tokenizer("He won the Velmar Prize.", add_special_tokens=False)["input_ids"]
    pieces = [gpt2_tokenizer.decode([i]) for i in ids]
    mask = keyword_token_mask(gpt2_tokenizer, ids, ["Velmar"])
    spelled = "".join(p for p, m in zip(pieces, mask) if m)
    assert "Velmar" in spelled and "won" not in spelled and "Prize" not in spelled
    logp = [math.log(0.5 if m else 0.9) for m in mask]
    assert keyword_confidence(logp, mask) == pytest.approx(0.5)
    assert math.isnan(keyword_confidence(logp, [False] * len(mask)))
