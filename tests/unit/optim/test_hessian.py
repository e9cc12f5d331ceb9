"""Hessian estimators: Hutchinson on a known quadratic, GNB on a tiny Llama, empirical, global-batch forms."""

import pytest
import torch

from ray_unlearn.errors import UnlearnError
from ray_unlearn.optim.hessian import (HessianEstimator, empirical_estimate, global_gnb_estimate,
                                       global_hutchinson_difference, global_hutchinson_estimate, gnb_estimate,
                                       hutchinson_estimate, probe_vectors, sample_gnb_labels)
from ray_unlearn.parallel import Strategy

D = torch.tensor([1e-2, 0.3, 1.0, 7.0, 1e2], dtype=torch.float64)  # f(x) = 1/2 sum d_i x_i^2


def _quadratic():
    x = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    return x, lambda: 0.5 * (D * x * x).sum()


def test_hutchinson_mean_is_hessian_diagonal():
    # u * (H u) = d * u^2 for H = diag(d); E[u^2] = 1, std of a mean of N samples = d*sqrt(2/N)
    torch.manual_seed(0)
    x, f = _quadratic()
    n = 4000
    total = torch.zeros_like(D)
    for _ in range(n):
        (est,), bs = hutchinson_estimate([x], f())
        total += est
        assert bs == 1.0
    torch.testing.assert_close(total / n, D, rtol=0.1, atol=0)
    assert x.grad is None


def test_hutchinson_linear_and_unused_params_give_zero():
    x, f = _quadratic()
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # enters linearly: H = 0
    unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    (hx, hb, hu), _ = hutchinson_estimate([x, b, unused], f() + (b * 2.0).sum())
    assert hx.shape == (5,) and (hx >= 0).all()
    assert torch.equal(hb, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(hu, torch.zeros(2, dtype=torch.float64))


def test_hutchinson_exact_for_one_probe():
    # with u drawn from a known seed, the estimate is exactly u * (d * u)
    x, f = _quadratic()
    torch.manual_seed(7)
    (est,), _ = hutchinson_estimate([x], f())
    torch.manual_seed(7)
    u = torch.randn_like(x)
    torch.testing.assert_close(est, u * D * u)


# ----------------------------------------------------------- GNB on a tiny Llama
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _batch():
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # item 1 right-padded by 2
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    # scored after the shift by one: item 0 positions 3..6 (4), item 1 positions 3..4 (2) -> B = 6
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_gnb_shapes_nonnegative_and_token_count(tiny_llama):
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    torch.manual_seed(0)
    ests, bs = gnb_estimate(tiny_llama, _batch())
    assert bs == 6.0
    assert len(ests) == len(params)
    for e, p in zip(ests, params):
        assert e.shape == p.shape
        assert torch.isfinite(e).all() and (e >= 0).all()
    assert sum(float(e.sum()) for e in ests) > 0


def test_gnb_does_not_touch_grad(tiny_llama):
    params = list(tiny_llama.parameters())
    for p in params:
        p.grad = torch.full_like(p, 0.25)
    gnb_estimate(tiny_llama, _batch())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in params)
    for p in params:
        p.grad = None
    gnb_estimate(tiny_llama, _batch())
    assert all(p.grad is None for p in params)


def test_gnb_skips_frozen_params_and_is_seeded(tiny_llama):
    emb = tiny_llama.get_input_embeddings().weight
    emb.requires_grad_(False)
    try:
        torch.manual_seed(3)
        a, _ = gnb_estimate(tiny_llama, _batch())
        torch.manual_seed(3)
        b, _ = gnb_estimate(tiny_llama, _batch())
        n_trainable = sum(1 for p in tiny_llama.parameters() if p.requires_grad)
    finally:
        emb.requires_grad_(True)
    assert len(a) == n_trainable
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gnb_without_scored_tokens_is_an_error(tiny_llama):
    batch = _batch()
    batch["labels"].fill_(-100)
    with pytest.raises(UnlearnError, match="no scored"):
        gnb_estimate(tiny_llama, batch)


# ----------------------------------------------------------- empirical and the dispatcher
def test_empirical_is_grad_squared_with_soul_bs():
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    (ep, eq), bs = empirical_estimate([p, q])
    torch.testing.assert_close(ep, torch.tensor([1.0, 4.0, 0.25]))
    assert torch.equal(eq, torch.zeros(2))
    assert bs == 5120.0


def test_due():
    assert [HessianEstimator("gnb", interval=3).due(s) for s in range(7)] == [
        True, False, False, True, False, False, True]
    assert all(HessianEstimator("empirical", interval=10).due(s) for s in range(5))
    with pytest.raises(UnlearnError, match="gnb, hutchinson, empirical"):
        HessianEstimator("fisher")


def _split(batch, items):
    return {k: v[items] for k, v in batch.items()}


def test_global_gnb_is_partition_invariant_and_keyed_by_item(tiny_llama):
    """One batch of 2 items equals the same items as 2 accumulated micro-batches: same labels (keyed by
    item), same g_hat of the token mean over all B scored tokens, B = 6."""
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    batch = _batch()
    whole, bs = global_gnb_estimate(tiny_llama, params, [batch], [[11, 12]], Strategy())
    assert bs == 6.0 and all(p.grad is None for p in params)
    parts, bs2 = global_gnb_estimate(tiny_llama, params, [_split(batch, [0]), _split(batch, [1])], [[11], [12]],
                                     Strategy())
    assert bs2 == 6.0
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
    # by hand: the labels sample_gnb_labels draws for keys (11, 12), grad of the mean CE, squared
    logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scored, y_hat = sample_gnb_labels(logits, batch["labels"], [11, 12])
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(scored, y_hat), params)
    for a, gi in zip(whole, g):
        torch.testing.assert_close(a, gi * gi, rtol=1e-5, atol=1e-12)
    other, _ = global_gnb_estimate(tiny_llama, params, [batch], [[13, 14]], Strategy())
    assert any(not torch.equal(a, b) for a, b in zip(whole, other))


def test_global_hutchinson_averages_micro_batches_with_one_probe(tiny_llama):
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    batch = _batch()

    def loss(b):
        return lambda: tiny_llama(input_ids=b["input_ids"], labels=b["labels"]).loss

    ests, bs = global_hutchinson_estimate(params, [loss(_split(batch, [0])), loss(_split(batch, [1]))], 5, Strategy())
    assert bs == 1.0 and all(p.grad is None for p in params)
    gen = torch.Generator().manual_seed(5)
    probes = [torch.randn(p.shape, generator=gen) for p in params]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        mean = 0.5 * (loss(_split(batch, [0]))() + loss(_split(batch, [1]))())
    expected, _ = hutchinson_estimate(params, mean, probes)
    for a, b in zip(ests, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


class _Quadratic(torch.nn.Module):
    """f(x) = 1/2 sum_i d_i x_i^2 + 1/6 sum_i x_i^3 over a batch of scales: H = diag(d + x) * mean(scale)."""

    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75], dtype=torch.float64))

    def forward(self, scale):
        return scale.mean() * ((0.5 * D * self.x * self.x).sum() + (self.x ** 3).sum() / 6)


def test_hutchinson_difference_on_a_cubic_by_hand():
    """H u by a central difference of gradients: exact (up to rounding) when f is at most cubic, as here, whose
    Hessian is diag(d + x) * 1.5 (the mean scale over two micro-batches), so u*(Hu) = u^2 * (d + x) * 1.5."""
    model = _Quadratic()
    x0 = model.x.detach().clone()
    (u,) = probe_vectors([model.x], 7)
    ests, bs = global_hutchinson_difference(model, [model.x], [torch.tensor([1.0]), torch.tensor([2.0])],
                                            lambda m, b: m(b), 7, 1e-4, Strategy())
    assert bs == 1.0 and model.x.grad is None
    assert torch.equal(model.x.detach(), x0)  # restored bit for bit
    torch.testing.assert_close(ests[0], u * u * (D + x0) * 1.5, rtol=1e-7, atol=1e-7)


def test_hutchinson_difference_is_close_to_the_double_backward(tiny_llama):
    """On a model, the difference of two gradients 1e-4 apart gives the double backward's u*(Hu) within a
    small fraction of its norm, with the same probes (the same generator, seed and order)."""
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    batch = _batch()
    before = [p.detach().clone() for p in params]

    def loss(model, b):
        return model(input_ids=b["input_ids"], labels=b["labels"]).loss

    parts = [_split(batch, [0]), _split(batch, [1])]
    exact, _ = global_hutchinson_estimate(params, [lambda b=b: loss(tiny_llama, b) for b in parts], 5, Strategy())
    diff, _ = global_hutchinson_difference(tiny_llama, params, parts, loss, 5, 1e-4, Strategy())
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and all(p.grad is None for p in params)
    e, d = torch.cat([t.flatten() for t in exact]), torch.cat([t.flatten() for t in diff])
    assert float((d - e).norm() / e.norm()) < 1e-3, float((d - e).norm() / e.norm())
