"""Failures caused by hand: a Ray Train worker killed with SIGKILL mid-run (issue 6, point 6a).

With `ray.max_failures`, Ray Train restarts the worker group from the latest checkpoint reported;
the loop's data order and Hessian samples are keyed by step, not by process, so the restarted
run ends at the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = pytest.mark.slow

RUN = ["ray.num_workers=2", "train.max_steps=30", "train.checkpoint_every=3", "train.log_every=3",
       "eval.enabled=false", "train.batch_size=8", "optim.lr=1e-3"]


def _train_workers() -> list[psutil.Process]:
    """Ray Train worker processes (Ray titles them after the actor class)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _kill_a_worker_after_the_first_checkpoint(storage: Path, killed: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        if any(_registered_checkpoints(run) for run in storage.glob("*")):
            workers = _train_workers()
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.02)


def _registered_checkpoints(run_dir: Path) -> list:
    """Checkpoints Ray Train's controller has registered (a checkpoint directory exists before that)."""
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def _weights(cfg) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "model", use_safetensors=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_killed_worker_restarts_from_the_checkpoint_and_ends_at_the_same_weights(micro_config, ray_session,
                                                                                 tmp_path):
    from ray_unlearn.config import JobConfig, from_dict, to_dict
    from ray_unlearn.pipeline import run_job

    faulty = micro_config(*RUN, "ray.max_failures=2", "name=faulty")
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_the_first_checkpoint,
                              args=(Path(faulty.output_dir) / "ray", killed, stop), daemon=True)
    killer.start()
    try:
        run_job(faulty)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed: the run ended before its first checkpoint was seen"

    data = to_dict(faulty)
    data.update(name="clean", output_dir=str(tmp_path / "clean"))
    clean = from_dict(JobConfig, data)
    run_job(clean)
    a, b = _weights(faulty), _weights(clean)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_killed_driver_resumes_when_the_same_command_runs_again(micro_bench, bench_cache, ray_session, tmp_path):
    """`ray-unlearn run` (joined to the running cluster) SIGKILLed after its first checkpoint; the same
    command again resumes from that checkpoint instead of starting over, and finishes."""
    import subprocess
    import sys

    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "ray-unlearn"), "run", "benchmark.size=micro",
           f"benchmark.cache_dir={bench_cache}", f"output_dir={out}", f"ray.address={address}", "name=driver",
           "ray.num_workers=1", "train.max_steps=40", "train.checkpoint_every=4", "train.log_every=4",
           "eval.enabled=false"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not _registered_checkpoints(out / "ray" / "driver"):
            assert first.poll() is None, "the first run ended before writing a checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = [line for line in again.stdout.splitlines() if "[unlearn] resumed from step" in line]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 4
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["step"] == 40
