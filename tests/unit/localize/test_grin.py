"""GRIN's parts on tensors whose answers are written by hand: the ratio, the exact top fraction, the noise,
the masked updates, and where a selection fell."""

from __future__ import annotations

import threading

import pytest
import torch

from ray_unlearn.config import load_config
from ray_unlearn.errors import UnlearnError
from ray_unlearn.localize import MaskedUpdates, gradient_ratio, perturb, selection_summary, top_fraction
from ray_unlearn.localize.grin import layer_of, module_type_of


def test_gradient_ratio_is_abs_forget_over_abs_retain_plus_eps():
    f, r = torch.tensor([2.0, -3.0, 0.0, 1.0]), torch.tensor([1.0, -0.5, 4.0, 0.0])
    assert gradient_ratio(f, r, 0.5).tolist() == pytest.approx([2 / 1.5, 3 / 1.0, 0.0, 1 / 0.5], rel=1e-7)
    assert f.tolist() == [2.0, -3.0, 0.0, 1.0] and r.tolist() == [1.0, -0.5, 4.0, 0.0]  # inputs untouched


def test_top_fraction_over_the_whole_model():
    """10 entries, fraction 0.3 -> k = 3: the scores 9, 8, 7 wherever they sit."""
    a, b = torch.tensor([1.0, 9.0, 3.0, 7.0]), torch.tensor([[8.0, 2.0, 0.0], [5.0, 4.0, 6.0]])
    ma, mb = top_fraction([a, b], [4, 6], 0.3, per_tensor=False)
    assert ma.tolist() == [False, True, False, True]
    assert mb.tolist() == [[True, False, False], [False, False, False]]


def test_top_fraction_per_tensor_and_ties_kept():
    """Per tensor, fraction 0.5: a (4 entries) keeps 2, b (6 entries) keeps 3; b's third place is a tie of
    two 5s, both kept. A tiny fraction still keeps one entry per group."""
    a, b = torch.tensor([1.0, 9.0, 3.0, 7.0]), torch.tensor([8.0, 5.0, 0.0, 5.0, 4.0, 6.0])
    ma, mb = top_fraction([a, b], [4, 6], 0.5, per_tensor=True)
    assert ma.tolist() == [False, True, False, True]
    assert mb.tolist() == [True, True, False, True, False, True]
    ma, mb = top_fraction([a, b], [4, 6], 1e-9, per_tensor=True)
    assert (int(ma.sum()), int(mb.sum())) == (1, 1)
    assert top_fraction([a], [4], 1.0, per_tensor=False)[0].all()  # everything, zeros included


def test_top_fraction_counts_shards_through_the_reduction():
    """A tensor split over two ranks (threads here, the reduction a sum through a barrier): each rank
    counts its part, the counts are summed, so both parts get the threshold of the whole tensor."""
    whole = torch.tensor([4.0, 1.0, 8.0, 2.0, 6.0, 3.0, 7.0, 5.0])
    parts, slots, out = [whole[:5], whole[5:]], [None, None], [None, None]
    barrier = threading.Barrier(2)

    def rank(r: int) -> None:
        def all_reduce_sum_(counts: torch.Tensor) -> torch.Tensor:
            slots[r] = counts.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        (out[r],) = top_fraction([parts[r]], [8], 0.5, per_tensor=False, all_reduce_sum_=all_reduce_sum_)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert torch.cat(out).tolist() == [False, False, True, False, True, False, True, True]  # 8, 7, 6, 5


def test_a_nan_score_is_refused():
    with pytest.raises(UnlearnError, match="negative or NaN"):
        top_fraction([torch.tensor([1.0, float("nan")])], [2], 0.5, per_tensor=False)


def test_noise_lands_on_the_selected_entries_only_scaled_by_the_tensor_std():
    torch.manual_seed(0)
    w = torch.randn(200, 50) * 3.0 + 1.0
    before = w.clone()
    mask = torch.rand(200, 50) < 0.5
    perturb([w], ["model.layers.0.mlp.up_proj.weight"], [mask], 0.1, seed=7)
    assert torch.equal(w[~mask], before[~mask])
    delta = (w - before)[mask]
    std = float(before.std(correction=0))
    assert delta.std().item() == pytest.approx(0.1 * std, rel=0.05) and abs(delta.mean().item()) < 0.02 * std
    again = before.clone()
    perturb([again], ["model.layers.0.mlp.up_proj.weight"], [mask], 0.1, seed=7)
    assert torch.equal(again, w)  # seeded by (seed, name)
    other = before.clone()
    perturb([other], ["model.layers.1.mlp.up_proj.weight"], [mask], 0.1, seed=7)
    assert not torch.equal(other, w)


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
                                  lambda p: __import__("ray_unlearn.optim", fromlist=["SophiaG"]).SophiaG(
                                      p, lr=0.1, weight_decay=0.5)])
def test_masked_updates_leave_unselected_entries_bit_identical(make):
    """Weight decay and the optimizer would move every entry; the masked ones stay exactly where they were,
    and the gradient the optimizer and the clip see is zero there."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    start = w.detach().clone()
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, :] = True
    opt, masked = make([w]), MaskedUpdates([w], [mask])
    for _ in range(5):
        (w * torch.randn(8, 8)).sum().backward()
        masked.mask_grads()
        assert bool((w.grad[~mask] == 0).all()) and bool((w.grad[mask] != 0).all())
        if hasattr(opt, "update_hessian"):
            opt.update_hessian()
        opt.step()
        opt.zero_grad(set_to_none=True)
        masked.restore()
    assert torch.equal(w.detach()[~mask], start[~mask])
    assert bool((w.detach()[mask] != start[mask]).all())
    assert masked.counts() == [16]


def test_layer_and_module_type_of_parameter_names():
    assert layer_of("model.layers.11.self_attn.q_proj.weight") == "11"
    assert layer_of("transformer.h.3.attn.c_attn.bias") == "3"  # GPT-2
    assert layer_of("model.embed_tokens.weight") == "other" and layer_of("lm_head.weight") == "other"
    assert module_type_of("model.layers.11.self_attn.q_proj.weight") == "q_proj"
    assert module_type_of("transformer.h.3.attn.c_attn.bias") == "c_attn.bias"
    assert module_type_of("model.norm.weight") == "norm"


def test_selection_summary_groups_by_layer_and_module_type():
    sizes = {"model.layers.0.mlp.up_proj.weight": 100, "model.layers.1.mlp.up_proj.weight": 100,
             "model.layers.10.self_attn.q_proj.weight": 50, "model.embed_tokens.weight": 250}
    selected = dict(zip(sizes, [10, 0, 5, 5]))
    s = selection_summary(selected, sizes)
    assert (s["selected"], s["total"], s["fraction"]) == (20, 500, 0.04)
    assert list(s["layers"]) == ["0", "1", "10", "other"]  # numeric order, then the rest
    assert s["layers"]["0"] == {"selected": 10, "total": 100, "fraction": 0.1}
    assert s["modules"]["up_proj"] == {"selected": 10, "total": 200, "fraction": 0.05}
    assert s["modules"]["embed_tokens"]["fraction"] == 0.02


@pytest.mark.parametrize("override,message", [
    ("localize.fraction=0", "localize.fraction"), ("localize.fraction=1.5", "localize.fraction"),
    ("localize.scope=layer", "localize.scope"), ("localize.method=grim", "localize.method"),
    ("localize.eps=0", "localize.eps")])
def test_bad_localize_settings_are_refused(override, message):
    with pytest.raises(UnlearnError, match=message):
        load_config(None, ["localize.method=grin", override])


def test_grin_under_deepspeed_is_refused_at_config_time():
    with pytest.raises(UnlearnError, match="ray.strategy=ddp or fsdp2"):
        load_config(None, ["localize.method=grin", "ray.strategy=deepspeed"])


def test_gradient_ratio_in_place_equals_the_copy():
    f, r = torch.randn(50), torch.randn(50)
    expected = gradient_ratio(f, r, 1e-3)
    got = gradient_ratio(f, r, 1e-3, inplace=True)
    assert torch.equal(got, expected) and got.data_ptr() == f.data_ptr()
