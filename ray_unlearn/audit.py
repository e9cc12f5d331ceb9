"""The audit record of a run (DESIGN.md §12), Ray-free: `build_record`, `write`, `check`.

Every `ray-unlearn run` writes `<output_dir>/audit.json`:

- `request_id`: `audit.request_id`, or a UUID4 generated for the run;
- `forget`: SHA-256 of the forget items in canonical JSON (`canonical_json`: sorted keys, no
  whitespace, UTF-8, the list in order), their count and, for `data.forget_path`, their source;
- `input_model` / `output_model`: SHA-256 of every weight/config file (`MODEL_FILE_SUFFIXES`) of
  the model directory, relative path -> hex digest (files are streamed in 1 MiB chunks); a LoRA run
  adds `output_adapter`, the same for its `adapter/` directory;
- `config`: the resolved config as dumped to config.yaml; `versions`: python and libraries;
- `metrics`: the summaries before (target) and after (unlearned) when evaluation ran;
- `verdict`: the `/v1/verify` rule (`serving.engine.item_forgotten`, default `VerdictRule`
  thresholds) applied per forget item to the evaluation's per-item extraction strength and answer
  probability of the unlearned model against the target's; it needs per-item values, so it is
  computed from the EVAL files, not the summaries (means cannot be thresholded per item);
  absent, with `verdict_omitted` saying why, when evaluation did not run or lacks those metrics;
- `started_at` / `finished_at`: ISO 8601, UTC.

`check(run_dir)` (`ray-unlearn verify RUN_DIR`, local directories only) re-hashes the forget items
(when their source file is recorded and still there), the output model and the input model (when
its directory is still there), recomputes the verdict from the EVAL files, and compares each with
the record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata, util
from pathlib import Path
from typing import Any, Sequence

from ray_unlearn.errors import UnlearnError
from ray_unlearn.models.lora import ADAPTER_DIR

AUDIT_FILE = "audit.json"
FORMAT = 1
CHUNK = 1 << 20
# weights, configs, tokenizer files and remote code of an HF model directory
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken", ".py")
LIBRARIES = ("torch", "transformers", "ray", "deepspeed", "ray_unlearn")
VERDICT_METRICS = ("extraction_strength", "forget_Q_A_Prob")


def new_request_id() -> str:
    return str(uuid.uuid4())


def utc_iso(ts: float) -> str:
    """A POSIX time as ISO 8601 UTC, e.g. 2026-12-02T17:41:13.123456+00:00."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (non-ASCII kept as is)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def hash_items(items: Sequence[Any]) -> str:
    """SHA-256 (hex) of the list of items, in order, as canonical JSON."""
    return hashlib.sha256(canonical_json(list(items))).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_files(model_dir: str | os.PathLike) -> list[str]:
    """Relative paths (POSIX, sorted) of the weight/config files of a model directory; hidden ones left out."""
    root = Path(model_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def hash_model_dir(model_dir: str | os.PathLike) -> dict[str, str]:
    """{relative path: SHA-256 hex} of `model_files(model_dir)`."""
    return {rel: sha256_file(Path(model_dir) / rel) for rel in model_files(model_dir)}


def _model_entry(path: str) -> dict[str, Any]:
    if Path(path).is_dir():
        return {"path": str(Path(path).resolve()), "files": hash_model_dir(path)}
    return {"path": path, "files": None, "note": "not a local directory (hub id or bucket): not hashed"}


def versions() -> dict[str, str | None]:
    """Python and the libraries' installed versions (None: not installed); nothing is imported."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib) if util.find_spec(lib) is not None else None
        except (metadata.PackageNotFoundError, ValueError, ImportError):
            out[lib] = None
    return out


def _clean(obj: Any) -> Any:
    """JSON has no NaN/Inf: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ---------------------------------------------------------------- verdict


def eval_paths(bench: str) -> dict[str, str]:
    """The EVAL files (relative to the run directory) that the verdict is computed from."""
    return {"target": f"eval/target/{bench}_EVAL.json", "unlearned": f"eval/{bench}_EVAL.json"}


def _per_item(results: dict, metric: str, key: str) -> dict[str, float]:
    return {i: rec[key] for i, rec in results[metric]["value_by_index"].items()}


def verdict_from_results(target: dict, unlearned: dict, rule: Any = None) -> dict[str, Any] | str:
    """The /v1/verify verdict of the unlearned model against the target (base) on the evaluated forget
    items, from their per-item ES and probability; a string says why it cannot be computed."""
    from ray_unlearn.serving.engine import VerdictRule, item_forgotten

    rule = rule or VerdictRule()
    for name, res in (("target", target), ("unlearned", unlearned)):
        missing = [m for m in VERDICT_METRICS if m not in res]
        if missing:
            return f"the {name} evaluation has no per-item {', '.join(missing)}"
    es = _per_item(unlearned, "extraction_strength", "score")
    prob = _per_item(unlearned, "forget_Q_A_Prob", "prob")
    base = _per_item(target, "forget_Q_A_Prob", "prob")
    idx = [i for i in es if es[i] is not None and prob.get(i) is not None and base.get(i) is not None]
    if not idx:
        return "no forget item has both models' extraction strength and probability"
    forgotten = sum(item_forgotten(es[i], prob[i], base[i], rule) for i in idx)
    fraction = forgotten / len(idx)
    return {"verdict": "forgotten" if fraction >= rule.min_forgotten_fraction else "not forgotten",
            "items": len(idx), "forgotten_items": forgotten, "forgotten_fraction": fraction,
            "rule": {"item": "es <= es_threshold and probability <= prob_ratio * target probability",
                     "request": "forgotten_fraction >= min_forgotten_fraction", "es_threshold": rule.es_threshold,
                     "prob_ratio": rule.prob_ratio, "min_forgotten_fraction": rule.min_forgotten_fraction}}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnlearnError(f"cannot read {path}: {e}") from e


def verdict_from_run(run_dir: str | os.PathLike, bench: str) -> tuple[dict[str, Any] | None, str | None]:
    """(verdict, None) from the run's EVAL files, or (None, why not)."""
    paths = {k: Path(run_dir) / v for k, v in eval_paths(bench).items()}
    absent = [str(p) for p in paths.values() if not p.is_file()]
    if absent:
        return None, f"evaluation files absent ({', '.join(absent)}): evaluation did not run"
    v = verdict_from_results(_read_json(paths["target"]), _read_json(paths["unlearned"]))
    if isinstance(v, str):
        return None, v
    return {**v, "from": eval_paths(bench)}, None


# ---------------------------------------------------------------- the record


def build_record(*, request_id: str, forget_items: Sequence[Any], forget_source: str | None, input_model: str,
                 output_model: str | os.PathLike, run_dir: str | os.PathLike, config: dict[str, Any], bench: str,
                 summaries: dict[str, dict[str, float]] | None, started: float, finished: float,
                 attacks: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit record of a run whose files are in `run_dir` (the output model at `output_model`, inside it);
    `attacks`: the red-team results (eval/attacks.json's) and `calibration` (eval/calibration.json's: α, the bar
    and the summary at α, without the curve), recorded beside the metrics."""
    out_model = Path(output_model)
    source = None
    if forget_source:
        source = str(Path(forget_source).resolve()) if Path(forget_source).exists() else forget_source
    record: dict[str, Any] = {
        "format": FORMAT,
        "request_id": request_id,
        "started_at": utc_iso(started),
        "finished_at": utc_iso(finished),
        "forget": {"items": len(forget_items), "sha256": hash_items(forget_items), "source": source,
                   "canonical": "JSON, sorted keys, no whitespace, UTF-8, the list in order"},
        "input_model": _model_entry(input_model),
        "output_model": {"path": out_model.relative_to(run_dir).as_posix()
                         if out_model.is_relative_to(run_dir) else str(out_model),
                         "files": hash_model_dir(out_model)},
        **({"output_adapter": {"path": ADAPTER_DIR, "files": hash_model_dir(Path(run_dir) / ADAPTER_DIR)}}
           if (Path(run_dir) / ADAPTER_DIR).is_dir() else {}),
        "benchmark": bench,
        "config": config,
        "versions": versions(),
    }
    if summaries and "target" in summaries and "unlearned" in summaries:
        record["metrics"] = _clean({"before": summaries["target"], "after": summaries["unlearned"],
                                    **({"retain": summaries["retain"]} if "retain" in summaries else {}),
                                    **({"attacks": attacks} if attacks else {}),
                                    **({"calibration": {k: v for k, v in calibration.items() if k != "curve"}}
                                       if calibration else {})})
        verdict, why = verdict_from_run(run_dir, bench)
    else:
        verdict, why = None, "evaluation did not run (eval.enabled=false)"
    if verdict is not None:
        record["verdict"] = _clean(verdict)
    else:
        record["verdict_omitted"] = why
    return record


def write(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write <run_dir>/audit.json atomically."""
    path = Path(run_dir) / AUDIT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- verify


@dataclass
class CheckResult:
    ok: bool
    line: str  # the one-line verdict `ray-unlearn verify` prints


def _compare_files(label: str, root: Path, recorded: dict[str, str]) -> str | None:
    """The first file of `root` whose hash differs from the record (or that is missing or new), as a message."""
    for rel in sorted(recorded):
        path = root / rel
        if not path.is_file():
            return f"{label} file {path} is missing"
        if sha256_file(path) != recorded[rel]:
            return f"{label} file {path} changed (SHA-256 differs from audit.json)"
    for rel in model_files(root):
        if rel not in recorded:
            return f"{label} file {root / rel} is not in audit.json"
    return None


def check(run_dir: str | os.PathLike) -> CheckResult:
    """Re-hash what the record of a local run directory names and compare; raises UnlearnError when
    there is no readable audit.json."""
    run_dir = Path(run_dir)
    path = run_dir / AUDIT_FILE
    if not path.is_file():
        raise UnlearnError(f"{run_dir} holds no {AUDIT_FILE}: give the output_dir of a `ray-unlearn run`"
                           if run_dir.is_dir() else f"run directory {run_dir} does not exist")
    rec = _read_json(path)
    if not isinstance(rec, dict) or "output_model" not in rec or "forget" not in rec:
        raise UnlearnError(f"{path} is not an audit record (no output_model / forget entries)")
    checked, skipped = [], []

    source = rec["forget"].get("source")
    if source and Path(source).exists():
        from ray_unlearn.data.loaders import load_forget_items

        items, _ = load_forget_items(source)
        if hash_items(items) != rec["forget"]["sha256"]:
            return CheckResult(False, f"MISMATCH: forget items of {source} changed (SHA-256 differs from audit.json)")
        checked.append("forget items")
    else:
        skipped.append("forget items (source " + ("not recorded" if not source else f"{source} absent") + ")")

    out_model = rec["output_model"]
    out_root = run_dir / out_model["path"] if not Path(out_model["path"]).is_absolute() else Path(out_model["path"])
    problem = _compare_files("output model", out_root, out_model["files"] or {})
    if problem:
        return CheckResult(False, f"MISMATCH: {problem}")
    checked.append(f"{len(out_model['files'] or {})} output model files")
    if "output_adapter" in rec:
        problem = _compare_files("output adapter", run_dir / rec["output_adapter"]["path"],
                                 rec["output_adapter"]["files"])
        if problem:
            return CheckResult(False, f"MISMATCH: {problem}")
        checked.append(f"{len(rec['output_adapter']['files'])} adapter files")

    in_model = rec.get("input_model") or {}
    if in_model.get("files") is not None and Path(in_model["path"]).is_dir():
        problem = _compare_files("input model", Path(in_model["path"]), in_model["files"])
        if problem:
            return CheckResult(False, f"MISMATCH: {problem}")
        checked.append(f"{len(in_model['files'])} input model files")
    else:
        skipped.append(f"input model ({in_model.get('path')} not a local directory here)")

    if "verdict" in rec:
        verdict, why = verdict_from_run(run_dir, rec.get("benchmark", ""))
        if verdict is None:
            skipped.append(f"verdict ({why})")
        elif verdict["verdict"] != rec["verdict"]["verdict"] \
                or verdict["forgotten_items"] != rec["verdict"]["forgotten_items"]:
            return CheckResult(False, f"MISMATCH: verdict recomputed from the EVAL files is {verdict['verdict']!r} "
                                      f"({verdict['forgotten_items']}/{verdict['items']}), audit.json says "
                                      f"{rec['verdict']['verdict']!r} ({rec['verdict']['forgotten_items']}/"
                                      f"{rec['verdict']['items']})")
        else:
            checked.append(f"verdict {verdict['verdict']!r}")
    line = f"OK: request {rec.get('request_id')}: " + ", ".join(checked) + " match audit.json"
    if skipped:
        line += "; not checked: " + ", ".join(skipped)
    return CheckResult(True, line)
