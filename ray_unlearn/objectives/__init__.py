"""Unlearning objectives: a registry of loss terms and their weighted combination.

Each term is a pure function `(policy_out, ref_out | None, batch, **hparams) -> (loss, logs)`
that never calls the model (DESIGN.md §5). Its `Term` record says which batch streams it
reads and whether the frozen reference model must run on them; the training loop reads those
records to decide which forward passes to run. A run combines terms with weights from
`ObjectiveConfig.terms`, e.g. NPO as usually reported = {npo: 1, retain_nll: 1}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from torch import Tensor

from ray_unlearn.config import ObjectiveConfig
from ray_unlearn.errors import UnlearnError
from ray_unlearn.objectives.ga import ga_loss
from ray_unlearn.objectives.idk_dpo import idk_dpo_loss
from ray_unlearn.objectives.npo import npo_loss
from ray_unlearn.objectives.refusal import refusal_loss
from ray_unlearn.objectives.retain_kl import retain_kl_loss
from ray_unlearn.objectives.retain_nll import retain_nll_loss
from ray_unlearn.objectives.simnpo import simnpo_loss


@dataclass(frozen=True)
class Term:
    """What a loss term computes and what it needs from the training loop."""

    fn: Callable[..., tuple[Tensor, dict[str, float]]]
    streams: tuple[str, ...]     # batch streams the term reads, e.g. ("forget",)
    needs_ref: bool              # True -> the loop runs the frozen reference model on `streams`
    hparams: Mapping[str, str]   # fn kwarg -> ObjectiveConfig field, e.g. {"beta": "npo_beta"}
    help: str                    # one line for the docs


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
}


@dataclass(frozen=True)
class WeightedTerm:
    """A registry term bound to its weight and its hyperparameter values from the config."""

    name: str
    weight: float
    term: Term
    kwargs: Mapping[str, float]


def build_objective(cfg: ObjectiveConfig) -> list[WeightedTerm]:
    """Turn `cfg.terms` (name -> weight) into weighted terms, in config order; weight-0 terms are dropped."""
    unknown = [name for name in cfg.terms if name not in TERMS]
    if unknown:
        raise UnlearnError(f"unknown objective term {unknown[0]!r} (valid: {', '.join(sorted(TERMS))})")
    terms = [WeightedTerm(name, float(weight), TERMS[name],
                          {kw: float(getattr(cfg, field)) for kw, field in TERMS[name].hparams.items()})
             for name, weight in cfg.terms.items() if weight != 0]
    if not terms:
        raise UnlearnError("objective.terms: every weight is 0; give at least one term a non-zero weight, "
                           "e.g. {npo: 1.0, retain_nll: 1.0}")
    return terms


def objective_streams(terms: Iterable[WeightedTerm]) -> set[str]:
    """Batch streams that some term reads (the loop runs the policy model on each)."""
    return {stream for wt in terms for stream in wt.term.streams}


def objective_ref_streams(terms: Iterable[WeightedTerm]) -> set[str]:
    """Streams on which the frozen reference model must run (empty: no reference model needed)."""
    return {stream for wt in terms if wt.term.needs_ref for stream in wt.term.streams}


def combined_loss(terms: Iterable[WeightedTerm], policy_out: Mapping[str, Any],
                  ref_out: Mapping[str, Any] | None,
                  batch: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
    """loss = Σ weight · term loss. Logs "loss/<name>" (unweighted), each term's own logs, "loss/total"."""
    total: Tensor | None = None
    logs: dict[str, float] = {}
    for wt in terms:
        if wt.term.needs_ref and ref_out is None:
            raise ValueError(f"objective term {wt.name!r} needs reference-model outputs on streams "
                             f"{wt.term.streams}, but ref_out is None")
        loss, term_logs = wt.term.fn(policy_out, ref_out, batch, **wt.kwargs)
        logs[f"loss/{wt.name}"] = loss.item()
        logs.update(term_logs)
        total = wt.weight * loss if total is None else total + wt.weight * loss
    if total is None:
        raise ValueError("combined_loss: no terms (build them with build_objective)")
    logs["loss/total"] = total.item()
    return total, logs


__all__ = ["TERMS", "Term", "WeightedTerm", "build_objective", "combined_loss",
           "objective_ref_streams", "objective_streams"]
