"""Build (or reuse from cache) the built-in benchmark: data splits, tokenizer, target and retain models.

The cache key is a hash of everything that shapes the result (size, seed, recipe, prompt), so a
changed recipe builds anew. The built-in tokenizer has no chat template: its models are trained
and checked with the plain prompt template (`PromptFormat(template, chat_template=False)`), and
data.chat_template / data.system_prompt do not change the build. A build writes into a temporary directory renamed when complete,
under a file lock, so concurrent runs never see half a benchmark.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import Any, Callable, Iterator

from ray_unlearn.config import BenchmarkConfig
from ray_unlearn.data.collate import DEFAULT_PROMPT
from ray_unlearn.models.io import atomic_dir, commit_dir, load_model, save_model
from ray_unlearn.models.tiny import MODEL_SIZES, train_memorizer, train_tokenizer

BUILD_VERSION = 1
Reporter = Callable[[str, int, int], None]  # (task, done, total)


@dataclass(frozen=True)
class BuiltBenchmark:
    """Where a built benchmark lives and what its build measured."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def target_dir(self) -> Path:
        return self.root / "target"

    @property
    def retain_dir(self) -> Path:
        return self.root / "retain"

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.root / "manifest.json").read_text())

    def splits(self) -> dict[str, list[dict]]:
        from ray_unlearn.data.benchmark import read_benchmark

        return read_benchmark(self.data_dir)


def cache_key(cfg: BenchmarkConfig, prompt_template: str) -> str:
    """Hash of what determines the build."""
    blob = json.dumps({"v": BUILD_VERSION, "size": cfg.size, "seed": cfg.seed, "prompt": prompt_template,
                       "spec": asdict(MODEL_SIZES[cfg.size])}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_benchmark(cfg: BenchmarkConfig, prompt_template: str = DEFAULT_PROMPT,
                     report: Reporter | None = None) -> BuiltBenchmark:
    """Return the cached benchmark for `cfg`, building it first when absent."""
    base = Path(cfg.cache_dir).expanduser() / "benchmarks"
    name = f"{cfg.size}-seed{cfg.seed}-{cache_key(cfg, prompt_template)}"
    built = BuiltBenchmark(base / name)
    if (built.root / "manifest.json").is_file():
        return built
    with _locked(base / f".{name}.lock"):
        if not (built.root / "manifest.json").is_file():
            tmp = atomic_dir(built.root)
            try:
                _build_into(tmp, cfg, prompt_template, report or (lambda *_: None))
                commit_dir(tmp, built.root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return built


def _texts(splits: dict[str, list[dict]]) -> list[str]:
    out = []
    for items in splits.values():
        for it in items:
            out += [it["question"], it["answer"], it.get("paraphrased_question", ""),
                    it.get("paraphrased_answer", ""), *it.get("perturbed_answer", [])]
    return [t for t in out if t] + ["Question:\nAnswer:", "I don't know."]


def _build_into(root: Path, cfg: BenchmarkConfig, prompt_template: str, report: Reporter) -> None:
    """Generate data, fit the tokenizer, train target and retain models (in parallel processes)."""
    from ray_unlearn.data.benchmark import generate_benchmark, write_benchmark

    spec = MODEL_SIZES[cfg.size]
    splits = generate_benchmark(cfg.size, cfg.seed)
    write_benchmark(splits, root / "data")
    tokenizer = train_tokenizer(_texts(splits), spec.vocab_size)
    tokenizer.save_pretrained(root / "tokenizer")
    ctx = multiprocessing.get_context("spawn")
    workers = max(1, min(2, os.cpu_count() or 1))
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_train_one, str(root), cfg.size, cfg.seed, prompt_template, name, queue)
                   for name in ("target", "retain")]
        while not all(f.done() for f in futures):
            try:
                report(*queue.get(timeout=0.5))
            except Empty:
                pass
        for f in futures:
            f.result()
    figures: dict[str, Any] = {"size": cfg.size, "seed": cfg.seed, "key": cache_key(cfg, prompt_template)}
    for name in ("target", "retain"):
        model = load_model(str(root / name))
        for split in ("forget10", "retain", "holdout"):
            figures[f"{name}_{split}_es"] = _forget_es(model, tokenizer, splits[split], prompt_template)
    (root / "manifest.json").write_text(json.dumps(figures, indent=2))


def _train_one(root: str, size: str, seed: int, prompt_template: str, name: str, queue: Any) -> None:
    """Subprocess body: train one model (one thread) and save it with the tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from ray_unlearn.data.benchmark import read_benchmark, training_corpus

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(Path(root) / "tokenizer")
    splits = read_benchmark(Path(root) / "data")
    pairs = [(it["question"], it["answer"]) for it in training_corpus(splits, include_forget=name == "target")]
    def on_step(step: int, total: int, loss: float) -> None:
        if step % 10 == 0 or step == total:
            queue.put((f"build {name} model", step, total))

    model = train_memorizer(MODEL_SIZES[size], tokenizer, pairs, seed, prompt_template, on_step)
    save_model(model, tokenizer, Path(root) / name)


def _forget_es(model: Any, tokenizer: Any, items: list[dict], prompt_template: str) -> float:
    """Mean extraction strength of `model` on `items` (the build's memorization check)."""
    from ray_unlearn.data.collate import PromptFormat, encode_qa, pad_batch
    from ray_unlearn.eval.metrics import extraction_strength

    fmt, values = PromptFormat(template=prompt_template, chat_template=False), []
    for i in range(0, len(items), 64):
        enc = [encode_qa(tokenizer, it["question"], it["answer"], fmt=fmt)
               for it in items[i:i + 64]]
        values += extraction_strength(model, pad_batch(enc, tokenizer.pad_token_id)).tolist()
    return float(sum(values) / max(1, len(values)))
