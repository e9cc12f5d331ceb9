"""Request validation and response shapes of the HTTP API (OpenAI's), without a server."""

from __future__ import annotations

import json

import pytest

from ray_unlearn.serving.schemas import (APIError, ChatCompletionRequest, CompletionRequest, VerifyRequest,
                                         chat_chunk, completion_response, model_list, parse_json, sse, validate)


def test_error_body_is_openais_shape():
    err = APIError(404, "model 'x' does not exist", param="model", code="model_not_found")
    assert err.body() == {"error": {"message": "model 'x' does not exist", "type": "invalid_request_error",
                                    "param": "model", "code": "model_not_found"}}


def test_malformed_json_is_a_400():
    with pytest.raises(APIError) as e:
        parse_json(b"{not json")
    assert (e.value.status, e.value.code) == (400, "invalid_json")
    with pytest.raises(APIError):
        parse_json(b"\xff\xfe")
    assert parse_json(b'{"a": 1}') == {"a": 1}


@pytest.mark.parametrize("body, param", [
    ([1, 2], None),
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": []}, None),
    ({"model": "m", "prompt": "x", "n": 2}, None),
    ({"model": "m", "prompt": "x", "echo": True}, None),
    ({"model": "m", "prompt": "x", "seed": 1180591620717411303424}, "seed"),  # issue 9: beyond 64 bits
    ({"model": "m", "prompt": "x", "seed": 2**64}, "seed"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
    ({"model": "m", "prompt": "x", "seed": 1.5}, "seed"),
    ({"model": "m", "prompt": "x", "seed": "7"}, "seed"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 1.01}, "top_p"),
    ({"model": "m", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, None),
    ({"model": "m", "prompt": "x", "frequency_penalty": -1}, None),
    ({"model": "m", "prompt": "x", "logprobs": 3}, None),
    ({"model": "m", "prompt": "x", "stop": ["a", 1]}, "stop"),
])
def test_bad_completion_requests_are_400s(body, param):
    with pytest.raises(APIError) as e:
        validate(CompletionRequest, body)
    assert e.value.status == 400
    if param:
        assert e.value.param == param


def test_range_errors_name_the_field_and_the_accepted_range():
    with pytest.raises(APIError) as e:
        validate(CompletionRequest, {"model": "m", "prompt": "x", "seed": 2**70})
    assert e.value.message == f"seed: Input should be less than {2**64}; send an integer in [0, {2**64 - 1}]"
    with pytest.raises(APIError) as e:
        validate(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 3})
    assert e.value.message == "temperature: Input should be less than or equal to 2; send a number in [0, 2]"


def test_accepted_edges():
    req = validate(CompletionRequest, {"model": "m", "prompt": "x", "seed": 2**64 - 1, "temperature": 0,
                                       "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": 0})
    assert (req.seed, req.temperature, req.top_p) == (2**64 - 1, 0.0, 1.0)


@pytest.mark.parametrize("raw", [b'{"model": "m", "temperature": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}',
                                 b'{"prompt": "\\ud800"}', b"[" * 100_000, b'{"seed": 1' + b"0" * 5000 + b"}"])
def test_bodies_json_cannot_carry_are_400s(raw):
    with pytest.raises(APIError) as e:
        parse_json(raw)
    assert (e.value.status, e.value.code) == (400, "invalid_json")


def test_api_errors_pickle_whole():
    import pickle

    err = pickle.loads(pickle.dumps(APIError(404, "gone", param="model", code="model_not_found")))
    assert (err.status, err.body()) == (404, APIError(404, "gone", param="model", code="model_not_found").body())


def test_completion_request_fields():
    req = validate(CompletionRequest, {"model": "m", "prompt": ["a", "b"], "stop": "\n", "user": "ignored"})
    assert req.prompts() == ["a", "b"] and req.stop_list() == ["\n"] and req.stream is False
    assert validate(CompletionRequest, {"model": "m", "prompt": "a", "stop": ["x", ""]}).stop_list() == ["x"]


def test_chat_request_fields():
    req = validate(ChatCompletionRequest, {"model": "m", "max_completion_tokens": 5, "max_tokens": 9,
                                           "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert req.requested_max_tokens() == 5 and req.messages[0].text() == "hi"
    for bad in ({"model": "m", "messages": []}, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
                {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}):
        with pytest.raises(APIError):
            validate(ChatCompletionRequest, bad)


@pytest.mark.parametrize("body", [
    {"model": "m"},
    {"model": "m", "items": [{"question": "q", "answer": "a"}], "texts": ["t"]},
    {"model": "m", "benchmark": "builtin:micro"},
    {"model": "m", "items": []},
    {"model": "m", "texts": ["t"], "unknown": 1},
])
def test_verify_needs_exactly_one_source(body):
    with pytest.raises(APIError):
        validate(VerifyRequest, body)


def test_verify_sources():
    assert validate(VerifyRequest, {"model": "m", "benchmark": "b", "split": "forget10", "max_items": 3}).max_items == 3
    assert validate(VerifyRequest, {"model": "m", "items": [{"question": "q", "answer": "a", "index": 4}]}).items
    assert validate(VerifyRequest, {"model": "m", "texts": ["doc"]}).texts == ["doc"]


def test_response_shapes():
    body = completion_response("cmpl-1", "m", [("hi", "stop")], 3, 2)
    assert body["object"] == "text_completion" and body["choices"][0] == {
        "index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunk = chat_chunk("c-1", "m", {"content": "x"}, None)
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"content": "x"}
    assert model_list(["a"], 1)["data"] == [{"id": "a", "object": "model", "created": 1, "owned_by": "ray_unlearn"}]


def test_sse_framing():
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(sse({"a": 1})[len("data: "):]) == {"a": 1}
