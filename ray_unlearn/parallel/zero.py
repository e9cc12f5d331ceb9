"""DeepSpeed ZeRO 1/2/3: optimizer state (1), gradients (2) and parameters (3) partitioned over ranks.

`deepspeed.initialize` wraps the model with our own optimizer (Sophia or AdamW) as the client
optimizer; ZeRO hands it one flat fp32 partition per parameter group, so Sophia's m and h are
partitioned too (the rule is elementwise) and its clip_rate counts are summed over ranks. The loop
owns accumulation: the engine runs with `managed_gradient_accumulation: false`, so backward only
accumulates (ZeRO 2/3 reduce into the partitions as they go) and `engine.step()` is the boundary,
where ZeRO clips to the global norm (`gradient_clipping`) and calls the client optimizer's step on
the reduced partition gradients.

Sophia's Hessian estimate reaches the partitioned optimizer the way the reference protocol's
`update_hessian()` does, from the gradients on its own params: GNB's backward passes go through
the engine like a training gradient, then one `engine.step()` without clipping in which the
client's step folds g*g into h instead of updating. The empirical estimator folds the step's own
(clipped) gradient in a pre-step hook of the client optimizer.

The reference model is a full copy per rank under ZeRO 1/2 (their parameters are not partitioned)
and a ZeRO-3 inference engine (partitioned, no optimizer) under ZeRO 3. Under ZeRO 3 each decoder block
is a leaf module, gathered whole as an fsdp2 unit is: DeepSpeed's hooks inside a block would change the
order in which the backward pass sums gradients (`_gather_per_block`). The final model is gathered to
rank 0's CPU one parameter at a time.

Checkpoints resume on any number of workers. DeepSpeed's own (`engine.save_checkpoint`) hold each
rank's flat partitions, which load only on as many ranks, and its universal-checkpoint converter knows
only Adam's state keys; so a checkpoint holds, for each trained parameter, its fp32 master and its
optimizer state tensors (Sophia's exp_avg and hessian, AdamW's exp_avg and exp_avg_sq) whole, assembled
with DeepSpeed's `safe_get_full_*` one parameter at a time. Every rank writes every world-th parameter
into its own safetensors file (`deepspeed/state-R-of-W.safetensors`: no rank holds more than its share),
rank 0 the optimizer's scalar state (its step count) in `deepspeed/optimizer.json`. Loading creates the
optimizer's state for its partitions, then every rank reads each parameter whole and keeps its own part
(`safe_set_full_*`): any number of ranks, a world of one (the plain model and optimizer) included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ray_unlearn.errors import UnlearnError
from ray_unlearn.parallel.base import fold_grad_squares_into, write_hf_weights
from ray_unlearn.parallel.ddp import DDPStrategy

TAG = "deepspeed"  # the subdirectory of a loop checkpoint that holds the parameters and optimizer state
META_FILE = "optimizer.json"  # in TAG: the optimizer's state keys and scalar state


def _import_deepspeed(device: torch.device) -> Any:
    """deepspeed, with its accelerator set from the device (it guesses otherwise, and says so)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - deepspeed is a dependency
        raise UnlearnError(f"ray.strategy=deepspeed needs the deepspeed package ({e}); pip install deepspeed") from e
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


class DeepSpeedStrategy(DDPStrategy):
    """`deepspeed.initialize` with ZeRO stage `zero_stage`; on a world of one (no process group) the
    plain model and optimizer, whose checkpoints are in the same per-parameter format."""

    name = "deepspeed"
    optimizer_sharded = True

    def __init__(self, *args: Any, zero_stage: int = 2, offload: str = "none", dtype: str = "float32",
                 micro_batch_size: int = 1, grad_clip: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)  # stage and offload come checked from the config (RayConfig)
        self.zero_stage, self.offload, self.dtype, self.micro_batch_size = zero_stage, offload, dtype, micro_batch_size
        self.grad_clip = grad_clip  # the engine clips inside its step, so it is fixed when it is built
        self.engine: Any = None
        self._source: dict[str, Tensor] | None = None  # ZeRO 3: rank 0's full weights, until the reference has them

    @classmethod
    def starts_on_meta(cls, zero_stage: int = 2, **options: Any) -> bool:
        """ZeRO 3 partitions the parameters: only rank 0 loads the weights, as fsdp2 does."""
        return zero_stage == 3

    def casts_parameters(self, model: torch.nn.Module) -> bool:
        # bf16 mode: engines (the model's; ZeRO 3's reference) hold bf16 parameters, fp32 masters in the
        # optimizer; ZeRO 1/2's plain reference copy runs under autocast
        return self.engine is not None and (model is self.engine or self.sharded)

    @property
    def sharded(self) -> bool:  # type: ignore[override]
        """ZeRO-3 partitions the parameters: forward passes are collectives."""
        return self.zero_stage == 3 and self.distributed

    def config(self, hidden_size: int | None = None) -> dict[str, Any]:
        """The engine's config: ZeRO stage and offload, precision, clipping, the loop owning accumulation,
        and communication buckets sized from the model's hidden size as HF's "auto" values are (DeepSpeed's
        defaults, 5e8 elements, allocate 2 GB fp32 buffers whatever the model's size)."""
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if hidden_size:
            zero.update(reduce_bucket_size=hidden_size * hidden_size, allgather_bucket_size=hidden_size * hidden_size,
                        stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                        stage3_param_persistence_threshold=10 * hidden_size,
                        # release a gathered parameter when its module is done (DeepSpeed's defaults keep any
                        # parameter reused within 1e9 elements: the whole model, between forward and backward)
                        stage3_max_live_parameters=16 * hidden_size * hidden_size, stage3_max_reuse_distance=0)
        if self.offload in ("optimizer", "params"):
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.offload == "params":
            zero["offload_param"] = {"device": "cpu"}
        conf: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size, "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False, "zero_optimization": zero, "gradient_clipping": self.grad_clip,
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
        if self.dtype == "bfloat16" or self.compute_dtype == torch.bfloat16:
            conf["bf16"] = {"enabled": True}
        if self.compute_dtype is not None:  # mixed precision: gradients accumulate and reduce in float32, as fsdp2's
            conf.update(communication_data_type="fp32", data_types={"grad_accum_dtype": "fp32"})
        elif self.dtype == "float16":
            conf["fp16"] = {"enabled": True}
        return conf

    # ---------------------------------------------------------------- model
    def wrap_with_optimizer(self, model: torch.nn.Module, make_optimizer: Callable[[list[Tensor]], Any]
                            ) -> tuple[torch.nn.Module, Any]:
        """(engine, client optimizer): the optimizer gets the module's parameters, which ZeRO replaces
        by its flat fp32 partitions. On a world of one: the plain model and optimizer."""
        if not self.distributed:
            return super().wrap_with_optimizer(model, make_optimizer)
        deepspeed = _import_deepspeed(self.device)
        if self.zero_stage == 3:
            if self.rank == 0:
                self._source = {k: v.detach() for k, v in model.state_dict().items()}
            model = self._partitioned(model)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.engine, _, _, _ = deepspeed.initialize(model=model.to(self.device), optimizer=optimizer,
                                                    config=self.config(_hidden_size(model)))
        _share_fp32_masters(self.engine.optimizer)
        if hasattr(optimizer, "sum_over_ranks"):
            optimizer.sum_over_ranks = self.all_reduce_sum_  # its params are this rank's partitions
        return self.engine, optimizer

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.distributed:
            raise UnlearnError("the deepspeed strategy wraps the model together with its optimizer: "
                               "call wrap_with_optimizer")
        return model.to(self.device)

    def wrap_reference(self, ref: torch.nn.Module | None) -> torch.nn.Module | None:
        """ZeRO 3: a partitioned inference engine; ZeRO 1/2: a full frozen copy, as their model is."""
        try:
            if ref is None or not self.sharded:
                return super().wrap_reference(ref)
            deepspeed = _import_deepspeed(self.device)
            ref = self._partitioned(ref.requires_grad_(False)).eval()
            engine, _, _, _ = deepspeed.initialize(model=ref, config=self.config(_hidden_size(ref)))
            engine.eval()  # (returns None)
            return engine
        finally:
            self._source = None  # rank 0's full copy is no longer needed

    def _partitioned(self, model: torch.nn.Module) -> torch.nn.Module:
        """ZeRO 3 without a full copy per rank: `model` (rank 0: loaded; the others: on the meta device)
        is built again under `deepspeed.zero.Init`, each parameter partitioned as it is created, and
        filled from rank 0's weights one parameter at a time. Requires-grad flags and activation
        checkpointing carry over; rank 0's loaded copy is released (moved to the meta device)."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        deepspeed = _import_deepspeed(self.device)
        dtype = next(model.parameters()).dtype
        # no dtype argument: DeepSpeed 0.19's Init takes bf16 for any dtype given on a CPU accelerator (an
        # operator-precedence slip); without one it follows the config's bf16/fp16 flags, else float32
        with deepspeed.zero.Init(config_dict_or_path=self.config(_hidden_size(model)), remote_device=None,
                                 pin_memory=False), no_init_weights():
            built = AutoModelForCausalLM.from_config(model.config, dtype=dtype)  # rank 0's weights fill it
        built.tie_weights()  # init_weights (skipped) ties them otherwise
        trains = dict(model.named_parameters())
        for name, p in built.named_parameters():
            p.requires_grad_(trains[name].requires_grad)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.rank == 0:
                    p.data.copy_(self._source[name])
        for name, buf in built.named_buffers():  # buffers are not partitioned: rank 0's, on every rank
            on_device = buf.to(self.device, copy=True)
            if self.rank == 0 and name in self._source:
                on_device.copy_(self._source[name])
            torch.distributed.broadcast(on_device, src=0)
            buf.copy_(on_device)
        if getattr(model, "is_activation_checkpointing", False):
            built.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        _gather_per_block(built)
        model.to("meta")  # rank 0's full copy goes (the caller may still hold the module)
        return built.train(model.training)

    def accumulate(self, model: torch.nn.Module, sync: bool) -> ContextManager:
        return contextlib.nullcontext()  # the engine only accumulates until step() (unmanaged accumulation)

    # ---------------------------------------------------------------- backward and step
    def backward(self, model: torch.nn.Module, loss: Tensor) -> None:
        if self.engine is None:
            return super().backward(model, loss)
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop divides by its accumulation itself

    def step(self, model: torch.nn.Module, optimizer: Any, max_norm: float,
             before_update: Callable[[Any], None] | None = None) -> float | None:
        """`engine.step()`: reduce (ZeRO 1), clip to `max_norm` (the engine's `gradient_clipping`),
        `before_update` and the client optimizer's step on this rank's partition, all-gather."""
        if self.engine is None:
            return super().step(model, optimizer, max_norm, before_update)
        hook = None
        if before_update is not None:
            hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: before_update(opt))
        try:
            self.engine.step()
        finally:
            if hook is not None:
                hook.remove()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if max_norm > 0 and norm is not None else None

    def fold_grad_squares(self, model: torch.nn.Module, optimizer: Any) -> None:
        """One `engine.step()` without clipping whose client step folds g*g of the partition gradients
        into h (the reference `update_hessian()`) and leaves the parameters as they are."""
        if self.engine is None:
            return super().fold_grad_squares(model, optimizer)
        with _stepping_folds_grad_squares(optimizer), _no_clipping(self.engine.optimizer):
            self.engine.step()

    def fold_hutchinson_difference(self, model: torch.nn.Module, optimizer: Any, params: list[Tensor],
                                   batches: Sequence[Any], loss_fn: Callable[[torch.nn.Module, Any], Tensor],
                                   probe_seed: int, eps: float) -> float:
        """Sophia-H by a central difference on ZeRO's partitions: the same u, gradients and estimate as
        `global_hutchinson_difference`, with ZeRO's reduced partition gradients read in client steps.

        The module's own parameters move to theta + eps*u (whole tensors under ZeRO 1/2; gathered one at a time
        under ZeRO 3); after the backward passes a step without clipping keeps g+ and sets the fp32 masters
        to theta - eps*u, which ZeRO copies into the module; after the second backward passes, a step folds
        u * (g+ - g-) / (2 eps) into h and puts the masters back to theta (kept before the module moved),
        which ZeRO copies again."""
        if self.engine is None:
            return super().fold_hutchinson_difference(model, optimizer, params, batches, loss_fn, probe_seed, eps)
        from ray_unlearn.optim.hessian import whole_probes  # (optim imports parallel)

        shapes = [_shape(p) for p in params]
        parts = self._cut_like_masters(params, whole_probes(params, probe_seed, shapes), optimizer)
        # theta, kept before the module moves: under ZeRO 3 in float32 the masters are the module's partitions
        # (`_share_fp32_masters`) and move with it
        saved = {id(f): f.detach().clone() for f in _own_params(optimizer, self.engine)}
        self._move_module(params, whole_probes(params, probe_seed, shapes), eps)  # the same u, drawn again
        plus: dict[int, Tensor] = {}

        def keep_plus_go_minus() -> None:
            optimizer.init_state()  # ZeRO 1/2 link each param to its partition's state after this first step
            for flat in _stepping_params(optimizer):
                plus[id(flat)] = _grad_or_zeros(flat).clone()
                flat.data.copy_(saved[id(flat)]).add_(parts[id(flat)], alpha=-eps)

        def fold_and_restore() -> None:
            flats = _stepping_params(optimizer)
            estimates = [parts[id(f)] * (plus.pop(id(f)) - _grad_or_zeros(f)).div_(2 * eps) for f in flats]
            for f in flats:
                f.data.copy_(saved.pop(id(f)))
            optimizer.update_hessian(estimates)

        for action in (keep_plus_go_minus, fold_and_restore):
            for batch in batches:
                self.backward(model, loss_fn(model, batch) / len(batches))
            with _client_step_does(optimizer, action), _no_clipping(self.engine.optimizer):
                self.engine.step()
        return 1.0

    def _cut_like_masters(self, params: list[Tensor], whole: Iterable[Tensor], optimizer: Any) -> dict[int, Tensor]:
        """{id(fp32 partition): the tensors `whole` (one per param, one at a time) laid out as that partition
        is}: the masters carry them (`safe_set_full_fp32_param` cuts each into its place) and are put back."""
        from deepspeed.utils import safe_set_full_fp32_param

        flats = _own_params(optimizer, self.engine)
        kept = [f.detach().clone() for f in flats]
        with torch.no_grad():
            for f in flats:
                f.zero_()
            for p, w in zip(params, whole):
                safe_set_full_fp32_param(p, w)
            parts = {id(f): f.detach().clone() for f in flats}
            for f, k in zip(flats, kept):
                f.copy_(k)
        return parts

    def _move_module(self, params: list[Tensor], whole: Iterable[Tensor], eps: float) -> None:
        """The module's own copy of each parameter += eps * u (`whole`: one u per param, one at a time): in place
        under ZeRO 1/2; under ZeRO 3 gathered one at a time and partitioned again."""
        deepspeed = _import_deepspeed(self.device)
        for p, u in zip(params, whole):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.sharded), torch.no_grad():
                if self.rank == 0 or not self.sharded:
                    p.data.add_(u, alpha=eps)

    # ---------------------------------------------------------------- checkpoints
    def save_state(self, out: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   final: bool = False) -> None:
        """Every rank writes every world-th trained parameter whole (fp32 master and optimizer state
        tensors) into its own file; rank 0 adds the scalar state. Collective: all ranks call it."""
        from safetensors.torch import save_file

        tensor_keys, scalars = _state_keys(optimizer, _own_params(optimizer, self.engine))
        mine: dict[str, Tensor] = {}
        for i, (name, p) in enumerate(_trained(module)):
            whole = self._whole(p, optimizer, tensor_keys)  # a collective under ZeRO
            if i % self.world_size == self.rank:
                mine.update({_key(name, k): v.detach().to("cpu", torch.float32, copy=True) for k, v in whole.items()})
        (out / TAG).mkdir(exist_ok=True)
        save_file(mine, str(out / TAG / f"state-{self.rank:05d}-of-{self.world_size:05d}.safetensors"))
        if self.rank == 0:
            (out / TAG / META_FILE).write_text(json.dumps({"tensor_keys": tensor_keys, "scalars": scalars}))
        if final:
            self.save_full_weights(out, module)

    def _whole(self, p: Tensor, optimizer: Any, tensor_keys: list[str]) -> dict[str, Tensor]:
        """{"": fp32 master, key: optimizer state} of `p`, whole (all-gathered from the partitions under ZeRO)."""
        if self.engine is None:
            state = optimizer.state.get(p, {})
            return {"": p, **{k: state[k] for k in tensor_keys if k in state}}
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        return {"": safe_get_full_fp32_param(p), **{k: safe_get_full_optimizer_state(p, k) for k in tensor_keys}}

    def load_state(self, path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restore what `save_state` wrote, by any number of ranks (every rank reads each parameter whole)."""
        from safetensors import safe_open

        meta_file, files = Path(path) / TAG / META_FILE, sorted((Path(path) / TAG).glob("state-*.safetensors"))
        if not meta_file.is_file() or not files:
            raise UnlearnError(f"checkpoint {path} holds no per-parameter DeepSpeed state under {TAG}/ (written by "
                               "an older ray_unlearn?); start fresh with a new name or output_dir")
        meta = json.loads(meta_file.read_text())
        _create_state(optimizer, _own_params(optimizer, self.engine), meta["tensor_keys"], meta["scalars"])
        if self.engine is not None and hasattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()  # ZeRO 1/2: link each param to its state
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
            where = {k: r for r in readers for k in r.keys()}
            for name, p in _trained(module):
                keys = [k for k in ["", *meta["tensor_keys"]] if _key(name, k) in where]
                if "" not in keys:
                    raise UnlearnError(f"checkpoint {path} lacks parameter {name} (it was written for another model "
                                       "or with other trainable parameters); start fresh with a new name or output_dir")
                self._set_whole(p, optimizer, {k: where[_key(name, k)].get_tensor(_key(name, k)).to(self.device)
                                               for k in keys})

    def _set_whole(self, p: Tensor, optimizer: Any, whole: dict[str, Tensor]) -> None:
        """Give `p` (and its optimizer state) the whole values `whole`, keeping this rank's part under ZeRO."""
        master = whole.pop("")
        if self.engine is None:
            with torch.no_grad():
                p.copy_(master)
            for k, v in whole.items():
                optimizer.state[p][k].copy_(v)
            return
        deepspeed = _import_deepspeed(self.device)
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(p, master)
        for k, v in whole.items():
            safe_set_full_optimizer_state(p, v, k)
        # the model's own (ZeRO 1/2: full; ZeRO 3: partitioned) copy of the parameter follows its master
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.sharded), torch.no_grad():
            if self.rank == 0 or not self.sharded:
                p.data.copy_(master)

    def save_full_weights(self, out: Path, module: torch.nn.Module) -> None:
        """Rank 0 writes the full weights; under ZeRO 3 they are gathered one parameter at a time. Under
        train.mixed_precision the engine's parameters are bf16 copies: the float32 masters are written."""
        if self.engine is not None and self.compute_dtype is not None:
            return self._save_fp32_masters(out, module)
        if not self.sharded:  # ZeRO 1/2 params are views into one flat buffer: copied out one by one
            if self.rank == 0:
                full = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
                write_hf_weights(out, module, full, self.max_shard_size)
            return
        deepspeed = _import_deepspeed(self.device)
        full: dict[str, Tensor] = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.rank == 0:
                    full[name] = p.detach().to("cpu", copy=True)
        if self.rank == 0:  # then the buffers a state dict holds
            params = set(dict(module.named_parameters(remove_duplicate=False)))
            full.update({k: v.detach().cpu() for k, v in module.state_dict().items() if k not in params})
            write_hf_weights(out, module, full, self.max_shard_size)

    def _save_fp32_masters(self, out: Path, module: torch.nn.Module) -> None:
        """The optimizer's float32 master of each parameter, assembled one at a time (a collective); frozen
        parameters, which have none, from the module itself."""
        deepspeed = _import_deepspeed(self.device)
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[str, Tensor] = {}
        for name, p in module.named_parameters():
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            if master is None:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=self.sharded):
                    master = p.detach().float()
            if self.rank == 0:
                full[name] = master.detach().to("cpu", dtype=torch.float32, copy=True)
        if self.rank == 0:
            params = set(dict(module.named_parameters(remove_duplicate=False)))
            full.update({k: (v.float() if v.is_floating_point() else v).detach().cpu()
                         for k, v in module.state_dict().items() if k not in params})
            write_hf_weights(out, module, full, self.max_shard_size)


def _share_fp32_masters(zero: Any) -> int:
    """With float32 parameters, make each fp32 master partition this rank's partition of the model's own
    parameters (one tensor, not two); returns how many groups now share. Nothing changes for bf16/fp16
    parameters, whose masters are float32 copies, or with offload (masters on another device).

    ZeRO 3 (`fp16_partitioned_groups_flat` / `fp32_partitioned_groups_flat`): DeepSpeed means to share them
    (stage3.py `_create_fp32_partitions`: "weights ... already in and updated using fp32 ... we don't need
    another copy"), but its test compares the partition's `torch.device` with the accelerator's device
    *name*, a string, which is never equal. ZeRO 1/2 (`parallel_partitioned_bit16_groups` /
    `single_partition_of_fp32_groups`) always clone. Either way each rank held its parameters' partition
    twice: 0.23 GiB per rank of a 125M model at 2 ranks (scale_memory.py: ZeRO 3 0.67 -> 0.59 of ddp's
    peak, ZeRO 2 0.77 -> 0.69). The values are the same either way: after each step DeepSpeed copies the
    masters into the model's partitions, a copy onto itself once they share. The optimizer's tensor keeps
    its identity (its state and param group are keyed by it); ZeRO 1/2's per-parameter views of the masters
    (`_hp_mapping`, what `safe_get_full_fp32_param` reads) are linked again, as DeepSpeed does after a load."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO 3
        pairs = list(zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat))
    elif hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO 1/2
        pairs = [(zero.parallel_partitioned_bit16_groups[i][torch.distributed.get_rank(zero.real_dp_process_group[i])],
                  master) for i, master in enumerate(zero.single_partition_of_fp32_groups)]
    else:
        return 0
    shared = moved = 0
    for low, master in pairs:
        if (low is None or master is None or low.dtype != master.dtype or low.device != master.device
                or low.shape != master.shape or master.untyped_storage().nbytes() == 0):
            continue
        if low.untyped_storage().data_ptr() != master.untyped_storage().data_ptr() \
                or low.storage_offset() != master.storage_offset():
            with torch.no_grad():
                low.copy_(master)  # equal already; the masters are what the optimizer steps
            master.data = low.data
            moved += 1
        shared += 1
    if moved and hasattr(zero, "_link_all_hp_params"):
        zero._link_all_hp_params()
    return shared


def _gather_per_block(model: torch.nn.Module) -> None:
    """Make each decoder block (the classes the model names in `_no_split_modules`, fsdp2's units) a ZeRO-3
    leaf module, before `deepspeed.initialize` installs its hooks: the block's parameters are gathered
    together, and no hook runs inside it.

    ZeRO 3 otherwise hooks every submodule and passes each one's input tensors through an autograd function of
    its own (to release parameters after its backward). Inside a block that regroups a gradient sum: the
    residual stream feeds the residual add and the RMSNorm (its square and its product), three contributions
    that ZeRO 3 then sums in another order than ddp and fsdp2, a rounding difference in most coordinates of
    every parameter upstream (measured on micro: ~1 ulp from the first backward pass on; the last block's MLP
    and the final norm, downstream of it, bit-identical). Sophia amplifies that (its sign steps, then a GNB
    label sampled from logits that moved), so ZeRO 3 ended up to 0.8 % of the coordinates away from ddp on
    some models. With leaf blocks its gradients are ddp's, bit for bit."""
    from deepspeed.utils import set_z3_leaf_modules

    from ray_unlearn.models.layers import decoder_layers

    classes = {type(block) for block in decoder_layers(model)}
    if classes:
        set_z3_leaf_modules(model, sorted(classes, key=lambda c: c.__name__))


def _trained(module: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """(name, parameter) of every trained parameter, in the module's order (the same on every rank)."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _shape(p: Tensor) -> torch.Size:
    """A parameter's whole shape (ZeRO 3 empties a partitioned parameter's own tensor and keeps it in ds_shape)."""
    return getattr(p, "ds_shape", p.shape)


def _grad_or_zeros(p: Tensor) -> Tensor:
    """p.grad, or zeros where the partition got none."""
    return torch.zeros_like(p) if p.grad is None else p.grad


def _stepping_params(optimizer: Any) -> list[Tensor]:
    """The fp32 partitions ZeRO hands the client optimizer in this step (ZeRO 3: one sub-group at a time)."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def _key(name: str, state_key: str) -> str:
    """The checkpoint key of a parameter's fp32 master (state_key "") or of one of its optimizer states."""
    return f"{name}::{state_key}" if state_key else name


def _own_params(optimizer: Any, engine: Any) -> list[Tensor]:
    """The tensors the client optimizer keeps state for: its params, which ZeRO 1/2 replace by their flat fp32
    partitions; ZeRO 3 hands it its partitions only during a step (they are `fp32_partitioned_groups_flat`)."""
    flat = getattr(getattr(engine, "optimizer", None), "fp32_partitioned_groups_flat", None)
    return list(flat) if flat is not None else [p for g in optimizer.param_groups for p in g["params"]]


def _state_keys(optimizer: Any, params: list[Tensor]) -> tuple[list[str], dict[str, Any]]:
    """(keys of the optimizer's per-coordinate state tensors, its scalar state) from the state of its first
    param (under ZeRO, a flat partition; the scalars, e.g. the step count, are the same for every param)."""
    states = [optimizer.state[p] for p in params if optimizer.state.get(p)]
    if not states:
        return [], {}
    tensor_keys = [k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() > 0]
    scalars = {k: {"value": (v.item() if torch.is_tensor(v) else v),
                   "dtype": str(v.dtype).removeprefix("torch.") if torch.is_tensor(v) else None}
               for k, v in states[0].items() if k not in tensor_keys}
    return tensor_keys, scalars


def _create_state(optimizer: Any, params: list[Tensor], tensor_keys: list[str], scalars: dict[str, Any]) -> None:
    """Create the optimizer's state of each of `params` (zeros, to be filled; scalars as saved), as its first
    step would: ZeRO links a parameter to its partition's state only once that state exists."""
    for p in params:
        state = optimizer.state[p]
        for k in tensor_keys:
            state.setdefault(k, torch.zeros_like(p, memory_format=torch.preserve_format))
        for k, s in scalars.items():
            state[k] = s["value"] if s["dtype"] is None else torch.tensor(s["value"], dtype=getattr(torch, s["dtype"]))


def _hidden_size(model: torch.nn.Module) -> int | None:
    """The model's hidden size from its HF config (None for other modules)."""
    return getattr(getattr(model, "config", None), "hidden_size", None)


@contextlib.contextmanager
def _client_step_does(optimizer: Any, action: Callable[[], None]) -> Iterator[None]:
    """Within it, `optimizer.step()` (called by ZeRO on its partitions, whose gradients are reduced) runs
    `action()` instead of an update; ZeRO then copies the (possibly changed) fp32 partitions into the model's
    parameters, as after any step."""

    patched = vars(optimizer).get("step")  # an LR scheduler wraps the instance's step to see it called
    optimizer.step = lambda *args, **kwargs: action()  # shadows the class's step
    try:
        yield
    finally:
        if patched is None:
            del optimizer.step
        else:
            optimizer.step = patched


def _stepping_folds_grad_squares(optimizer: Any) -> ContextManager:
    """Within it, `optimizer.step()` is Sophia's reference `update_hessian()` from the gradients (h only:
    never the momentum, whatever soul_compat says)."""
    return _client_step_does(optimizer, lambda: fold_grad_squares_into(optimizer))


@contextlib.contextmanager
def _no_clipping(zero_optimizer: Any) -> Iterator[None]:
    """ZeRO's own clipping off for one step (the Hessian's gradients are not clipped)."""
    clip = zero_optimizer.clip_grad
    zero_optimizer.clip_grad = 0.0
    try:
        yield
    finally:
        zero_optimizer.clip_grad = clip
