"""Resolve a job's inputs before any work starts: benchmark, model, tokenizer, data.

Everything a run needs is checked here, in the driver, so bad input fails in seconds with a
one-line error instead of inside a Ray worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ray_unlearn.config import JobConfig
from ray_unlearn.errors import UnlearnError
from ray_unlearn.eval.registry import selected_attacks

BUILTIN_FORGET_SPLITS = ("forget01", "forget05", "forget10")


@dataclass
class JobInputs:
    """What a run reads: model/tokenizer locations and the forget, retain and evaluation items."""

    bench: str
    model_path: str
    tokenizer_path: str
    retain_model_path: str | None
    forget: list[dict]
    retain: list[dict]
    kind: str = "qa"
    eval_splits: dict[str, list[dict]] = field(default_factory=dict)
    build_figures: dict[str, Any] | None = None
    mia_reference_path: str | None = None  # the reference attack's model: eval.mia_reference_model or the retain model
    train: list[dict] = field(default_factory=list)  # items a fine-tune fits (`ray-unlearn finetune`); [] to unlearn
    neighbours: list[dict] = field(default_factory=list)  # the scope attack's out-of-scope items (see _neighbours)


def resolve_inputs(cfg: JobConfig, report: Callable[[str, int, int], None] | None = None) -> JobInputs:
    """Build the benchmark if needed, load and check data, and pick model paths."""
    from ray_unlearn.data.loaders import load_forget_items, load_qa, resolve_overlap

    built = None
    if not cfg.model.path or not cfg.data.forget_path or not cfg.data.retain_path:
        from ray_unlearn.models.build import ensure_benchmark

        built = ensure_benchmark(cfg.benchmark, cfg.data.prompt_template, report)
    splits = built.splits() if built is not None else {}
    if cfg.data.forget_path:
        forget, kind = load_forget_items(cfg.data.forget_path)
    else:
        if cfg.data.forget_split not in BUILTIN_FORGET_SPLITS:
            raise UnlearnError(f"data.forget_split: {cfg.data.forget_split!r} is not one of "
                               f"{', '.join(BUILTIN_FORGET_SPLITS)}")
        forget, kind = splits[cfg.data.forget_split], "qa"
    retain = load_qa(cfg.data.retain_path, cfg.data.hub_split) if cfg.data.retain_path else splits["retain"]
    if not forget:
        raise UnlearnError("the forget set is empty; give data.forget_path with at least one item")
    if kind == "text":
        _check_text_objective(cfg)
    retain = resolve_overlap(forget, retain, cfg.data.overlap)
    model_path = cfg.model.path or str(built.target_dir)
    retain_model = cfg.model.retain_model or (str(built.retain_dir) if built is not None and not cfg.model.path
                                              else None)
    eval_splits = {"forget": forget} if kind == "qa" else {}
    eval_splits["retain"] = retain
    if "world_facts" in splits:
        eval_splits["world_facts"] = splits["world_facts"]
    holdout = _holdout(cfg, splits, forget)
    if holdout:
        eval_splits["holdout"] = holdout
    reference = cfg.eval.mia_reference_model or retain_model
    selected_attacks(cfg.eval.mia, "forget" in eval_splits, bool(holdout), bool(reference))  # a one-line error now
    bench = (f"BUILTIN_{cfg.benchmark.size}_{cfg.data.forget_split}" if not cfg.data.forget_path else "CUSTOM")
    return JobInputs(bench=bench, model_path=model_path, tokenizer_path=cfg.model.tokenizer or model_path,
                     retain_model_path=retain_model, forget=forget, retain=retain, kind=kind,
                     eval_splits=eval_splits, build_figures=built.manifest if built is not None else None,
                     mia_reference_path=reference, neighbours=_neighbours(cfg, forget, retain))


def _check_text_objective(cfg: JobConfig) -> None:
    """A text corpus has no questions to pair with a refusal: terms on the refusal stream are a one-line error."""
    from ray_unlearn.objectives import TERMS

    refusing = [name for name in cfg.objective.terms if name in TERMS and "forget_idk" in TERMS[name].streams]
    if refusing:
        source = f" (the {cfg.recipe} recipe's)" if cfg.recipe == "pretrained" else ""
        raise UnlearnError(f"objective.terms{source}: {', '.join(refusing)} trains refusals to forget questions, but "
                           f"data.forget_path {cfg.data.forget_path} is a text corpus; set objective.terms for text, "
                           "e.g. '{npo: 1.0, retain_nll: 2.0}'")


def _holdout(cfg: JobConfig, splits: dict[str, list[dict]], forget: list[dict]) -> list[dict]:
    """Membership inference's non-members: data.holdout_path, else the built-in holdout split when the
    forget set is a built-in split (entities of the same distribution no model was trained on)."""
    from ray_unlearn.data.loaders import load_qa

    if not cfg.data.holdout_path:
        return list(splits.get("holdout", [])) if not cfg.data.forget_path else []
    return _apart_from_forget(load_qa(cfg.data.holdout_path, cfg.data.hub_split), forget, "data.holdout_path",
                              "holdout items must be non-members (never trained on)")


def _neighbours(cfg: JobConfig, forget: list[dict], retain: list[dict]) -> list[dict]:
    """The scope attack's out-of-scope items: data.neighbours_path, else, for a built-in forget split, the
    built-in neighbours (retain items whose attribute value equals a forget item's) of that forget split."""
    from ray_unlearn.data.benchmark import neighbour_items
    from ray_unlearn.data.loaders import load_qa

    if not cfg.data.neighbours_path:
        if cfg.data.forget_path:
            return []
        return neighbour_items([it for it in retain if "attribute" in it and "value" in it], forget)
    return _apart_from_forget(load_qa(cfg.data.neighbours_path, cfg.data.hub_split), forget,
                              "data.neighbours_path", "neighbours are the out-of-scope knowledge to keep")


def _apart_from_forget(items: list[dict], forget: list[dict], key: str, why: str) -> list[dict]:
    """`items`, or a one-line error naming `key` when some (question, answer) pair is also a forget item."""
    forgotten = {(it.get("question"), it.get("answer")) for it in forget}
    shared = sum((it["question"], it["answer"]) in forgotten for it in items)
    if shared:
        raise UnlearnError(f"{key}: {shared} item(s) are also forget items; {why}: remove them")
    return items


def load_checked(cfg: JobConfig, inputs: JobInputs, meta: bool = False) -> tuple[Any, Any]:
    """Load the model and tokenizer and check that they fit together (vocabulary; a chat template
    when data.chat_template is true). `meta=True` builds the model
    from its config on the meta device (shapes, no weights): what the driver checks with (often a
    small CPU-only head node) and what sharded strategies start from on every rank but 0."""
    from ray_unlearn.data.collate import prompt_format, uses_chat_template
    from ray_unlearn.models.io import check_vocab, empty_model, load_model, load_tokenizer

    m = cfg.model
    model = (empty_model if meta else load_model)(inputs.model_path, m.dtype, m.trust_remote_code)
    tokenizer = load_tokenizer(inputs.tokenizer_path, m.trust_remote_code)
    check_vocab(model, tokenizer)
    uses_chat_template(tokenizer, prompt_format(cfg.data))  # data.chat_template=true needs one
    return model, tokenizer
