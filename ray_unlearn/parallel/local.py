"""Run the unlearning loop in N local processes over gloo, without Ray.

What Ray Train does for the loop, reduced to the minimum: one process per rank, a process group,
a checkpoint directory per rank, and the ranks' checkpoint files merged into one directory (Ray
Train uploads every rank's files into the same checkpoint). For tests of the distributed paths
and for benchmarks that compare against Ray; `ray-unlearn run` goes through Ray Train.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import torch


def free_port() -> int:
    """A free TCP port on the loopback interface (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world_size: int, port: int, cfg_dict: dict[str, Any], inputs: Any, root: str,
               resume_from: str | None) -> None:
    """One rank: join the process group, load, run the loop, leave."""
    from ray_unlearn.config import JobConfig, from_dict
    from ray_unlearn.loop import LoopEnv, Unlearner, load_run

    with rank_group(rank, world_size, port):
        cfg = from_dict(JobConfig, cfg_dict)
        torch.manual_seed(cfg.train.seed + rank)
        model, ref, data, tokenizer = load_run(cfg, inputs, rank, world_size)
        env = LoopEnv(rank=rank, world_size=world_size, checkpoint_dir=Path(root) / f"rank{rank}",
                      resume_from=Path(resume_from) if resume_from else None)
        Unlearner(cfg, model, ref, data, tokenizer.pad_token_id, env).run()


@contextlib.contextmanager
def rank_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """The body of one spawned rank: join a gloo process group on loopback (the environment torchrun and Ray
    Train set, one torch thread), run the body, then leave together and end the process (`exit_rank`).

    Leaving together: rank 0 hosts the rendezvous store, and a rank still in a collective or in the store
    when rank 0 tears it down aborts in C++ ("terminate called without an active exception", seen once in CI
    on the scale-equality test), so the ranks pass a barrier first. A body that raises destroys the group
    and fails the rank as usual."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))  # as torchrun (and Ray Train) set
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank()


def exit_rank() -> None:
    """End a spawned rank's process now, its work done and its process group destroyed: flush Python's
    streams and skip the interpreter's teardown. There torch's C++ objects (process groups and DTensor meshes
    still referenced by garbage modules, their threads) are destroyed in no fixed order, and now and then one
    aborts the process ("terminate called without an active exception", SIGABRT) after the rank's work
    succeeded: 2 of about 40 two-rank runs of test_zero_masters / test_fsdp2_offload, each time after every
    check had passed and the ranks had left a barrier together. Only for processes this module (or a test)
    spawns; an exception before it still fails the rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def merge_checkpoint(root: Path, step: int) -> Path:
    """Copy every rank's files of checkpoint `step` into `root/merged/step-N` (as Ray Train's storage holds it)."""
    name = f"step-{step:06d}"
    out = Path(root) / "merged" / name
    out.mkdir(parents=True, exist_ok=True)
    for rank_dir in sorted(Path(root).glob(f"rank*/{name}")):
        shutil.copytree(rank_dir, out, dirs_exist_ok=True)  # deepspeed's files are in a subdirectory
    return out


def run_local(cfg: Any, inputs: Any, world_size: int, root: Path, resume_from: Path | None = None) -> Path:
    """Run `cfg` on `world_size` local gloo processes; returns the merged final checkpoint."""
    import torch.multiprocessing as mp

    from ray_unlearn.config import to_dict

    mp.spawn(_rank_main, args=(world_size, free_port(), to_dict(cfg), inputs, str(root),
                               str(resume_from) if resume_from else None), nprocs=world_size, join=True)
    return merge_checkpoint(Path(root), cfg.train.max_steps)
