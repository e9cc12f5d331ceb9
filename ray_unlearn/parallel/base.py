"""What every data-parallel strategy shares: the world-of-1 behaviour and the collectives.

A strategy owns everything that differs between DDP and FSDP2 (DESIGN.md §10): how the model
and the frozen reference are wrapped, how gradients accumulate without a sync, global grad-norm
clipping, reductions of values the loop computes itself, and how training state is saved and
restored. The loop calls only these methods, so it reads the same for every strategy.

Collectives go through `torch.distributed` when a process group of more than one rank is up
(Ray Train sets it up in its workers; tests use `torch.multiprocessing` with gloo), and are
no-ops otherwise.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch
from torch import Tensor

from ray_unlearn.errors import UnlearnError

MODEL_FILE = "model.safetensors"  # full weights (every ddp checkpoint; the final checkpoint of any strategy)
INDEX_FILE = "model.safetensors.index.json"  # written instead when the weights are split into shards
NORM_CHUNK = 1 << 22  # elements of a gradient whose float64 norm is taken at once
HF_FILES = ("config.json", "generation_config.json", "model*.safetensors", INDEX_FILE)  # an HF model dir's weights


def dtensor_type() -> type | None:
    """torch's DTensor class, or None where torch.distributed is not built."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def local_tensor(t: Tensor) -> Tensor:
    """The rank's own part of a (possibly sharded) tensor: a DTensor's local shard, else `t`."""
    dt = dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def local_part(like: Tensor, full: Tensor) -> Tensor:
    """This rank's part of `full` (a tensor of `like`'s global shape, the same on every rank), cut as `like`
    is: a DTensor's shard (no communication), else `full` itself."""
    dt = dtensor_type()
    if dt is None or not isinstance(like, dt):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(local_tensor(like).device), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def full_of(like: Tensor, local: Tensor) -> Tensor:
    """The whole tensor whose part on this rank is `local`, cut as `like` is (a DTensor: gathered from every
    rank, which all call it); else `local` itself."""
    dt = dtensor_type()
    if dt is None or not isinstance(like, dt):
        return local
    return dt.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                         stride=like.stride()).full_tensor()


def tied_names(module: torch.nn.Module) -> set[str]:
    """Names to drop for tied parameters: every name of a tensor but its first registered one (the input
    embedding, not the tied output head), the names `save_pretrained` writes and other readers expect."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name for names in groups.values() for name in names[1:]}


def own_storage(t: Tensor) -> Tensor:
    """`t`, copied when it is a view into a larger storage (FSDP2 gathers a parameter whose first dimension
    the world size does not divide, e.g. an odd vocabulary on 2 workers, into a padded buffer), which
    safetensors refuses to write."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone(
        memory_format=torch.contiguous_format)


def write_hf_weights(out: Path, module: torch.nn.Module, state: dict[str, Tensor], max_shard_size: str) -> None:
    """Write `state` (full tensors) as an HF model directory's weights: config.json (and
    generation_config.json), `model.safetensors` or, above `max_shard_size`, numbered shards plus
    `model.safetensors.index.json`, as `save_pretrained` does. A LoRA model (peft) writes its adapter
    directory's files and the merged model's weights under the base model's names."""
    from huggingface_hub import save_torch_state_dict

    from ray_unlearn.models.lora import base_name, is_lora, merged_state, write_adapter

    tied = tied_names(module)
    if is_lora(module):
        write_adapter(out, module, state)
        state, tied = merged_state(module, state), {base_name(name) for name in tied}
    save_torch_state_dict({k: own_storage(v) for k, v in state.items() if k not in tied}, out,
                          max_shard_size=max_shard_size, metadata={"format": "pt"})
    if getattr(module, "config", None) is not None:
        module.config.save_pretrained(out)
    if getattr(module, "generation_config", None) is not None:
        module.generation_config.save_pretrained(out)


def load_hf_weights(module: torch.nn.Module, path: Path) -> None:
    """Load what `write_hf_weights` wrote (one file or shards) into `module`; every weight must be there.
    A LoRA model loads its adapter (its base weights are the input model's, frozen)."""
    from safetensors.torch import load_file

    from ray_unlearn.models.lora import is_lora, load_adapter

    if is_lora(module):
        return load_adapter(module, path)
    path = Path(path)
    index = path / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [MODEL_FILE]
    expected = set(module.state_dict()) - tied_names(module)
    for name in files:
        part = load_file(str(path / name))
        expected -= set(part)
        module.load_state_dict(part, strict=False)
    if expected:
        raise UnlearnError(f"{path} lacks {len(expected)} weights of the model (e.g. {sorted(expected)[0]}); "
                           "it was written for another model")


def fold_grad_squares_into(optimizer: Any) -> None:
    """h <- b2*h + (1-b2)*g*g for the gradients on the optimizer's own params, which are then cleared
    (Sophia's reference `update_hessian()`, minus soul_compat's momentum fold)."""
    optimizer.fold_grad_squares()
    optimizer.zero_grad(set_to_none=True)


class Strategy:
    """Data-parallel strategy base: correct for a world of one, with collectives when distributed.

    `sharded` strategies keep only a shard of each parameter per rank, so every forward pass is a
    collective: all ranks must run it (in-training evaluation included).
    """

    name = "base"
    sharded = False  # parameters sharded: every forward pass is a collective
    optimizer_sharded = False  # optimizer state partitioned: counts over it are summed over ranks

    @classmethod
    def starts_on_meta(cls, **options: Any) -> bool:
        """Whether every rank but 0 builds the model (and every rank the reference) on the meta device,
        rank 0's weights filling them once sharded; `options` are the strategy's own (build_strategy's)."""
        return False

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 max_shard_size: str = "5GB", compute_dtype: torch.dtype | None = None):
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.max_shard_size = max_shard_size  # of the safetensors files of full weights
        self.compute_dtype = compute_dtype  # mixed precision: forward/backward in this dtype, float32 parameters

    @property
    def distributed(self) -> bool:
        """True when collectives must run: more than one rank in an initialised process group."""
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def casts_parameters(self, model: torch.nn.Module) -> bool:
        """Whether `model`'s wrapper itself computes in `compute_dtype` (FSDP2's policy, DeepSpeed's bf16
        mode); otherwise mixed precision is autocast around its forward pass."""
        return False

    def forward(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The model's logits. Under mixed precision the forward computes in `compute_dtype` (the
        wrapper's casting, or autocast) and the logits come back in float32 for the losses."""
        if self.compute_dtype is None:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
        autocast = contextlib.nullcontext() if self.casts_parameters(model) else \
            torch.autocast(self.device.type, dtype=self.compute_dtype)
        with autocast:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.float()

    # ---------------------------------------------------------------- model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train (placed on the device, wrapped for data parallelism)."""
        return model.to(self.device)

    def wrap_reference(self, ref: torch.nn.Module | None) -> torch.nn.Module | None:
        """The frozen reference model, placed (and sharded where the strategy shards)."""
        return None if ref is None else ref.to(self.device).eval().requires_grad_(False)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose parameters the optimizer updates and checkpoints hold."""
        return model

    def wrap_with_optimizer(self, model: torch.nn.Module, make_optimizer: Callable[[list[Tensor]], Any]
                            ) -> tuple[torch.nn.Module, Any]:
        """(wrapped model, optimizer): `make_optimizer` gets the trainable parameters of the wrapped
        module (sharded where the strategy shards them)."""
        wrapped = self.wrap(model)
        return wrapped, make_optimizer([p for p in self.unwrap(wrapped).parameters() if p.requires_grad])

    def accumulate(self, model: torch.nn.Module, sync: bool) -> ContextManager:
        """Context for one micro-batch's forward + backward; sync=False skips the gradient reduction."""
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- reductions
    def all_reduce_sum_(self, t: Tensor) -> Tensor:
        """Sum `t` over ranks in place (no-op on one rank); returns `t`. A tensor on another device than the
        process group's (fsdp2's CPU-offloaded shards under NCCL) is reduced on a copy on this rank's device."""
        if self.distributed:
            if t.device == self.device:
                torch.distributed.all_reduce(t)
            else:
                on_device = t.to(self.device)
                torch.distributed.all_reduce(on_device)
                t.copy_(on_device)
        return t

    def all_reduce_mean_(self, tensors: Iterable[Tensor]) -> None:
        """Average full (unsharded) tensors over ranks in place."""
        for t in tensors:
            if self.distributed:
                torch.distributed.all_reduce(t)
                t.div_(self.world_size)

    @property
    def grad_average_factor(self) -> int:
        """The gradient reduction averages over ranks: a loss summed over the global batch must be
        multiplied by this so that the reduced gradient is its gradient."""
        return self.world_size if self.distributed else 1

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> float:
        """Clip the global gradient norm to `max_norm`; returns the norm before clipping.

        The norm is accumulated in float64 over the gradients (a sharded strategy's shards summed over ranks)
        and the scale is 1 / max((norm + 1e-6) / max_norm, 1): DeepSpeed ZeRO's own clipping, so that every
        strategy clips alike. (torch's float32 `clip_grad_norm_` was off by ~1e-6 relative on the micro model,
        enough for Sophia's steps to tell ddp from ZeRO apart.)"""
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            for chunk in g.reshape(-1).split(NORM_CHUNK):  # bounded float64 temporaries
                squares += torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
        if self.sharded:
            self.all_reduce_sum_(squares)
        norm = float(squares.sqrt())
        scale = 1.0 / max((norm + 1e-6) / max_norm, 1.0)
        if scale < 1.0:
            torch._foreach_mul_(grads, scale)
        return norm

    # ---------------------------------------------------------------- backward and step
    def backward(self, model: torch.nn.Module, loss: Tensor) -> None:
        """Backward of one micro-batch's loss (inside `accumulate`), already divided as the caller wants."""
        loss.backward()

    def step(self, model: torch.nn.Module, optimizer: Any, max_norm: float,
             before_update: Callable[[Any], None] | None = None) -> float | None:
        """Clip the reduced gradients to the global norm `max_norm` (0 = off), call `before_update(optimizer)`
        (where the optimizer's own params hold their gradients: Sophia's empirical Hessian reads them),
        step and clear the gradients. Returns the norm before clipping (None when not clipping)."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        norm = self.clip_grad_norm(params, max_norm) if max_norm > 0 else None
        if before_update is not None:
            before_update(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def fold_grad_squares(self, model: torch.nn.Module, optimizer: Any) -> None:
        """Sophia's reference `update_hessian()`: h <- b2*h + (1-b2)*g*g over the reduced gradients the
        last backward passes left (not the momentum: soul_compat folds only the step's own gradient),
        then clear them."""
        fold_grad_squares_into(optimizer)

    def fold_hutchinson_difference(self, model: torch.nn.Module, optimizer: Any, params: list[Tensor],
                                   batches: Sequence[Any], loss_fn: Callable[[torch.nn.Module, Any], Tensor],
                                   probe_seed: int, eps: float) -> float:
        """Sophia-H with H*u as a central difference of two gradients over the global batch
        (`optim.hessian.global_hutchinson_difference`), folded into h; returns its bs (1)."""
        from ray_unlearn.optim.hessian import global_hutchinson_difference

        estimates, bs = global_hutchinson_difference(model, params, batches, loss_fn, probe_seed, eps, self)
        optimizer.update_hessian(estimates)
        return bs

    # ---------------------------------------------------------------- checkpoints
    def save_state(self, out: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   final: bool = False) -> None:
        """Write model weights and optimizer state into `out` (every rank calls it); a `final` state
        also holds the full weights as an HF model directory's (what the run's output is made of)."""
        raise NotImplementedError

    def load_state(self, path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restore what `save_state` wrote (every rank calls it)."""
        raise NotImplementedError

    def save_full_weights(self, out: Path, module: torch.nn.Module) -> None:
        """Rank 0 writes the full weights into `out` as an HF model directory's (every rank calls it)."""
        raise NotImplementedError

    def check_checkpoint(self, path: Path, written_by: str) -> None:
        """Refuse a checkpoint written by another strategy, naming both (any strategy's checkpoints load on
        any number of workers)."""
        if written_by != self.name:
            raise UnlearnError(f"checkpoint {path} was written by ray.strategy={written_by}, this run uses "
                               f"ray.strategy={self.name}; rerun with ray.strategy={written_by} to resume it, "
                               "or use a new name/output_dir to start fresh")
