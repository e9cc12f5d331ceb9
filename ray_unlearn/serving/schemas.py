"""Request and response models of the HTTP API (OpenAI's shapes), and its error type. Ray-free.

Requests follow OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`; unknown
request fields are ignored (as clients send extras such as `user`), fields this server cannot
honour (`n` > 1, `logprobs`, `echo`, `best_of` > 1, tools, non-zero penalties) are 400s rather
than silently dropped. Every numeric field is checked here against the range the engine accepts
(`ACCEPTED`), so that no request reaches a batch with a value that fails there; numbers must be
JSON numbers (no "0.5" strings, no booleans, no NaN or Infinity). Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}.
`/v1/verify` is this project's own endpoint (see `VerifyRequest`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes [-2**63, 2**64); negative seeds alias 2**64 + seed

ACCEPTED = {  # field -> the range the engine accepts, as an error message states it
    "seed": f"an integer in [0, {SEED_LIMIT - 1}]",
    "temperature": "a number in [0, 2]",
    "top_p": "a number in (0, 1]",
    "max_tokens": "an integer >= 1 (and at most the server's limits.max_tokens)",
    "max_completion_tokens": "an integer >= 1 (and at most the server's limits.max_tokens)",
    "n": "1",
    "presence_penalty": "0 (penalties are not supported)",
    "frequency_penalty": "0 (penalties are not supported)",
    "stop": "a string or a list of strings",
    "prompt": "a string or a non-empty list of strings",
    "messages": "a non-empty list of {role, content} messages",
}

StrictInt = Annotated[int, Strict()]  # a JSON integer: no strings, booleans or floats
StrictFloat = Annotated[float, Strict()]  # a JSON number: no strings or booleans


class APIError(Exception):
    """An HTTP error with OpenAI's JSON body; `status` is the HTTP status code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """{"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self) -> tuple:
        """Pickle with every field (the default would call __init__ with the message alone)."""
        return APIError, (self.status, self.message, self.type, self.param, self.code)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """Decode a request body, or a 400 naming the JSON problem (NaN, Infinity and lone UTF-16
    surrogates such as "\\ud800", which no tokenizer encodes, are problems too)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # raises on lone surrogates
        return data
    except (ValueError, UnicodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e}); send a JSON object",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply; send a flat JSON object",
                       code="invalid_json") from None


def _is_union_tag(loc: int | str) -> bool:
    """Whether a pydantic error location names a union member's type ("str", "list[str]"), not a field."""
    return isinstance(loc, str) and (loc in ("str", "int", "float", "bool") or "[" in loc)


def validate(model: type[BaseModel], data: Any) -> Any:
    """`model.model_validate(data)`, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or None
        accepted = ACCEPTED.get(str(err["loc"][0])) if err["loc"] else None
        hint = f"; send {accepted}" if accepted else ""
        raise APIError(400, f"{param or 'body'}: {err['msg']}{hint}", param=param, code="invalid_value") from None


# ---------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationParams(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT)
    presence_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    logprobs: Any = None

    @model_validator(mode="after")
    def _supported(self) -> "GenerationParams":
        if self.n not in (None, 1):
            raise ValueError("n > 1 is not supported; send one request per completion")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; send 0 or leave them out")
        return self

    def stop_list(self) -> list[str]:
        """`stop` as a list without empty strings."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(GenerationParams):
    prompt: str | list[str]
    echo: bool | None = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: give at least one prompt")
        if self.echo or self.best_of not in (None, 1) or self.suffix:
            raise ValueError("echo, best_of > 1 and suffix are not supported")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _chat(self) -> "ChatCompletionRequest":
        if self.tools:
            raise ValueError("tools are not supported")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class VerifyQA(BaseModel):
    model_config = ConfigDict(extra="ignore")  # TOFU rows carry more fields

    question: str
    answer: str


class VerifyRequest(BaseModel):
    """Score `items` (question/answer pairs), `texts` (raw documents), or `split` of `benchmark`; with `audit`,
    also (or only) return the audit record of the run that wrote the model, its hashes re-checked.

    Exactly one source, or none with `audit`. `max_items` keeps the first N items of a benchmark split.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    items: list[VerifyQA] | None = None
    texts: list[str] | None = None
    benchmark: str | None = None
    split: str | None = None
    max_items: int | None = Field(None, ge=1)
    audit: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "VerifyRequest":
        sources = [self.items is not None, self.texts is not None, self.benchmark is not None]
        if sum(sources) > 1 or (sum(sources) == 0 and not self.audit):
            raise ValueError("give exactly one of items, texts, or benchmark + split (or audit: true alone)")
        if (self.benchmark is None) != (self.split is None):
            raise ValueError("benchmark and split go together")
        if (self.items is not None and not self.items) or (self.texts is not None and not self.texts):
            raise ValueError("items/texts: give at least one")
        return self

    def scores(self) -> bool:
        """The request names items to score (else it asks for the audit record only)."""
        return self.items is not None or self.texts is not None or self.benchmark is not None


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int,
                        completion_tokens: int) -> dict[str, Any]:
    """OpenAI text_completion; `texts` = [(text, finish_reason)] in prompt order."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                        for i, (t, f) in enumerate(texts)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    """OpenAI chat.completion with one assistant choice."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    """One streamed text_completion event."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    """One streamed chat.completion.chunk event."""
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The final streamed event when stream_options.include_usage is set: no choices, the usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends a stream)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def model_list(ids: list[str], created: int, parents: dict[str, str] | None = None) -> dict[str, Any]:
    """OpenAI's /v1/models body; an id in `parents` (a LoRA adapter -> the model id it runs on) has a `parent`
    field, as vLLM lists its LoRA adapters."""
    parents = parents or {}
    return {"object": "list",
            "data": [{"id": i, "object": "model", "created": created, "owned_by": "ray_unlearn",
                      **({"parent": parents[i]} if i in parents else {})} for i in ids]}
