"""The one explicit training loop (pure PyTorch: Ray only reaches it through `LoopEnv` callbacks): unlearning,
fine-tuning (`ray-unlearn finetune`: the `nll` term on the train stream, no forget stream) and the relearning attack.

Per optimizer step: `train.accumulation(world_size)` micro-batches, each one forward pass over
every stream the objective reads (forget, retain, forget_idk, train concatenated into one batch, so DDP
sees a single forward; the forget stream also when the objective does not read it but the data has one, for
its logged NLL) plus a no-grad pass of the frozen reference model when a term needs it; a
weighted objective; backward; clipping; the Hessian estimate when due (Sophia); the step; then
stateful terms (PDU's λ) update from the step's logs, averaged over ranks. Terms that read a
decoder layer's output (RMU) get it from a forward hook on that layer alone. Everything that
differs between DDP, FSDP2 and DeepSpeed (wrapping, accumulation without sync, backward, clipping,
the step, reductions, checkpoint format) is behind one `ray_unlearn.parallel.Strategy` object. Every
`log_every` steps it reports metrics; every `checkpoint_every` steps and at the end it writes a
checkpoint (model safetensors, optimizer, step, history, term state) and reports it. When the
runner gives an `evaluate` callback, every `eval_every` steps and at the last step rank 0 evaluates
the model and that step's report carries the metrics (every rank reports at the same steps). A
non-finite loss stops the run before anything is written, so the last good checkpoint stays the
latest.

GRIN (`localize.method=grin`, `ray_unlearn.localize`): before step 0 the loop takes the mean forget and retain
gradients over global batches, selects the entries whose ratio is in the top fraction, adds noise to them,
and from then on zeroes the other entries' gradients before clipping and puts them back after every step,
so they end bit-identical to the input model; the masks are in every checkpoint.

LoRA (`model.lora.r > 0`, `ray_unlearn.models.lora`): `load_run` wraps the model with peft adapters, the only
parameters that train; the reference model is the same model run with its adapters disabled (no frozen copy).
The strategies' weight writers turn the peft state into the adapter files and the merged model's weights.

Dropout is off while unlearning (the model's rates set to 0 in memory; its saved config keeps them, so
GPT-2's 0.1 is still there for whoever fine-tunes the result): forward passes are then deterministic,
so runs are the same at every scale and on resume (per-rank dropout masks are not), and NPO's and
the KL terms' ratios against the reference model, which runs without dropout, start at 1.

Batches are chosen by a deterministic function of (seed, step, micro-step, rank), so a resumed
run sees the data the interrupted one would have, and 1 worker x N accumulation steps sees the
same items as N workers x 1. Sophia's Hessian is estimated over the whole global batch with
samples keyed by (seed, step, item), so it too is the same for every such split.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ray_unlearn.config import JobConfig
from ray_unlearn.data.collate import encode_qa, encode_text, pad_batch, prompt_format
from ray_unlearn.errors import UnlearnError
from ray_unlearn.logprobs import batch_nll
from ray_unlearn.localize import LOCALIZE_FILE, MaskedUpdates, gradient_ratio, perturb, top_fraction
from ray_unlearn.models.lora import is_lora
from ray_unlearn.models.layers import capture_layer_outputs, decoder_layers, disable_dropout, params_through_layer
from ray_unlearn.objectives import (StreamOutput, build_objective, check_model_fits, combined_loss, init_states,
                                    is_trainable, objective_layers, objective_reach, objective_ref_streams,
                                    objective_streams, state_log_keys, update_states)
from ray_unlearn.optim import build_hessian_estimator, build_optimizer
from ray_unlearn.optim.hessian import SOUL_BS, global_hutchinson_estimate, gnb_backward, nll_backward
from ray_unlearn.parallel import Strategy, build_strategy, load_hf_weights
from ray_unlearn.parallel.base import full_of, local_part, local_tensor

Encoded = dict[str, list[int]]
STREAM_SOURCES = {"forget": "question/answer forget data", "forget_idk": "question/answer forget data",
                  "retain": "retain data", "train": "items to fine-tune on (the nll term is for `ray-unlearn finetune`; "
                                                    "unlearning runs keep retain answers with retain_nll)"}


@dataclass
class UnlearnData:
    """Encoded streams: forget (question + answer), forget_idk (question + refusal), retain, and train (what
    a fine-tune fits: `ray-unlearn finetune`, the relearning attack; empty for unlearning runs)."""

    forget: list[Encoded]
    retain: list[Encoded]
    forget_idk: list[Encoded] = field(default_factory=list)
    train: list[Encoded] = field(default_factory=list)

    def stream(self, name: str) -> list[Encoded]:
        return {"forget": self.forget, "retain": self.retain, "forget_idk": self.forget_idk, "train": self.train}[name]


@dataclass
class LoopEnv:
    """What the runner (plain process or a Ray Train worker) gives the loop."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint_dir: Path = Path("checkpoint-tmp")  # this rank's own (sharded strategies write from every rank)
    resume_from: Path | None = None
    report: Callable[[dict[str, float], Path | None], None] = lambda metrics, ckpt: None
    on_step: Callable[[int, int, dict[str, float]], None] | None = None
    # (unwrapped module, step) -> metrics; every train.eval_every steps and at the end, on rank 0 (on every
    # rank for sharded strategies, whose forward passes are collectives; only rank 0's metrics are used)
    evaluate: Callable[[Any, int], dict[str, float]] | None = None


def encode_data(cfg: JobConfig, tokenizer: Any, forget: Sequence[dict], retain: Sequence[dict],
                kind: str = "qa", train: Sequence[dict] = ()) -> UnlearnData:
    """Tokenize forget/retain/train items (prompts as `prompt_format(cfg.data)` says); text corpora
    (kind "text") have no refusal stream. `train`: question/answer items to fine-tune on (the train stream)."""
    d, fmt = cfg.data, prompt_format(cfg.data)

    def qa(items: Sequence[dict], refusal: bool = False) -> list[Encoded]:
        return [encode_qa(tokenizer, it["question"], d.refusal if refusal else it["answer"], d.max_length, fmt)
                for it in items]

    if kind == "text":
        return UnlearnData(forget=[encode_text(tokenizer, it["text"], d.max_length) for it in forget],
                           retain=[encode_text(tokenizer, it["text"], d.max_length) if "text" in it
                                   else encode_qa(tokenizer, it["question"], it["answer"], d.max_length, fmt)
                                   for it in retain])
    return UnlearnData(forget=qa(forget), retain=qa(retain), forget_idk=qa(forget, refusal=True), train=qa(train))


def load_run(cfg: JobConfig, inputs: Any, rank: int = 0, world_size: int = 1
             ) -> tuple[Any, Any | None, UnlearnData, Any]:
    """(model, reference copy or None, encoded data, tokenizer) of a run, unwrapped: what a worker
    loads before `Unlearner` hands the models to the strategy.

    Sharded strategies on more than one rank load the weights on rank 0 only (on the CPU); every
    other model, the reference included, is built on the meta device and filled when sharded, so
    no rank but 0 ever holds a full copy. With `model.lora` the model comes wrapped by peft (only its
    adapters train) and there is no reference copy: the loop runs the model with its adapters disabled.
    """
    from ray_unlearn.job import load_checked
    from ray_unlearn.models.io import empty_model
    from ray_unlearn.parallel import STRATEGIES

    meta = world_size > 1 and STRATEGIES[cfg.ray.strategy].starts_on_meta(**strategy_options(cfg))
    model, tokenizer = load_checked(cfg, inputs, meta=meta and rank != 0)
    ref = None
    if cfg.model.lora.enabled:  # the reference is the same model with its adapters disabled
        from ray_unlearn.models.lora import apply_lora

        model = apply_lora(model, cfg.model.lora, cfg.train.seed)
    elif objective_ref_streams(build_objective(cfg.objective)):
        m = cfg.model
        ref = empty_model(inputs.model_path, m.dtype, m.trust_remote_code) if meta else copy.deepcopy(model)
    return model, ref, encode_data(cfg, tokenizer, inputs.forget, inputs.retain, inputs.kind,
                                        inputs.train), tokenizer


def check_objective_fits(terms: Sequence[Any], model: Any) -> set[str]:
    """Check the terms' settings against `model` (one-line errors: a decoder layer out of range, a
    trainable-parameter regex matching nothing) and return the names of the parameters to train.

    A loss that reads only layer ℓ's output (RMU) trains the embeddings and layers 0..ℓ: nothing
    after ℓ gets a gradient, and DDP needs every trained parameter to get one. `model` may be on
    the meta device.
    """
    reach = objective_reach(terms)
    names = [n for n, _ in model.named_parameters()] if reach is None else params_through_layer(model, reach)
    check_model_fits(terms, len(decoder_layers(model)), names)
    return {name for name in names if is_trainable(terms, name)}


def strategy_options(cfg: JobConfig) -> dict[str, Any]:
    """The options of the run's `ray.strategy` that only that strategy takes (deepspeed's ZeRO stage, ...)."""
    if cfg.ray.strategy == "deepspeed":
        return dict(zero_stage=cfg.ray.zero, offload=cfg.ray.offload, dtype=cfg.model.dtype,
                    micro_batch_size=cfg.train.batch_size, grad_clip=cfg.optim.grad_clip)
    if cfg.ray.strategy == "fsdp2":
        return dict(offload=cfg.ray.offload)
    return {}


def make_strategy(cfg: JobConfig, env: LoopEnv) -> Strategy:
    """The run's `ray.strategy` for this rank, with the strategy's own options from the config."""
    compute = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None
    return build_strategy(cfg.ray.strategy, env.rank, env.world_size, env.device, cfg.model.max_shard_size,
                          compute_dtype=compute, **strategy_options(cfg))


def batch_slot_indices(n: int, batch_size: int, slot: int, seed: int) -> list[int]:
    """Item indices of batch number `slot` in a stream of n items reshuffled every epoch."""
    orders: dict[int, list[int]] = {}  # one shuffle per epoch the batch touches (at most a few)
    out = []
    for pos in range(slot * batch_size, (slot + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][offset])
    return out


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR at `step`: linear warmup, then constant/linear/cosine decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - frac)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return 1.0


def _forward_streams(model: Any, streams: dict[str, dict[str, torch.Tensor]], pad_id: int,
                     layers: Sequence[int] = (), strategy: Strategy | None = None) -> dict[str, StreamOutput]:
    """One forward over all streams concatenated (right-padded to one width), split back per stream,
    with the outputs of decoder `layers` (hooked: no other layer's output is kept). The strategy runs
    the forward (mixed precision: in bf16, logits and layer outputs back in float32)."""
    names = list(streams)
    width = max(streams[n]["input_ids"].shape[1] for n in names)

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([widen(streams[n]["input_ids"], pad_id) for n in names])
    mask = torch.cat([widen(streams[n]["attention_mask"], 0) for n in names])
    with capture_layer_outputs(model, layers) as hidden:
        logits = (strategy or Strategy()).forward(model, ids, mask)
    if strategy is not None and strategy.compute_dtype is not None:
        hidden = {i: h.float() for i, h in hidden.items()}
    out, start = {}, 0
    for n in names:
        b, w = streams[n]["input_ids"].shape
        out[n] = StreamOutput(logits[start:start + b, :w], {i: h[start:start + b, :w] for i, h in hidden.items()})
        start += b
    return out


class Unlearner:
    """Holds the model, optimizer and objective of one run; `run()` is the loop.

    `model` and `ref_model` come unwrapped; the strategy (`cfg.ray.strategy`) places, wraps and
    shards them.
    """

    def __init__(self, cfg: JobConfig, model: Any, ref_model: Any | None, data: UnlearnData, pad_id: int,
                 env: LoopEnv):
        self.cfg, self.data, self.pad_id, self.env = cfg, data, pad_id, env
        self.terms = build_objective(cfg.objective)
        self.streams = sorted(objective_streams(self.terms) | ({"forget"} if data.forget else set()))
        self.ref_streams = sorted(objective_ref_streams(self.terms))
        for s in self.streams:
            if not data.stream(s):
                raise UnlearnError(f"objective needs the {s} stream but it is empty; give {STREAM_SOURCES[s]}")
        # Sophia's GNB samples labels on the forget stream (SOUL); a fine-tune without one, on its own stream
        self.hessian_stream = "forget" if "forget" in self.streams else self.streams[0]
        if cfg.optim.name == "influence" and not data.retain:
            raise UnlearnError("optim.name=influence preconditions by the Fisher of the retain loss but there is "
                               "no retain data; give retain items (data.retain_path) or use optim.name=sophia")
        if cfg.localize.method == "grin" and not data.retain:
            raise UnlearnError("localize.method=grin weighs each entry's forget gradient against its retain gradient "
                               "but there is no retain data; give retain items (data.retain_path) or drop localize")
        self.ref_is_base = bool(self.ref_streams) and is_lora(model)  # LoRA: the reference is the adapter-free base
        if self.ref_streams and ref_model is None and not self.ref_is_base:
            raise UnlearnError("objective needs a reference model but none was given")
        self.layers = objective_layers(self.terms)  # decoder layers whose outputs some term reads
        trained = check_objective_fits(self.terms, model)
        for name, p in model.named_parameters():  # RMU: layers 0..ℓ, and only its trainable_params
            if name not in trained:
                p.requires_grad_(False)
        disable_dropout(model)  # deterministic forward passes (see the module docstring)
        t = cfg.train
        self.accum = t.accumulation(env.world_size)  # micro-batches per step: the global batch is fixed
        self.strategy = make_strategy(cfg, env)
        if t.activation_checkpointing:  # before wrapping: each block recomputes inside its own shard
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.model, self.optimizer = self.strategy.wrap_with_optimizer(
            model, lambda params: build_optimizer(params, cfg.optim))
        self.module = self.strategy.unwrap(self.model)
        self.ref = self.strategy.wrap_reference(ref_model if self.ref_streams else None)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.names = [n for n, p in self.module.named_parameters() if p.requires_grad]  # aligned with params
        self.localized: MaskedUpdates | None = None  # GRIN: the entries that may move
        self.hessian = build_hessian_estimator(cfg.optim)
        if self.hessian is not None and self.hessian.kind == "empirical":
            self._bs = self.hessian.bs_override or SOUL_BS  # the others set it when they estimate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.max_steps, t.warmup_steps, t.lr_schedule))
        self.step = 0
        self.history: list[dict[str, float]] = []
        hidden_size = getattr(getattr(self.module, "config", None), "hidden_size", 0)
        self.states = self._on_device(init_states(self.terms, hidden_size, t.seed))  # RMU's u, PDU's λ
        if env.resume_from is not None:
            self.load_checkpoint(env.resume_from)

    # ------------------------------------------------------------------ data
    def micro_batch(self, micro: int, step: int | None = None,
                    streams: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The rank's slice of global micro-batch (step, micro) for every stream (default: this step's, the
        objective's streams); each stream's "index" holds the items' positions in the stream (what Hessian
        samples are keyed by)."""
        t, env = self.cfg.train, self.env
        slot = ((self.step if step is None else step) * self.accum + micro) * env.world_size + env.rank
        batch = {}
        for s in (self.streams if streams is None else streams):
            items = self.data.stream(s)
            # forget and forget_idk share indices (same questions), retain has its own order (train: forget's)
            seed = t.seed + (7919 if s == "retain" else 0)
            idx = batch_slot_indices(len(items), t.batch_size, slot, seed)
            batch[s] = {k: v.to(env.device) for k, v in pad_batch([items[i] for i in idx], self.pad_id).items()}
            batch[s]["index"] = torch.tensor(idx)
        return batch

    # ------------------------------------------------------------------ one step
    def loss_on(self, model: Any, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
        """Objective value of `model` on a micro-batch (reference model run without grad)."""
        policy = _forward_streams(model, batch, self.pad_id, self.layers, self.strategy)
        ref = None
        if self.ref_streams:
            with torch.no_grad(), (self.module.disable_adapter() if self.ref_is_base else contextlib.nullcontext()):
                ref = _forward_streams(model if self.ref_is_base else self.ref,
                                       {s: batch[s] for s in self.ref_streams}, self.pad_id, self.layers, self.strategy)
        loss, logs = combined_loss(self.terms, policy, ref, batch, self.states)
        with torch.no_grad():
            for s in ("forget", "retain", "train"):
                if s in policy:
                    logs[f"nll/{s}"] = batch_nll(policy[s].logits, batch[s]["labels"]).item()
        return loss, logs

    def train_step(self) -> dict[str, float]:
        """Estimate the Hessian when due (Sophia), accumulate the step's micro-batches, clip, step."""
        sums: dict[str, float] = {}
        batches = [self.micro_batch(micro) for micro in range(self.accum)]
        self._estimate_hessian(batches)
        for micro, batch in enumerate(batches):
            with self.strategy.accumulate(self.model, sync=micro == self.accum - 1):
                loss, logs = self.loss_on(self.model, batch)
                self._check_finite(loss)
                self.strategy.backward(self.model, loss / self.accum)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / self.accum
        sums["lr"] = self.scheduler.get_last_lr()[0]  # the LR of this step's update, before the schedule moves on
        if self.hessian is not None:
            self.optimizer.bs = self._bs
        if self.localized is not None:
            self.localized.mask_grads()  # before the clip: the norm and the optimizer see only the selection
        norm = self.strategy.step(self.model, self.optimizer, self.cfg.optim.grad_clip, self._empirical_hessian)
        if self.localized is not None:
            self.localized.restore()  # undo weight decay (or any move) of the entries not selected
        if norm is not None:
            sums["grad_norm"] = norm
        self.scheduler.step()
        self._update_states(sums)
        self.step += 1
        if hasattr(self.optimizer, "clip_rate"):
            sums["clip_rate"] = float(self.optimizer.clip_rate)
        return sums

    def _empirical_hessian(self, optimizer: Any) -> None:
        """Sophia's empirical estimator (the SOUL code's): g*g of the step's own clipped gradient, folded
        in just before the update, on the params the optimizer holds (partitions under ZeRO)."""
        if self.hessian is not None and self.hessian.kind == "empirical":
            optimizer.update_hessian()  # the reference protocol: g*g of each param's own grad, in place

    def _estimate_hessian(self, batches: list[dict[str, dict[str, torch.Tensor]]]) -> None:
        """Fold a gnb / hutchinson estimate over the global batch into Sophia when due (or when
        resuming without a stored scale), before the step's own gradients exist."""
        est = self.hessian
        if est is None or est.kind == "empirical" or not (est.due(self.step) or not hasattr(self, "_bs")):
            return
        key = (self.cfg.train.seed * 1_000_003 + self.step) * 1_000_033  # (seed, step): never the rank
        if est.kind == "gnb":
            sampled = [b[self.hessian_stream] for b in batches]
            keys = [[key + int(i) for i in b["index"]] for b in sampled]
            bs = gnb_backward(self.model, sampled, keys, self.strategy)
            self.strategy.fold_grad_squares(self.model, self.optimizer)
        elif self.cfg.optim.hvp == "difference":
            bs = self.strategy.fold_hutchinson_difference(self.model, self.optimizer, self.params, batches,
                                                          lambda model, b: self.loss_on(model, b)[0], key,
                                                          self.cfg.optim.hvp_eps)
        else:
            estimates, bs = global_hutchinson_estimate(
                self.params, [lambda b=b: self.loss_on(self.module, b)[0] for b in batches], key, self.strategy)
            self.optimizer.update_hessian(estimates)
        self._bs = est.bs_override or bs

    def _estimate_fisher(self) -> int:
        """Influence unlearning: fold the diagonal Fisher of the retain loss into the optimizer, F = mean over
        the K global batches covering the retain split of B * g*g (g: the reduced gradient of the batch's
        token-mean NLL, B = its items); returns K. The batches are the global steps' retain batches, so F does
        not depend on the worker count."""
        items = self.cfg.train.batch_size * self.accum * max(1, self.env.world_size)  # B: the global batch
        count = math.ceil(len(self.data.retain) / items)
        self.optimizer.fold_weight = items / count
        for k in range(count):
            batches = [self.micro_batch(micro, step=k, streams=["retain"])["retain"] for micro in range(self.accum)]
            nll_backward(self.model, batches, self.strategy)
            self.strategy.fold_grad_squares(self.model, self.optimizer)
        return count

    def _localize(self) -> float:
        """GRIN before step 0 (`ray_unlearn.localize.grin`): mean NLL gradients over global batches covering
        the forget and the retain split, their ratio, the top fraction selected, noise added; then every
        step moves only the selection. Returns the fraction selected."""
        lc, t = self.cfg.localize, self.cfg.train
        items = t.batch_size * self.accum * max(1, self.env.world_size)  # a global batch
        means = {}
        for stream in ("forget", "retain"):
            count = math.ceil(len(self.data.stream(stream)) / items)
            count = min(count, lc.max_batches) if lc.max_batches else count
            acc = [torch.zeros_like(local_tensor(p), dtype=torch.float32) for p in self.params]
            for k in range(count):
                batches = [self.micro_batch(m, step=k, streams=[stream])[stream] for m in range(self.accum)]
                nll_backward(self.model, batches, self.strategy)
                for a, p in zip(acc, self.params):
                    if p.grad is not None:
                        a.add_(local_tensor(p.grad), alpha=1.0 / count)
                    p.grad = None
            means[stream] = acc
        forget, retain = means.pop("forget"), means.pop("retain")
        scores = [gradient_ratio(f, r, lc.eps, inplace=True) for f, r in zip(forget, retain)]  # in forget's memory
        del forget, retain
        over_shards = self.strategy.all_reduce_sum_ if self.strategy.sharded else (lambda x: x)  # ddp: whole
        masks = top_fraction(scores, [p.numel() for p in self.params], lc.fraction, lc.scope == "per_tensor",
                             over_shards)
        del scores
        if lc.noise > 0:
            perturb(self.params, self.names, masks, lc.noise, t.seed, over_shards)
        self.localized = MaskedUpdates(self.params, masks)
        chosen = over_shards(torch.tensor([sum(self.localized.counts())], dtype=torch.int64, device=self.env.device))
        return int(chosen) / sum(p.numel() for p in self.params)

    def _save_masks(self, out: Path) -> None:
        """Every rank: the selection masks, whole, into the checkpoint (rank 0 writes them)."""
        from safetensors.torch import save_file

        full = {name: full_of(p, m.to(torch.uint8)).cpu()
                for name, p, m in zip(self.names, self.params, self.localized.masks)}
        if self.env.rank == 0:
            save_file(full, str(out / LOCALIZE_FILE))

    def _load_masks(self, path: Path) -> None:
        """Rebuild the selection from a checkpoint's masks; its unselected entries are those of the input model."""
        from safetensors.torch import load_file

        file = Path(path) / LOCALIZE_FILE
        if not file.is_file():
            raise UnlearnError(f"checkpoint {path} holds no localize masks (it was not a localize.method=grin run); "
                               "resume it without localize, or start fresh with a new name/output_dir")
        full = load_file(str(file))
        missing = [n for n in self.names if n not in full]
        if missing:
            raise UnlearnError(f"checkpoint {path}: its localize masks lack {missing[0]}; it was written for "
                               "another model or set of trained parameters")
        self.localized = MaskedUpdates(self.params, [local_part(p, full[n].bool()) for n, p in
                                                     zip(self.names, self.params)])

    def _update_states(self, logs: dict[str, float]) -> None:
        """Stateful terms (PDU's λ) update after the step from its logs; the logs they read are first
        averaged over ranks (in `logs` too), so every rank keeps the same state."""
        keys = state_log_keys(self.terms, logs)
        if keys:
            values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.env.device)
            self.strategy.all_reduce_sum_(values)
            values /= self.env.world_size if self.strategy.distributed else 1
            logs.update(zip(keys, values.tolist()))
        self.states = self._on_device(update_states(self.terms, self.states, logs))

    def _on_device(self, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.to(self.env.device) for k, v in state.items()} for name, state in states.items()}

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop every rank on a NaN/Inf loss before anything is written."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
        if self.strategy.all_reduce_sum_(bad).item() > 0:
            raise UnlearnError(f"non-finite loss at step {self.step + 1}: stopped before writing a checkpoint, "
                               "the last good one is kept; lower optim.lr or check the data")

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[dict[str, float]]:
        """Unlearn until max_steps; returns the logged history."""
        t = self.cfg.train
        self.model.train()
        once: dict[str, float] = {}  # facts of the passes before step 0, logged with the first logged step
        if self.cfg.optim.name == "influence" and self.step == 0:
            once["fisher_batches"] = self._estimate_fisher()
        if self.cfg.localize.method == "grin" and self.localized is None:
            once["localized_fraction"] = self._localize()
        if self.step >= t.max_steps:  # resumed a finished run: hand its final checkpoint back
            self.env.report(dict(self.history[-1]) if self.history else {"step": self.step}, self.save_checkpoint())
        while self.step < t.max_steps:
            start = time.perf_counter()
            logs = self.train_step()
            logs["step"], logs["step_time_s"] = self.step, time.perf_counter() - start
            last = self.step == t.max_steps
            evaluated = self._evaluate_if_due(logs, last)
            if self.env.on_step is not None:
                self.env.on_step(self.step, t.max_steps, logs)
            if self.step % t.log_every == 0 or last or evaluated:
                logs.update(once)
                once = {}
                self.history.append(logs)
            if last or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
                self.env.report(logs, self.save_checkpoint())
            elif self.step % t.log_every == 0 or evaluated:
                self.env.report(logs, None)
        return self.history

    def _evaluate_if_due(self, logs: dict[str, float], last: bool) -> bool:
        """Every eval_every steps and at the last step, rank 0 adds the evaluation metrics to `logs`
        (sharded strategies evaluate on every rank: each forward pass needs all of them).

        Returns whether this step was an evaluation step: the same on every rank, so all ranks
        report at the same steps (a report is a barrier); only rank 0's report carries the metrics.
        """
        every = self.cfg.train.eval_every
        if self.env.evaluate is None or not (last or (every and self.step % every == 0)):
            return False
        if self.env.rank == 0 or self.strategy.sharded:
            metrics = self.env.evaluate(self.module, self.step)
            if self.env.rank == 0:
                logs.update(metrics)
        return True

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Every rank: the strategy writes weights and optimizer state (ddp: rank 0, full; fsdp2: each
        rank its shard); rank 0 adds scheduler, step and history, and at the last step the full
        weights. Returns the directory this rank wrote, None if it wrote nothing."""
        from ray_unlearn.models.io import atomic_dir, commit_dir

        final = Path(self.env.checkpoint_dir) / f"step-{self.step:06d}"
        out = atomic_dir(final)  # written under a temporary name, renamed when complete
        try:
            out.mkdir()
            self.strategy.save_state(out, self.module, self.optimizer, final=self.step >= self.cfg.train.max_steps)
            if self.localized is not None:
                self._save_masks(out)
            if self.env.rank == 0:
                torch.save(self.scheduler.state_dict(), out / "scheduler.pt")
                if self.states:  # the same on every rank
                    torch.save({name: {k: v.cpu() for k, v in state.items()} for name, state in self.states.items()},
                               out / "term_state.pt")
                (out / "state.json").write_text(json.dumps({
                    "step": self.step, "history": self.history, "hessian_bs": getattr(self, "_bs", None),
                    "strategy": self.strategy.name, "world_size": self.env.world_size}))
            if not any(out.iterdir()):
                return None
            commit_dir(out, final)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote (a checkpoint of another strategy is refused)."""
        state = json.loads((Path(path) / "state.json").read_text())
        if "strategy" not in state:
            raise UnlearnError(f"checkpoint {path} was written by an older ray_unlearn (one file for optimizer and "
                               "scheduler); start fresh with a new name or output_dir")
        self.strategy.check_checkpoint(Path(path), state["strategy"])
        self.strategy.load_state(Path(path), self.module, self.optimizer)
        self.scheduler.load_state_dict(torch.load(Path(path) / "scheduler.pt", weights_only=True))
        self.step, self.history = int(state["step"]), list(state["history"])
        saved = Path(path) / "term_state.pt"
        if self.states and saved.is_file():  # terms whose state it lacks keep their fresh state
            stored = torch.load(saved, weights_only=True)
            self.states = self._on_device({name: stored.get(name, state) for name, state in self.states.items()})
        if self.cfg.localize.method == "grin":
            self._load_masks(Path(path))
        if state.get("hessian_bs") is not None:  # Sophia's h is in the optimizer state; its scale is here
            self._bs = float(state["hessian_bs"])


def load_checkpoint_weights(model: Any, path: Path) -> Any:
    """Load a loop checkpoint's full weights into `model` (any strategy's last checkpoint has them)."""
    load_hf_weights(model, Path(path))
    return model


def checkpoint_history(path: Path) -> list[dict[str, float]]:
    """The logged history stored in a checkpoint."""
    return list(json.loads((Path(path) / "state.json").read_text())["history"])
