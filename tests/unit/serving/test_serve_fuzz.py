"""Fuzzing the HTTP API in process: no request can hurt another (issue 9).

Hypothesis writes groups of 8 requests, valid and invalid (huge and negative seeds, out-of-range
numbers, NaN, odd stop lists, missing, extra and mistyped fields, lone surrogates, bodies that are
not JSON objects), and sends each group at once to the real FastAPI app of `ray_unlearn.serve`,
driven over ASGI without Ray: the `Gateway` class is instantiated directly (Serve's class-based view
asks `serve.get_replica_context()` for it, patched here), and `InProcessServer` stands in for the
`ModelServer` handle, decoding concurrent requests with the replica's continuous-batching `Scheduler`
(each joins the running batch as it arrives). Every response must be a 200 for a valid request and
a 4xx with OpenAI's error body for an invalid one; nothing may be a 5xx. The model is a randomly
initialised micro Llama (what it writes does not matter, only that every valid request gets it).
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_unlearn.serving.config import serve_config_from_dict
from ray_unlearn.serving.engine import Delta, GenerationRequest, LoadedModel
from ray_unlearn.serving.scheduler import Scheduler

GROUP = 8  # requests sent at once
GROUPS = 130  # >= 1,000 requests in all
LIMITS = {"max_body_bytes": 20_000, "max_prompt_tokens": 128, "max_tokens": 16, "default_max_tokens": 4,
          "max_prompts": 4, "max_messages": 4, "max_stop": 4, "max_stop_chars": 16}
MISSING = object()  # a field left out of the request


# ---------------------------------------------------------------- the app without Ray


class InProcessServer:
    """Stands in for the ModelServer handle: what `ModelServer.complete` and `.stream` do, with its `Scheduler`
    (continuous batching) and one loaded model, without Ray."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.loaded = LoadedModel(model, tokenizer)
        self.scheduler = Scheduler(max_running=GROUP, max_waiting=GROUP * LIMITS["max_prompts"])
        self.complete = SimpleNamespace(remote=self._complete)
        self.stream = SimpleNamespace(remote=self._stream)

    def options(self, **_: Any) -> "InProcessServer":
        return self

    async def _complete(self, request: GenerationRequest) -> Delta:
        return await self.scheduler.complete(self.loaded, request)

    def _stream(self, request: GenerationRequest):
        return self.scheduler.stream(self.loaded, request)


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised micro Llama and a byte-level BPE tokenizer (no chat template)."""
    from ray_unlearn.models.tiny import MODEL_SIZES, new_llama, train_tokenizer

    tokenizer = train_tokenizer(["Question: what is the capital of France?\nAnswer: Paris."] * 20, 300)
    return new_llama(MODEL_SIZES["micro"], tokenizer, seed=0).eval(), tokenizer


@pytest.fixture(scope="module")
def app(tiny):
    """(ASGI app, InProcessServer) of one Gateway serving model "tiny"."""
    import ray.serve

    import ray_unlearn.serve as serve_module

    gateway_cls = next(c for c in serve_module.Gateway.func_or_class.__mro__[1:] if c.__name__ == "Gateway")
    cfg = serve_config_from_dict({"models": {"tiny": "unused"}, "base_model": "tiny", "limits": LIMITS})
    server = InProcessServer(*tiny)
    gateway = gateway_cls(server, cfg, {"tiny": "unused"}, {}, "")
    gateway.tokenizers["tiny"] = tiny[1]
    patch = pytest.MonkeyPatch()
    patch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=gateway))
    yield serve_module.api, server
    patch.undo()


async def asgi_post(app: Any, path: str, body: bytes) -> tuple[int, bytes]:
    """POST `body` to the ASGI `app`: (status, response body). An exception the app raises after
    answering (Starlette re-raises a 500's) is kept as the answer. The client never disconnects."""
    sent = [{"type": "http.request", "body": body, "more_body": False}]
    status, chunks = [500], []

    async def receive() -> dict:
        if sent:
            return sent.pop()
        await asyncio.Event().wait()  # stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    try:
        await app(scope, receive, send)
    except Exception as e:  # noqa: BLE001
        return 500, f"{type(e).__name__}: {e}".encode()
    return status[0], b"".join(chunks)


# ---------------------------------------------------------------- requests, valid and not


def texts(max_size: int) -> st.SearchStrategy[str]:
    """Any text JSON can carry (no lone surrogates), at most `max_size` characters."""
    return st.text(st.characters(exclude_categories=["Cs"]), max_size=max_size)


# field -> (valid values, invalid values); MISSING leaves the field out
COMMON = {
    "model": (st.just("tiny"), st.sampled_from([MISSING, "", "nope", 7, None, ["tiny"]])),
    "seed": (st.one_of(st.just(MISSING), st.none(), st.integers(0, 2**64 - 1)),
             st.one_of(st.integers(-2**200, -1), st.integers(min_value=2**64, max_value=2**200),
                       st.sampled_from([1180591620717411303424, 1.5, 2.0, "7", "abc", True, [1]]))),
    "temperature": (st.one_of(st.just(MISSING), st.none(), st.floats(0, 2), st.integers(0, 2)),
                    st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=2.000001),
                              st.sampled_from([float("nan"), float("inf"), "0.5", True, [0.5]]))),
    "top_p": (st.one_of(st.just(MISSING), st.none(), st.floats(1e-6, 1), st.just(1)),
              st.one_of(st.floats(max_value=0), st.floats(min_value=1.000001),
                        st.sampled_from([float("nan"), float("-inf"), "1", False]))),
    "max_tokens": (st.one_of(st.just(MISSING), st.none(), st.integers(1, LIMITS["max_tokens"])),
                   st.one_of(st.integers(max_value=0), st.integers(min_value=LIMITS["max_tokens"] + 1),
                             st.sampled_from([10**30, 1.5, "4", True]))),
    "stop": (st.one_of(st.just(MISSING), st.none(), texts(16),
                       st.lists(texts(LIMITS["max_stop_chars"]), max_size=LIMITS["max_stop"])),
             st.one_of(st.lists(texts(4).filter(bool), min_size=LIMITS["max_stop"] + 1, max_size=8),
                       st.text(min_size=LIMITS["max_stop_chars"] + 1, max_size=40).map(lambda s: [s]),
                       st.sampled_from([["a", 1], [None], 5, {"a": 1}]))),
    "n": (st.sampled_from([MISSING, None, 1]), st.sampled_from([0, 2, -1, 1.0, "1"])),
    "logprobs": (st.sampled_from([MISSING, None, False, 0]), st.sampled_from([True, 3, [1]])),
    "presence_penalty": (st.sampled_from([MISSING, None, 0, 0.0]), st.sampled_from([0.5, -2, 3, "0", float("nan")])),
    "frequency_penalty": (st.sampled_from([MISSING, None, 0]), st.sampled_from([1, -2.5, "x"])),
    "stream": (st.sampled_from([MISSING, None, False, True]), st.sampled_from([[True], {"a": 1}])),
    "user": (st.one_of(st.just(MISSING), texts(8)), st.nothing()),  # extras are ignored
    "x_extra": (st.one_of(st.just(MISSING), st.integers(-2**70, 2**70), st.lists(texts(3), max_size=3)),
                st.nothing()),
}
COMPLETION = {
    **COMMON,
    "prompt": (st.one_of(texts(20), st.lists(texts(20), min_size=1, max_size=LIMITS["max_prompts"])),
               st.one_of(st.sampled_from([MISSING, [], None, 5, [1, 2], ["ok", 3]]),
                         st.lists(texts(3), min_size=LIMITS["max_prompts"] + 1, max_size=6),
                         st.just("long " * 200))),
    "echo": (st.sampled_from([MISSING, False]), st.just(True)),
    "best_of": (st.sampled_from([MISSING, None, 1]), st.sampled_from([2, 0.5])),
    "suffix": (st.sampled_from([MISSING, None, ""]), st.just("x")),
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant", "user"]), "content": texts(20)})
USER = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
    texts(20), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts(8)}), min_size=1, max_size=2))})
CHAT = {
    **COMMON,
    "messages": (st.tuples(st.lists(MESSAGE, max_size=2), USER).map(lambda t: t[0] + [t[1]]),
                 st.one_of(st.sampled_from([MISSING, [], None, "hi", [{"role": "robot", "content": "x"}],
                                            [{"role": "user", "content": 5}], [{"content": "x"}],
                                            [{"role": "system", "content": "no user"}]]),
                           st.lists(USER, min_size=LIMITS["max_messages"] + 1, max_size=6))),
    "max_completion_tokens": (st.one_of(st.just(MISSING), st.integers(1, LIMITS["max_tokens"])),
                              st.sampled_from([0, LIMITS["max_tokens"] + 1, 2**70, "2"])),
}
RAW_BODIES = [b"", b"{", b"null", b"[]", b'"text"', b"\xff\xfe", b"[" * 5000, b'{"model": "tiny", "prompt": NaN}',
              b'{"model": "tiny", "prompt": "\\ud800"}', b'{"model": "tiny", "prompt": "x", "seed": 1e999}',
              b'{"model": "tiny", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}", b"x" * 30_000]


@st.composite
def requests_(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """(path, body, valid): a valid request, one with 1-2 fields broken, or a raw body that is no request."""
    kind = draw(st.sampled_from(["completion", "chat", "raw"]))
    if kind == "raw":
        return "/v1/completions", draw(st.sampled_from(RAW_BODIES)), False
    fields = COMPLETION if kind == "completion" else CHAT
    body = {name: draw(valid) for name, (valid, _) in fields.items()}
    breakable = [name for name, (_, invalid) in fields.items() if not invalid.is_empty]
    broken = draw(st.one_of(st.just([]), st.lists(st.sampled_from(breakable), min_size=1, max_size=2, unique=True)))
    for name in broken:
        body[name] = draw(fields[name][1])
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    raw = json.dumps({k: v for k, v in body.items() if v is not MISSING}, allow_nan=True).encode()
    return path, raw, not broken


# ---------------------------------------------------------------- the property


def check(status: int, body: bytes, valid: bool, request: bytes) -> None:
    """A valid request gets a 200 (a stream without an error event); an invalid one a 4xx with OpenAI's body."""
    context = f"{status} {body[:300]!r} for {request[:300]!r}"
    assert status < 500, context
    if valid:
        assert status == 200, context
        assert b'"error"' not in body, context
        return
    assert 400 <= status < 500, context
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}, context


@pytest.mark.timeout(600)
def test_no_request_hurts_another(app, one_thread):
    api, server = app
    counts = {"sent": 0, "valid": 0}

    @settings(max_examples=GROUPS, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(requests_(), min_size=GROUP, max_size=GROUP))
    def group_of_eight(group: list[tuple[str, bytes, bool]]) -> None:
        async def send_all() -> list[tuple[int, bytes]]:
            sends = asyncio.gather(*(asgi_post(api, path, body) for path, body, _ in group))
            return await asyncio.wait_for(sends, timeout=60)

        for (status, body), (_, request, valid) in zip(asyncio.run(send_all()), group):
            check(status, body, valid, request)
        counts["sent"] += len(group)
        counts["valid"] += sum(valid for _, _, valid in group)

    with torch.no_grad():
        group_of_eight()
    assert counts["sent"] >= 1000 and counts["valid"] >= 200, counts
    stats = server.scheduler.stats()
    assert stats["largest"] > 1, "concurrent requests were never batched together"
    assert stats["rejected"] == 0 and stats["running"] == stats["waiting"] == 0, stats


# ---------------------------------------------------------------- overload


def test_overload_is_a_503_with_openai_body(app, one_thread):
    """Beyond the replica's rows and queue a request is a 503 `overloaded` (streamed: an error event), as is a
    full Serve queue in front of the replicas (BackPressureError from the handle)."""
    from ray.serve.exceptions import BackPressureError

    api, server = app
    saved = server.scheduler
    server.scheduler = Scheduler(max_running=1, max_waiting=1)
    body = lambda **kw: json.dumps({"model": "tiny", "prompt": "Question: what", "max_tokens": 16, "temperature": 0,
                                    **kw}).encode()
    try:
        async def burst():
            return await asyncio.gather(*(asgi_post(api, "/v1/completions", body()) for _ in range(4)),
                                        asgi_post(api, "/v1/completions", body(stream=True)))

        answers = asyncio.run(burst())
    finally:
        server.scheduler = saved
    statuses = [status for status, _ in answers[:4]]
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}, answers
    for status, raw in answers[:4]:
        if status == 503:
            err = json.loads(raw)["error"]
            assert (err["type"], err["code"]) == ("server_error", "overloaded") and "retry later" in err["message"]
    status, raw = answers[4]
    assert status == 200 and (b'"overloaded"' in raw or b'"error"' not in raw)

    async def full(request):
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64)

    patch = pytest.MonkeyPatch()
    patch.setattr(server.complete, "remote", full)
    try:
        status, raw = asyncio.run(asgi_post(api, "/v1/completions", body()))
    finally:
        patch.undo()
    err = json.loads(raw)["error"]
    assert status == 503 and err["code"] == "overloaded" and "max_queued_requests=64" in err["message"]
