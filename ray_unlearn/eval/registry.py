"""The metric registry: every metric the suite can compute, under OpenUnlearning's name, and what it needs.

A metric is a frozen record: its name (the key in <BENCH>_EVAL.json / _SUMMARY.json), the split it
describes, its `handler` (how `eval.suite` computes it, as OpenUnlearning's metric configs name a
handler) and its `Needs`: which splits, which shared inputs (the one teacher-forced pass per split,
one greedy generation per split, the truth-ratio passes, a backward pass per item), whether it
reads a reference model's losses or the retain model's results, and which other metrics it is
computed from. The suite computes each shared input once, on first use, and every metric whose
inputs exist; Tune's metric check, the report table, pareto.md and Serve's /v1/verify take their
names from here.

This module is plain data (no torch), so that the config check and the CLI can read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ray_unlearn.errors import UnlearnError


@dataclass(frozen=True)
class Needs:
    """What computing a metric takes; every input is computed once per evaluated model and shared."""

    splits: tuple[str, ...] = ()    # evaluation splits whose items it reads
    teacher_forced: bool = False    # the one teacher-forced pass over each split's (question, answer) pairs
    vocab_stats: bool = False       # ... keeping the mean / variance of log p over the vocabulary (Min-K++)
    generation: bool = False        # greedy answers to each split's questions (one generation per split)
    truth: bool = False             # passes over the paraphrased and perturbed answers
    gradients: bool = False         # one backward pass per item
    reference: bool = False         # a reference model's per-item losses on the same items
    retain: bool = False            # the retain model's results
    metrics: tuple[str, ...] = ()   # metrics it is computed from


@dataclass(frozen=True)
class Metric:
    """One metric of the suite."""

    name: str                       # key in the EVAL / SUMMARY files (OpenUnlearning's name)
    handler: str                    # how eval.suite computes it (a key of suite.HANDLERS)
    needs: Needs
    split: str | None = None        # the evaluation split it describes; None: several
    label: str = ""                 # its row in report tables
    attack: str = ""                # membership inference: the attack (a key of MIA_ATTACKS)


@dataclass(frozen=True)
class SplitSpec:
    """Which metrics an evaluation split gets and under which OpenUnlearning names."""

    prefix: str                     # metric-name prefix: forget_Q_A_Prob, wf_Q_A_ROUGE, ...
    title: str                      # its name in report labels
    correct_key: str                # the "true" answer of the truth ratio
    truth_ratio_name: str
    truth_ratio_agg: str            # OpenUnlearning's aggregator: closer_to_1_better (forget) or true_better
    es_name: str | None = None      # extraction strength on this split's answers
    em_name: str | None = None      # exact memorization on this split's answers
    normalised: bool = False        # also report <prefix>_Q_A_Prob_normalised


SPLITS: dict[str, SplitSpec] = {
    "forget": SplitSpec("forget", "forget", "paraphrased_answer", "forget_truth_ratio", "closer_to_1_better",
                        es_name="extraction_strength", em_name="exact_memorization"),
    "retain": SplitSpec("retain", "retain", "paraphrased_answer", "retain_Truth_Ratio", "true_better",
                        es_name="retain_extraction_strength"),
    "real_authors": SplitSpec("ra", "real authors", "answer", "ra_Truth_Ratio", "true_better", normalised=True),
    "world_facts": SplitSpec("wf", "world", "answer", "wf_Truth_Ratio", "true_better", normalised=True),
}
HOLDOUT = "holdout"  # membership inference's non-members: same distribution as forget, never trained on
EVAL_SPLITS = (*SPLITS, HOLDOUT)

# OpenUnlearning's model_utility: hmean of these, per split present (ra only with a real_authors split).
UTILITY_METRICS: dict[str, tuple[str, ...]] = {
    "retain": ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"),
    "real_authors": ("ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio"),
    "world_facts": ("wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"),
}


@dataclass(frozen=True)
class Attack:
    """A membership-inference attack: a per-item score, higher = less likely a member (loss-like)."""

    score: str                      # what the score is, in one line
    default: bool                   # on under eval.mia=auto
    needs: Needs
    label: str


_MIA_SPLITS = ("forget", HOLDOUT)
MIA_ATTACKS: dict[str, Attack] = {
    "loss": Attack("token-mean answer NLL (EOS included)", True,
                   Needs(_MIA_SPLITS, teacher_forced=True), "MIA AUC LOSS"),
    "zlib": Attack("answer NLL / zlib-compressed bytes of the answer text", True,
                   Needs(_MIA_SPLITS, teacher_forced=True), "MIA AUC ZLib"),
    "min_k": Attack("-mean of the lowest k fraction of answer-token log-probs (EOS left out)", True,
                    Needs(_MIA_SPLITS, teacher_forced=True), "MIA AUC Min-K"),
    "min_k_plus_plus": Attack("-mean of the lowest k fraction of vocabulary-normalised answer-token log-probs",
                              True, Needs(_MIA_SPLITS, teacher_forced=True, vocab_stats=True), "MIA AUC Min-K++"),
    "reference": Attack("answer NLL minus the reference (retain) model's", True,
                        Needs(_MIA_SPLITS, teacher_forced=True, reference=True), "MIA AUC reference"),
    "gradnorm": Attack("mean over parameter tensors of the L2 norm of the answer NLL's gradient (batch size 1)",
                       False, Needs(_MIA_SPLITS, gradients=True), "MIA AUC GradNorm"),
}
PRIVLEAK_ATTACK = "min_k"  # privleak compares this attack's AUC with the retain model's (MUSE, OpenUnlearning)
DEFAULT_RETAIN_AUC = 0.5   # OpenUnlearning's ref_value when no retain model is known


def mia_metric_name(attack: str) -> str:
    """The result key of an attack's AUC: mia_<attack> (OpenUnlearning's metric names)."""
    return f"mia_{attack}"


def _split_metrics(split: str, spec: SplitSpec) -> list[Metric]:
    """A split's metrics in the order the suite writes them."""
    p, t, answers = spec.prefix, spec.title, Needs((split,), teacher_forced=True)
    truth = Needs((split,), teacher_forced=True, truth=True)
    out = [Metric(f"{p}_Q_A_Prob", "probability", answers, split, label=f"{t} prob")]
    if spec.es_name:
        out.append(Metric(spec.es_name, "extraction_strength", answers, split, label=f"{t} ES"))
    if spec.em_name:
        out.append(Metric(spec.em_name, "exact_memorization", answers, split, label=f"{t} EM"))
    out.append(Metric(f"{p}_Q_A_ROUGE", "rouge", Needs((split,), generation=True), split, label=f"{t} ROUGE-L"))
    if spec.correct_key != "answer":
        out.append(Metric(f"{p}_Q_A_PARA_Prob", "paraphrased_probability", truth, split))
    out.append(Metric(f"{p}_Q_A_PERT_Prob", "perturbed_probability", truth, split))
    out.append(Metric(spec.truth_ratio_name, "truth_ratio", truth, split, label=f"{t} truth ratio"))
    if spec.normalised:
        out.append(Metric(f"{p}_Q_A_Prob_normalised", "normalised_probability", truth, split,
                          label=f"{t} prob (norm.)"))
    return out


KEYWORD_SPLITS = ("forget",)  # splits whose items' keywords (GRIN) are checked, when every item has some


def _build() -> dict[str, Metric]:
    metrics = [m for split, spec in SPLITS.items() for m in _split_metrics(split, spec)]
    for split in KEYWORD_SPLITS:  # skipped unless every item of the split has keywords
        p = SPLITS[split].prefix
        metrics += [Metric(f"{p}_keyword_accuracy", "keyword_accuracy", Needs((split,), generation=True), split,
                           label=f"{SPLITS[split].title} keyword acc."),
                    Metric(f"{p}_keyword_confidence", "keyword_confidence", Needs((split,), teacher_forced=True),
                           split, label=f"{SPLITS[split].title} keyword conf.")]
    metrics.append(Metric("forget_quality", "forget_quality",
                          Needs(("forget",), retain=True, metrics=("forget_truth_ratio",)), label="forget quality"))
    utility = tuple(name for names in UTILITY_METRICS.values() for name in names)
    metrics.append(Metric("model_utility", "model_utility", Needs(metrics=utility), label="model utility"))
    metrics += [Metric(mia_metric_name(name), "mia_auc", attack.needs, label=attack.label, attack=name)
                for name, attack in MIA_ATTACKS.items()]
    # privleak reads the retain model's Min-K AUC when there is one, else OpenUnlearning's default 0.5
    metrics.append(Metric("privleak", "privleak", Needs(metrics=(mia_metric_name(PRIVLEAK_ATTACK),)),
                          label="privleak"))
    return {m.name: m for m in metrics}


METRICS: dict[str, Metric] = _build()

# The report table's rows, in order (labels from the metrics), and the extra columns of pareto.md.
REPORT_ROWS = ("extraction_strength", "exact_memorization", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
               "forget_keyword_accuracy", "forget_keyword_confidence", "forget_truth_ratio", "forget_quality", "retain_extraction_strength", "retain_Q_A_Prob",
               "retain_Q_A_ROUGE", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "model_utility",
               *(mia_metric_name(a) for a in MIA_ATTACKS), "privleak")
HEADLINE_METRICS = ("extraction_strength", "forget_quality", "model_utility", "exact_memorization",
                    "retain_extraction_strength", "privleak")


def metric_names() -> list[str]:
    """Every summary metric the suite can produce, in the order it writes them."""
    return list(METRICS)


# Model-mixing calibration's results under their own names (Tune can search them): calibration_alpha, the
# mixing ratio it chose, and calibrated_<metric> for every metric of the summary at that ratio.
CALIBRATION_ALPHA = "calibration_alpha"
CALIBRATED_PREFIX = "calibrated_"


def calibrated_metric_names() -> list[str]:
    """calibration_alpha and calibrated_<metric> for every summary metric."""
    return [CALIBRATION_ALPHA] + [CALIBRATED_PREFIX + name for name in METRICS]


def calibrated_base(name: str) -> str | None:
    """The metric a calibrated name reports at the calibrated α (calibration_alpha: itself), else None."""
    if name == CALIBRATION_ALPHA:
        return name
    return name.removeprefix(CALIBRATED_PREFIX) if name.startswith(CALIBRATED_PREFIX) else None


def report_rows() -> list[tuple[str, str]]:
    """(name, label) of the report table's rows."""
    return [(name, METRICS[name].label) for name in REPORT_ROWS]


def check_attack_names(key: str, names: Sequence[str]) -> None:
    """Every name is a MIA attack, or a one-line UnlearnError listing them."""
    for name in names:
        if name not in MIA_ATTACKS:
            raise UnlearnError(f"{key}: unknown membership-inference attack {name!r} "
                               f"(valid: {', '.join(MIA_ATTACKS)}; or auto, or [] for none)")


def selected_attacks(setting: str | Sequence[str], has_forget: bool, has_holdout: bool,
                     has_reference: bool) -> tuple[str, ...]:
    """The attacks to run for eval.mia = `setting`.

    auto: the default attacks the inputs allow (none without a question-answer forget set and a
    holdout split; reference only with a reference model). A list: exactly those, or a one-line
    UnlearnError naming what is missing and how to give it.
    """
    if setting == "auto":
        if not (has_forget and has_holdout):
            return ()
        return tuple(name for name, attack in MIA_ATTACKS.items()
                     if attack.default and (has_reference or not attack.needs.reference))
    attacks = tuple(dict.fromkeys(setting))
    check_attack_names("eval.mia", attacks)
    if attacks and not has_forget:
        raise UnlearnError("eval.mia: membership inference needs question-answer forget items (members); "
                           "a text corpus has none: set eval.mia=[]")
    if attacks and not has_holdout:
        raise UnlearnError("eval.mia: membership inference needs a holdout split (non-members: items like the "
                           "forget set's, never trained on); set data.holdout_path, use a built-in forget split "
                           "(its benchmark's holdout split), or set eval.mia=[]")
    if "reference" in attacks and not has_reference:
        raise UnlearnError("eval.mia: the reference attack needs a reference model; set eval.mia_reference_model "
                           "or model.retain_model, or leave reference out of eval.mia")
    return attacks
