"""FSDP2: parameters, gradients and optimizer state sharded over ranks (torch `fully_shard`).

Each decoder block (the classes an HF model lists in `_no_split_modules`) is sharded, then the
root, as torchtune's `shard_model` does; forward and backward all-gather one block at a time and
gradients are reduce-scattered (averaged) into each rank's shard. Sophia's m and h are created
from the sharded parameters, so they are sharded too. The frozen reference model is sharded the
same way. Checkpoints are torch distributed checkpoints (DCP): every rank writes its shard, and
a checkpoint can be loaded by any number of ranks (DCP reshards on load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager

import torch

from ray_unlearn.parallel.base import MODEL_FILE, Strategy, dtensor_type


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks to shard one by one: modules whose class the model names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


class FSDP2Strategy(Strategy):
    """`fully_shard` per decoder block, then the root; a plain module when no process group is up."""

    name = "fsdp2"
    sharded = True

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return model  # a plain process (world of one): nothing to shard over
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._shard(model)

    def wrap_reference(self, ref: torch.nn.Module | None) -> torch.nn.Module | None:
        return None if ref is None else self._shard(ref.eval().requires_grad_(False))

    def accumulate(self, model: torch.nn.Module, sync: bool) -> ContextManager:
        return _gradient_sync(model, sync)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # DTensor-aware: the global norm
        dt = dtensor_type()
        return float(norm.full_tensor() if dt is not None and isinstance(norm, dt) else norm)

    def save_state(self, out: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(module, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out))

    def load_state(self, path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def save_full_weights(self, out: Path, module: torch.nn.Module) -> None:
        """Gather the full weights to rank 0's CPU one tensor at a time and write them as safetensors."""
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            save_file(_without_tied_copies(module, full), str(Path(out) / MODEL_FILE), metadata={"format": "pt"})


class _gradient_sync:
    """`set_requires_gradient_sync(sync)` for the micro-batch, back to syncing afterwards."""

    def __init__(self, model: Any, sync: bool):
        self.model, self.sync = model, sync

    def __enter__(self) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(self.sync)

    def __exit__(self, *exc: Any) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(True)


def _tied_names(module: torch.nn.Module) -> set[str]:
    """Names to drop for tied parameters: all but the alphabetically first name of each tensor, as
    safetensors' `save_model` keeps it (so `load_model` and the ddp checkpoints agree)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name for names in groups.values() for name in sorted(names)[1:]}


def _without_tied_copies(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state dict with one name per tied tensor, contiguous (what safetensors writes)."""
    tied = _tied_names(module)
    return {k: v.contiguous() for k, v in state.items() if k not in tied}
