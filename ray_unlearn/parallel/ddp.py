"""DDP: every rank holds the full model, gradients are all-reduced (averaged) after backward.

Checkpoints are full state written by rank 0 (weights as an HF directory's safetensors, optimizer
state with torch.save), so any number of workers can resume them. A LoRA run's checkpoints hold its
adapter (the base weights are the input model's, frozen), and the last one the merged weights too.
"""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager

import torch

from ray_unlearn.models.lora import is_lora, write_adapter
from ray_unlearn.parallel.base import Strategy, load_hf_weights, write_hf_weights


class DDPStrategy(Strategy):
    """torch DistributedDataParallel (gloo on CPU, NCCL on GPU); a plain module on one rank."""

    name = "ddp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def accumulate(self, model: torch.nn.Module, sync: bool) -> ContextManager:
        return super().accumulate(model, sync) if sync or not hasattr(model, "no_sync") else model.no_sync()

    def save_state(self, out: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   final: bool = False) -> None:
        if self.rank == 0:  # the full weights, final or not (LoRA: the adapter, and the merged weights when final)
            if is_lora(module) and not final:
                write_adapter(out, module, module.state_dict())
            else:
                self.save_full_weights(out, module)
            torch.save(optimizer.state_dict(), out / "optimizer.pt")

    def load_state(self, path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        load_hf_weights(module, path)
        optimizer.load_state_dict(torch.load(Path(path) / "optimizer.pt", weights_only=True))

    def save_full_weights(self, out: Path, module: torch.nn.Module) -> None:
        if self.rank == 0:
            write_hf_weights(out, module, module.state_dict(), self.max_shard_size)
