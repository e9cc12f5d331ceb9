"""`ray-unlearn submit` against a real Ray head running as a separate process (issue 9, point 7).

The head (`ray start --head --block`, 2 CPUs, its own temp dir and ports, the dashboard's Jobs API
on loopback) runs with token authentication on, as Ray 2.60 runs local clusters by default, with a
token of its own. Against it: a submission without the token, or with another, is refused in one
line (exit 2); the micro job with the token ships this working directory, streams its logs, SUCCEEDS
and leaves its outputs on disk (exit 0); a job whose forget file is not on the cluster is FAILED with
the job's own one-line error and its exit status. The head is stopped by its PID in a finally, and
anything still running from its temp dir is killed by PID (`ray stop` would stop every Ray on the
machine).

Like test_cluster_nodes.py this must be the only Ray on the machine while it runs (Ray 2.60's
placement-group cleaner can remove another instance's groups): it refuses to start if this process
already runs Ray, and its file name sorts it before the tests that start the shared session cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from ray_unlearn.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MICRO = ["ray.num_workers=0", "train.max_steps=3", "train.log_every=1", "eval.max_items=5"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_leftovers(temp_dir: str) -> None:
    """Kill, by PID, every process still running from this head's temp dir."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def ray_head():
    """A Ray head in its own process with token auth; yields (jobs API URL, token)."""
    import ray

    assert not ray.is_initialized(), "run this module before (or without) the tests that share a Ray session"
    temp_dir = tempfile.mkdtemp(prefix="ru_head_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard, client, manager, objects, metrics, agent_http, agent_grpc, runtime_env = _free_ports(9)
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
           f"--temp-dir={temp_dir}", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--node-manager-port={manager}",
           f"--object-manager-port={objects}", f"--metrics-export-port={metrics}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(url, token, head)
        yield url, token
    finally:
        head.send_signal(signal.SIGTERM)  # --block: `ray start` stops what it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        _kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(url: str, token: str, head: subprocess.Popen) -> None:
    import requests

    deadline = time.time() + 60
    while True:
        assert head.poll() is None, "the Ray head exited at start-up"
        assert time.time() < deadline, "the Ray head's Jobs API did not answer within 60 s"
        try:
            if requests.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


def _submit(capsys, *args: str) -> tuple[int, str, list[str]]:
    rc = main(["submit", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.splitlines()


def test_submit_runs_the_job_on_the_cluster_and_reports_its_status(ray_head, micro_bench, bench_cache, tmp_path,
                                                                   capsys, monkeypatch):
    url, token = ray_head
    monkeypatch.chdir(REPO)  # the working directory shipped with the job
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # a user's shell: the token decides
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token
    out = tmp_path / "run"
    job = ["jobs/micro_smoke.yaml", *MICRO, f"benchmark.cache_dir={bench_cache}", f"output_dir={out}"]

    rc, _, err = _submit(capsys, *job, "--address", url)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: the Ray cluster at {url} requires a token") and "RAY_AUTH_TOKEN" in err[0]

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-" + token)
    rc, _, err = _submit(capsys, *job, "--address", url)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: the Ray cluster at {url} refused the token "
                                                           "from RAY_AUTH_TOKEN"), err

    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    rc, logs, err = _submit(capsys, *job, "--address", url)
    assert rc == 0, (logs[-3000:], err)
    assert f"outputs in {out}" in logs and "SUCCEEDED" in logs.splitlines()[-1]
    summary = json.loads((out / "eval" / "BUILTIN_micro_forget10_SUMMARY.json").read_text())
    assert 0.0 <= summary["extraction_strength"] <= 1.0
    assert json.loads((out / "audit.json").read_text())["request_id"]
    trained, target = (hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
                       for d in (out / "model", micro_bench.target_dir))
    assert trained != target  # the job unlearned: the weights moved

    # a deletion request whose forget file is not on the cluster: the job's driver refuses it in one line
    failed_out, request = tmp_path / "failed", tmp_path / "requests" / "req-42.jsonl"
    rc, logs, err = _submit(capsys, *job[:-1], f"data.forget_path={request}", f"output_dir={failed_out}",
                            "--address", url)
    assert rc == 2, (logs[-3000:], err)  # the job's own exit status: its driver refused the input
    assert len(err) == 1 and err[0].startswith("error: job raysubmit_") and " FAILED: " in err[0], err
    assert err[0].endswith(f"FAILED: {request} does not exist; give a .json/.jsonl/.parquet file, a load_from_disk "
                           "directory or a hub dataset id"), err
    assert not failed_out.exists()
