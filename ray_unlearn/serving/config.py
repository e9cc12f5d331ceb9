"""Typed configuration of `ray-unlearn serve` (SERVE.yaml + dotted overrides). Ray-free.

The same machinery as the job config (`ray_unlearn.config`): complete YAML sections, every
field with a help string, unknown keys and wrong types rejected with a one-line error.
The model registry maps a model id to an HF model directory (e.g. a run's `<output_dir>/model`: any
number of full checkpoints) or to a built-in benchmark model, `builtin:<size>:target` /
`builtin:<size>:retain`; `adapters` maps more ids to LoRA adapter directories served on the base model.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ray_unlearn.config import (BenchmarkConfig, _choice, _f, _positive, chat_template_setting, from_dict, merge,
                                parse_overrides, read_yaml_mapping)
from ray_unlearn.data.collate import DEFAULT_PROMPT
from ray_unlearn.errors import UnlearnError

API_KEY_ENV = "RAY_UNLEARN_API_KEY"
BUILTIN_ROLES = ("target", "retain")
LOOPBACK_NAMES = ("localhost",)


@dataclass
class HttpConfig:
    host: str = _f("127.0.0.1", "Address the HTTP proxy binds; anything but loopback requires an API key.")
    port: int = _f(8000, "HTTP port.")
    route_prefix: str = _f("/", "Route prefix of the application (the API lives under it).")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UnlearnError(f"http.port: must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise UnlearnError(f"http.route_prefix: must start with '/', got {self.route_prefix!r}")


@dataclass
class AuthConfig:
    api_key: str = _f("", f"Bearer token clients must send; empty = read ${API_KEY_ENV}. "
                          "Required whenever http.host is not loopback.")
    require_on_loopback: bool = _f(False, "Require the key on loopback too (it is always required beyond it).")


@dataclass
class LimitsConfig:
    max_body_bytes: int = _f(1_000_000, "Largest request body accepted (413 beyond).")
    max_prompt_tokens: int = _f(512, "Longest prompt, in tokens, after chat-template rendering (400 beyond).")
    max_tokens: int = _f(256, "Largest max_tokens a request may ask for (400 beyond).")
    default_max_tokens: int = _f(64, "max_tokens of chat requests that give none (completions: OpenAI's 16).")
    max_prompts: int = _f(16, "Most prompts in one /v1/completions request.")
    max_messages: int = _f(64, "Most messages in one chat request.")
    max_stop: int = _f(4, "Most stop sequences per request (OpenAI allows 4).")
    max_stop_chars: int = _f(256, "Longest stop sequence, in characters (400 beyond).")
    max_verify_items: int = _f(256, "Most items one /v1/verify request scores (400 beyond).")
    max_item_tokens: int = _f(256, "Longest verify item (question + answer, or text), in tokens (400 beyond).")

    def __post_init__(self) -> None:
        for key in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_prompts",
                    "max_messages", "max_stop", "max_stop_chars", "max_verify_items", "max_item_tokens"):
            _positive(f"limits.{key}", getattr(self, key))
        if self.default_max_tokens > self.max_tokens:
            raise UnlearnError(f"limits.default_max_tokens ({self.default_max_tokens}) exceeds limits.max_tokens "
                               f"({self.max_tokens}); lower it")


@dataclass
class BatchingConfig:
    enabled: bool = _f(True, "Continuous batching: requests join the running decode batch between steps and "
                             "leave it when they finish; off = one request decodes at a time per replica.")
    max_batch_size: int = _f(8, "Most requests a replica decodes together (running rows, over all its models).")
    max_queued_requests: int = _f(64, "Most generation requests waiting for a row: in each replica, and in each "
                                      "gateway's Serve router when every replica holds max_ongoing_requests "
                                      "(Serve's max_queued_requests). One more is answered 503 (code overloaded).")
    batch_wait_timeout_s: float = _f(0.0, "When a replica decodes nothing, how long the first request to arrive "
                                          "waits for others to be prefilled with it (0 = start at once; a busy "
                                          "replica never waits: arrivals join at the next step).")

    def __post_init__(self) -> None:
        _positive("batching.max_batch_size", self.max_batch_size)
        _positive("batching.max_queued_requests", self.max_queued_requests)
        _positive("batching.batch_wait_timeout_s", self.batch_wait_timeout_s, allow_zero=True)

    @property
    def effective_batch_size(self) -> int:
        """The batch size actually used: 1 when batching is off."""
        return self.max_batch_size if self.enabled else 1


@dataclass
class AutoscalingConfig:
    enabled: bool = _f(False, "Autoscale the model deployment (then num_replicas is ignored).")
    min_replicas: int = _f(1, "Fewest model replicas.")
    max_replicas: int = _f(2, "Most model replicas.")
    target_ongoing_requests: float = _f(4.0, "Ongoing requests per replica the autoscaler aims at.")

    def __post_init__(self) -> None:
        _positive("deployment.autoscaling.min_replicas", self.min_replicas, allow_zero=True)
        _positive("deployment.autoscaling.max_replicas", self.max_replicas)
        _positive("deployment.autoscaling.target_ongoing_requests", self.target_ongoing_requests)
        if self.min_replicas > self.max_replicas:
            raise UnlearnError("deployment.autoscaling: min_replicas exceeds max_replicas")


@dataclass
class DeploymentConfig:
    num_replicas: int = _f(1, "Model-server replicas (when autoscaling is off).")
    num_cpus: float = _f(1.0, "CPUs reserved per model-server replica.")
    num_gpus: float = _f(0.0, "GPUs per model-server replica (models then run on cuda).")
    gateway_num_cpus: float = _f(0.1, "CPUs reserved per HTTP gateway (ingress) replica.")
    gateway_replicas: int = _f(1, "HTTP gateway replicas.")
    max_ongoing_requests: int = _f(32, "Requests one model replica accepts at a time (>= max_batch_size); "
                                       "generation requests beyond the running rows wait in its queue.")
    max_models_per_replica: int = _f(3, "Models one replica keeps loaded (LRU, @serve.multiplexed); >= 2, "
                                        "since /v1/verify needs the model and the base model. The base "
                                        "model with every adapter on it counts once.")
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig,
                                           metadata={"help": "Autoscaling of the model deployment."})

    def __post_init__(self) -> None:
        _positive("deployment.num_replicas", self.num_replicas)
        _positive("deployment.num_cpus", self.num_cpus, allow_zero=True)
        _positive("deployment.num_gpus", self.num_gpus, allow_zero=True)
        _positive("deployment.gateway_num_cpus", self.gateway_num_cpus, allow_zero=True)
        _positive("deployment.gateway_replicas", self.gateway_replicas)
        _positive("deployment.max_ongoing_requests", self.max_ongoing_requests)
        if self.max_models_per_replica < 2:
            raise UnlearnError("deployment.max_models_per_replica: must be >= 2 (a model and the base model)")


@dataclass
class VerifyConfig:
    es_threshold: float = _f(0.4, "An item is forgotten only if its extraction strength is <= this (calibrate: "
                                         "the ES a model never trained on such data reaches, e.g. holdout).")
    prob_ratio: float = _f(0.5, "... and its answer probability is <= prob_ratio x the base model's.")
    min_forgotten_fraction: float = _f(0.9, "The request's verdict is forgotten when at least this fraction "
                                            "of its items is forgotten.")
    mink_k: float = _f(0.4, "Membership score (mink): mean of the lowest k fraction of answer-token log-probs, "
                            "the EOS left out (the evaluation's min_k attack, negated).")
    batch_size: int = _f(32, "Items per forward pass.")

    def __post_init__(self) -> None:
        for key in ("es_threshold", "min_forgotten_fraction", "mink_k"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise UnlearnError(f"verify.{key}: must be in [0, 1], got {value}")
        _positive("verify.prob_ratio", self.prob_ratio)
        _positive("verify.batch_size", self.batch_size)
        if self.mink_k == 0:
            raise UnlearnError("verify.mink_k: must be > 0")


@dataclass
class ServeConfig:
    name: str = _f("ray_unlearn", "Serve application name.")
    models: dict[str, str] = _f({"base": "builtin:small:target"},
                                "Model registry: id -> HF model directory (safetensors) or "
                                "builtin:<size>:target|retain.")
    base_model: str = _f("base", "Id of the model before unlearning: /v1/verify compares against it.")
    adapters: dict[str, str] = _f({}, "LoRA adapters served as model ids on the base model: id -> adapter "
                                      "directory (peft format; a model.lora run writes <output_dir>/adapter). "
                                      "They share one copy of the base model per replica, and requests for "
                                      "different adapters (and the base) decode in one batch.")
    benchmarks: dict[str, str] = _f({}, "Benchmarks /v1/verify can read splits of: name -> directory of "
                                        "<split>.jsonl or builtin:<size>. Every builtin:<size> a model "
                                        "refers to is registered under that name too.")
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig,
                                       metadata={"help": "Seed and cache of builtin: models and benchmarks "
                                                         "(size is taken from each builtin:<size> reference)."})
    prompt_template: str = _f(DEFAULT_PROMPT, "Prompt around a question ({question}) for tokenizers without a chat "
                                              "template (or with chat_template false): chat requests (the last "
                                              "user message) and /v1/verify items.")
    chat_template: str | bool = _f("auto", "Chat requests and /v1/verify items through the tokenizer's chat "
                                           "template: auto (when it has one), true (every model's must have "
                                           "one), false (never: prompt_template).")
    system_prompt: str = _f("", "System message of chat-template prompts (added to chat requests without one); "
                                "empty = none (the template's default).")
    max_length: int = _f(128, "Verify items are truncated to this many tokens (prompt + answer).")
    dtype: str = _f("float32", "Parameter dtype: float32, bfloat16, float16.")
    trust_remote_code: bool = _f(False, "Allow custom model code from model directories (off unless set).")
    ray_address: str = _f("", "Ray cluster to join; empty = start or join a local one.")
    http: HttpConfig = field(default_factory=HttpConfig, metadata={"help": "HTTP binding."})
    auth: AuthConfig = field(default_factory=AuthConfig, metadata={"help": "API key."})
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata={"help": "Request caps."})
    batching: BatchingConfig = field(default_factory=BatchingConfig, metadata={"help": "Continuous batching."})
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig,
                                         metadata={"help": "Replicas and resources."})
    verify: VerifyConfig = field(default_factory=VerifyConfig, metadata={"help": "Verification verdict rule."})

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _positive("max_length", self.max_length)
        if "{question}" not in self.prompt_template:
            raise UnlearnError("prompt_template: must contain {question}")
        self.chat_template = chat_template_setting("chat_template", self.chat_template)
        if not self.models:
            raise UnlearnError("models: register at least one model, e.g. models.base=builtin:micro:target")
        for model_id, path in self.models.items():
            _check_model_ref(model_id, path)
        if self.base_model not in self.models:
            raise UnlearnError(f"base_model: {self.base_model!r} is not a registered model id "
                               f"(registered: {', '.join(self.models)})")
        for adapter_id, path in self.adapters.items():
            _check_id("adapters", adapter_id)
            if adapter_id in self.models:
                raise UnlearnError(f"adapters.{adapter_id}: the id is also a model id under models; give the "
                                   "adapter another id")
            if not path:
                raise UnlearnError(f"adapters.{adapter_id}: empty path; give a LoRA adapter directory "
                                   "(<output_dir>/adapter of a model.lora run)")
        for name, path in self.benchmarks.items():
            if not path:
                raise UnlearnError(f"benchmarks.{name}: empty path")
        if self.deployment.max_ongoing_requests < self.batching.effective_batch_size:
            raise UnlearnError("deployment.max_ongoing_requests must be >= batching.max_batch_size, "
                               "or the batch never fills")


def _check_id(section: str, model_id: str) -> None:
    """A model id is a plain name: non-empty, without spaces or '/'."""
    if not model_id or any(c.isspace() for c in model_id) or "/" in model_id:
        raise UnlearnError(f"{section}: id {model_id!r} must be non-empty, without spaces or '/'")


def _check_model_ref(model_id: str, path: str) -> None:
    """A model id is a plain name; its path is non-empty and a builtin reference is well formed."""
    _check_id("models", model_id)
    if not path:
        raise UnlearnError(f"models.{model_id}: empty path; give an HF model directory or builtin:<size>:target")
    if path.startswith("builtin:"):
        parse_builtin_model(model_id, path)


def parse_builtin_model(model_id: str, ref: str) -> tuple[str, str]:
    """`builtin:<size>:<role>` -> (size, role), or a one-line error naming the model id."""
    parts = ref.split(":")
    if len(parts) != 3 or parts[2] not in BUILTIN_ROLES:
        raise UnlearnError(f"models.{model_id}: {ref!r} must look like builtin:<size>:target or "
                           "builtin:<size>:retain")
    _choice(f"models.{model_id} size", parts[1], ("micro", "small", "medium"))
    return parts[1], parts[2]


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(cfg: ServeConfig, environ: dict[str, str] | None = None) -> str:
    """The API key in force ('' = none): config first, then $RAY_UNLEARN_API_KEY.

    A key in force is always required from clients. Raises when there is none but one is needed:
    http.host beyond loopback, or auth.require_on_loopback.
    """
    env = os.environ if environ is None else environ
    key = cfg.auth.api_key or env.get(API_KEY_ENV, "")
    if not key and not is_loopback(cfg.http.host):
        raise UnlearnError(f"http.host {cfg.http.host} is not loopback and no API key is set; set auth.api_key "
                           f"or ${API_KEY_ENV}, or bind http.host=127.0.0.1")
    if not key and cfg.auth.require_on_loopback:
        raise UnlearnError(f"auth.require_on_loopback is set but no API key is: set auth.api_key or ${API_KEY_ENV}")
    return key


def serve_config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> ServeConfig:
    """Build a ServeConfig from a mapping (a SERVE.yaml's content) plus dotted overrides.

    `models.x=path` adds or changes one id (of the file's registry, or of the default one).
    """
    data = dict(data or {})
    if data.get("models") is None:
        data["models"] = dict(ServeConfig.__dataclass_fields__["models"].default_factory())
    return from_dict(ServeConfig, merge(data, parse_overrides(overrides or [])))


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """Load a SERVE.yaml (or the defaults when `path` is None) and apply dotted overrides."""
    return serve_config_from_dict(read_yaml_mapping(path, "serve config"), overrides)


# ---------------------------------------------------------------- registry resolution


def _builtin(cfg: ServeConfig, size: str) -> Any:
    """The built-in benchmark of `size` (built on first use: micro ~1 min, small a few on 2 cores)."""
    from ray_unlearn.models.build import ensure_benchmark

    bench = BenchmarkConfig(size=size, seed=cfg.benchmark.seed, cache_dir=cfg.benchmark.cache_dir)
    return ensure_benchmark(bench, cfg.prompt_template)


def resolve_models(cfg: ServeConfig) -> dict[str, str]:
    """Model id -> local directory (or hub id); builtin references built if needed, local paths checked."""
    from ray_unlearn.models.io import _check_model_dir, looks_like_path

    out = {}
    for model_id, ref in cfg.models.items():
        if ref.startswith("builtin:"):
            size, role = parse_builtin_model(model_id, ref)
            built = _builtin(cfg, size)
            out[model_id] = str(built.target_dir if role == "target" else built.retain_dir)
        elif looks_like_path(ref):
            path = Path(ref).expanduser().resolve()
            _check_model_dir(path)
            out[model_id] = str(path)
        else:
            out[model_id] = ref  # a hub id, fetched by from_pretrained in the replica
    return out


def resolve_adapters(cfg: ServeConfig, models: dict[str, str] | None = None) -> dict[str, str]:
    """Adapter id -> absolute adapter directory, each checked (a one-line error otherwise): it exists and is
    a LoRA adapter (checked first: it needs no model), then its base model has the served base's
    architecture (`serving.adapters.check_adapter`). `models`: `resolve_models`'s result (resolved here when
    None)."""
    if not cfg.adapters:
        return {}
    from ray_unlearn.models.io import empty_model
    from ray_unlearn.serving.adapters import check_adapter, read_adapter_config

    paths = {adapter_id: Path(ref).expanduser().resolve() for adapter_id, ref in cfg.adapters.items()}
    for adapter_id, path in paths.items():
        read_adapter_config(adapter_id, path)
    base = (models if models is not None else resolve_models(cfg))[cfg.base_model]
    skeleton = empty_model(base, "float32", cfg.trust_remote_code)  # the meta device, built once for every adapter
    for adapter_id, path in paths.items():
        check_adapter(adapter_id, path, base, cfg.base_model, cfg.trust_remote_code, skeleton)
    return {adapter_id: str(path) for adapter_id, path in paths.items()}


def resolve_benchmarks(cfg: ServeConfig) -> dict[str, str]:
    """Benchmark name -> directory of <split>.jsonl: the `benchmarks` entries plus every builtin:<size>
    that a model refers to."""
    refs = dict(cfg.benchmarks)
    for model_id, ref in cfg.models.items():
        if ref.startswith("builtin:"):
            size = parse_builtin_model(model_id, ref)[0]
            refs.setdefault(f"builtin:{size}", f"builtin:{size}")
    out = {}
    for name, ref in refs.items():
        if ref.startswith("builtin:"):
            size = ref.split(":", 1)[1]
            _choice(f"benchmarks.{name}", size, ("micro", "small", "medium"))
            out[name] = str(_builtin(cfg, size).data_dir)
        else:
            path = Path(ref).expanduser().resolve()
            if not any(path.glob("*.jsonl")):
                raise UnlearnError(f"benchmarks.{name}: {path} holds no <split>.jsonl files")
            out[name] = str(path)
    return out
