"""Data-parallel strategies (Ray-free): the loop talks to one `Strategy` object.

| step        | ddp                        | fsdp2                                             |
|-------------|----------------------------|---------------------------------------------------|
| wrap        | DistributedDataParallel    | `fully_shard` per decoder block, then the root    |
| accumulate  | `no_sync()`                | `set_requires_gradient_sync(False)`               |
| clip        | `clip_grad_norm_`          | the same on DTensor grads (global norm)           |
| checkpoint  | rank 0: full safetensors   | every rank: torch distributed checkpoint (DCP)    |
| final model | rank 0                     | gathered to rank 0's CPU one tensor at a time     |
"""

from __future__ import annotations

import torch

from ray_unlearn.errors import UnlearnError
from ray_unlearn.parallel.base import (HF_FILES, MODEL_FILE, Strategy, load_hf_weights, local_tensor,
                                       write_hf_weights)
from ray_unlearn.parallel.ddp import DDPStrategy
from ray_unlearn.parallel.fsdp2 import FSDP2Strategy

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy}


def build_strategy(name: str, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                   max_shard_size: str = "5GB") -> Strategy:
    """The strategy called `name` for this rank; a bad name is an error listing the valid ones."""
    if name not in STRATEGIES:
        raise UnlearnError(f"ray.strategy: {name!r} is not one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](rank=rank, world_size=world_size, device=device, max_shard_size=max_shard_size)


__all__ = ["HF_FILES", "MODEL_FILE", "STRATEGIES", "DDPStrategy", "FSDP2Strategy", "Strategy", "build_strategy",
           "load_hf_weights", "local_tensor", "write_hf_weights"]
