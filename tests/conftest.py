"""Shared fixtures: one micro benchmark build and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache directory for built benchmarks (RAY_UNLEARN_TEST_CACHE reuses one across sessions)."""
    env = os.environ.get("RAY_UNLEARN_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("bench_cache")


@pytest.fixture(scope="session")
def micro_bench(bench_cache: Path):
    """The `micro` built-in benchmark (data, tokenizer, target and retain models), built once."""
    from ray_unlearn.config import BenchmarkConfig
    from ray_unlearn.models.build import ensure_benchmark

    return ensure_benchmark(BenchmarkConfig(size="micro", seed=0, cache_dir=str(bench_cache)))


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and steadiest on a busy machine) on one CPU thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def micro_config(bench_cache: Path, tmp_path: Path):
    """make(*overrides) -> JobConfig for a quick run on the micro benchmark writing under tmp_path/run."""
    from ray_unlearn.config import load_config

    def make(*extra: str):
        return load_config(None, [f"benchmark.size=micro", f"benchmark.cache_dir={bench_cache}",
                                  f"output_dir={tmp_path / 'run'}", "train.max_steps=10", "train.log_every=5",
                                  "eval.max_items=20", *extra])

    return make
