"""Load real forget/retain data: TOFU-format question/answer items or a plain-text corpus.

Question/answer sources (`load_qa`): a .json file (a JSON list of items, or JSON lines), a
.jsonl file, a .parquet file, a `datasets.save_to_disk` directory (a Dataset, or a
DatasetDict from which `split` is taken), or a hub dataset id read with
`datasets.load_dataset(source, split=split)`. A string that looks like a path is always
treated as one (a missing file is an error, never a hub lookup). Items keep all their fields;
those without an `index` get their 0-based position. Every problem raises `UnlearnError`
with one line naming it and the fix; "item i" counts from 0 like `index`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ray_unlearn.errors import UnlearnError

REQUIRED_QA_FIELDS = ("question", "answer")
QA_SUFFIXES = (".json", ".jsonl", ".parquet")
TEXT_SUFFIXES = (".txt",)
OVERLAP_MODES = ("warn", "error")
_QA_HINT = "give a .json/.jsonl/.parquet file, a load_from_disk directory or a hub dataset id"


def load_qa(source: str | os.PathLike, split: str = "train") -> list[dict]:
    """Question/answer items from a file, a load_from_disk directory or a hub dataset id."""
    source = os.fspath(source)
    if not source.strip():
        raise UnlearnError(f"data source is empty; {_QA_HINT}")
    rows = _read_local(source, split) if _looks_like_path(source) else _read_hub(source, split)
    return _add_index(source, _check_qa_items(source, rows))


def load_text(source: str | os.PathLike) -> list[dict]:
    """A .txt corpus, one document per line (blank lines skipped): [{"text": ..., "index": i}]."""
    source = os.fspath(source)
    path = _existing_path(source, "give a .txt file with one document per line")
    if path.is_dir():
        raise UnlearnError(f"{source} is a directory; give a .txt file with one document per line")
    docs = [line.strip() for line in _read_file_text(path, source).splitlines() if line.strip()]
    if not docs:
        raise UnlearnError(f"{source} holds no documents; give a .txt file with one document per line")
    return [{"text": doc, "index": i} for i, doc in enumerate(docs)]


def load_forget_items(source: str | os.PathLike, split: str = "train") -> tuple[list[dict], str]:
    """Forget data and its kind: a .txt corpus -> (documents, "text"), anything else -> (items, "qa")."""
    source = os.fspath(source)
    if source.lower().endswith(TEXT_SUFFIXES):
        return load_text(source), "text"
    return load_qa(source, split), "qa"


def resolve_overlap(forget: list[dict], retain: list[dict], mode: str) -> list[dict]:
    """The retain items to use, given forget items that may also be in the retain set.

    Items match on (question, answer), or on `text` for documents, ignoring surrounding
    whitespace. mode "error": any overlap raises UnlearnError with the count; "warn": warn with
    the count and return retain without the overlapping items.
    """
    if mode not in OVERLAP_MODES:
        raise UnlearnError(f"data.overlap: {mode!r} is not one of {', '.join(OVERLAP_MODES)}")
    forget_keys = {_overlap_key(item) for item in forget}
    kept = [item for item in retain if _overlap_key(item) not in forget_keys]
    count = len(retain) - len(kept)
    if count == 0:
        return list(retain)
    if mode == "error":
        raise UnlearnError(f"{count} retain items also appear in the forget set; remove them from one "
                           "of the two or set data.overlap=warn to drop them from retain")
    if not kept:
        raise UnlearnError("every retain item also appears in the forget set; give a retain set that "
                           "differs from the forget set")
    warnings.warn(f"{count} retain items also appear in the forget set; dropped them from retain",
                  stacklevel=2)
    return kept


# ---------------------------------------------------------------------------- paths


def _looks_like_path(source: str) -> bool:
    """A path (not a hub id): starts with / . ~, exists, ends in a known suffix, or has an existing parent dir."""
    if source.startswith(("/", ".", "~")) or Path(source).expanduser().exists():
        return True
    if source.lower().endswith(QA_SUFFIXES + TEXT_SUFFIXES):
        return True
    return os.sep in source and Path(source).expanduser().parent.is_dir()


def _existing_path(source: str, hint: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise UnlearnError(f"{source} does not exist; {hint}")
    return path


def _read_file_text(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UnlearnError(f"{source} is not UTF-8 text; give a UTF-8 file") from None
    except OSError as e:
        raise UnlearnError(f"{source} cannot be read ({_one_line(e)}); check its permissions") from None


def _one_line(error: BaseException) -> str:
    """The first line of an exception's message (messages must stay on one line)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------- readers


def _read_local(source: str, split: str) -> list[Any]:
    path = _existing_path(source, _QA_HINT)
    if path.is_dir():
        return _read_disk_dataset(path, source, split)
    readers = {".json": _read_json, ".jsonl": _read_json_lines, ".parquet": _read_parquet}
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        raise UnlearnError(f"{source} is a text corpus, not question/answer items; use it as forget data "
                           "or give a .json/.jsonl/.parquet file")
    if suffix not in readers:
        raise UnlearnError(f"{source}: unsupported file type {suffix or '(no suffix)'!r}; {_QA_HINT}")
    return readers[suffix](path, source, split)


def _read_json(path: Path, source: str, split: str) -> list[Any]:
    """A JSON list of items (or {split: [items]}, or one item); otherwise JSON lines."""
    text = _read_file_text(path, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith("["):
            return _parse_json_lines(text, source)
        raise UnlearnError(f"{source} is not valid JSON (line {e.lineno}: {e.msg}); fix the file") from None
    if isinstance(data, dict):
        if isinstance(data.get(split), list):
            return data[split]
        if any(key in data for key in REQUIRED_QA_FIELDS):
            return [data]
        raise UnlearnError(f"{source}: the JSON object is neither an item nor has a {split!r} list; "
                           "give a JSON list of items")
    if not isinstance(data, list):
        raise UnlearnError(f"{source}: the JSON value is {type(data).__name__}, not a list of items; "
                           "give a JSON list of items")
    return data


def _read_json_lines(path: Path, source: str, split: str) -> list[Any]:
    return _parse_json_lines(_read_file_text(path, source), source)


def _parse_json_lines(text: str, source: str) -> list[Any]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UnlearnError(f"{source}: line {n} is not valid JSON ({e.msg}); "
                               "give one JSON object per line or a JSON list") from None
    return rows


def _read_parquet(path: Path, source: str, split: str) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt files
        raise UnlearnError(f"{source} cannot be read as parquet ({_one_line(e)}); "
                           "give a valid .parquet file") from None


def _read_disk_dataset(path: Path, source: str, split: str) -> list[Any]:
    """A `save_to_disk` directory: a Dataset, or a DatasetDict from which `split` is taken."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for a plain directory, others for corrupt ones
        raise UnlearnError(f"{source} is not a datasets load_from_disk directory ({_one_line(e)}); "
                           f"{_QA_HINT}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UnlearnError(f"{source} has no split {split!r} (it has {', '.join(data)}); "
                               "set data.hub_split to one of them")
        data = data[split]
    return _rows(data)


def _read_hub(source: str, split: str) -> list[Any]:
    import datasets

    try:
        data = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown id, unknown split, ...
        raise UnlearnError(f"{source}: cannot load hub dataset split {split!r} ({_one_line(e)}); "
                           "check the id, the split and the network, or give a local file") from None
    return _rows(data)


def _rows(data: Any) -> list[Any]:
    """Rows of a datasets.Dataset (or any iterable of rows) as a list."""
    return data.to_list() if hasattr(data, "to_list") else list(data)


# ---------------------------------------------------------------------------- checks


def _check_qa_items(source: str, rows: list[Any]) -> list[dict]:
    """Copies of the rows, each checked to be a dict with non-empty string question and answer."""
    if not rows:
        raise UnlearnError(f"{source} holds no items; give at least one item with 'question' and 'answer'")
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UnlearnError(f"{source}: item {i} is {type(row).__name__}, not an object with "
                               "'question' and 'answer' fields")
        for key in REQUIRED_QA_FIELDS:
            if key not in row:
                raise UnlearnError(f"{source}: item {i} has no {key!r} field; every item needs "
                                   "'question' and 'answer'")
            if not isinstance(row[key], str):
                raise UnlearnError(f"{source}: item {i} {key!r} is {type(row[key]).__name__}, "
                                   "not a string; make it text")
            if not row[key].strip():
                raise UnlearnError(f"{source}: item {i} has an empty {key!r}; fill it or drop the item")
        items.append(dict(row))
    return items


def _add_index(source: str, items: list[dict]) -> list[dict]:
    """Give items without an `index` their position; indices must be unique integers."""
    seen: set[int] = set()
    for i, item in enumerate(items):
        if item.get("index") is None:
            item["index"] = i
        index = item["index"]
        if not isinstance(index, int) or isinstance(index, bool):
            raise UnlearnError(f"{source}: item {i} has a non-integer 'index' ({index!r}); "
                               "make it an integer or drop the field")
        if index in seen:
            raise UnlearnError(f"{source}: index {index} appears twice (item {i}); give every item a "
                               "unique 'index' or none")
        seen.add(index)
    return items


def _overlap_key(item: dict) -> tuple:
    if "question" in item and "answer" in item:
        return ("qa", str(item["question"]).strip(), str(item["answer"]).strip())
    return ("text", str(item.get("text", "")).strip())
