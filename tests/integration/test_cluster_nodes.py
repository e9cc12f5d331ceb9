"""A worker node removed mid-run (issue 6, point 6b) on a real multi-node Ray cluster on this machine.

`ray.cluster_utils.Cluster` starts a head (no CPUs, so no worker lands there) and two worker nodes of
one CPU each, every one its own raylet. An elastic run (`ray.num_workers=[1, 2]`) starts with a worker
on each node; after its first checkpoint one node is removed (its raylet and processes killed), Ray
Train restarts the group on what is left from the latest checkpoint, and the run ends where a fixed
one-worker run ends: the global batch is fixed, so the worker count does not change the steps.

This module must be the only Ray instance on the machine while it runs (Ray 2.60's placement-group
cleaner finds "its" cluster by auto-detection and has removed another instance's placement groups),
so it starts no test if this process already runs Ray, and its file name sorts it before the tests
that start the shared session cluster.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

RUN = ["ray.num_workers=[1,2]", "train.global_batch_size=8", "train.batch_size=2", "train.max_steps=8",
       "train.checkpoint_every=2", "train.log_every=2", "ray.max_failures=3", "ray.resize_interval_s=1",
       "eval.enabled=false", "optim.lr=1e-3", "optim.hessian=gnb", "optim.hessian_interval=2"]


@pytest.fixture
def cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    # Ray Train decides the new group size as the failure arrives, before the GCS has declared the node dead,
    # so it first asks for 2 workers again and waits for them until this timeout (default 60 s) before it
    # settles for 1; Ray Train passes the variable from the driver to its controller
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")

    assert not ray.is_initialized(), "run this module before (or without) the tests that share a Ray session"
    # the GCS declares a removed node dead after 2 missed 0.5 s health checks (default: 5 x 3 s)
    fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 2}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "_system_config": fast})
    try:
        nodes = [c.add_node(num_cpus=1) for _ in range(2)]
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


def _states(run_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/state.json")),
                  key=lambda s: s["step"])


def test_a_removed_worker_node_leaves_the_run_on_what_is_left_with_the_same_result(cluster, micro_config,
                                                                                 micro_bench):
    from ray_unlearn.pipeline import run_job

    c, nodes = cluster
    cfg = micro_config(*RUN, "name=elastic")
    run_dir = Path(cfg.output_dir) / "ray" / "elastic"
    started_with: list[int] = []

    def remove_a_node_after_the_first_checkpoint() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            states = _states(run_dir)
            if states:
                started_with.append(states[0]["world_size"])
                c.remove_node(nodes[1])
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_a_node_after_the_first_checkpoint, daemon=True)
    remover.start()
    run_job(cfg)
    remover.join(timeout=5)
    assert started_with == [2], "the run did not start on both worker nodes"
    states = _states(run_dir)
    assert states[-1]["step"] == 8 and states[-1]["world_size"] == 1  # finished on the node that was left

    fixed = micro_config(*[a for a in RUN if not a.startswith("ray.num_workers")], "ray.num_workers=1",
                         "name=fixed", f"output_dir={Path(cfg.output_dir).parent / 'fixed'}")
    run_job(fixed)
    a = load_file(str(Path(cfg.output_dir) / "model" / "model.safetensors"))
    b = load_file(str(Path(fixed.output_dir) / "model" / "model.safetensors"))
    start = load_file(str(micro_bench.target_dir / "model.safetensors"))
    moved = torch.cat([(a[k] - start[k]).abs().flatten() for k in a])
    assert float((moved > 1e-4).double().mean()) > 0.5
    # Sophia's tolerance (test_scale_equality), over 8 steps rather than 4, some at 2 workers and some at 1: the
    # reductions' rounding differs with the worker count and compounds step by step (measured 1.03e-4 of the
    # coordinates off by > 1e-6, max 8.4e-6, on the AMD EPYC CI runs on); no coordinate flipped (that is 2 lr)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float((diff > 1e-6).double().mean()) <= 2e-4 and float(diff.max()) < 1e-4, float(diff.max())
