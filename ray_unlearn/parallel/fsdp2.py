"""FSDP2: parameters, gradients and optimizer state sharded over ranks (torch `fully_shard`).

Each decoder block (the classes an HF model lists in `_no_split_modules`) and untied embedding
matrix is sharded, then the root, as torchtune's `shard_model` does; forward and backward all-gather one block at a time and
gradients are reduce-scattered (averaged) into each rank's shard. Sophia's m and h are created
from the sharded parameters, so they are sharded too. The frozen reference model is sharded the
same way. Checkpoints are torch distributed checkpoints (DCP): every rank writes its shard, and
a checkpoint can be loaded by any number of ranks (DCP reshards on load). A LoRA run's checkpoints
hold only the adapter's shards and their optimizer state (the frozen base is the input model's).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch

from ray_unlearn.models.lora import is_lora
from ray_unlearn.parallel.base import Strategy, local_part, local_tensor, write_hf_weights


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks to shard one by one: modules whose class the model names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What is sharded before the root: the decoder blocks, and untied input and output embeddings (a
    large vocabulary's two matrices would otherwise stay gathered in the root from forward to backward,
    and in a frozen reference model for good); tied ones stay in the root (one parameter, one unit)."""
    units = _blocks(model)
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb_in, emb_out = (get_in() if get_in else None), (get_out() if get_out else None)
    if emb_in is not None and emb_out is not None and emb_in.weight is not emb_out.weight:
        units += [emb_in, emb_out]
    return units


class FSDP2Strategy(Strategy):
    """`fully_shard` per decoder block, then the root; a plain module when no process group is up.

    Start-up without a full copy per rank: rank 0 passes the loaded model, every other rank the same
    model built on the meta device (`loop.load_run`). `wrap` shards both and broadcasts rank 0's
    weights shard by shard; the reference model (meta on every rank) is filled from the same weights.
    """

    name = "fsdp2"
    sharded = True
    optimizer_sharded = True

    @classmethod
    def starts_on_meta(cls, **options: Any) -> bool:
        return True

    def __init__(self, *args: Any, offload: str = "none", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.offload = offload  # "params": FSDP2's CPUOffloadPolicy (shards, gradients, optimizer state on CPU)
        # rank 0's full weights and buffers, kept until the reference model has them too
        self._source: dict[str, torch.Tensor] | None = None
        self._source_buffers: dict[str, torch.Tensor] = {}

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard blocks then the root on a mesh of every rank on this device type, then fill meta
        parameters with rank 0's weights and every rank's buffers with rank 0's."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # mixed precision: gathered parameters cast to compute_dtype, gradients reduced in float32
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32) \
            if self.compute_dtype is not None else MixedPrecisionPolicy()
        # CPU offload: the shards live in (pinned) CPU memory, each unit's are copied to the device to be
        # all-gathered, and the reduce-scattered gradients come back to CPU, where the optimizer steps
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.offload == "params" \
            else OffloadPolicy()
        for unit in _units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)  # moves the shards to the device
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            # CPU offload: the shards on CPU, where FSDP2 keeps them, and the (unsharded) buffers on the device
            model.to_empty(device="cpu" if self.offload == "params" else self.device)
            if self.offload == "params":
                _buffers_to(model, self.device)
        if self.offload == "params":
            self._fill_offloaded(model)
        else:
            set_model_state_dict(model, dict(self._source) if self.rank == 0 else {},  # it rewrites the dict it gets
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) are in no state dict
            buf = local_tensor(buf)
            if self.rank == 0:
                buf.copy_(self._source_buffers[name])
            torch.distributed.broadcast(buf, src=0)
        return model

    def _fill_offloaded(self, model: torch.nn.Module) -> None:
        """Rank 0's weights into CPU-offloaded shards, one parameter at a time: broadcast whole on the rank's
        device (NCCL carries no CPU tensors, and `set_model_state_dict` would broadcast from where the shards
        are), then each rank copies its own part into its CPU shard."""
        for name, p in model.named_parameters():
            full = self._source[name].to(self.device, copy=True) if self.rank == 0 else \
                torch.empty(p.shape, dtype=p.dtype, device=self.device)
            torch.distributed.broadcast(full, src=0)
            with torch.no_grad():
                local_tensor(p).copy_(local_part(p, full))

    def casts_parameters(self, model: torch.nn.Module) -> bool:
        return self.distributed  # its MixedPrecisionPolicy (policy and reference); a world of one is a plain module

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.distributed:
            return model.to(self.device)  # a plain process (world of one): nothing to shard over
        if self.rank == 0:
            self._source = {k: v.detach() for k, v in model.state_dict().items()}
            self._source_buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        return self._shard(model)

    def wrap_reference(self, ref: torch.nn.Module | None) -> torch.nn.Module | None:
        try:
            if ref is None or not self.distributed:
                return super().wrap_reference(ref)
            return self._shard(ref.eval().requires_grad_(False))
        finally:
            self._source, self._source_buffers = None, {}  # rank 0's full copy is no longer needed

    def wrap_with_optimizer(self, model: torch.nn.Module, make_optimizer: Any) -> tuple[torch.nn.Module, Any]:
        wrapped, optimizer = super().wrap_with_optimizer(model, make_optimizer)
        if self.offload == "params" and hasattr(optimizer, "sum_over_ranks"):
            # Sophia's clip-rate counts sit with the CPU shards: summed through the rank's device (NCCL)
            optimizer.sum_over_ranks = self.all_reduce_sum_
        return wrapped, optimizer

    def accumulate(self, model: torch.nn.Module, sync: bool) -> ContextManager:
        return _gradient_sync(model, sync)

    def save_state(self, out: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   final: bool = False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(module, optimizer)
        dcp.save({"model": _trained(module, model_sd), "optim": optim_sd}, checkpoint_id=str(out))
        if final:
            self.save_full_weights(out, module)

    def load_state(self, path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": _trained(module, model_sd), "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not is_lora(module)))

    def save_full_weights(self, out: Path, module: torch.nn.Module) -> None:
        """Gather the full weights to rank 0's CPU one tensor at a time and write them there."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            write_hf_weights(out, module, full, self.max_shard_size)


def _buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    """Move every buffer of `model` (not its parameters) to `device`, keeping which are persistent."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)


def _trained(module: torch.nn.Module, model_sd: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of the model's state: all of it, or for a LoRA model only its adapter (the
    trainable entries: the frozen base is the input model's, which every resume loads first)."""
    if not is_lora(module):
        return model_sd
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}


@contextlib.contextmanager
def _gradient_sync(model: Any, sync: bool) -> Iterator[None]:
    """`set_requires_gradient_sync(sync)` for one micro-batch, back to syncing afterwards."""
    fsdp = hasattr(model, "set_requires_gradient_sync")  # a plain module when no process group is up
    if fsdp:
        model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        if fsdp:
            model.set_requires_gradient_sync(True)
