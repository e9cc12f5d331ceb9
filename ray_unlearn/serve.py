"""Ray Serve glue: the HTTP application that serves base and unlearned models (the only Serve importer).

Two deployments:

- `Gateway`, the FastAPI ingress: API key, request caps, JSON and schema checks, prompt
  rendering and token counting (it holds tokenizers, not models), server-sent events.
- `ModelServer`: holds the models. Each registered model id (the base model and any number of
  unlearned checkpoints) is loaded on first use by an `@serve.multiplexed` loader, LRU per
  replica. LoRA adapters (`adapters`) are model ids too, but not models of their own: every adapter is
  loaded by peft onto the base model's one copy in the replica (`serving.adapters.SharedBase`), the
  gateway routes their requests by the base model's id, and their rows decode in the base model's
  batch, each through its own adapter. Generation is continuously batched by the replica's own
  `serving.scheduler.Scheduler` (requests join the running batch of their model between decode
  steps and leave it when they finish; a background task decodes, off the event loop);
  `/v1/verify` scores items with the model (or adapter) and the base model.

Endpoints: GET /healthz (readiness, no key), GET /v1/models[/{id}], POST /v1/completions,
POST /v1/chat/completions (both with `stream` as server-sent events), POST /v1/verify. Chat
messages and /v1/verify items are encoded as in training and evaluation (`data.collate`): through
the tokenizer's chat template when it has one (`chat_template`, `system_prompt`), else
`prompt_template` around the last user message (see `serving.engine.render_chat`); generation
stops at EOS and at the chat template's end-of-turn token.

The gateway calls `ModelServer` through a handle with `.options(multiplexed_model_id=<model>)`,
so Serve routes each request to a replica that already holds its model. Every error is
OpenAI's JSON body {"error": {"message", "type", "param", "code"}} with a 4xx status for bad
requests. Overload is a 503 with code `overloaded`: a replica's queue is full
(`batching.max_queued_requests`), or Serve's own queue in front of the replicas is (the same bound).
"""


import asyncio
import contextlib
import signal
import socket
import sys
import time
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_unlearn.cli import quiet_libraries
from ray_unlearn.data.collate import prompt_format, stop_token_ids, uses_chat_template
from ray_unlearn.errors import UnlearnError
from ray_unlearn.serving.adapters import SharedBase
from ray_unlearn.serving.auth import require_key
from ray_unlearn.serving.config import (ServeConfig, is_loopback, load_serve_config, resolve_adapters,
                                        resolve_api_key, resolve_benchmarks, resolve_models, serve_config_from_dict)
from ray_unlearn.serving.engine import (Delta, GenerationRequest, LoadedModel, VerdictRule, audit_of,
                                        check_max_tokens, check_prompt_length, encode_rows, render_chat,
                                        render_completion, rule_description, sampling_params, score_items, verdict,
                                        verify_rows)
from ray_unlearn.serving.scheduler import Scheduler
from ray_unlearn.serving.schemas import (APIError, ChatCompletionRequest, CompletionRequest, VerifyRequest,
                                         chat_chunk, chat_response, completion_chunk, completion_response,
                                         model_list, new_id, parse_json, sse, usage_chunk, validate)

OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16

api = FastAPI(title="ray_unlearn", docs_url=None, redoc_url=None, openapi_url=None)


# ---------------------------------------------------------------- errors as OpenAI JSON


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    return JSONResponse(err.body(), status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(400, str(exc.errors()[:1]), code="invalid_value").body(), status_code=400)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    err = APIError(500, f"internal error ({type(exc).__name__}); see the replica's log", type="server_error")
    return JSONResponse(err.body(), status_code=500)


# NB: Serve serializes the deployment classes when they are decorated, so every module-level name
# their methods use must be defined above them.


def _root_message(exc: BaseException) -> str:
    """First line of the underlying error of a failed replica call (Ray wraps it)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body is {size} bytes, over the limit of {limit}", code="request_too_large")


def _replica_error(model: str, exc: Exception) -> APIError:
    """What a failed ModelServer call answers: a full Serve queue is 503 overloaded, anything else (e.g. a
    checkpoint that cannot load) 503 model_unavailable."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return APIError(503, f"the server is overloaded ({_root_message(exc)}); retry later", type="server_error",
                        code="overloaded")
    return APIError(503, f"model {model!r} is unavailable: {_root_message(exc)}", type="server_error",
                    code="model_unavailable")


def _stream_error(model: str, exc: Exception) -> dict[str, Any]:
    return _replica_error(model, exc).body()


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- model server


@serve.deployment
class ModelServer:
    """Holds the models (multiplexed by id), decodes generation requests continuously batched, scores
    verification items."""

    def __init__(self, cfg: ServeConfig, models: dict[str, str], adapters: dict[str, str] | None = None) -> None:
        quiet_libraries()
        self.cfg, self.models, self.adapters = cfg, models, adapters or {}
        gpu = cfg.deployment.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        torch.set_num_threads(max(1, int(cfg.deployment.num_cpus)))

        async def load_model_by_id(model_id: str) -> LoadedModel:
            return await asyncio.to_thread(self._load_sync, model_id)

        self._load = serve.multiplexed(max_num_models_per_replica=cfg.deployment.max_models_per_replica)(
            load_model_by_id)
        b = cfg.batching
        self.scheduler = Scheduler(b.effective_batch_size, b.max_queued_requests, b.batch_wait_timeout_s)

    def _load_sync(self, model_id: str) -> LoadedModel:
        """Load one registered model and its tokenizer (safetensors only; remote code only if configured); the
        base model with every adapter on it (`serving.adapters.load_adapters`)."""
        from ray_unlearn.models.io import load_model, load_tokenizer

        path = self.models[model_id]
        model = load_model(path, self.cfg.dtype, self.cfg.trust_remote_code)
        if model_id == self.cfg.base_model and self.adapters:
            from ray_unlearn.serving.adapters import load_adapters

            model = load_adapters(model, self.adapters)
        model = model.to(self.device).eval()
        tokenizer = load_tokenizer(path, self.cfg.trust_remote_code)
        return LoadedModel(model, tokenizer, stop_token_ids(tokenizer, prompt_format(self.cfg, prefix="")))

    # Both decode in the model's running batch (see `Scheduler`). A request that fails (alone, with its
    # batch's forward pass, or because the replica is overloaded) gets a Delta with `error`; a model that
    # cannot load raises. A cancelled call, or a closed stream, withdraws the request and frees its row.

    async def complete(self, request: GenerationRequest) -> Delta:
        """The whole completion of one request, or its error in `error`."""
        return await self.scheduler.complete(await self._load(request.model_id), request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The completion of one request as it is decoded, one Delta per step (the last one may carry `error`)."""
        loaded = await self._load(request.model_id)
        async with contextlib.aclosing(self.scheduler.stream(loaded, request)) as deltas:
            async for d in deltas:
                yield d

    async def verify(self, model_items: list[dict], base_items: list[dict], adapter: str | None = None) -> dict:
        """Per-item metrics of the request's model (its multiplexed id; through `adapter` when one is given: the
        id is then the base model's) and of the base model."""
        model_id, base_id = serve.get_multiplexed_model_id(), self.cfg.base_model
        scores = await self._score(model_id, model_items, adapter)
        base = scores if model_id == base_id and adapter is None else await self._score(base_id, base_items)
        return {"model": scores, "base": base}

    async def _score(self, model_id: str, items: list[dict], adapter: str | None = None) -> dict[str, list[float]]:
        loaded = await self._load(model_id)
        pad = loaded.tokenizer.pad_token_id or 0
        model = loaded.model
        if isinstance(model, SharedBase):
            model = model.bound(adapter)
        elif adapter is not None:
            raise APIError(404, f"adapter {adapter!r} is not loaded on model {model_id!r}", param="model",
                           code="model_not_found")
        return await asyncio.to_thread(score_items, model, pad, items, self.cfg.verify.batch_size,
                                       self.cfg.verify.mink_k)

    async def health(self) -> dict[str, Any]:
        """Device, batch size in force and this replica's batching counts (`Scheduler.stats`)."""
        return {"device": str(self.device), "max_batch_size": self.cfg.batching.effective_batch_size,
                "batching": self.scheduler.stats()}


# ---------------------------------------------------------------- gateway (HTTP ingress)


@serve.deployment
@serve.ingress(api)
class Gateway:
    """OpenAI-style HTTP API plus /v1/verify and /healthz, in front of ModelServer."""

    def __init__(self, server: DeploymentHandle, cfg: ServeConfig, models: dict[str, str],
                 benchmarks: dict[str, str], api_key: str, adapters: dict[str, str] | None = None) -> None:
        quiet_libraries()
        self.server, self.cfg, self.models, self.benchmarks = server, cfg, models, benchmarks
        self.adapters = adapters or {}
        self.parents = {adapter_id: cfg.base_model for adapter_id in self.adapters}
        self.api_key = api_key
        self.tokenizers: dict[str, Any] = {}
        self.handles: dict[tuple[str, bool], DeploymentHandle] = {}
        self.created = int(time.time())
        self.rule = VerdictRule(cfg.verify.es_threshold, cfg.verify.prob_ratio, cfg.verify.min_forgotten_fraction)
        self.prompt_format = prompt_format(cfg, prefix="")

    # -------------------------------------------------- request plumbing

    async def _body(self, request: Request) -> Any:
        """Authorize, then read the JSON body within the byte cap (413 beyond it)."""
        require_key(self.api_key, request.headers.get("authorization"))
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(len(body), limit)
        return parse_json(bytes(body))

    def _route(self, name: str) -> tuple[str, str | None]:
        """(the model that runs a request for `name`, the adapter on it or None): an adapter runs on the base
        model; a 404 for an unknown name."""
        if name in self.models:
            return name, None
        if name in self.adapters:
            return self.cfg.base_model, name
        raise APIError(404, f"model {name!r} does not exist; available: {', '.join(self._ids())}",
                       param="model", code="model_not_found")

    def _ids(self) -> list[str]:
        """Every servable id: the models, then the adapters."""
        return [*self.models, *self.adapters]

    def _tokenizer(self, model_id: str) -> Any:
        if model_id not in self.tokenizers:
            from ray_unlearn.models.io import load_tokenizer

            try:
                tokenizer = load_tokenizer(self.models[model_id], self.cfg.trust_remote_code)
                uses_chat_template(tokenizer, self.prompt_format)  # chat_template=true needs one
                self.tokenizers[model_id] = tokenizer
            except UnlearnError as e:
                raise APIError(503, f"model {model_id!r} is unavailable: {e}", type="server_error",
                               code="model_unavailable") from None
        return self.tokenizers[model_id]

    async def _remote(self, call: Any, model_id: str) -> Any:
        """Await a ModelServer call; its failures (e.g. a checkpoint that cannot load, a full queue) become a
        503, and a Delta with `error` (the request failed in the replica) raises that error."""
        try:
            result = await call
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray wraps replica errors in its own types
            raise _replica_error(model_id, e) from None
        if isinstance(result, Delta) and result.error is not None:
            raise result.error
        return result

    def _handle(self, model_id: str, stream: bool = False) -> DeploymentHandle:
        """The ModelServer handle routed by `model_id` (made once per id: `.options()` is not free)."""
        key = (model_id, stream)
        if key not in self.handles:
            self.handles[key] = self.server.options(multiplexed_model_id=model_id, stream=stream)
        return self.handles[key]

    async def _deltas(self, gens: list[GenerationRequest]) -> AsyncIterator[tuple[int, Delta]]:
        """(prompt index, Delta) of several streamed generations, as they arrive."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, g: GenerationRequest) -> None:
            try:
                async for d in self._handle(g.model_id, stream=True).stream.remote(g):
                    await queue.put((i, d))
            except Exception as e:  # noqa: BLE001
                await queue.put((i, e))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        finished = 0
        try:
            while finished < len(gens):
                i, d = await queue.get()
                if d is None:
                    finished += 1
                elif isinstance(d, Exception):
                    raise d
                elif d.error is not None:  # this request failed in the replica
                    raise d.error
                else:
                    yield i, d
        finally:
            for t in tasks:
                t.cancel()

    def _gen_params(self, req: Any, max_tokens: int | None, default: int) -> Any:
        lim = self.cfg.limits
        if req.max_tokens is not None:  # chat: checked even where max_completion_tokens wins
            check_max_tokens("max_tokens", req.max_tokens, lim.max_tokens)
        return sampling_params(max_tokens, default, lim.max_tokens, req.temperature, req.top_p, req.stop_list(),
                               lim.max_stop, lim.max_stop_chars, req.seed)

    # -------------------------------------------------- endpoints

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Readiness: the gateway is up and a model replica answers (no key needed)."""
        try:
            info = await asyncio.wait_for(self.server.health.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "ready": False, "error": _root_message(e)}, 503)
        return JSONResponse({"status": "ok", "ready": True, "models": self._ids(),
                             "base_model": self.cfg.base_model, **info})

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        require_key(self.api_key, request.headers.get("authorization"))
        return JSONResponse(model_list(self._ids(), self.created, self.parents))

    @api.get("/v1/models/{model}")
    async def get_model(self, model: str, request: Request) -> JSONResponse:
        require_key(self.api_key, request.headers.get("authorization"))
        self._route(model)
        return JSONResponse(model_list([model], self.created, self.parents)["data"][0])

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        req = validate(CompletionRequest, await self._body(request))
        model_id, adapter = self._route(req.model)
        prompts = req.prompts()
        if len(prompts) > self.cfg.limits.max_prompts:
            raise APIError(400, f"prompt has {len(prompts)} prompts, over the limit of "
                                f"{self.cfg.limits.max_prompts}", param="prompt", code="too_many_prompts")
        params = self._gen_params(req, req.max_tokens, OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS)
        tok = self._tokenizer(model_id)
        gens = []
        for i, prompt in enumerate(prompts):
            ids = render_completion(tok, prompt)
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            check_prompt_length(ids, self.cfg.limits.max_prompt_tokens, param)
            gens.append(GenerationRequest(model_id, tuple(ids), params, adapter))
        rid, n_prompt = new_id("cmpl"), sum(len(g.prompt_ids) for g in gens)
        if req.stream:
            return _event_stream(self._completion_events(rid, req, gens, n_prompt))
        results = await asyncio.gather(*(self._remote(self._handle(model_id).complete.remote(g), req.model)
                                         for g in gens))
        return JSONResponse(completion_response(rid, req.model, [(r.text, r.finish_reason) for r in results],
                                                n_prompt, sum(r.completion_tokens for r in results)))

    async def _completion_events(self, rid: str, req: CompletionRequest, gens: list[GenerationRequest],
                                 n_prompt: int) -> AsyncIterator[str]:
        done = [0] * len(gens)
        try:
            async for i, d in self._deltas(gens):
                done[i] = d.completion_tokens
                if d.text or d.finish_reason:
                    yield sse(completion_chunk(rid, req.model, i, d.text, d.finish_reason))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(usage_chunk(rid, req.model, "text_completion", n_prompt, sum(done)))
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield sse(_stream_error(req.model, e))
        yield sse("[DONE]")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        req = validate(ChatCompletionRequest, await self._body(request))
        model_id, adapter = self._route(req.model)
        lim = self.cfg.limits
        if len(req.messages) > lim.max_messages:
            raise APIError(400, f"messages has {len(req.messages)} messages, over the limit of {lim.max_messages}",
                           param="messages", code="too_many_messages")
        params = self._gen_params(req, req.requested_max_tokens(), lim.default_max_tokens)
        ids = render_chat(self._tokenizer(model_id), req.messages, self.prompt_format)
        check_prompt_length(ids, lim.max_prompt_tokens, "messages")
        gen, rid = GenerationRequest(model_id, tuple(ids), params, adapter), new_id("chatcmpl")
        if req.stream:
            return _event_stream(self._chat_events(rid, req, gen))
        r = await self._remote(self._handle(model_id).complete.remote(gen), req.model)
        return JSONResponse(chat_response(rid, req.model, r.text, r.finish_reason, len(ids), r.completion_tokens))

    async def _chat_events(self, rid: str, req: ChatCompletionRequest, gen: GenerationRequest) -> AsyncIterator[str]:
        n_done = 0
        try:
            yield sse(chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None))
            async for _, d in self._deltas([gen]):
                n_done = d.completion_tokens
                if d.text:
                    yield sse(chat_chunk(rid, req.model, {"content": d.text}, None))
                if d.finish_reason:
                    yield sse(chat_chunk(rid, req.model, {}, d.finish_reason))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(usage_chunk(rid, req.model, "chat.completion.chunk", len(gen.prompt_ids), n_done))
        except Exception as e:  # noqa: BLE001
            yield sse(_stream_error(req.model, e))
        yield sse("[DONE]")

    @api.post("/v1/verify")
    async def verify(self, request: Request) -> JSONResponse:
        """Score items with the model and the base model; verdict forgotten / not forgotten (see engine). With
        `audit: true`, the record of the run that wrote the model, its hashes re-checked (engine.audit_of)."""
        req = validate(VerifyRequest, await self._body(request))
        (model_id, adapter), base_id = self._route(req.model), self.cfg.base_model
        body: dict[str, Any] = {"object": "verification", "model": req.model}
        if req.audit:  # re-hashing reads every weight file: off the event loop
            body["audit"] = await asyncio.to_thread(
                audit_of, req.model, *((self.adapters[adapter], "output_adapter") if adapter else
                                       (self.models[model_id], "output_model")))
        if not req.scores():
            return JSONResponse(body)
        rows, source = verify_rows(req, self.benchmarks, self.cfg.limits.max_verify_items)
        model_items, base_items = self._encode_rows(model_id, rows), self._encode_rows(base_id, rows)
        scores = await self._remote(self._handle(model_id).verify.remote(model_items, base_items, adapter=adapter),
                                    req.model)
        report = verdict(scores["model"], scores["base"], self.rule, labels=rows)
        return JSONResponse({**body, "base_model": base_id, "source": source,
                             "rule": rule_description(self.rule, self.cfg.verify.mink_k), **report})

    def _encode_rows(self, model_id: str, rows: list[dict[str, str]]) -> list[dict[str, list[int]]]:
        c = self.cfg
        return encode_rows(self._tokenizer(model_id), rows, c.max_length, self.prompt_format,
                           c.limits.max_item_tokens)


# ---------------------------------------------------------------- building and running


def build_app(cfg: ServeConfig, api_key: str | None = None) -> Any:
    """The Serve application for `cfg` (models and benchmarks resolved here; builtin ones built if needed).

    `api_key` None = resolve it from the config / $RAY_UNLEARN_API_KEY (raising when the host is
    not loopback and there is none).
    """
    key = resolve_api_key(cfg) if api_key is None else api_key
    models, benchmarks = resolve_models(cfg), resolve_benchmarks(cfg)
    adapters = resolve_adapters(cfg, models)
    d = cfg.deployment
    scaling: dict[str, Any] = {"num_replicas": d.num_replicas}
    if d.autoscaling.enabled:
        scaling = {"autoscaling_config": {"min_replicas": d.autoscaling.min_replicas,
                                          "max_replicas": d.autoscaling.max_replicas,
                                          "target_ongoing_requests": d.autoscaling.target_ongoing_requests}}
    server = ModelServer.options(max_ongoing_requests=d.max_ongoing_requests,
                                 max_queued_requests=cfg.batching.max_queued_requests,
                                 ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
                                 **scaling).bind(cfg, models, adapters)
    return Gateway.options(num_replicas=d.gateway_replicas, max_ongoing_requests=max(100, 4 * d.max_ongoing_requests),
                           ray_actor_options={"num_cpus": d.gateway_num_cpus}).bind(
        server, cfg, models, benchmarks, key, adapters)


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / `serve deploy` (import_path ray_unlearn.serve:app_builder).

    `args` is a SERVE.yaml's content inline (plus optional `overrides: [key=value, ...]`). Its
    http.host must match the deploy file's http_options.host: it decides whether a key is required.
    """
    args = dict(args or {})
    overrides = args.pop("overrides", []) or []
    return build_app(serve_config_from_dict(args, list(overrides)))


def url_of(cfg: ServeConfig) -> str:
    """Base URL of the running application."""
    host = cfg.http.host if ":" not in cfg.http.host else f"[{cfg.http.host}]"
    return f"http://{host}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}"


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UnlearnError(f"cannot bind {host}:{port} ({e.strerror}); choose another port with "
                               "http.port=... or stop what uses it") from None


def start(cfg: ServeConfig, api_key: str | None = None) -> str:
    """Start Serve (HTTP on cfg.http) and deploy the application; returns its base URL. Ray must be up."""
    app = build_app(cfg, api_key)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(app, name=cfg.name, route_prefix=cfg.http.route_prefix, blocking=False)
    return url_of(cfg)


def run_serve(job: str | None, overrides: list[str]) -> int:
    """`ray-unlearn serve [SERVE.yaml] [key=value ...]`: deploy, print the URL, block until Ctrl-C."""
    import ray

    cfg = load_serve_config(job, overrides)
    key = resolve_api_key(cfg)  # refuse to start before anything runs
    _check_port_free(cfg.http.host, cfg.http.port)
    resolve_adapters(cfg)  # a bad adapter too (checked again, cheaply, when the application is built)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=cfg.ray_address or None, configure_logging=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        base = start(cfg, key)
        auth = "API key required" if key else "no API key (loopback only)"
        print(f"serving {', '.join([*cfg.models, *cfg.adapters])} (base: {cfg.base_model}) at {base}/v1 - {auth}; "
              f"health: {base}/healthz; Ctrl-C to stop", flush=True)
        if not is_loopback(cfg.http.host):
            print(f"warning: bound to {cfg.http.host}, reachable beyond this machine", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        serve.shutdown()
        if own_ray:
            ray.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
