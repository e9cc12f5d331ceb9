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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on a loopback port for the session; yields its endpoint URL.

    Tests point the AWS variables at it with `s3_env` and make buckets with `make_bucket`."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "the moto server exited at start-up"
                assert time.time() < deadline, "the moto server did not listen within 60 s"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()  # stopped by its PID
        proc.wait()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS variables naming the loopback S3 server (test credentials); returns make_bucket(name)."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server, "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    def make_bucket(name: str) -> str:
        import pyarrow.fs as pafs

        endpoint = s3_server.split("://", 1)[1]
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing", secret_key="testing",
                          region="us-east-1", allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    return make_bucket
