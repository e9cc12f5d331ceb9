"""The term registry, build_objective, stream bookkeeping and combined_loss."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.config import ObjectiveConfig
from ray_unlearn.errors import UnlearnError
from ray_unlearn.objectives import (TERMS, build_objective, combined_loss, objective_ref_streams,
                                    objective_streams)

STREAMS = ("forget", "retain", "forget_idk")
LABELS = {"forget": [[-100, -100, 1, 2, 3], [-100, 4, 5, -100, -100]],
          "retain": [[-100, 0, 6, 2, -100], [-100, -100, -100, 3, 1]],
          "forget_idk": [[-100, -100, 5, 5, 0], [-100, 5, 5, 0, -100]]}


def make_batch() -> dict[str, dict[str, torch.Tensor]]:
    batch = {}
    for name, labels in LABELS.items():
        labels_t = torch.tensor(labels)
        batch[name] = {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t),
                       "labels": labels_t}
    return batch


def make_outputs(seed: int, requires_grad: bool = False) -> dict[str, SimpleNamespace]:
    gen = torch.Generator().manual_seed(seed)
    return {name: SimpleNamespace(logits=torch.randn(2, 5, 7, generator=gen).requires_grad_(requires_grad))
            for name in STREAMS}


def test_registry_names_match_config_help():
    assert set(TERMS) == {"ga", "retain_nll", "retain_kl", "npo", "simnpo", "idk_dpo", "refusal"}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_hparams_map_fn_kwargs_to_config_fields(name):
    term = TERMS[name]
    fields = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    kwonly = {p.name for p in inspect.signature(term.fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert set(term.hparams) == kwonly
    assert set(term.hparams.values()) <= fields
    assert term.help and "\n" not in term.help


def test_unknown_term_lists_valid_names():
    with pytest.raises(UnlearnError) as err:
        build_objective(ObjectiveConfig(terms={"npo": 1.0, "bogus": 1.0}))
    assert str(err.value) == ("unknown objective term 'bogus' "
                              "(valid: ga, idk_dpo, npo, refusal, retain_kl, retain_nll, simnpo)")


def test_weight_zero_terms_dropped_and_kwargs_from_config():
    cfg = ObjectiveConfig(terms={"npo": 1.0, "ga": 0.0, "simnpo": 0.5}, npo_beta=0.2, simnpo_delta=0.3)
    terms = build_objective(cfg)
    assert [(t.name, t.weight) for t in terms] == [("npo", 1.0), ("simnpo", 0.5)]
    assert terms[0].kwargs == {"beta": 0.2}
    assert terms[1].kwargs == {"beta": cfg.simnpo_beta, "delta": 0.3}


def test_all_zero_weights_rejected():
    with pytest.raises(UnlearnError, match="non-zero"):
        build_objective(ObjectiveConfig(terms={"npo": 0.0, "retain_nll": 0}))


def test_streams_and_ref_streams():
    idk = build_objective(ObjectiveConfig(terms={"idk_dpo": 1.0}))
    assert objective_streams(idk) == {"forget", "forget_idk"}
    assert objective_ref_streams(idk) == {"forget", "forget_idk"}
    npo = build_objective(ObjectiveConfig(terms={"npo": 1.0, "retain_nll": 1.0}))
    assert objective_streams(npo) == {"forget", "retain"}
    assert objective_ref_streams(npo) == {"forget"}
    free = build_objective(ObjectiveConfig(terms={"simnpo": 1.0, "refusal": 1.0, "ga": 1.0}))
    assert objective_ref_streams(free) == set()
    assert objective_ref_streams(build_objective(ObjectiveConfig(terms={"retain_kl": 1.0}))) == {"retain"}


def test_combined_loss_is_weighted_sum_and_logs_each_term():
    terms = build_objective(ObjectiveConfig(terms={"ga": 0.5, "retain_kl": 2.0, "npo": 1.5}, npo_beta=0.3))
    policy, ref, batch = make_outputs(0), make_outputs(1), make_batch()
    total, logs = combined_loss(terms, policy, ref, batch)
    parts = {t.name: t.term.fn(policy, ref, batch, **t.kwargs)[0].item() for t in terms}
    expected = 0.5 * parts["ga"] + 2.0 * parts["retain_kl"] + 1.5 * parts["npo"]
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert logs["loss/total"] == pytest.approx(expected, rel=1e-6)
    for name, value in parts.items():
        assert logs[f"loss/{name}"] == pytest.approx(value, rel=1e-6)
    assert "npo/log_ratio" in logs and "ga/forget_nll" in logs
    assert all(isinstance(v, float) for v in logs.values())


def test_combined_loss_without_ref_outputs_is_an_error():
    terms = build_objective(ObjectiveConfig(terms={"npo": 1.0}))
    with pytest.raises(ValueError, match="npo"):
        combined_loss(terms, make_outputs(0), None, make_batch())


@pytest.mark.parametrize("name", sorted(TERMS))
def test_gradients_reach_the_streams_each_term_reads(name):
    terms = build_objective(ObjectiveConfig(terms={name: 1.0}))
    policy = make_outputs(0, requires_grad=True)
    ref = make_outputs(1) if TERMS[name].needs_ref else None
    loss, _ = combined_loss(terms, policy, ref, make_batch())
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    for stream in STREAMS:
        grad = policy[stream].logits.grad
        if stream in TERMS[name].streams:
            assert grad is not None and grad.abs().sum().item() > 0
        else:
            assert grad is None
