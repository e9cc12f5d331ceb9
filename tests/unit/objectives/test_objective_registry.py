"""The term registry, build_objective, stream bookkeeping and combined_loss."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.config import ObjectiveConfig, PDUSettings, RMUSettings
from ray_unlearn.errors import UnlearnError
from ray_unlearn.objectives import (TERMS, build_objective, check_model_fits, combined_loss, init_states,
                                    is_trainable, objective_layers, objective_reach, objective_ref_streams,
                                    objective_streams,
                                    state_log_keys, update_states)

STREAMS = ("forget", "retain", "forget_idk", "train")
LABELS = {"forget": [[-100, -100, 1, 2, 3], [-100, 4, 5, -100, -100]],
          "retain": [[-100, 0, 6, 2, -100], [-100, -100, -100, 3, 1]],
          "forget_idk": [[-100, -100, 5, 5, 0], [-100, 5, 5, 0, -100]],
          "train": [[-100, 2, 2, 4, -100], [-100, -100, 6, 1, 0]]}


def make_batch() -> dict[str, dict[str, torch.Tensor]]:
    batch = {}
    for name, labels in LABELS.items():
        labels_t = torch.tensor(labels)
        batch[name] = {"input_ids": labels_t.clamp(min=0), "attention_mask": torch.ones_like(labels_t),
                       "labels": labels_t}
    return batch


HIDDEN = 4  # hidden size of the fake layer outputs


def make_outputs(seed: int, requires_grad: bool = False, layers: tuple[int, ...] = ()) -> dict[str, SimpleNamespace]:
    gen = torch.Generator().manual_seed(seed)
    return {name: SimpleNamespace(logits=torch.randn(2, 5, 7, generator=gen).requires_grad_(requires_grad),
                                  hidden={i: torch.randn(2, 5, HIDDEN, generator=gen).requires_grad_(requires_grad)
                                          for i in layers})
            for name in STREAMS}


def test_registry_names_match_config_help():
    names = {"ga", "retain_nll", "retain_kl", "npo", "simnpo", "idk_dpo", "refusal", "rmu", "undial", "wga",
             "satimp", "ce_u", "pdu", "nll"}
    assert set(TERMS) == names
    help_text = dataclasses.fields(ObjectiveConfig)[0].metadata["help"]
    assert all(name in help_text for name in names)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_hparams_map_fn_kwargs_to_config_fields(name):
    term = TERMS[name]
    source = dict(ObjectiveConfig.__dataclass_fields__)[term.settings].default_factory if term.settings \
        else ObjectiveConfig
    fields = {f.name for f in dataclasses.fields(source)}
    kwonly = {p.name for p in inspect.signature(term.fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert set(term.hparams) | ({"state"} if term.state else set()) == kwonly
    assert set(term.hparams.values()) <= fields
    assert {term.hidden, term.trainable} - {""} <= fields
    assert set(term.ref_streams) <= set(term.streams)
    assert term.help and "\n" not in term.help


@pytest.mark.parametrize("section", [f for f in dataclasses.fields(ObjectiveConfig) if dataclasses.is_dataclass(
    f.default_factory)], ids=lambda f: f.name)
def test_every_term_setting_has_help(section):
    assert section.name in TERMS and TERMS[section.name].settings == section.name
    for f in dataclasses.fields(section.default_factory):
        assert f.metadata.get("help"), f"objective.{section.name}.{f.name} has no help string"


def test_unknown_term_lists_valid_names():
    with pytest.raises(UnlearnError) as err:
        build_objective(ObjectiveConfig(terms={"npo": 1.0, "bogus": 1.0}))
    assert str(err.value) == ("unknown objective term 'bogus' (valid: ce_u, ga, idk_dpo, nll, npo, pdu, "
                              "refusal, retain_kl, retain_nll, rmu, satimp, simnpo, undial, wga)")


def test_term_settings_come_from_their_section():
    cfg = ObjectiveConfig(terms={"rmu": 1.0, "pdu": 2.0, "npo": 1.0},
                          rmu=RMUSettings(layer=3, steering_coeff=5.0), pdu=PDUSettings(gamma=0.5))
    rmu, pdu, npo = build_objective(cfg)
    assert rmu.kwargs == {"layer": 3, "steering_coeff": 5.0, "retain_weight": 1.0} and rmu.settings is cfg.rmu
    assert pdu.kwargs == {"gamma": 0.5, "retain_eps": 0.3} and pdu.weight == 2.0
    assert npo.kwargs == {"beta": 0.1} and npo.settings is None
    assert (rmu.layers, pdu.layers, npo.layers) == ((3,), (), ())
    assert objective_layers([rmu, pdu, npo]) == [3]


def test_rmu_needs_the_reference_on_retain_only():
    terms = build_objective(ObjectiveConfig(terms={"rmu": 1.0}))
    assert objective_streams(terms) == {"forget", "retain"}
    assert objective_ref_streams(terms) == {"retain"}


def test_model_fit_checks_name_the_setting_and_the_valid_range():
    terms = build_objective(ObjectiveConfig(terms={"rmu": 1.0}, rmu=RMUSettings(layer=7)))
    check_model_fits(terms, 8, ["model.layers.0.mlp.weight"])
    with pytest.raises(UnlearnError) as err:
        check_model_fits(terms, 2, ["model.layers.0.mlp.weight"])
    assert str(err.value) == ("objective.rmu.layer=7 is out of range: the model has 2 decoder layers, valid 0..1")
    regex = build_objective(ObjectiveConfig(terms={"rmu": 1.0}, rmu=RMUSettings(layer=0, trainable_params="x")))
    with pytest.raises(UnlearnError, match=r"^objective.rmu.trainable_params='x' matches no parameter the objective "
                                           r"can train \(their names look like 'model.layers.0.mlp.weight'\)$"):
        check_model_fits(regex, 2, ["model.layers.0.mlp.weight"])


def test_reach_is_the_last_layer_when_every_term_reads_only_layer_outputs():
    assert objective_reach(build_objective(ObjectiveConfig(terms={"rmu": 1.0}, rmu=RMUSettings(layer=2)))) == 2
    assert objective_reach(build_objective(ObjectiveConfig(terms={"rmu": 1.0, "ga": 1.0}))) is None
    assert objective_reach(build_objective(ObjectiveConfig(terms={"npo": 1.0}))) is None


def test_trainable_regex_is_a_full_match_and_empty_means_all():
    everything = build_objective(ObjectiveConfig(terms={"rmu": 1.0, "npo": 1.0}))
    assert is_trainable(everything, "lm_head.weight")
    some = build_objective(ObjectiveConfig(terms={"rmu": 1.0}, rmu=RMUSettings(trainable_params=r"a\.(1|2)")))
    assert [is_trainable(some, n) for n in ("a.1", "a.2", "a.3", "a.1.b", "xa.1")] == [True, True, False, False,
                                                                                       False]


def test_states_init_update_and_the_logs_they_read():
    terms = build_objective(ObjectiveConfig(terms={"rmu": 1.0, "pdu": 1.0, "npo": 1.0},
                                            pdu=PDUSettings(dual_init=2.0, dual_step_size=1.0, retain_eps=0.5)))
    states = init_states(terms, HIDDEN, seed=0)
    assert set(states) == {"rmu", "pdu"}
    assert states["rmu"]["u"].shape == (HIDDEN,) and states["pdu"]["lambda"].item() == 2.0
    logs = {"loss/pdu": 9.0, "pdu/retain_loss": 1.5, "pdu/forget_loss": 3.0, "rmu/forget_act": 1.0, "npo/x": 0.0}
    assert state_log_keys(terms, logs) == ["pdu/forget_loss", "pdu/retain_loss"]  # rmu's state never changes
    after = update_states(terms, states, logs)
    assert after["pdu"]["lambda"].item() == 3.0  # 2 + 1·(1.5 − 0.5)
    assert after["rmu"] is states["rmu"] and states["pdu"]["lambda"].item() == 2.0  # the old states stay as they were


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


def test_combined_loss_without_state_is_an_error():
    terms = build_objective(ObjectiveConfig(terms={"pdu": 1.0}))
    with pytest.raises(ValueError, match="pdu"):
        combined_loss(terms, make_outputs(0), None, make_batch())


@pytest.mark.parametrize("name", sorted(TERMS))
def test_gradients_reach_the_streams_each_term_reads(name):
    terms = build_objective(ObjectiveConfig(terms={name: 1.0}))
    layers = tuple(objective_layers(terms))
    policy = make_outputs(0, requires_grad=True, layers=layers)
    ref = make_outputs(1, layers=layers) if TERMS[name].needs_ref else None
    loss, _ = combined_loss(terms, policy, ref, make_batch(), init_states(terms, HIDDEN, seed=0))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    for stream in STREAMS:
        out = policy[stream]
        grads = [out.logits.grad] if not layers else [out.hidden[i].grad for i in layers]
        for grad in grads:
            if stream in TERMS[name].streams:
                assert grad is not None and grad.abs().sum().item() > 0
            else:
                assert grad is None
