"""Model-mixing calibration (DESIGN §7; seed paper 002): compare methods at the same retention.

θ(α) = (1−α)·θ_target + α·θ_unlearned, elementwise over every floating parameter and buffer (other
entries, e.g. integer position ids, are the target's). `calibrate` finds by bisection the largest α
in [0, 1] whose retain extraction strength (`retain_extraction_strength`) is at least τ × the
target's, and reports the summary (forget ES and every other metric) of θ(α).

Monotonicity assumption: retain ES is taken to fall (weakly) as α goes from 0 (the target) to 1
(the unlearned model), so "retain ES ≥ τ × target's" holds on [0, α*] and fails above. Bisection
then finds α* within 2^-steps. When the curve is not monotone the answer is still an α that meets
the bar and one within 2^-steps above it that does not, but not necessarily the largest such α;
`calibration.json`'s curve shows every point evaluated so this can be checked.

Ray-free and model-agnostic: `evaluate_fn(model) -> {metric: value}` does the evaluating.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch

from ray_unlearn.errors import UnlearnError

RETAIN_ES = "retain_extraction_strength"
FORGET_ES = "extraction_strength"


def check_calibration_inputs(has_target: bool, splits: Sequence[str]) -> None:
    """What eval.calibrate needs, checked before any work: a one-line UnlearnError otherwise."""
    if not has_target:
        raise UnlearnError("eval.calibrate: model-mixing calibration needs the target model (the model before "
                           "unlearning); set model.path, or set eval.calibrate=false")
    if "retain" not in splits:
        raise UnlearnError("eval.calibrate: calibration needs a retain split (its bar is retain extraction "
                           "strength); give retain data, or set eval.calibrate=false")


def check_same_architecture(target_sd: Mapping[str, torch.Tensor], unlearned_sd: Mapping[str, torch.Tensor]) -> None:
    """Same parameter names and shapes, or a one-line UnlearnError naming the first difference."""
    missing = sorted(set(target_sd) ^ set(unlearned_sd))
    if missing:
        side = "unlearned" if missing[0] in target_sd else "target"
        raise UnlearnError(f"model mixing: target and unlearned models differ in architecture "
                           f"({missing[0]!r} missing from the {side} model, {len(missing)} names differ)")
    for name, t in target_sd.items():
        u = unlearned_sd[name]
        if tuple(t.shape) != tuple(u.shape):
            raise UnlearnError(f"model mixing: target and unlearned models differ in architecture "
                               f"({name!r}: shape {tuple(t.shape)} vs {tuple(u.shape)})")


def mix_state(target_sd: Mapping[str, torch.Tensor], unlearned_sd: Mapping[str, torch.Tensor],
              alpha: float) -> dict[str, torch.Tensor]:
    """(1−α)·target + α·unlearned for every floating tensor (computed in float32 at least, cast back
    to the target's dtype); non-floating tensors are the target's. Same names and shapes required."""
    if not 0.0 <= alpha <= 1.0:
        raise UnlearnError(f"model mixing: alpha must be in [0, 1], got {alpha}")
    check_same_architecture(target_sd, unlearned_sd)
    out: dict[str, torch.Tensor] = {}
    for name, t in target_sd.items():
        u = unlearned_sd[name]
        if not torch.is_floating_point(t):
            out[name] = t.detach().clone()
            continue
        work = torch.promote_types(t.dtype, torch.float32)
        mixed = (1.0 - alpha) * t.detach().to(work) + alpha * u.detach().to(device=t.device, dtype=work)
        out[name] = mixed.to(t.dtype)
    return out


def bisect_largest(f: Callable[[float], Any], ok: Callable[[Any], bool], steps: int,
                   lo: float = 0.0, hi: float = 1.0) -> tuple[float, list[tuple[float, Any]]]:
    """Largest x in [lo, hi] with ok(f(x)), for a predicate true on [lo, x*] and false above (monotone).

    `lo` is assumed to pass and is never evaluated. `hi` is tried first: if it passes, it is the
    answer. Otherwise `steps` halvings of [lo, hi] keep ok at lo and not-ok at hi, so the answer is
    within (hi − lo)·2^-steps below the true boundary. Returns (x, [(x_i, f(x_i)) in evaluation order]).
    """
    if steps < 1:
        raise UnlearnError(f"bisection: steps must be >= 1, got {steps}")
    points: list[tuple[float, Any]] = []

    def passes(x: float) -> bool:
        y = f(x)
        points.append((x, y))
        return bool(ok(y))

    if passes(hi):
        return hi, points
    for _ in range(steps):
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo, points


def calibrate(target_model: Any, unlearned_model: Any, evaluate_fn: Callable[[Any], Mapping[str, float]],
              tau: float = 0.9, steps: int = 6,
              known: Mapping[float, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """The largest α whose mixed model keeps retain ES ≥ τ × the target's, and its summary.

    `evaluate_fn(model)` returns a summary {metric: value} with `retain_extraction_strength` (and
    normally `extraction_strength`); `known` gives summaries already computed at α = 0 (the target)
    and/or α = 1 (the unlearned model) to save those evaluations. The models are not changed (the
    mixtures go into a copy of the target). Returns {"alpha", "tau", "steps", "target_retain_es",
    "threshold", "resolution", "curve": [{"alpha", "retain_es", "forget_es"}, ...] sorted by α,
    "calibrated": the summary at α}. If α = 1 meets the bar, α = 1 and calibrated = the unlearned
    model's summary.
    """
    if target_model is None:
        raise UnlearnError("model mixing: calibration needs the target model (the model before unlearning)")
    if unlearned_model is None:
        raise UnlearnError("model mixing: calibration needs the unlearned model")
    if not 0 < tau <= 1:
        raise UnlearnError(f"calibration: tau must be in (0, 1], got {tau}")
    if type(target_model) is not type(unlearned_model):
        raise UnlearnError(f"model mixing: target and unlearned models differ in architecture "
                           f"({type(target_model).__name__} vs {type(unlearned_model).__name__})")
    target_sd = {k: v.detach().clone() for k, v in target_model.state_dict().items()}
    unlearned_sd = unlearned_model.state_dict()
    check_same_architecture(target_sd, unlearned_sd)
    summaries: dict[float, dict[str, float]] = {float(a): dict(s) for a, s in (known or {}).items()}
    mixed = None

    def at(alpha: float) -> dict[str, float]:
        nonlocal mixed
        if alpha not in summaries:
            if alpha == 0.0:
                summaries[alpha] = dict(evaluate_fn(target_model))
            elif alpha == 1.0:
                summaries[alpha] = dict(evaluate_fn(unlearned_model))
            else:
                if mixed is None:
                    mixed = copy.deepcopy(target_model)
                mixed.load_state_dict(mix_state(target_sd, unlearned_sd, alpha))
                summaries[alpha] = dict(evaluate_fn(mixed))
        if RETAIN_ES not in summaries[alpha]:
            raise UnlearnError(f"calibration: the evaluation gives no {RETAIN_ES} (is there a retain split?)")
        return summaries[alpha]

    target_es = float(at(0.0)[RETAIN_ES])
    threshold = tau * target_es
    alpha, _ = bisect_largest(at, lambda s: float(s[RETAIN_ES]) >= threshold, steps)
    del mixed
    curve = [{"alpha": a, "retain_es": s.get(RETAIN_ES), "forget_es": s.get(FORGET_ES)}
             for a, s in sorted(summaries.items())]
    return {"alpha": alpha, "tau": tau, "steps": steps, "target_retain_es": target_es, "threshold": threshold,
            "resolution": 2.0 ** -steps, "curve": curve, "calibrated": summaries[alpha]}


def calibrated_metrics(target_model: Any, unlearned_model: Any, evaluate_fn: Callable[[Any], Mapping[str, float]],
                       tau: float = 0.9, steps: int = 6,
                       known: Mapping[float, Mapping[str, float]] | None = None) -> dict[str, float]:
    """`calibrate`'s result as flat metrics (what Tune searches): calibration_alpha and calibrated_<metric> for
    every metric of the summary at the calibrated α."""
    from ray_unlearn.eval.registry import CALIBRATED_PREFIX, CALIBRATION_ALPHA

    result = calibrate(target_model, unlearned_model, evaluate_fn, tau, steps, known)
    return {CALIBRATION_ALPHA: float(result["alpha"]),
            **{CALIBRATED_PREFIX + k: v for k, v in result["calibrated"].items()}}
