"""`eval.num_workers`: an evaluation's model passes on Ray actors, each holding the model.

`EvalPool(n, model_path, ...)` starts n actors (one CPU each, or one GPU each with ray.use_gpu) that load the
model and tokenizer from disk (the driver never loads the weights) and run the suite's own pass functions on
spans of whole batches (`ray_unlearn.eval.passes`), so `evaluate_model(None, ..., pool=pool)` gives the
single-process results. A pool serves one model; `eval_pools` opens one per model and closes them (the
actors are killed by handle, their processes end with them).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Sequence

import ray

from ray_unlearn.data.collate import PromptFormat
from ray_unlearn.errors import UnlearnError
from ray_unlearn.eval.passes import batch_spans, cut, merge_outputs


@ray.remote
class EvalWorker:
    """One actor: the model and tokenizer, loaded once, and the suite's passes on the spans it is given."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, tokenizer_path: str,
                 fmt: PromptFormat, max_length: int, batch_size: int, max_new_tokens: int, use_gpu: bool):
        import torch

        from ray_unlearn.cli import quiet_libraries
        from ray_unlearn.data.collate import stop_token_ids
        from ray_unlearn.eval.suite import _Run
        from ray_unlearn.models.io import load_model, load_tokenizer

        quiet_libraries()
        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        model = load_model(model_path, dtype, trust_remote_code).eval()
        if use_gpu:
            model = model.to("cuda")
        torch.set_grad_enabled(True)  # GradNorm differentiates; the passes that do not run under no_grad
        self.run = _Run(model, tokenizer, fmt, stop_token_ids(tokenizer, fmt), max_length, batch_size,
                        max_new_tokens, lambda msg: None)

    def teacher_forced(self, pairs: list, token_stats: bool, vocab_stats: bool, keywords: list | None) -> dict:
        from ray_unlearn.eval.suite import _teacher_forced

        return _teacher_forced(self.run, pairs, token_stats, vocab_stats, keywords)

    def generate(self, items: list[dict]) -> list[str]:
        from ray_unlearn.eval.suite import _generate

        return _generate(self.run, items)

    def gradnorms(self, encoded: list[dict]) -> Any:
        from ray_unlearn.eval import mia

        return mia.gradnorm_scores(self.run.model, encoded)


class EvalPool:
    """n `EvalWorker`s holding one model; each pass is cut into spans of whole batches, one per worker."""

    def __init__(self, workers: int, model_path: str, dtype: str, trust_remote_code: bool, tokenizer_path: str,
                 fmt: PromptFormat, max_length: int, batch_size: int, max_new_tokens: int, use_gpu: bool = False):
        options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
        self.batch_size = batch_size
        self.actors = [EvalWorker.options(**options).remote(model_path, dtype, trust_remote_code, tokenizer_path,
                                                            fmt, max_length, batch_size, max_new_tokens, use_gpu)
                       for _ in range(workers)]

    def _spread(self, method: str, items: Sequence[Any], *args: Any, per_item: Sequence[Any] | None = None) -> Any:
        """Every worker's `method` on its span of whole batches of `items` (and of `per_item`), joined in order."""
        spans = batch_spans(len(items), self.batch_size, len(self.actors)) or [(0, 0)]
        refs = [getattr(actor, method).remote(list(items[a:b]), *args, *(() if per_item is None else (extra,)))
                for actor, (a, b), extra in zip(self.actors, spans, cut(per_item, spans))]
        return merge_outputs(ray.get(refs))

    def teacher_forced(self, pairs: Sequence, token_stats: bool = False, vocab_stats: bool = False,
                       keywords: Sequence | None = None) -> dict:
        if keywords is None:
            return self._spread("teacher_forced", pairs, token_stats, vocab_stats, None)
        return self._spread("teacher_forced", pairs, token_stats, vocab_stats, per_item=keywords)

    def generate(self, items: Sequence[dict]) -> list[str]:
        return self._spread("generate", items)

    def gradnorms(self, encoded: Sequence[dict]) -> Any:
        return self._spread("gradnorms", encoded)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _free(kind: str, wanted: int, wait_s: float = 10.0) -> float:
    """The cluster's free `kind` resources, waiting up to `wait_s` for `wanted` (actors just killed, e.g. a
    previous pool's, release theirs a moment later)."""
    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources().get(kind, 0)
        if free >= wanted or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


@contextlib.contextmanager
def eval_pools(workers: int, **settings: Any) -> Iterator[Any]:
    """open(model_path) -> an EvalPool of `workers` actors for that model (the other settings fixed); every pool
    opened is closed on exit."""
    if not ray.is_initialized():  # `ray-unlearn eval`; a run has joined its cluster already
        ray.init(configure_logging=False, log_to_driver=False)
    kind, have = ("GPU", "GPUs") if settings.get("use_gpu") else ("CPU", "CPUs")
    free = _free(kind, workers)
    if free < workers:
        raise UnlearnError(f"eval.num_workers={workers} needs {workers} free {have} (one per actor) but the cluster "
                           f"has {free:g} free; lower eval.num_workers or use 0 (the driver scores the items)")
    pools: list[EvalPool] = []

    def open_pool(model_path: str) -> EvalPool:
        pools.append(EvalPool(workers, model_path, **settings))
        return pools[-1]

    try:
        yield open_pool
    finally:
        for pool in pools:
            pool.close()
