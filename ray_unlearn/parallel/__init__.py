"""Data-parallel strategies (Ray-free): the loop talks to one `Strategy` object.

| step        | ddp                      | fsdp2                                          | deepspeed (ZeRO 1/2/3)                       |
|-------------|--------------------------|------------------------------------------------|----------------------------------------------|
| wrap        | DistributedDataParallel  | `fully_shard` per decoder block, then the root | `deepspeed.initialize(model, our optimizer)` |
| accumulate  | `no_sync()`              | `set_requires_gradient_sync(False)`            | the engine accumulates until `step()`        |
| clip        | float64 global norm      | the same over the shards, summed over ranks    | the engine's `gradient_clipping` (the same)  |
| Hessian     | g*g of all-reduced grads | g*g of reduce-scattered shards                 | g*g of the partitions, in an engine step     |
| checkpoint  | rank 0: full safetensors | every rank: torch distributed checkpoint (DCP) | every rank: 1/world of the params, whole     |
| final model | rank 0                   | gathered to rank 0's CPU one tensor at a time  | ZeRO 3: gathered one parameter at a time     |
"""

from __future__ import annotations

from typing import Any

import torch

from ray_unlearn.errors import UnlearnError
from ray_unlearn.parallel.base import (HF_FILES, MODEL_FILE, Strategy, load_hf_weights, local_tensor,
                                       write_hf_weights)
from ray_unlearn.parallel.ddp import DDPStrategy
from ray_unlearn.parallel.fsdp2 import FSDP2Strategy
from ray_unlearn.parallel.zero import DeepSpeedStrategy

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(name: str, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                   max_shard_size: str = "5GB", **options: Any) -> Strategy:
    """The strategy called `name` for this rank (`options`: the strategy's own, e.g. deepspeed's
    zero_stage); a bad name is an error listing the valid ones."""
    if name not in STRATEGIES:
        raise UnlearnError(f"ray.strategy: {name!r} is not one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](rank=rank, world_size=world_size, device=device, max_shard_size=max_shard_size,
                            **options)


__all__ = ["HF_FILES", "MODEL_FILE", "STRATEGIES", "DDPStrategy", "DeepSpeedStrategy", "FSDP2Strategy", "Strategy",
           "build_strategy",
           "load_hf_weights", "local_tensor", "write_hf_weights"]
