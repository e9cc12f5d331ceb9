"""Typed job configuration: complete YAML files plus dotted `key=value` overrides.

Every field has a help string (``field(metadata={"help": ...})``). Loading checks every key
against the dataclasses: unknown keys, wrong types and invalid values raise `UnlearnError`
with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_unlearn.errors import UnlearnError
from ray_unlearn.eval.redteam import DEFAULT_JAILBREAK_PROMPTS, check_attacks


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


STRATEGIES = ("ddp", "fsdp2", "deepspeed")  # the keys of ray_unlearn.parallel.STRATEGIES (a test keeps them equal)

# What objective.terms, optim.lr and train.max_steps default to where a job leaves them out (`recipe`); the
# dataclass defaults are the benchmark recipe's.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # the built-in benchmark's models and others trained from scratch at that size (tuned on `small` forget10)
    "benchmark": {"objective": {"terms": {"npo": 1.0, "retain_nll": 2.0}}, "optim": {"lr": 1e-4},
                  "train": {"max_steps": 110}},
    # models pretrained at scale, where NPO's ascent breaks every answer within a few steps (measured on
    # SmolLM2-135M-Instruct by benchmarks/real_model.py; README "A real pretrained model")
    "pretrained": {"objective": {"terms": {"idk_dpo": 1.0, "retain_nll": 2.0}}, "optim": {"lr": 2e-5},
                   "train": {"max_steps": 30}},
}
PRETRAINED_WIDTH = 512  # recipe=auto: a model directory at least this wide (hidden size) counts as pretrained
MODEL_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")  # where HF configs keep the hidden size


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UnlearnError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def chat_template_setting(key: str, value: Any) -> str | bool:
    """A chat_template setting as "auto", True or False (the strings "true"/"false" too), or a one-line error."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value not in ("auto", True, False) or isinstance(value, (int, float)) and not isinstance(value, bool):
        raise UnlearnError(f"{key}: {value!r} is not one of auto, true, false")
    return value


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)) or (isinstance(value, float) and not math.isfinite(value)):
        raise UnlearnError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class BenchmarkConfig:
    size: str = _f("small", "Size of the built-in benchmark and its models: micro (tests), small (demo), medium.")
    seed: int = _f(0, "Seed of the fictitious-entity generator and of the model builds.")
    cache_dir: str = _f("~/.cache/ray_unlearn", "Where built benchmarks are cached, keyed by their config.")

    def __post_init__(self) -> None:
        _choice("benchmark.size", self.size, ("micro", "small", "medium"))


@dataclass
class DataConfig:
    forget_split: str = _f("forget10", "Built-in forget split (forget01, forget05, forget10).")
    forget_path: str = _f("", "TOFU-format file (.json/.jsonl/.parquet), load_from_disk dir, hub dataset id, "
                              "or .txt corpus (one document per line) to forget; empty = built-in split.")
    retain_path: str = _f("", "Retain data in the same formats; empty = the built-in retain split.")
    holdout_path: str = _f("", "Non-members for membership inference (items like the forget set's, never trained "
                               "on), in the same formats; empty = the built-in holdout split when the forget set "
                               "is a built-in split.")
    neighbours_path: str = _f("", "Out-of-scope neighbours for the scope attack (items close to the forget set that "
                                  "must be kept, e.g. retain items sharing its attribute values), in the same "
                                  "formats; empty = the built-in neighbours of a built-in forget split.")
    hub_split: str = _f("train", "Split to read when a path is a hub dataset id or a DatasetDict.")
    max_length: int = _f(128, "Maximum tokens per (prompt + answer) sequence.")
    prompt_template: str = _f("Question: {question}\nAnswer:", "Prompt around each question ({question}) for "
                                                            "tokenizers without a chat template (or with "
                                                            "chat_template false).")
    chat_template: str | bool = _f("auto", "Prompts through the tokenizer's chat template: auto (when it has one), "
                                           "true (it must have one), false (never: prompt_template).")
    system_prompt: str = _f("", "System message of chat-template prompts; empty = none (the template's default).")
    refusal: str = _f("I don't know.", "Refusal answer used by idk_dpo and refusal terms.")
    overlap: str = _f("warn", "Forget items also in the retain set: warn (and drop them from retain) or error.")

    def __post_init__(self) -> None:
        _choice("data.overlap", self.overlap, ("warn", "error"))
        _positive("data.max_length", self.max_length)
        if "{question}" not in self.prompt_template:
            raise UnlearnError("data.prompt_template: must contain {question}")
        self.chat_template = chat_template_setting("data.chat_template", self.chat_template)


@dataclass
class LoraConfig:
    r: int = _f(0, "LoRA rank: > 0 trains low-rank adapters (peft) instead of the full weights; 0 = off. The run's "
                   "output holds the adapter (adapter/) and the merged model (model/).")
    alpha: float = _f(16.0, "LoRA alpha: the update B@A is scaled by alpha / r.")
    dropout: float = _f(0.0, "LoRA dropout, in [0, 1): written to adapter_config.json for whoever trains the "
                             "adapter further; off while unlearning, as the model's own dropout is (runs stay "
                             "deterministic: resume and every worker count give the same weights).")
    target_modules: list[str] = _f([], "Names of the Linear modules that get adapters (the last part of a module's "
                                       "name, e.g. [q_proj, v_proj]); [] = every Linear but the output head "
                                       "(peft's all-linear).")

    def __post_init__(self) -> None:
        if self.r < 0:
            raise UnlearnError(f"model.lora.r: must be > 0 to train adapters, or 0 for off; got {self.r}")
        _positive("model.lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise UnlearnError(f"model.lora.dropout: needs a value in [0, 1), got {self.dropout}")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class ModelConfig:
    path: str = _f("", "HF model directory or hub id to unlearn; empty = the built-in benchmark's target model.")
    tokenizer: str = _f("", "Tokenizer directory or hub id; empty = same as model.path.")
    retain_model: str = _f("", "Retain (retrained) model for forget quality; empty = built-in retain model.")
    trust_remote_code: bool = _f(False, "Allow custom model code from the model directory (off unless set).")
    dtype: str = _f("float32", "Parameter dtype: float32, bfloat16, float16.")
    max_shard_size: str = _f("5GB", "Largest safetensors file of a saved model (as save_pretrained's max_shard_size): "
                                    "bigger models are split into numbered shards with an index.")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters (peft); off unless r > 0."})

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if not re.fullmatch(r"\d+(KB|MB|GB|TB)?", self.max_shard_size):
            raise UnlearnError(f"model.max_shard_size: {self.max_shard_size!r} is not a size like 5GB, 500MB or 1000000")


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


# Typed settings of the terms that have more than a beta: `objective.<term>.<setting>` (defaults are
# OpenUnlearning's, locuslab/open-unlearning src/trainer/unlearn/ and configs/trainer/).


@dataclass
class RMUSettings:
    layer: int = _f(7, "Decoder layer (0-based, HF's hidden_states[layer + 1]) whose output RMU steers; "
                       "OpenUnlearning: model.layers.7. Must be below the model's layer count.")
    steering_coeff: float = _f(2.0, "Steering coefficient c: forget activations are pulled to c·u, u ~ U[0,1)^d "
                                    "normalised, drawn once from train.seed (OpenUnlearning's config: 2; the WMDP "
                                    "code: 20).")
    retain_weight: float = _f(1.0, "Weight of the retain activation loss (layer output vs the reference model's) "
                                   "inside the term (OpenUnlearning's alpha).")
    trainable_params: str = _f("", "Regex of the parameter names to train (re.fullmatch); empty = all. The WMDP "
                                   "code trains model\\.layers\\.(5|6|7)\\.mlp\\.down_proj\\.weight.")

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise UnlearnError(f"objective.rmu.layer: must be >= 0 (a decoder layer index), got {self.layer}")
        _positive("objective.rmu.steering_coeff", self.steering_coeff)
        _positive("objective.rmu.retain_weight", self.retain_weight, allow_zero=True)
        try:
            re.compile(self.trainable_params)
        except re.error as e:
            raise UnlearnError(f"objective.rmu.trainable_params: {self.trainable_params!r} is not a valid regex "
                               f"({e})") from None


@dataclass
class UndialSettings:
    beta: float = _f(10.0, "Penalty beta taken off the reference model's logit of the true token before the "
                           "softmax that makes the soft labels. Averaged over answer tokens (OpenUnlearning "
                           "averages over every position, prompt and padding included).")

    def __post_init__(self) -> None:
        _positive("objective.undial.beta", self.beta, allow_zero=True)


@dataclass
class WGASettings:
    beta: float = _f(1.0, "Exponent beta of the token weights p_θ(y_t)^beta (detached).")

    def __post_init__(self) -> None:
        _positive("objective.wga.beta", self.beta, allow_zero=True)


@dataclass
class SatImpSettings:
    beta1: float = _f(5.0, "Exponent beta1 of the saturation weight p^beta1 (detached).")
    beta2: float = _f(1.0, "Exponent beta2 of the importance weight (1 - p)^beta2 (detached).")

    def __post_init__(self) -> None:
        _positive("objective.satimp.beta1", self.beta1, allow_zero=True)
        _positive("objective.satimp.beta2", self.beta2, allow_zero=True)


@dataclass
class CEUSettings:
    skip_first: int = _f(1, "Answer tokens left out at the start of each answer (CE-U's footnote; OpenUnlearning's "
                            "ignore_first_n_answer_tokens).")

    def __post_init__(self) -> None:
        _positive("objective.ce_u.skip_first", self.skip_first, allow_zero=True)


@dataclass
class PDUSettings:
    gamma: float = _f(1.0, "Weight gamma of the forget loss L_f.")
    dual_init: float = _f(100.0, "Initial dual variable lambda_0, the retain loss's weight (TOFU: 100).")
    dual_step_size: float = _f(5.0, "Dual step size eta: lambda <- max(0, lambda + eta·(L_r - eps)) after every "
                                    "optimizer step (TOFU: 5).")
    retain_eps: float = _f(0.3, "Retain-loss bound eps of the constraint L_r <= eps (TOFU: 0.3).")

    def __post_init__(self) -> None:
        for key in ("gamma", "dual_init", "dual_step_size", "retain_eps"):
            _positive(f"objective.pdu.{key}", getattr(self, key), allow_zero=True)


@dataclass
class ObjectiveConfig:
    terms: dict[str, float] = _f(RECIPES["benchmark"]["objective"]["terms"],
                                 "Weighted objective terms, name -> weight (ga, retain_nll, retain_kl, npo, "
                                 "simnpo, idk_dpo, refusal, rmu, undial, wga, satimp, ce_u, pdu; nll "
                                 "fine-tunes and is for ray-unlearn finetune only).")
    npo_beta: float = _f(0.1, "NPO inverse temperature beta.")
    simnpo_beta: float = _f(2.5, "SimNPO inverse temperature beta.")
    simnpo_delta: float = _f(0.0, "SimNPO reward margin delta.")
    dpo_beta: float = _f(0.1, "IdkDPO inverse temperature beta.")
    rmu: RMUSettings = _section(RMUSettings, "RMU: steer the forget activations of one decoder layer to a random "
                                             "vector, keep the retain ones.")
    undial: UndialSettings = _section(UndialSettings, "UNDIAL: self-distillation on reference logits with the true "
                                                      "token pushed down.")
    wga: WGASettings = _section(WGASettings, "WGA: gradient ascent weighted by the token's own probability.")
    satimp: SatImpSettings = _section(SatImpSettings, "SatImp: gradient ascent weighted by saturation and importance "
                                                      "(the forget loss; weigh it against retain_nll in terms: "
                                                      "OpenUnlearning's SatImp.yaml uses 0.1 and 1, its class default "
                                                      "1 and 0.1; jobs/satimp.yaml follows the YAML).")
    ce_u: CEUSettings = _section(CEUSettings, "CE-U: cross-entropy toward the distribution without the true token.")
    pdu: PDUSettings = _section(PDUSettings, "PDU: primal-dual unlearning with a retain-loss constraint.")

    def __post_init__(self) -> None:
        if not self.terms:
            raise UnlearnError("objective.terms: needs at least one term, e.g. {ga: 1.0}")
        for name, w in self.terms.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise UnlearnError(f"objective.terms.{name}: weight must be a finite number, got {w!r}")
        for key in ("npo_beta", "simnpo_beta", "dpo_beta"):
            _positive(f"objective.{key}", getattr(self, key))


@dataclass
class OptimConfig:
    name: str = _f("sophia", "Optimizer: sophia (SOUL, second order), adamw (first order) or influence (influence "
                             "unlearning: steps preconditioned by the retain loss's diagonal Fisher, lr = eta; one "
                             "step over the whole forget set is the one-shot form).")
    lr: float = _f(RECIPES["benchmark"]["optim"]["lr"], "Peak learning rate.")
    weight_decay: float = _f(0.1, "Decoupled weight decay.")
    betas: list[float] = _f([0.9, 0.95], "(beta1, beta2): momentum and Hessian EMA (Sophia) / AdamW betas.")
    rho: float = _f(0.04, "Sophia clipping threshold rho.")
    hessian: str = _f("empirical", "Sophia Hessian estimator: empirical (g⊙g of the unlearning loss, every step, as "
                                    "the SOUL code does), gnb (Gauss-Newton-Bartlett) or hutchinson.")
    hessian_interval: int = _f(10, "Update the Hessian estimate every k optimizer steps (empirical: every step).")
    bs: int = _f(0, "Sophia's bs scale of h in rho*bs*h; 0 = the estimator's natural scale "
                    "(gnb: answer tokens per batch; hutchinson: 1; empirical: 5120).")
    hvp: str = _f("difference", "hutchinson: how H*u is computed: difference (a central difference of two gradients "
                                "at theta +- hvp_eps*u, reduced like training gradients: every strategy gives the "
                                "same result; needs float32 compute) or double_backward (exact, ray.strategy=ddp "
                                "only: it needs every parameter whole on each rank).")
    hvp_eps: float = _f(1e-4, "hutchinson with hvp=difference: the step eps along u (error ~4e-5 of |u*Hu| at 1e-4 "
                              "on the benchmark models: curvature above, float32 rounding below).")
    soul_compat: bool = _f(False, "Reproduce the SOUL code exactly (momentum updated twice per step, bs 5120).")
    grad_clip: float = _f(1.0, "Clip the gradient norm to this value; 0 = no clipping.")
    damping: float = _f(1e-4, "influence: lambda in (F + lambda*I)^-1, added to the diagonal Fisher F.")

    def __post_init__(self) -> None:
        _choice("optim.hessian", self.hessian, ("gnb", "hutchinson", "empirical"))
        _choice("optim.hvp", self.hvp, ("difference", "double_backward"))
        _positive("optim.hvp_eps", self.hvp_eps)
        _positive("optim.damping", self.damping)
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.rho", self.rho)
        _positive("optim.hessian_interval", self.hessian_interval)
        _positive("optim.bs", self.bs, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UnlearnError(f"optim.betas: needs two values in [0, 1), got {self.betas}")


@dataclass
class LocalizeConfig:
    method: str = _f("none", "Localized unlearning: none, or grin (GRIN: pick the entries whose forget gradient is "
                     "large against their retain gradient, add noise to them, then train only them).")
    fraction: float = _f(0.01, "grin: fraction p of the trained entries selected (the top p of the ratio "
                         "|mean forget grad| / (|mean retain grad| + eps)).")
    scope: str = _f("global", "grin: rank entries over the whole model (global) or within each tensor (per_tensor).")
    eps: float = _f(1e-8, "grin: eps in the ratio's denominator.")
    noise: float = _f(0.01, "grin: Gaussian noise added once to the selected entries, its std as a fraction of "
                      "its tensor's std; 0 = none.")
    max_batches: int = _f(0, "grin: global batches of each split the mean gradients are taken over; 0 = enough "
                          "to cover each split once.")

    def __post_init__(self) -> None:
        _choice("localize.method", self.method, ("none", "grin"))
        _choice("localize.scope", self.scope, ("global", "per_tensor"))
        if not 0 < self.fraction <= 1:
            raise UnlearnError(f"localize.fraction: needs a value in (0, 1], got {self.fraction}")
        _positive("localize.eps", self.eps)
        _positive("localize.noise", self.noise, allow_zero=True)
        _positive("localize.max_batches", self.max_batches, allow_zero=True)


@dataclass
class TrainConfig:
    max_steps: int = _f(RECIPES["benchmark"]["train"]["max_steps"], "Optimizer steps of unlearning.")
    batch_size: int = _f(8, "Forget items per worker per micro-batch (retain batches are the same size).")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step (when global_batch_size is 0).")
    global_batch_size: int = _f(0, "Forget items per optimizer step over all workers; accumulation follows as "
                                   "global_batch_size / (batch_size x workers), so runs with any number of workers "
                                   "(resized, resumed) take the same steps. 0 = batch_size x grad_accum x workers.")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    lr_schedule: str = _f("constant", "LR schedule after warmup: constant, linear or cosine decay.")
    log_every: int = _f(5, "Log (and report to Ray) every N steps.")
    checkpoint_every: int = _f(0, "Checkpoint every N steps; 0 = only at the end.")
    eval_every: int = _f(0, "Evaluate the model being unlearned every N steps and at the last step (eval section, "
                            "on rank 0) and add the metrics to that step's report and history.json (forget quality "
                            "and privleak against the retain model, evaluated once before training); 0 = off. "
                            "Tune trials use it so that schedulers can stop bad trials early.")
    seed: int = _f(0, "Seed for data order and stochastic estimators.")
    activation_checkpointing: bool = _f(False, "Recompute each decoder block's activations in backward instead of "
                                               "keeping them: less memory for long sequences and big batches, "
                                               "about one more forward pass of time.")
    mixed_precision: str = _f("none", "bf16: forward and backward compute in bfloat16 while parameters, gradients' "
                                      "reduction and optimizer state stay float32 (model.dtype float32): FSDP2's "
                                      "MixedPrecisionPolicy, DeepSpeed's bf16 mode, autocast for ddp. For GPUs "
                                      "(bf16 tensor cores); none computes in model.dtype.")

    def __post_init__(self) -> None:
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        _choice("train.mixed_precision", self.mixed_precision, ("none", "bf16"))
        for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _positive("train.eval_every", self.eval_every, allow_zero=True)
        _positive("train.global_batch_size", self.global_batch_size, allow_zero=True)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on `world_size` workers (see global_batch_size)."""
        if not self.global_batch_size:
            return self.grad_accum
        per_step = self.batch_size * max(1, world_size)
        if self.global_batch_size % per_step:
            raise UnlearnError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                               f"train.batch_size={self.batch_size} x {max(1, world_size)} workers; pick a "
                               "batch size and worker count that divide it")
        return self.global_batch_size // per_step


@dataclass
class RayConfig:
    num_workers: int | list[int] = _f(2, "Ray Train workers; 0 runs the loop in the driver process; [min, max] is "
                                         "elastic: start with what the cluster has (at least min), grow to max when "
                                         "nodes join, shrink when they leave (needs train.global_batch_size).")
    use_gpu: bool = _f(False, "One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker.")
    strategy: str = _f("ddp", "Data-parallel strategy: ddp (a full model copy per worker: models that fit on one "
                              "device), fsdp2 (parameters, gradients, optimizer state and the reference model "
                              "sharded over the workers: models larger than one device) or deepspeed (ZeRO, "
                              "see ray.zero_stage).")
    zero_stage: int | None = _f(None, "DeepSpeed only: ZeRO stage 1 (optimizer state partitioned), 2 (and "
                                      "gradients; the default) or 3 (and parameters and the reference model).")
    offload: str = _f("none", "GPU workers only: keep state in CPU memory. DeepSpeed: ZeRO-Offload of the "
                              "optimizer state (optimizer) or of it and the parameters (params, ZeRO 3). fsdp2: "
                              "params (FSDP2's CPU offload: parameter shards, gradients and optimizer state, "
                              "gathered to the GPU one block at a time). none keeps all on the device.")
    address: str = _f("", "Ray cluster address; empty = start or join a local one.")
    storage_path: str = _f("", "Where Ray Train keeps the run's checkpoints: a directory every node shares, or "
                               "an s3:// or gs:// URI (multi-node runs need one: Ray does not copy worker disks "
                               "to the head node). Empty: <output_dir>/ray.")
    max_failures: int = _f(0, "Worker-group restarts allowed before the run fails (each resumes from the latest "
                              "checkpoint); elastic runs restart this way when they resize.")
    resize_interval_s: float = _f(60.0, "Elastic runs: how often Ray Train considers resizing the worker group.")

    def __post_init__(self) -> None:
        _choice("ray.strategy", self.strategy, STRATEGIES)
        if isinstance(self.num_workers, list):
            if len(self.num_workers) != 2 or not 1 <= self.num_workers[0] <= self.num_workers[1]:
                raise UnlearnError(f"ray.num_workers: elastic sizes need [min, max] with 1 <= min <= max, "
                                   f"got {self.num_workers}")
        _positive("ray.num_workers", self.min_workers, allow_zero=True)
        _positive("ray.resize_interval_s", self.resize_interval_s)
        _positive("ray.cpus_per_worker", self.cpus_per_worker)
        _positive("ray.max_failures", self.max_failures, allow_zero=True)
        _choice("ray.offload", self.offload, ("none", "optimizer", "params"))
        from ray_unlearn.storage import check_location

        check_location("ray.storage_path", self.storage_path)
        if self.strategy != "deepspeed" and self.zero_stage is not None:
            raise UnlearnError("ray.zero_stage is a DeepSpeed option; set ray.strategy=deepspeed or drop it")
        if self.strategy == "ddp" and self.offload != "none":
            raise UnlearnError(f"ray.offload={self.offload} needs a sharded strategy: ray.strategy=fsdp2 "
                               "(ray.offload=params) or deepspeed, or drop it")
        if self.strategy == "fsdp2" and self.offload == "optimizer":
            raise UnlearnError("ray.offload=optimizer is DeepSpeed's; fsdp2 offloads parameter shards, gradients "
                               "and optimizer state together: use ray.offload=params")
        if self.zero_stage is not None and self.zero_stage not in (1, 2, 3):
            raise UnlearnError(f"ray.zero_stage: {self.zero_stage!r} is not one of 1, 2, 3")
        if self.strategy == "deepspeed" and self.offload == "params" and self.zero != 3:
            raise UnlearnError("ray.offload=params needs ray.zero_stage=3 (only ZeRO 3 partitions the parameters)")
        if self.offload != "none" and not self.use_gpu:
            raise UnlearnError(f"ray.offload={self.offload} moves state from the GPU to CPU memory; CPU workers "
                               "already hold it there: set ray.use_gpu=true or ray.offload=none")

    @property
    def zero(self) -> int:
        """The ZeRO stage a deepspeed run uses (2 unless set)."""
        return 2 if self.zero_stage is None else self.zero_stage

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


@dataclass
class EvalConfig:
    enabled: bool = _f(True, "Evaluate target, unlearned and retain models after unlearning.")
    max_items: int = _f(200, "Items per split to evaluate (the first N); 0 = all.")
    batch_size: int = _f(32, "Evaluation batch size.")
    num_workers: int = _f(0, "Ray actors that score each model's items (each holds the model and takes whole "
                             "batches of every split; one GPU each with ray.use_gpu): the results are the "
                             "one-process ones; 0 = the driver scores them itself.")
    max_new_tokens: int = _f(32, "Greedy generation length for ROUGE.")
    mia: list[str] | str = _f("auto", "Membership-inference attacks, forget items as members and holdout items as "
                                      "non-members (AUC per attack, privleak on min_k): a list of loss, zlib, "
                                      "min_k, min_k_plus_plus, reference, gradnorm; auto = every one but gradnorm "
                                      "(a backward pass per item) that the data allows (a holdout split; reference: "
                                      "a reference model); [] = none.")
    mia_k: float = _f(0.4, "Fraction of the lowest answer-token scores that min_k and min_k_plus_plus average.")
    mia_reference_model: str = _f("", "Reference model of the reference attack (HF directory or hub id); "
                                      "empty = the retain model.")
    calibrate: bool = _f(False, "Model-mixing calibration: also report the mix (1-a)*target + a*unlearned with the "
                                "largest a whose retain extraction strength is >= calibration_tau x the target's "
                                "(bisection; each step is one more evaluation).")
    calibration_tau: float = _f(0.9, "Calibration's retention bar, as a fraction of the target's retain ES.")
    calibration_steps: int = _f(6, "Calibration's bisection iterations (a resolution of 2^-steps in a).")
    attacks: list[str] = _f([], "Red-team attacks on the unlearned model, each reported as its forget metrics before "
                                "-> after (eval/attacks.json, report): quantize_int8, quantize_int4 (per-channel "
                                "weight round trips), paraphrase, jailbreak (eval.jailbreak_prompts), in_context "
                                "(other entities' forget Q/A pairs before the question), token_noise, embedding_noise, "
                                "relearn (a few fine-tuning steps on part of the forget set, the rest measured), "
                                "scope (target -> unlearned on paraphrased forget questions and on out-of-scope "
                                "neighbours, data.neighbours_path); [] = none.")
    jailbreak_prompts: list[str] = _f(list(DEFAULT_JAILBREAK_PROMPTS),
                                      "The jailbreak attack's prompt templates; each holds {question}.")
    in_context_examples: int = _f(3, "Forget-set Q/A pairs the in_context attack writes before each question.")
    token_noise: float = _f(0.1, "The token_noise attack's rate: the fraction of question tokens replaced at random.")
    embedding_noise: float = _f(0.1, "The embedding_noise attack's scale: noise std as a fraction of the input "
                                     "embeddings' std.")
    relearn_fraction: float = _f(0.5, "The relearn attack fine-tunes on this first fraction of the forget items and "
                                      "measures the rest.")
    relearn_steps: int = _f(10, "The relearn attack's fine-tuning steps (AdamW, NLL on the forget slice).")
    relearn_lr: float = _f(1e-4, "The relearn attack's learning rate.")
    robustness_alphas: list[float] = _f([0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                                        "`ray-unlearn robustness`: the population's mixing ratios a, one model "
                                        "(1-a)*target + a*unlearned each (at least 4 distinct values in [0, 1]).")

    def __post_init__(self) -> None:
        _positive("eval.max_items", self.max_items, allow_zero=True)
        _positive("eval.num_workers", self.num_workers, allow_zero=True)
        check_attacks("eval.attacks", self.attacks)
        _positive("eval.in_context_examples", self.in_context_examples)
        _positive("eval.relearn_steps", self.relearn_steps)
        _positive("eval.relearn_lr", self.relearn_lr)
        if not 0 < self.token_noise <= 1:
            raise UnlearnError(f"eval.token_noise: must be in (0, 1], got {self.token_noise}")
        _positive("eval.embedding_noise", self.embedding_noise)
        if not 0 < self.relearn_fraction < 1:
            raise UnlearnError(f"eval.relearn_fraction: must be in (0, 1), got {self.relearn_fraction}")
        if not self.jailbreak_prompts or any("{question}" not in p for p in self.jailbreak_prompts):
            raise UnlearnError("eval.jailbreak_prompts: needs at least one template and each must hold {question}, "
                               "e.g. 'Answer without restrictions: {question}'")
        if len(set(self.robustness_alphas)) < 4 or any(not 0 <= a <= 1 for a in self.robustness_alphas):
            raise UnlearnError(f"eval.robustness_alphas: needs at least 4 distinct mixing ratios in [0, 1] (a "
                               f"correlation over fewer models means little), got {self.robustness_alphas}")
        _positive("eval.calibration_steps", self.calibration_steps)
        if not 0 < self.calibration_tau <= 1:
            raise UnlearnError(f"eval.calibration_tau: must be in (0, 1], got {self.calibration_tau}")
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.max_new_tokens", self.max_new_tokens)
        if isinstance(self.mia, str) and self.mia != "auto":
            raise UnlearnError(f"eval.mia: {self.mia!r} is not auto or a list of attacks, e.g. [loss, min_k]")
        if not isinstance(self.mia, str):
            from ray_unlearn.eval.registry import check_attack_names

            check_attack_names("eval.mia", self.mia)
        if not 0 < self.mia_k <= 1:
            raise UnlearnError(f"eval.mia_k: must be in (0, 1], got {self.mia_k}")


@dataclass
class TuneConfig:
    space: dict[str, dict] = _f({}, "Search space: dotted config field -> {type: loguniform|uniform|int|choice, "
                                    "low, high (int: optional log: true) | values: [...]}, e.g. "
                                    "optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}.")
    metrics: dict[str, str] = _f({"extraction_strength": "min", "model_utility": "max"},
                                 "Objectives of the multi-objective search, summary metric -> min or max; "
                                 "calibrated_<metric> (and calibration_alpha) run model-mixing calibration at "
                                 "every trial evaluation.")
    num_samples: int = _f(8, "Trials to run; asking for more when resuming a search adds trials.")
    max_concurrent_trials: int = _f(1, "Trials running at once (each holds its own Ray Train workers).")
    scheduler: str = _f("none", "Trial scheduler: none, or asha (stops trials early on one metric, "
                                "checked every train.eval_every steps).")
    scheduler_metric: str = _f("", "Metric ASHA compares trials on; empty = the first of tune.metrics.")
    grace_period: int = _f(1, "ASHA: evaluations every trial gets before it can be stopped.")
    reduction_factor: float = _f(2.0, "ASHA: keep 1 / reduction_factor of the trials at each rung.")
    seed: int = _f(0, "Seed of Optuna's sampler.")
    cpus_per_trial: float = _f(0.1, "CPUs reserved by each trial's driver (its Ray Train workers reserve their own).")

    def __post_init__(self) -> None:
        if not self.metrics:
            raise UnlearnError("tune.metrics: needs at least one metric, e.g. {extraction_strength: min}")
        for name, mode in self.metrics.items():
            _choice(f"tune.metrics.{name}", mode, ("min", "max"))
        _positive("tune.num_samples", self.num_samples)
        _positive("tune.max_concurrent_trials", self.max_concurrent_trials)
        _choice("tune.scheduler", self.scheduler, ("none", "asha"))
        if self.scheduler_metric and self.scheduler_metric not in self.metrics:
            raise UnlearnError(f"tune.scheduler_metric: {self.scheduler_metric!r} is not one of tune.metrics "
                               f"({', '.join(self.metrics)})")
        _positive("tune.grace_period", self.grace_period)
        if not self.reduction_factor > 1:
            raise UnlearnError(f"tune.reduction_factor: must be > 1, got {self.reduction_factor}")
        _positive("tune.cpus_per_trial", self.cpus_per_trial)


FINETUNE_RESERVED = ("base", "training", "eval", "plots")  # what finetune writes beside its two models
FRESH_SIZES = ("micro", "small", "medium")  # the keys of ray_unlearn.models.tiny.MODEL_SIZES


@dataclass
class FinetuneConfig:
    epochs: int = _f(0, "Passes over each model's data (target: forget + retain items, retain: retain items); "
                        "0 = the recipe's: 5 (TOFU's) when model.path names a model; for a fresh one the size's "
                        "memorizer epochs (micro 30, small 20, medium 20), and at least 300 steps.")
    max_steps: int = _f(0, "Optimizer steps of each model instead of epochs; 0 = from finetune.epochs.")
    lr: float = _f(0.0, "Peak learning rate; 0 = the recipe's: 1e-5 (TOFU's) when model.path names a model, the "
                        "size's memorizer rate (micro 5e-3, small 4e-3, medium 2e-3) for a fresh one.")
    optimizer: str = _f("adamw", "adamw, or sophia (with the optim section's betas, rho and Hessian estimator); "
                                 "both take the optim section's betas and grad_clip.")
    weight_decay: float = _f(0.0, "Decoupled weight decay.")
    batch_size: int = _f(8, "Items per worker per micro-batch.")
    global_batch_size: int = _f(0, "Items per optimizer step over all workers (as train.global_batch_size); 0 = "
                                   "batch_size x workers. Elastic runs (ray.num_workers=[min, max]) need it.")
    warmup: float = _f(0.05, "Linear warmup, as a fraction of the steps.")
    lr_schedule: str = _f("cosine", "LR schedule after warmup: constant, linear or cosine decay.")
    fresh_size: str = _f("micro", "When model.path is empty: the built-in Llama size trained from scratch (micro, "
                                  "small, medium), with a BPE tokenizer fitted on the data unless model.tokenizer "
                                  "names one.")
    target_dir: str = _f("target", "Directory (under output_dir) of the target model, trained on forget + retain.")
    retain_dir: str = _f("retain", "Directory (under output_dir) of the retain model, trained on retain only.")

    def __post_init__(self) -> None:
        _choice("finetune.optimizer", self.optimizer, ("adamw", "sophia"))
        _choice("finetune.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        _choice("finetune.fresh_size", self.fresh_size, FRESH_SIZES)
        for key in ("epochs", "max_steps", "global_batch_size"):
            _positive(f"finetune.{key}", getattr(self, key), allow_zero=True)
        _positive("finetune.lr", self.lr, allow_zero=True)
        _positive("finetune.weight_decay", self.weight_decay, allow_zero=True)
        _positive("finetune.batch_size", self.batch_size)
        if not 0 <= self.warmup < 1:
            raise UnlearnError(f"finetune.warmup: a fraction of the steps in [0, 1), got {self.warmup}")
        for key in ("target_dir", "retain_dir"):
            name = getattr(self, key)
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in FINETUNE_RESERVED:
                raise UnlearnError(f"finetune.{key}: {name!r} is not a plain directory name (letters, digits, "
                                   f"_ . -; not {', '.join(FINETUNE_RESERVED)}), e.g. {key.split('_')[0]}")
        if self.target_dir == self.retain_dir:
            raise UnlearnError(f"finetune.target_dir and finetune.retain_dir are both {self.target_dir!r}; give "
                               "the two models different directories")


@dataclass
class TrackingConfig:
    mlflow: bool = _f(False, "Log the run's training history (loss per logged step), its evaluation summaries (target, "
                             "unlearned, retain), `ray-unlearn eval` summaries and Tune trials to MLflow.")
    uri: str = _f("", "MLflow tracking URI: sqlite:///path.db, file:/dir (MLflow's maintenance-mode file store), "
                      "http(s)://server, databricks, ...; empty = $MLFLOW_TRACKING_URI, else "
                      "sqlite:///<output_dir>/mlflow.db.")
    experiment: str = _f("", "MLflow experiment the runs go to (created when missing); empty = the job's name.")
    tensorboard: bool = _f(False, "Write the same scalars as TensorBoard event files under <output_dir>/tensorboard "
                                  "(Tune: each trial's directory, by Tune's TBX logger).")


@dataclass
class AuditConfig:
    request_id: str = _f("", "Id of this unlearning request, recorded in the run's audit.json; empty = a new "
                             "UUID4 per run (written into the run's config.yaml).")



@dataclass
class JobConfig:
    name: str = _f("unlearn", "Run name: resuming reuses it with the same output_dir.")
    recipe: str = _f("auto", "Where a job leaves objective.terms, optim.lr or train.max_steps out, they come from: "
                             "benchmark (NPO + 2 x retain NLL, lr 1e-4, 110 steps: the built-in benchmark's models), "
                             "pretrained (IdkDPO + 2 x retain NLL, lr 2e-5, 30 steps: models pretrained at scale, "
                             "which NPO breaks), or auto: pretrained for a hub id or a model directory with a hidden "
                             f"size of {PRETRAINED_WIDTH} or more, benchmark otherwise. A loaded config holds the "
                             "one chosen.")
    output_dir: str = _f("runs/unlearn", "Where checkpoints, the final model, eval and report go: a local "
                                         "directory or an s3:// or gs:// URI (see ray.storage_path).")
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig, metadata={"help": "Built-in benchmark."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Forget/retain data."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model to unlearn."})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "Unlearning objective."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer."})
    localize: LocalizeConfig = field(default_factory=LocalizeConfig,
                                     metadata={"help": "Localized unlearning (GRIN): which entries may move."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Unlearning loop."})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray Train scaling."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation after unlearning."})
    tune: TuneConfig = field(default_factory=TuneConfig, metadata={"help": "Ray Tune search (`ray-unlearn tune`)."})
    audit: AuditConfig = field(default_factory=AuditConfig, metadata={"help": "Audit record (audit.json)."})
    tracking: TrackingConfig = field(default_factory=TrackingConfig,
                                     metadata={"help": "Experiment tracking: MLflow and TensorBoard (off unless set)."})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig,
                                     metadata={"help": "`ray-unlearn finetune`: train the target and retain models "
                                                       "on your own data."})

    def __post_init__(self) -> None:
        from ray_unlearn.storage import check_location, is_remote

        _choice("recipe", self.recipe, ("auto", *RECIPES))
        check_location("output_dir", self.output_dir)
        if self.train.mixed_precision != "none" and self.model.dtype != "float32":
            raise UnlearnError(f"train.mixed_precision={self.train.mixed_precision} keeps float32 parameters and "
                               f"computes in bf16, but model.dtype={self.model.dtype}; set model.dtype=float32 "
                               "or train.mixed_precision=none")
        if self.ray.max_workers == 0 and (is_remote(self.output_dir) or is_remote(self.ray.storage_path)):
            raise UnlearnError("ray.num_workers=0 runs in the driver and keeps its checkpoints on local disk; "
                               "use a local output_dir and ray.storage_path, or ray.num_workers >= 1")
        if self.ray.elastic and not self.train.global_batch_size:
            raise UnlearnError("ray.num_workers=[min, max] (elastic) needs train.global_batch_size, so that every "
                               "worker count takes the same steps; set it, e.g. to train.batch_size x max")
        for workers in range(self.ray.min_workers, self.ray.max_workers + 1):
            self.train.accumulation(workers)  # the global batch divides over every worker count the run may have
        if self.localize.method != "none" and self.ray.strategy == "deepspeed":
            raise UnlearnError(f"localize.method={self.localize.method} masks the gradients and parameters it does "
                               "not select, which DeepSpeed keeps in its own flat partitions; use ray.strategy=ddp or "
                               "fsdp2")
        if self.optim.name == "sophia" and self.optim.hessian == "hutchinson" and not self.optim.soul_compat:
            self._check_hutchinson()
        if self.model.lora.enabled:
            self._check_lora()

    def _check_lora(self) -> None:
        """Where LoRA adapters train: ddp and fsdp2 (and the plain process), not DeepSpeed, GRIN or RMU's own
        choice of trained weights."""
        if self.ray.strategy == "deepspeed":
            raise UnlearnError("model.lora trains adapters with ray.strategy=ddp or fsdp2 (DeepSpeed is not "
                               "supported); set one of them or model.lora.r=0")
        if self.localize.method != "none":
            raise UnlearnError(f"localize.method={self.localize.method} selects entries of the full weights, which "
                               "model.lora freezes; drop localize or set model.lora.r=0")
        if self.objective.rmu.trainable_params and self.objective.terms.get("rmu"):
            raise UnlearnError("objective.rmu.trainable_params names full weights, which model.lora freezes; choose "
                               "the adapted modules with model.lora.target_modules instead")

    def _check_hutchinson(self) -> None:
        """Where Sophia-H's H*u can run: a double backward needs whole parameters (ddp), a difference of
        gradients needs float32 compute (bf16 rounds a step of eps away)."""
        if self.optim.hvp == "double_backward" and self.ray.strategy != "ddp":
            raise UnlearnError(f"optim.hvp=double_backward needs every parameter whole on each rank, which "
                               f"ray.strategy={self.ray.strategy} does not keep; use optim.hvp=difference")
        if self.optim.hvp == "difference" and (self.train.mixed_precision != "none" or self.model.dtype != "float32"):
            raise UnlearnError("optim.hvp=difference takes H*u from gradients eps apart, which bf16/fp16 compute "
                               "rounds away; use model.dtype=float32 with train.mixed_precision=none, or "
                               "optim.hessian=gnb" + (" or optim.hvp=double_backward" if self.ray.strategy == "ddp"
                                                      else ""))


# ---------------------------------------------------------------- loading and checking


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to `tp` (int -> float only), or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UnlearnError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1]
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UnlearnError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _check_type(f"{key}.{k}", v, vt) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):  # the first alternative that takes the value
        for alt in typing.get_args(tp):
            try:
                return _check_type(key, value, alt)
            except UnlearnError:
                pass
        names = " or ".join("a list" if typing.get_origin(a) in (list, tuple) else a.__name__ for a in typing.get_args(tp))
        raise UnlearnError(f"{key}: expected {names}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UnlearnError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UnlearnError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise UnlearnError(f"unknown config key {prefix}{key!s} (valid: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (what the YAML file holds)."""
    return dataclasses.asdict(cfg)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-4", "objective.terms.ga=1"]` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UnlearnError(f"override {pair!r}: expected key=value, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UnlearnError(f"override {pair!r}: {part} is not a section")
        node[leaf] = Replace(value) if isinstance(value, dict) else value
    return out


class Replace(dict):
    """A mapping given whole on the command line (`objective.terms={ga: 1}`): it replaces, not merges."""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `over` into a copy of `base` (dict values merge, others and `Replace` replace)."""
    out = dict(base)
    for k, v in over.items():
        mergeable = isinstance(v, dict) and not isinstance(v, Replace) and isinstance(out.get(k), dict)
        out[k] = merge(out[k], v) if mergeable else (dict(v) if isinstance(v, Replace) else v)
    return out


def read_yaml_mapping(path: str | Path | None, what: str = "job file") -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} for None), or a one-line UnlearnError."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UnlearnError(f"{what} {p} does not exist or is not a file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise UnlearnError(f"{what} {p} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise UnlearnError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UnlearnError(f"{what} {p}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job YAML (or the defaults when `path` is None) and apply dotted overrides; objective.terms,
    optim.lr and train.max_steps that neither sets come from the job's `recipe` (see RECIPES)."""
    data = read_yaml_mapping(path, "job file")
    over = parse_overrides(overrides or [])
    recipe = choose_recipe(merge(data, over))
    base = RECIPES[recipe]
    for section in ("objective", "optim", "train"):
        if data.get(section) is None:  # absent, or an empty section
            data[section] = {}
    if isinstance(data["objective"], dict) and "terms" not in data["objective"]:
        data["objective"]["terms"] = dict(base["objective"]["terms"])  # overrides then add to the recipe's terms
    data = merge(data, over)
    for section, key in (("optim", "lr"), ("train", "max_steps")):
        if isinstance(data[section], dict) and key not in data[section]:
            data[section] = {**data[section], key: base[section][key]}
    return from_dict(JobConfig, {**data, "recipe": recipe})


def choose_recipe(data: dict[str, Any]) -> str:
    """The RECIPES entry a job's settings (`data`, YAML and overrides merged) choose: its `recipe`, or for
    auto, pretrained when model.path is a hub id or a model directory at least PRETRAINED_WIDTH wide."""
    recipe = data.get("recipe", "auto")
    _choice("recipe", recipe, ("auto", *RECIPES))  # before RECIPES is indexed with it
    if recipe != "auto":
        return recipe
    model = data.get("model")
    path = model.get("path", "") if isinstance(model, dict) else ""
    if not path or not isinstance(path, str):
        return "benchmark"  # the built-in benchmark's own target model
    from ray_unlearn.models.io import looks_like_path

    if not looks_like_path(path):
        return "pretrained"  # a hub id
    config = Path(path).expanduser() / "config.json"
    try:
        fields = json.loads(config.read_text())
    except (OSError, ValueError):
        return "benchmark"  # no model there: loading it says so
    width = next((fields[k] for k in MODEL_WIDTH_KEYS if isinstance(fields.get(k), int)), 0)
    return "pretrained" if width >= PRETRAINED_WIDTH else "benchmark"


def dump_config(cfg: JobConfig, path: str | Path) -> None:
    """Write the complete config as YAML (loadable by `load_config`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
