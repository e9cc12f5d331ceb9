"""The one explicit unlearning loop (pure PyTorch: Ray only reaches it through `LoopEnv` callbacks).

Per optimizer step: `grad_accum` micro-batches, each one forward pass over every stream the
objective reads (forget, retain, forget_idk concatenated into one batch, so DDP sees a single
forward) plus a no-grad pass of the frozen reference model when a term needs it; a weighted
objective; backward; clipping; the Hessian estimate when due (Sophia); the step. Every
`log_every` steps it reports metrics; every `checkpoint_every` steps and at the end it writes a
checkpoint (model safetensors, optimizer, step, history) and reports it. When the runner gives an
`evaluate` callback, every `eval_every` steps and at the last step rank 0 evaluates the model and
that step's report carries the metrics (every rank reports at the same steps). A non-finite loss
stops the run before anything is written, so the last good checkpoint stays the latest.

Batches are chosen by a deterministic function of (seed, step, micro-step, rank), so a resumed
run sees the data the interrupted one would have, and 1 worker x N accumulation steps sees the
same items as N workers x 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ray_unlearn.config import JobConfig
from ray_unlearn.data.collate import encode_qa, encode_text, pad_batch
from ray_unlearn.errors import UnlearnError
from ray_unlearn.logprobs import batch_nll
from ray_unlearn.objectives import (build_objective, combined_loss, objective_ref_streams,
                                    objective_streams)
from ray_unlearn.optim import build_hessian_estimator, build_optimizer

Encoded = dict[str, list[int]]


@dataclass
class UnlearnData:
    """Encoded streams: forget (question + answer), forget_idk (question + refusal), retain."""

    forget: list[Encoded]
    retain: list[Encoded]
    forget_idk: list[Encoded] = field(default_factory=list)

    def stream(self, name: str) -> list[Encoded]:
        return {"forget": self.forget, "retain": self.retain, "forget_idk": self.forget_idk}[name]


@dataclass
class LoopEnv:
    """What the runner (plain process or a Ray Train worker) gives the loop."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint_dir: Path = Path("checkpoint-tmp")
    resume_from: Path | None = None
    report: Callable[[dict[str, float], Path | None], None] = lambda metrics, ckpt: None
    on_step: Callable[[int, int, dict[str, float]], None] | None = None
    # (unwrapped module, step) -> metrics; called on rank 0 only, every train.eval_every steps and at the end
    evaluate: Callable[[Any, int], dict[str, float]] | None = None


def encode_data(cfg: JobConfig, tokenizer: Any, forget: Sequence[dict], retain: Sequence[dict],
                kind: str = "qa") -> UnlearnData:
    """Tokenize forget/retain items; text corpora (kind "text") have no refusal stream."""
    d = cfg.data

    def qa(items: Sequence[dict], refusal: bool = False) -> list[Encoded]:
        return [encode_qa(tokenizer, it["question"], d.refusal if refusal else it["answer"], d.max_length,
                          d.prompt_template) for it in items]

    if kind == "text":
        return UnlearnData(forget=[encode_text(tokenizer, it["text"], d.max_length) for it in forget],
                           retain=[encode_text(tokenizer, it["text"], d.max_length) if "text" in it
                                   else encode_qa(tokenizer, it["question"], it["answer"], d.max_length,
                                                  d.prompt_template) for it in retain])
    return UnlearnData(forget=qa(forget), retain=qa(retain), forget_idk=qa(forget, refusal=True))


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


def _forward_streams(model: Any, streams: dict[str, dict[str, torch.Tensor]], pad_id: int) -> dict[str, Any]:
    """One forward over all streams concatenated (right-padded to one width), split back per stream."""
    names = list(streams)
    width = max(streams[n]["input_ids"].shape[1] for n in names)

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([widen(streams[n]["input_ids"], pad_id) for n in names])
    mask = torch.cat([widen(streams[n]["attention_mask"], 0) for n in names])
    logits = model(input_ids=ids, attention_mask=mask).logits
    out, start = {}, 0
    for n in names:
        b, w = streams[n]["input_ids"].shape
        out[n] = _Out(logits[start:start + b, :w])
        start += b
    return out


@dataclass
class _Out:
    logits: torch.Tensor


class Unlearner:
    """Holds the model, optimizer and objective of one run; `run()` is the loop."""

    def __init__(self, cfg: JobConfig, model: Any, ref_model: Any | None, data: UnlearnData, pad_id: int,
                 env: LoopEnv):
        self.cfg, self.model, self.ref, self.data, self.pad_id, self.env = cfg, model, ref_model, data, pad_id, env
        self.module = getattr(model, "module", model)  # unwrapped (DDP keeps the real one in .module)
        self.terms = build_objective(cfg.objective)
        self.streams = sorted(objective_streams(self.terms) | {"forget"})
        self.ref_streams = sorted(objective_ref_streams(self.terms))
        for s in self.streams:
            if not data.stream(s):
                raise UnlearnError(f"objective needs the {s} stream but it is empty; "
                                   f"give {'retain data' if s == 'retain' else 'question/answer forget data'}")
        if self.ref_streams and ref_model is None:
            raise UnlearnError("objective needs a reference model but none was given")
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.hessian = build_hessian_estimator(cfg.optim)
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.max_steps, t.warmup_steps, t.lr_schedule))
        self.step = 0
        self.history: list[dict[str, float]] = []
        if env.resume_from is not None:
            self.load_checkpoint(env.resume_from)

    # ------------------------------------------------------------------ data
    def micro_batch(self, micro: int) -> dict[str, dict[str, torch.Tensor]]:
        """The rank's slice of global micro-batch (step, micro) for every stream."""
        t, env = self.cfg.train, self.env
        slot = (self.step * t.grad_accum + micro) * env.world_size + env.rank
        batch = {}
        for s in self.streams:
            items = self.data.stream(s)
            # forget and forget_idk share indices (same questions), retain has its own order
            seed = t.seed + (7919 if s == "retain" else 0)
            idx = batch_slot_indices(len(items), t.batch_size, slot, seed)
            batch[s] = {k: v.to(env.device) for k, v in pad_batch([items[i] for i in idx], self.pad_id).items()}
        return batch

    # ------------------------------------------------------------------ one step
    def loss_on(self, model: Any, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
        """Objective value of `model` on a micro-batch (reference model run without grad)."""
        policy = _forward_streams(model, batch, self.pad_id)
        ref = None
        if self.ref_streams:
            with torch.no_grad():
                ref = _forward_streams(self.ref, {s: batch[s] for s in self.ref_streams}, self.pad_id)
        loss, logs = combined_loss(self.terms, policy, ref, batch)
        with torch.no_grad():
            logs["nll/forget"] = batch_nll(policy["forget"].logits, batch["forget"]["labels"]).item()
            if "retain" in policy:
                logs["nll/retain"] = batch_nll(policy["retain"].logits, batch["retain"]["labels"]).item()
        return loss, logs

    def train_step(self) -> dict[str, float]:
        """Accumulate grad_accum micro-batches, estimate the Hessian when due, step."""
        t = self.cfg.train
        sums: dict[str, float] = {}
        batch = None
        for micro in range(t.grad_accum):
            batch = self.micro_batch(micro)
            sync = micro == t.grad_accum - 1 or not hasattr(self.model, "no_sync")
            ctx = self.model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                loss, logs = self.loss_on(self.model, batch)
                self._check_finite(loss)
                (loss / t.grad_accum).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / t.grad_accum
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
            sums["grad_norm"] = float(norm)
        step_kwargs = self._hessian_update(batch)
        sums["lr"] = self.scheduler.get_last_lr()[0]  # the LR of this step's update, before the schedule moves on
        self.optimizer.step(**step_kwargs)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if hasattr(self.optimizer, "clip_rate"):
            sums["clip_rate"] = float(self.optimizer.clip_rate)
        return sums

    def _hessian_update(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
        """Fold a fresh Hessian estimate into Sophia when due; returns step() kwargs."""
        if self.hessian is None:
            return {}
        if self.hessian.due(self.step) or not hasattr(self, "_bs"):
            # seeded by (seed, step, rank): a resumed run draws the same samples as an uninterrupted one
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.cfg.train.seed * 1_000_003 + self.step) * 1009 + self.env.rank)
                estimates, bs = self.hessian.estimate(self.module, batch["forget"],
                                                      lambda: self.loss_on(self.module, batch)[0])
            if self.env.world_size > 1:
                import torch.distributed as dist

                for e in estimates:
                    dist.all_reduce(e, op=dist.ReduceOp.AVG)
            self.optimizer.update_hessian(estimates)
            self._bs = 5120.0 if self.cfg.optim.soul_compat else bs
        return {"bs": self._bs}

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop every rank on a NaN/Inf loss before anything is written."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
        if self.env.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(bad)
        if bad.item() > 0:
            raise UnlearnError(f"non-finite loss at step {self.step + 1}: stopped before writing a checkpoint, "
                               "the last good one is kept; lower optim.lr or check the data")

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[dict[str, float]]:
        """Unlearn until max_steps; returns the logged history."""
        t = self.cfg.train
        self.model.train()
        if self.step >= t.max_steps:  # resumed a finished run: hand its final checkpoint back
            self.env.report(dict(self.history[-1]) if self.history else {"step": self.step}, self.save_checkpoint())
        while self.step < t.max_steps:
            logs = self.train_step()
            logs["step"] = self.step
            last = self.step == t.max_steps
            evaluated = self._evaluate_if_due(logs, last)
            if self.env.on_step is not None:
                self.env.on_step(self.step, t.max_steps, logs)
            if self.step % t.log_every == 0 or last or evaluated:
                self.history.append(logs)
            if last or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
                self.env.report(logs, self.save_checkpoint())
            elif self.step % t.log_every == 0 or evaluated:
                self.env.report(logs, None)
        return self.history

    def _evaluate_if_due(self, logs: dict[str, float], last: bool) -> bool:
        """Every eval_every steps and at the last step, rank 0 adds the evaluation metrics to `logs`.

        Returns whether this step was an evaluation step: the same on every rank, so all ranks
        report at the same steps (a report is a barrier); only rank 0's report carries the metrics.
        """
        every = self.cfg.train.eval_every
        if self.env.evaluate is None or not (last or (every and self.step % every == 0)):
            return False
        if self.env.rank == 0:
            logs.update(self.env.evaluate(self.module, self.step))
        return True

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes model weights (safetensors), optimizer, scheduler, step and history."""
        if self.env.rank != 0:
            return None
        from safetensors.torch import save_model

        from ray_unlearn.models.io import atomic_dir, commit_dir

        final = Path(self.env.checkpoint_dir) / f"step-{self.step:06d}"
        out = atomic_dir(final)  # written under a temporary name, renamed when complete
        try:
            out.mkdir()
            save_model(self.module, str(out / "model.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       out / "optimizer.pt")
            (out / "state.json").write_text(json.dumps({"step": self.step, "history": self.history,
                                                        "hessian_bs": getattr(self, "_bs", None)}))
            commit_dir(out, final)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote."""
        from safetensors.torch import load_model

        load_model(self.module, str(Path(path) / "model.safetensors"))
        opt = torch.load(Path(path) / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        state = json.loads((Path(path) / "state.json").read_text())
        self.step, self.history = int(state["step"]), list(state["history"])
        if state.get("hessian_bs") is not None:  # Sophia's h is in the optimizer state; its scale is here
            self._bs = float(state["hessian_bs"])


def load_checkpoint_weights(model: Any, path: Path) -> Any:
    """Load a loop checkpoint's weights into `model` (for writing the final HF directory)."""
    from safetensors.torch import load_model

    load_model(model, str(Path(path) / "model.safetensors"))
    return model


def checkpoint_history(path: Path) -> list[dict[str, float]]:
    """The logged history stored in a checkpoint."""
    return list(json.loads((Path(path) / "state.json").read_text())["history"])
