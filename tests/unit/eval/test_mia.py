"""Membership-inference scores, AUC and privleak: hand-computed values, and item-by-item agreement with
an independent numpy transcription of OpenUnlearning's definitions (src/evals/metrics/mia/*.py and
utils.tokenwise_logprobs / tokenwise_vocab_logprobs / evaluate_probability) on the same batch."""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ray_unlearn.eval.mia import (answer_texts, answer_token_stats, gradnorm_scores, lowest_k_score, mia_auc,
                                  privleak, reference_score, zlib_score)
from ray_unlearn.logprobs import sequence_nll

# ---------------------------------------------------------------- by hand


def test_lowest_k_by_hand():
    values = np.array([-1.0, -5.0, -2.0, -4.0, -3.0])
    assert lowest_k_score(values, 0.4) == 4.5  # floor(5 * 0.4) = 2 lowest: -5, -4
    assert lowest_k_score(values, 0.1) == 5.0  # floor(0.5) = 0 -> at least 1
    assert lowest_k_score(values, 1.0) == 3.0
    assert lowest_k_score(np.array([]), 0.4) == 0.0  # no scored token: 0, as OpenUnlearning


def _bernoulli_logits(p_first: list[float]) -> torch.Tensor:
    """[1, T, 2] logits whose softmax is (p, 1 - p) at each position."""
    p = torch.tensor(p_first, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=-1)[None].float()


def test_token_stats_by_hand_eos_left_out():
    """Two-token vocabulary, the label's probability p and the other's q: log p - mu = q (log p - log q) and
    sd = sqrt(pq) |log p - log q|, so Min-K++'s z = sqrt(q / p) when p > q, -sqrt(q / p) when p < q, and
    0 when p = q (variance 0, floored at 1e-6)."""
    logits = _bernoulli_logits([0.8, 0.5, 0.2, 0.9, 0.7])  # position t predicts token t + 1
    labels = torch.tensor([[-100, 0, 1, 0, 1, 0]])[:, :5]  # answer = tokens 1..4; token 4 (the EOS) left out
    (stats,) = answer_token_stats(logits, labels, vocab_stats=True)
    assert stats["logp"] == pytest.approx([math.log(0.8), math.log(0.5), math.log(0.2)], abs=1e-6)
    assert stats["z"] == pytest.approx([math.sqrt(0.2 / 0.8), 0.0, -math.sqrt(0.8 / 0.2)], abs=1e-3)
    assert lowest_k_score(stats["logp"], 0.4) == pytest.approx(-math.log(0.2), abs=1e-6)  # floor(1.2) = 1
    assert lowest_k_score(stats["z"], 0.4) == pytest.approx(2.0, abs=1e-3)
    uniform = answer_token_stats(torch.zeros(1, 4, 7), torch.tensor([[-100, 3, 1, 2]]), vocab_stats=True)[0]
    assert uniform["z"] == pytest.approx([0.0, 0.0])  # variance 0 -> floor 1e-6, and log p = mu


def test_zlib_reference_and_answer_text_by_hand():
    assert len(zlib.compress(b"abc")) == 11
    assert zlib_score(2.2, "abc") == pytest.approx(0.2)
    assert reference_score(1.5, 0.25) == 1.25
    vocab = {5: "Ada", 6: " was", 7: " born", 2: "</s>"}
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(
        vocab[i] for i in ids if not (skip_special_tokens and i == 2)))
    labels = torch.tensor([[-100, 5, 6, 7, 2], [-100, -100, 5, 2, -100]])
    assert answer_texts(tok, labels) == ["Ada was born", "Ada"]


def test_auc_and_privleak_by_hand():
    assert mia_auc([0.1, 0.4], [0.35, 0.8]) == 0.75  # holdout above forget in 3 of the 4 pairs
    assert mia_auc([1.0], [1.0]) == 0.5
    assert mia_auc([0.1, 0.2], [0.3, 0.4]) == 1.0  # forget loss lower everywhere: looks memorized
    assert privleak(0.9, 0.5) == pytest.approx(-80.0)  # ((1 - .9) - (1 - .5)) / (1 - .5) * 100
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.3, 0.5) == pytest.approx(40.0)  # over-unlearned: the forget set looks less familiar


class _Bigram(torch.nn.Module):
    """logits[t] = W[x_t] + b; an unused layer has no gradient (skipped, as OpenUnlearning skips grad None)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(vocab, vocab))
        self.b = torch.nn.Parameter(torch.zeros(vocab))
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.W[input_ids] + self.b)


def test_gradnorm_by_hand():
    """Item [p=0, a1=1, a2=2, eos=3]: the loss -mean(log p(a1|p), log p(a2|a1)) (EOS left out). At W = b = 0
    softmax is u = 1/4: dL/dW[0] = (u - e1)/2, dL/dW[1] = (u - e2)/2, dL/db = (2u - e1 - e2)/2, so
    ||dW|| = sqrt(0.75 + 0.75)/2 and ||db|| = 1/2; the score is their mean over the two tensors."""
    model = _Bigram(4)
    model.b.grad = torch.full((4,), 7.0)  # gradients already there are left alone
    item = {"input_ids": [0, 1, 2, 3], "labels": [-100, 1, 2, 3]}
    (score,) = gradnorm_scores(model, [item])
    assert score == pytest.approx((math.sqrt(1.5) / 2 + 0.5) / 2, abs=1e-6)
    assert model.b.grad.tolist() == [7.0] * 4 and model.W.grad is None


# ---------------------------------------------------------------- OpenUnlearning's definitions, transcribed


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _openunlearning_scores(logits: np.ndarray, input_ids: np.ndarray, labels: np.ndarray, k: float) -> dict:
    """Per item: LOSS (evaluate_probability's avg_loss), Min-K and Min-K++ (tokenwise_(vocab_)logprobs:
    labelled positions minus the last, log-probs of input_ids[t + 1] at start - 1 .. end - 1)."""
    lsm = _log_softmax(logits.astype(np.float64))[:, :-1]
    target = np.take_along_axis(lsm, input_ids[:, 1:, None], axis=2)[..., 0]
    out = {"loss": [], "min_k": [], "min_k_plus_plus": []}
    for i in range(len(labels)):
        scored = labels[i, 1:] != -100
        out["loss"].append(-target[i][scored].sum() / (labels[i] != -100).sum())
        actual = np.nonzero(labels[i] != -100)[0][:-1]
        start, end = actual[0], actual[-1]
        lp, vlp = target[i, start - 1:end], lsm[i, start - 1:end]
        num_k = max(1, int(len(lp) * k))
        out["min_k"].append(-np.mean(np.sort(lp)[:num_k]))
        mu = (np.exp(vlp) * vlp).sum(-1)
        sigma = np.maximum((np.exp(vlp) * vlp ** 2).sum(-1) - mu ** 2, 1e-6)
        out["min_k_plus_plus"].append(-np.mean(np.sort((lp - mu) / np.sqrt(sigma))[:num_k]))
    return out


def test_scores_equal_openunlearning_item_by_item():
    torch.manual_seed(3)
    input_ids = torch.tensor([[1, 4, 5, 6, 7, 8, 2, 0, 0],     # prompt 2, answer 4 + EOS, 2 padding
                              [1, 4, 9, 3, 3, 6, 5, 7, 2],     # prompt 3, answer 5 + EOS
                              [1, 6, 7, 2, 0, 0, 0, 0, 0]])    # prompt 1, answer 1 + EOS
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, 2, -100, -100],
                           [-100, -100, -100, 3, 3, 6, 5, 7, 2],
                           [-100, 6, 7, 2, -100, -100, -100, -100, -100]])
    logits = torch.randn(3, 9, 11) * 3
    expected = _openunlearning_scores(logits.numpy(), input_ids.numpy(), labels.numpy(), k=0.4)
    stats = answer_token_stats(logits, labels, vocab_stats=True)
    assert sequence_nll(logits, labels).double().numpy() == pytest.approx(expected["loss"], rel=1e-6)
    assert [lowest_k_score(s["logp"], 0.4) for s in stats] == pytest.approx(expected["min_k"], rel=1e-5)
    assert [lowest_k_score(s["z"], 0.4) for s in stats] == pytest.approx(expected["min_k_plus_plus"], rel=1e-5)
