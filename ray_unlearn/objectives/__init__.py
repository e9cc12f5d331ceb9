"""Unlearning objectives: a registry of loss terms and their weighted combination.

Each term is a pure function `(policy_out, ref_out | None, batch, **hparams) -> (loss, logs)`
that never calls the model (DESIGN.md §5). `policy_out[stream]` / `ref_out[stream]` are
`StreamOutput`s: logits, plus the outputs of the decoder layers some term asked for. A term's
`Term` record says what it needs: which batch streams it reads, on which of them the frozen
reference model must run, which decoder layer's output (`hidden`), which parameters may train
(`trainable`), and per-run state (`TermState`: RMU's random vector, PDU's dual variable) that
the loop keeps, updates after every optimizer step and checkpoints. The training loop reads
those records to decide which forward passes to run.

A run combines terms with weights from `ObjectiveConfig.terms`, e.g. NPO as usually reported =
{npo: 1, retain_nll: 1}. Hyperparameters come from the typed config: flat fields for the first
terms (`objective.npo_beta`), a settings section per term for the others (`objective.rmu.layer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from torch import Tensor

from ray_unlearn.config import ObjectiveConfig
from ray_unlearn.errors import UnlearnError
from ray_unlearn.objectives.ce_u import ce_u_loss
from ray_unlearn.objectives.ga import ga_loss
from ray_unlearn.objectives.idk_dpo import idk_dpo_loss
from ray_unlearn.objectives.nll import nll_loss
from ray_unlearn.objectives.npo import npo_loss
from ray_unlearn.objectives.pdu import pdu_init_state, pdu_loss, pdu_update_state
from ray_unlearn.objectives.refusal import refusal_loss
from ray_unlearn.objectives.retain_kl import retain_kl_loss
from ray_unlearn.objectives.retain_nll import retain_nll_loss
from ray_unlearn.objectives.rmu import rmu_init_state, rmu_loss
from ray_unlearn.objectives.satimp import satimp_loss
from ray_unlearn.objectives.simnpo import simnpo_loss
from ray_unlearn.objectives.undial import undial_loss
from ray_unlearn.objectives.wga import wga_loss

State = dict[str, Tensor]


@dataclass
class StreamOutput:
    """What a term reads of one model's forward pass on one stream."""

    logits: Tensor                                           # [B, T, V]
    hidden: dict[int, Tensor] = field(default_factory=dict)  # decoder layer -> its output [B, T, d]


@dataclass(frozen=True)
class TermState:
    """Per-run state of a term, passed to its fn as `state=`; the loop saves it in checkpoints."""

    init: Callable[[Any, int, int], State]  # (settings, hidden size, seed) -> state; the same on every rank
    # (state, settings, the step's logs) -> the state after an optimizer step; the term's own logs
    # ("<name>/...") are averaged over the step's micro-batches and over every rank
    update: Callable[[State, Any, Mapping[str, float]], State] | None = None


@dataclass(frozen=True)
class Term:
    """What a loss term computes and what it needs from the training loop."""

    fn: Callable[..., tuple[Tensor, dict[str, float]]]
    streams: tuple[str, ...]     # batch streams the term reads, e.g. ("forget",)
    needs_ref: bool | tuple[str, ...]  # the loop runs the frozen reference model on `streams` (True) or on these
    hparams: Mapping[str, str]   # fn kwarg -> ObjectiveConfig field ({"beta": "npo_beta"}), or field of `settings`
    help: str                    # one line for the docs
    settings: str = ""           # ObjectiveConfig section of the term's typed settings, e.g. "rmu"
    hidden: str = ""             # settings field: the decoder layer whose output the term reads (not the logits)
    trainable: str = ""          # settings field: a regex of the parameter names to train ("" in it: all)
    state: TermState | None = None

    @property
    def ref_streams(self) -> tuple[str, ...]:
        """Streams on which the reference model must run for this term."""
        return self.streams if self.needs_ref is True else tuple(self.needs_ref or ())


TERMS: dict[str, Term] = {
    "ga": Term(ga_loss, ("forget",), False, {},
               "Gradient ascent: −NLL(forget)."),
    "retain_nll": Term(retain_nll_loss, ("retain",), False, {},
                       "NLL(retain): keep the retain answers likely."),
    "retain_kl": Term(retain_kl_loss, ("retain",), True, {},
                      "KL(ref ‖ θ) on retain answer tokens, token-mean."),
    "npo": Term(npo_loss, ("forget",), True, {"beta": "npo_beta"},
                "NPO: −(2/β)·logσ(−β(logπ_θ(y_f) − logπ_ref(y_f)))."),
    "simnpo": Term(simnpo_loss, ("forget",), False, {"beta": "simnpo_beta", "delta": "simnpo_delta"},
                   "SimNPO (reference-free): −(2/β)·logσ(−β·logπ_θ(y_f)/|y_f| − δ)."),
    "idk_dpo": Term(idk_dpo_loss, ("forget", "forget_idk"), True, {"beta": "dpo_beta"},
                    "DPO preferring a refusal (chosen) over the forget answer (rejected)."),
    "refusal": Term(refusal_loss, ("forget_idk",), False, {},
                    "SOUL's preference term: NLL(forget question → refusal answer)."),
    "rmu": Term(rmu_loss, ("forget", "retain"), ("retain",),
                {"layer": "layer", "steering_coeff": "steering_coeff", "retain_weight": "retain_weight"},
                "RMU: forget outputs of decoder layer ℓ → c·u (u random, fixed), retain outputs → the reference's.",
                settings="rmu", hidden="layer", trainable="trainable_params", state=TermState(rmu_init_state)),
    "undial": Term(undial_loss, ("forget",), True, {"beta": "beta"},
                   "UNDIAL: CE(θ, softmax(z_ref − β·onehot(y))) over forget answer tokens (OpenUnlearning: all "
                   "positions).", settings="undial"),
    "wga": Term(wga_loss, ("forget",), False, {"beta": "beta"},
                "WGA: −mean over forget answer tokens of p_θ(y_t)^β (detached) · CE_t.", settings="wga"),
    "satimp": Term(satimp_loss, ("forget",), False, {"beta1": "beta1", "beta2": "beta2"},
                   "SatImp: −mean over forget answer tokens of p^β1·(1−p)^β2 (detached) · CE_t; OpenUnlearning "
                   "weighs it 0.1 against retain NLL 1 (SatImp.yaml; its class: 1 and 0.1).", settings="satimp"),
    "ce_u": Term(ce_u_loss, ("forget",), False, {"skip_first": "skip_first"},
                 "CE-U: CE toward the model's own detached distribution without the true token, answer tokens "
                 "after the first.", settings="ce_u"),
    "nll": Term(nll_loss, ("train",), False, {},
                "Fine-tuning, not unlearning: NLL(train), the train stream's answers (`ray-unlearn finetune`, "
                "the relearn attack)."),
    "pdu": Term(pdu_loss, ("forget", "retain"), False, {"gamma": "gamma", "retain_eps": "retain_eps"},
                "PDU: γ·(max z − mean z)² on forget + λ·(NLL(retain) − ε), λ ← max(0, λ + η(L_r − ε)) every "
                "step.", settings="pdu", state=TermState(pdu_init_state, pdu_update_state)),
}


@dataclass(frozen=True)
class WeightedTerm:
    """A registry term bound to its weight and its hyperparameter values from the config."""

    name: str
    weight: float
    term: Term
    kwargs: Mapping[str, Any]
    settings: Any = None  # the term's settings section of the config (None: it has none)

    @property
    def layers(self) -> tuple[int, ...]:
        """Decoder layers whose outputs this term reads."""
        return (getattr(self.settings, self.term.hidden),) if self.term.hidden else ()

    def setting_key(self, name: str) -> str:
        """The dotted config key of one of this term's settings, for error messages."""
        return f"objective.{self.term.settings}.{name}"


def _weighted(cfg: ObjectiveConfig, name: str, weight: float) -> WeightedTerm:
    term = TERMS[name]
    if not term.settings:  # the first terms: flat float fields of ObjectiveConfig
        return WeightedTerm(name, float(weight), term,
                            {kw: float(getattr(cfg, key)) for kw, key in term.hparams.items()})
    settings = getattr(cfg, term.settings)
    return WeightedTerm(name, float(weight), term,
                        {kw: getattr(settings, key) for kw, key in term.hparams.items()}, settings)


def build_objective(cfg: ObjectiveConfig) -> list[WeightedTerm]:
    """Turn `cfg.terms` (name -> weight) into weighted terms, in config order; weight-0 terms are dropped."""
    unknown = [name for name in cfg.terms if name not in TERMS]
    if unknown:
        raise UnlearnError(f"unknown objective term {unknown[0]!r} (valid: {', '.join(sorted(TERMS))})")
    terms = [_weighted(cfg, name, weight) for name, weight in cfg.terms.items() if weight != 0]
    if not terms:
        raise UnlearnError("objective.terms: every weight is 0; give at least one term a non-zero weight, "
                           "e.g. {npo: 1.0, retain_nll: 1.0}")
    return terms


def objective_streams(terms: Iterable[WeightedTerm]) -> set[str]:
    """Batch streams that some term reads (the loop runs the policy model on each)."""
    return {stream for wt in terms for stream in wt.term.streams}


def objective_ref_streams(terms: Iterable[WeightedTerm]) -> set[str]:
    """Streams on which the frozen reference model must run (empty: no reference model needed)."""
    return {stream for wt in terms for stream in wt.term.ref_streams}


def objective_layers(terms: Iterable[WeightedTerm]) -> list[int]:
    """Decoder layers whose outputs some term reads (the loop captures only these), sorted."""
    return sorted({layer for wt in terms for layer in wt.layers})


def objective_reach(terms: Iterable[WeightedTerm]) -> int | None:
    """The last decoder layer the loss depends on when every term reads only layer outputs (RMU
    alone): later parameters get no gradient. None when some term reads the logits."""
    terms = list(terms)
    if all(wt.layers for wt in terms):
        return max(layer for wt in terms for layer in wt.layers)
    return None


def check_model_fits(terms: Iterable[WeightedTerm], num_layers: int, param_names: list[str]) -> None:
    """One-line errors for settings the model cannot satisfy: a decoder layer out of range, a
    trainable-parameter regex that matches none of `param_names` (those the objective can train)."""
    for wt in terms:
        for layer in wt.layers:
            if not num_layers:
                raise UnlearnError(f"{wt.setting_key(wt.term.hidden)}: the model names no decoder-layer class "
                                   "(_no_split_modules), so no layer output can be captured; use another term")
            if not 0 <= layer < num_layers:
                raise UnlearnError(f"{wt.setting_key(wt.term.hidden)}={layer} is out of range: the model has "
                                   f"{num_layers} decoder layers, valid 0..{num_layers - 1}")
        pattern = getattr(wt.settings, wt.term.trainable) if wt.term.trainable else ""
        if pattern and not any(re.fullmatch(pattern, n) for n in param_names):
            raise UnlearnError(f"{wt.setting_key(wt.term.trainable)}={pattern!r} matches no parameter the "
                               f"objective can train (their names look like {param_names[0]!r})")


def is_trainable(terms: Iterable[WeightedTerm], param_name: str) -> bool:
    """Whether a parameter may train: its name fully matches every term's non-empty trainable regex."""
    patterns = [getattr(wt.settings, wt.term.trainable) for wt in terms if wt.term.trainable]
    return all(re.fullmatch(p, param_name) for p in patterns if p)


def init_states(terms: Iterable[WeightedTerm], hidden_size: int, seed: int) -> dict[str, State]:
    """Initial state of every stateful term, by term name (the same on every rank: seeded by `seed` alone)."""
    return {wt.name: wt.term.state.init(wt.settings, hidden_size, seed) for wt in terms if wt.term.state}


def state_log_keys(terms: Iterable[WeightedTerm], logs: Mapping[str, float]) -> list[str]:
    """Keys of `logs` that state updates read (the own logs of terms with an update), sorted: the
    loop averages them over ranks before `update_states`."""
    prefixes = tuple(f"{wt.name}/" for wt in terms if wt.term.state and wt.term.state.update)
    return sorted(k for k in logs if prefixes and k.startswith(prefixes))


def update_states(terms: Iterable[WeightedTerm], states: Mapping[str, State],
                  logs: Mapping[str, float]) -> dict[str, State]:
    """The states after an optimizer step whose logs (averaged as `state_log_keys` says) are `logs`."""
    out = dict(states)
    for wt in terms:
        if wt.term.state and wt.term.state.update:
            out[wt.name] = wt.term.state.update(states[wt.name], wt.settings, logs)
    return out


def combined_loss(terms: Iterable[WeightedTerm], policy_out: Mapping[str, Any],
                  ref_out: Mapping[str, Any] | None, batch: Mapping[str, Mapping[str, Tensor]],
                  states: Mapping[str, State] | None = None) -> tuple[Tensor, dict[str, float]]:
    """loss = Σ weight · term loss. Logs "loss/<name>" (unweighted), each term's own logs, "loss/total".
    Stateful terms get their state from `states` (see `init_states`)."""
    total: Tensor | None = None
    logs: dict[str, float] = {}
    for wt in terms:
        if wt.term.ref_streams and ref_out is None:
            raise ValueError(f"objective term {wt.name!r} needs reference-model outputs on streams "
                             f"{wt.term.ref_streams}, but ref_out is None")
        kwargs = dict(wt.kwargs)
        if wt.term.state is not None:
            if states is None or wt.name not in states:
                raise ValueError(f"objective term {wt.name!r} keeps state: pass states=init_states(...)")
            kwargs["state"] = states[wt.name]
        loss, term_logs = wt.term.fn(policy_out, ref_out, batch, **kwargs)
        logs[f"loss/{wt.name}"] = loss.item()
        logs.update(term_logs)
        total = wt.weight * loss if total is None else total + wt.weight * loss
    if total is None:
        raise ValueError("combined_loss: no terms (build them with build_objective)")
    logs["loss/total"] = total.item()
    return total, logs


__all__ = ["TERMS", "State", "StreamOutput", "Term", "TermState", "WeightedTerm", "build_objective",
           "check_model_fits", "combined_loss", "init_states", "is_trainable", "objective_layers",
           "objective_reach", "objective_ref_streams", "objective_streams", "state_log_keys", "update_states"]
