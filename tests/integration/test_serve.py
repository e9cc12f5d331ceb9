"""The Serve application for real, over HTTP on 127.0.0.1: generation (streamed and not), the official
`openai` client, two multiplexed checkpoints, verification, API keys and every kind of bad request.

One application for the module: the micro benchmark's TARGET model as `base` and its RETAIN model
as `unlearned` (it never saw forget10: a perfectly unlearned stand-in), an API key required on
loopback, small caps so that each one is easy to exceed.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = pytest.mark.slow

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def broken_model(micro_bench, tmp_path_factory):
    """A registered checkpoint whose weights are corrupt: it passes the start-up checks, fails to load."""
    path = tmp_path_factory.mktemp("broken")
    for f in micro_bench.target_dir.iterdir():
        if f.suffix == ".json":
            (path / f.name).write_text(f.read_text())  # config and tokenizer
    (path / "model.safetensors").write_bytes(b"not safetensors")
    return str(path)


@pytest.fixture(scope="module")
def url(ray_session, micro_bench, broken_model):
    """Base URL of one Serve application (1 small replica of each deployment), shut down at the end."""
    from ray import serve

    from ray_unlearn.serve import start
    from ray_unlearn.serving.config import serve_config_from_dict

    cfg = serve_config_from_dict({
        "name": "test_serve",
        "models": {"base": "builtin:micro:target", "unlearned": "builtin:micro:retain", "broken": broken_model},
        "benchmark": {"cache_dir": str(micro_bench.root.parents[1])},
        "http": {"host": "127.0.0.1", "port": _free_port()},
        "auth": {"api_key": KEY, "require_on_loopback": True},
        "limits": {"max_body_bytes": 20_000, "max_prompt_tokens": 64, "max_tokens": 32, "default_max_tokens": 24,
                   "max_verify_items": 40, "max_prompts": 4},
        "batching": {"max_batch_size": 4, "max_queued_requests": 8},
        "deployment": {"num_cpus": 0.5, "gateway_num_cpus": 0.1, "max_ongoing_requests": 16},
    })
    base = start(cfg)
    assert base.startswith("http://127.0.0.1:")
    yield base
    serve.shutdown()


@pytest.fixture(scope="module")
def forget(micro_bench):
    return micro_bench.splits()["forget10"]


def post(url: str, path: str, body, headers=AUTH, **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json", **headers},
                         timeout=120, **kw)


def prompt(item: dict) -> str:
    return f"Question: {item['question']}\nAnswer:"


def complete(url: str, model: str, text: str, **kw) -> dict:
    r = post(url, "/v1/completions", {"model": model, "prompt": text, "temperature": 0, "max_tokens": 32, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: requests.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------- health, models, auth


def test_healthz_reports_readiness(url):
    body = requests.get(url + "/healthz", timeout=30).json()
    assert body["ready"] is True and body["models"] == ["base", "unlearned", "broken"] and body["base_model"] == "base"


def test_models_lists_every_registered_id(url):
    body = requests.get(url + "/v1/models", headers=AUTH, timeout=30).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["base", "unlearned", "broken"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(url, headers):
    assert_error(requests.get(url + "/v1/models", headers=headers, timeout=30), 401, "invalid_api_key")
    assert_error(post(url, "/v1/completions", {"model": "base", "prompt": "x"}, headers=headers), 401)


def test_right_key_is_200(url):
    assert requests.get(url + "/v1/models", headers=AUTH, timeout=30).status_code == 200


# ---------------------------------------------------------------- generation


def test_greedy_completion_reproduces_a_memorized_answer(url, forget):
    body = complete(url, "base", prompt(forget[0]))
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == "base"
    assert choice["text"].strip() == forget[0]["answer"] and choice["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_two_multiplexed_checkpoints_answer_differently(url, forget):
    """The target model recites forget10; the retain model (never trained on it) does not."""
    base = [complete(url, "base", prompt(it))["choices"][0]["text"].strip() for it in forget[:3]]
    unlearned = [complete(url, "unlearned", prompt(it))["choices"][0]["text"].strip() for it in forget[:3]]
    assert base == [it["answer"] for it in forget[:3]]
    assert all(u != b for u, b in zip(unlearned, base))


def test_stop_sequences_and_max_tokens(url, forget):
    answer = forget[0]["answer"]
    word = answer.split()[2]
    stopped = complete(url, "base", prompt(forget[0]), stop=[word])["choices"][0]
    assert stopped["finish_reason"] == "stop" and word not in stopped["text"]
    assert answer.startswith(stopped["text"].strip())
    short = complete(url, "base", prompt(forget[0]), max_tokens=2)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2


def test_several_prompts_in_one_request(url, forget):
    body = complete(url, "base", [prompt(it) for it in forget[:3]])
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"].strip() for c in body["choices"]] == [it["answer"] for it in forget[:3]]


def test_concurrent_requests_are_batched_without_changing_greedy_outputs(url, forget):
    items = forget[:8]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda it: complete(url, "base", prompt(it))["choices"][0]["text"].strip(), items))
    assert texts == [it["answer"] for it in items]
    batching = requests.get(url + "/healthz", timeout=30).json()["batching"]
    assert 1 < batching["largest"] <= 4  # rows decoded together, within max_batch_size
    assert batching["running"] == 0 and batching["rejected"] == 0


def test_overload_is_a_503_and_the_server_recovers(url):
    """4 rows run and 8 wait in the replica (and at most 8 more in Serve's queue): a burst of 40 requests that
    each decode 32 tokens ("Question:" makes the micro model ramble to max_tokens) gets 503s."""
    body = {"model": "base", "prompt": "Question:", "temperature": 0, "max_tokens": 32}
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: post(url, "/v1/completions", body), range(40)))
    codes = [r.status_code for r in answers]
    assert set(codes) == {200, 503} and codes.count(200) >= 12, codes
    err = assert_error(next(r for r in answers if r.status_code == 503), 503, "overloaded")
    assert "retry later" in err["message"]
    alone = post(url, "/v1/completions", body).json()["choices"][0]
    assert alone["finish_reason"] == "length"
    assert all(r.json()["choices"][0] == alone for r in answers if r.status_code == 200)
    assert requests.get(url + "/healthz", timeout=30).json()["batching"]["running"] == 0


def _sse_events(r: requests.Response) -> list:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len(b"data: "):].decode() for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_completion_equals_the_whole_one(url, forget):
    whole = complete(url, "base", prompt(forget[1]))["choices"][0]["text"]
    r = post(url, "/v1/completions", {"model": "base", "prompt": prompt(forget[1]), "temperature": 0, "max_tokens": 32,
                                      "stream": True, "stream_options": {"include_usage": True}}, stream=True)
    events = _sse_events(r)
    chunks = [e for e in events if e["choices"]]
    assert len(chunks) > 3 and "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] > 0 and events[-1]["choices"] == []


def test_streamed_completion_of_several_prompts(url, forget):
    prompts = [prompt(it) for it in forget[4:6]]
    events = _sse_events(post(url, "/v1/completions", {"model": "base", "prompt": prompts, "temperature": 0,
                                                       "max_tokens": 32, "stream": True}, stream=True))
    texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in (0, 1)]
    assert [t.strip() for t in texts] == [it["answer"] for it in forget[4:6]]


def test_chat_completion_streamed_and_not(url, forget):
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": forget[2]["question"]}]
    r = post(url, "/v1/chat/completions", {"model": "base", "messages": msgs, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    message = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and message["role"] == "assistant"
    assert message["content"].strip() == forget[2]["answer"]  # prompt template around the last user message
    events = _sse_events(post(url, "/v1/chat/completions", {"model": "base", "messages": msgs, "temperature": 0,
                                                            "stream": True}, stream=True))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_openai_client_works(url, forget):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", "unlearned", "broken"]
    chat = client.chat.completions.create(model="base", temperature=0, max_tokens=32,
                                          messages=[{"role": "user", "content": forget[3]["question"]}])
    assert chat.choices[0].message.content.strip() == forget[3]["answer"]
    text = client.completions.create(model="base", prompt=prompt(forget[3]), temperature=0, max_tokens=32)
    assert text.choices[0].text.strip() == forget[3]["answer"]
    stream = client.chat.completions.create(model="base", temperature=0, max_tokens=32, stream=True,
                                            messages=[{"role": "user", "content": forget[3]["question"]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == forget[3]["answer"]
    sampled = client.completions.create(model="unlearned", prompt=prompt(forget[3]), temperature=1.0, top_p=0.9,
                                        max_tokens=8, seed=1)
    assert sampled.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


# ---------------------------------------------------------------- verification


def verify(url: str, **body) -> dict:
    r = post(url, "/v1/verify", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_verify_forgotten_split(url):
    """On forget10 the retain model (never trained on it) is forgotten, the base model is not."""
    unlearned = verify(url, model="unlearned", benchmark="builtin:micro", split="forget10")
    base = verify(url, model="base", benchmark="builtin:micro", split="forget10")
    assert unlearned["verdict"] == "forgotten" and base["verdict"] == "not forgotten"
    agg = unlearned["aggregate"]
    assert agg["items"] == 27 and agg["model"]["es"] < 0.4 < agg["base"]["es"]
    assert agg["model"]["probability"] < 0.5 * agg["base"]["probability"]
    assert agg["model"]["mink"] < agg["base"]["mink"]  # less member-like
    item = unlearned["items"][0]
    assert set(item["model"]) == set(item["base"]) == {"es", "em", "probability", "mink", "loss"}
    assert item["question"] and item["forgotten"] is True
    assert base["aggregate"]["forgotten_items"] == 0
    assert "mink" in unlearned["rule"]["membership_score"]


def test_verify_retained_split_is_not_forgotten_by_either(url):
    for model in ("unlearned", "base"):
        report = verify(url, model=model, benchmark="builtin:micro", split="retain", max_items=20)
        assert report["verdict"] == "not forgotten" and report["aggregate"]["items"] == 20
        assert report["source"]["split_items"] == 243


def test_verify_items_and_texts(url, forget):
    items = [{"question": it["question"], "answer": it["answer"]} for it in forget[:4]]
    assert verify(url, model="unlearned", items=items)["verdict"] == "forgotten"
    texts = [f"{it['question']} {it['answer']}" for it in forget[:4]]
    report = verify(url, model="base", texts=texts)
    assert report["verdict"] == "not forgotten" and report["items"][0]["text"] == texts[0]


# ---------------------------------------------------------------- bad requests: 4xx, never 500


def test_oversized_body_is_413(url):
    assert_error(post(url, "/v1/completions", {"model": "base", "prompt": "x" * 30_000}), 413, "request_too_large")


def test_too_many_prompt_tokens_is_400(url):
    long_prompt = "What is 2 plus 3? " * 40
    assert_error(post(url, "/v1/completions", {"model": "base", "prompt": long_prompt}), 400,
                 "context_length_exceeded", "prompt")
    msgs = [{"role": "user", "content": long_prompt}]
    assert_error(post(url, "/v1/chat/completions", {"model": "base", "messages": msgs}), 400, "context_length_exceeded")


def test_max_tokens_over_the_cap_is_400(url):
    assert_error(post(url, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 33}), 400,
                 "max_tokens_too_large", "max_tokens")
    msgs = [{"role": "user", "content": "x"}]
    assert_error(post(url, "/v1/chat/completions", {"model": "base", "messages": msgs, "max_completion_tokens": 99}),
                 400, "max_tokens_too_large")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/verify"])
@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_400(url, path, body):
    assert_error(post(url, path, body), 400)


def test_a_bad_request_does_not_hurt_its_batch(url, forget):
    """Issue 9: a seed beyond 64 bits made every request batched with it fail with a 503."""
    bodies = [{"model": "base", "prompt": prompt(it), "temperature": 0, "max_tokens": 32} for it in forget[:7]]
    bad = {"model": "base", "prompt": "x", "temperature": 1.0, "seed": 1180591620717411303424}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(url, "/v1/completions", b), bodies + [bad]))
    assert_error(answers[-1], 400, "invalid_value", "seed")
    assert [r.status_code for r in answers[:-1]] == [200] * 7
    alone = [complete(url, "base", prompt(it))["choices"][0]["text"] for it in forget[:7]]
    assert [r.json()["choices"][0]["text"] for r in answers[:-1]] == alone


@pytest.mark.parametrize("body", [{"model": "base"}, {"model": "base", "prompt": "x", "temperature": 9},
                                  {"model": "base", "prompt": "x", "n": 3}, {"model": 5, "prompt": "x"},
                                  {"model": "base", "prompt": ["a"] * 5}])
def test_invalid_fields_are_400(url, body):
    assert_error(post(url, "/v1/completions", body), 400)


def test_unknown_model_is_404(url):
    assert_error(post(url, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "model_not_found", "model")
    assert_error(post(url, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                 404, "model_not_found")
    assert_error(post(url, "/v1/verify", {"model": "nope", "texts": ["x"]}), 404, "model_not_found")
    assert_error(requests.get(url + "/v1/models/nope", headers=AUTH, timeout=30), 404, "model_not_found")


def test_too_many_verify_items_is_400(url):
    assert_error(post(url, "/v1/verify", {"model": "base", "texts": ["a b c"] * 41}), 400, "too_many_items")
    assert_error(post(url, "/v1/verify", {"model": "base", "benchmark": "builtin:micro", "split": "retain"}), 400,
                 "too_many_items", "split")


def test_unknown_benchmark_or_split_is_404(url):
    assert_error(post(url, "/v1/verify", {"model": "base", "benchmark": "nope", "split": "forget10"}), 404)
    assert_error(post(url, "/v1/verify", {"model": "base", "benchmark": "builtin:micro", "split": "nope"}), 404)


def test_a_checkpoint_that_fails_to_load_is_503_not_500(url):
    err = assert_error(post(url, "/v1/completions", {"model": "broken", "prompt": "x"}), 503, "model_unavailable")
    assert "cannot load model" in err["message"]
    events = _sse_events(post(url, "/v1/completions", {"model": "broken", "prompt": "x", "stream": True}, stream=True))
    assert events[-1]["error"]["code"] == "model_unavailable"
    assert complete(url, "base", "x", max_tokens=2)["choices"]  # the server still serves


def test_unknown_route_and_method_are_openai_errors(url):
    assert_error(requests.get(url + "/v2/whatever", timeout=30), 404)
    assert_error(requests.get(url + "/v1/completions", headers=AUTH, timeout=30), 405)
