"""LoRA adapters as model ids, for real: Serve over HTTP on 127.0.0.1, every endpoint asked for the base model
and for adapters on it.

The adapter `lora` is what a real `ray-unlearn run ... model.lora.r=4` wrote (a few steps of NPO on the micro
target), served beside that run's merged model as the full checkpoint `merged`: the two compute the same
function, so every answer of `lora` must equal `merged`'s (generation, streaming, chat, verification), while
`lora` shares the base's weights in the replica. `noisy` is a second adapter on the same base, made with peft
with random B weights (so that it answers differently from the base), so that rows of the base and of two
adapters decode in the same batches.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.test_serve import _free_port, _sse_events, assert_error, post, prompt

pytestmark = pytest.mark.slow

AUTH = {}  # loopback without a key


@pytest.fixture(scope="module")
def lora_run(ray_session, micro_bench, bench_cache, tmp_path_factory):
    """A real LoRA unlearning run on micro: <out>/adapter (peft), <out>/model (merged), <out>/audit.json."""
    from ray_unlearn.cli import main

    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(["run", "benchmark.size=micro", f"benchmark.cache_dir={bench_cache}", "ray.num_workers=0",
                 "model.lora.r=4", "train.max_steps=4", "optim.lr=1e-2", "eval.enabled=false",
                 f"output_dir={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def noisy_adapter(micro_bench, tmp_path_factory):
    """An adapter of the micro target with random (nonzero) A and B: it answers unlike the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(micro_bench.target_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = tmp_path_factory.mktemp("noisy") / "adapter"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def url(ray_session, micro_bench, lora_run, noisy_adapter):
    from ray import serve

    from ray_unlearn.serve import start
    from ray_unlearn.serving.config import serve_config_from_dict

    cfg = serve_config_from_dict({
        "name": "test_serve_adapters",
        "models": {"base": "builtin:micro:target", "merged": str(lora_run / "model")},
        "adapters": {"lora": str(lora_run / "adapter"), "noisy": noisy_adapter},
        "benchmark": {"cache_dir": str(micro_bench.root.parents[1])},
        "http": {"host": "127.0.0.1", "port": _free_port()},
        "limits": {"max_tokens": 32, "default_max_tokens": 32, "max_verify_items": 40},
        "batching": {"max_batch_size": 6, "max_queued_requests": 16, "batch_wait_timeout_s": 0.1},
        "deployment": {"num_cpus": 0.5, "gateway_num_cpus": 0.1, "max_ongoing_requests": 16},
    })
    base = start(cfg)
    yield base
    serve.shutdown()


@pytest.fixture(scope="module")
def forget(micro_bench):
    return micro_bench.splits()["forget10"]


def complete(url: str, model: str, text, **kw) -> dict:
    r = post(url, "/v1/completions", {"model": model, "prompt": text, "temperature": 0, "max_tokens": 32, **kw},
             headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def text_of(url: str, model: str, item: dict) -> str:
    return complete(url, model, prompt(item))["choices"][0]["text"]


def test_models_lists_the_adapters_with_their_parent(url):
    body = requests.get(url + "/v1/models", timeout=30).json()
    assert [(m["id"], m.get("parent")) for m in body["data"]] == [
        ("base", None), ("merged", None), ("lora", "base"), ("noisy", "base")]
    one = requests.get(url + "/v1/models/lora", timeout=30).json()
    assert one["id"] == "lora" and one["parent"] == "base" and one["object"] == "model"
    assert requests.get(url + "/healthz", timeout=30).json()["models"] == ["base", "merged", "lora", "noisy"]


def test_an_adapter_answers_as_its_merged_model(url, forget):
    """Greedy completions of the adapter equal those of the run's merged model (the same function); the noisy
    adapter's differ from the base's."""
    items = forget[:4]
    lora = [text_of(url, "lora", it) for it in items]
    assert lora == [text_of(url, "merged", it) for it in items]
    base = [text_of(url, "base", it) for it in items]
    assert [b.strip() for b in base] == [it["answer"] for it in items]
    assert [text_of(url, "noisy", it) for it in items] != base


def test_a_mixed_batch_gives_each_request_its_own_model(url, forget):
    """Concurrent requests for the base and both adapters decode together on the one shared base; each answer
    is what its model gives alone."""
    jobs = [(model, it) for it in forget[4:8] for model in ("base", "lora", "noisy")]
    alone = [text_of(url, model, it) for model, it in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: text_of(url, *job), jobs))
    assert together == alone
    batching = requests.get(url + "/healthz", timeout=30).json()["batching"]  # the tests before sent one at a time
    assert batching["largest"] >= 3 and batching["running"] == 0  # rows of several adapters in one step


def test_streamed_completion_and_chat_of_an_adapter(url, forget):
    item = forget[8]
    whole = text_of(url, "lora", item)
    events = _sse_events(post(url, "/v1/completions", {"model": "lora", "prompt": prompt(item), "temperature": 0,
                                                       "max_tokens": 32, "stream": True}, headers=AUTH, stream=True))
    assert "".join(e["choices"][0]["text"] for e in events) == whole and events[0]["model"] == "lora"
    msgs = [{"role": "user", "content": item["question"]}]
    chats = {}
    for model in ("lora", "merged", "noisy"):
        r = post(url, "/v1/chat/completions", {"model": model, "messages": msgs, "temperature": 0}, headers=AUTH)
        assert r.status_code == 200, r.text
        chats[model] = r.json()["choices"][0]["message"]["content"]
    assert chats["lora"] == chats["merged"] != chats["noisy"]
    events = _sse_events(post(url, "/v1/chat/completions", {"model": "lora", "messages": msgs, "temperature": 0,
                                                            "stream": True}, headers=AUTH, stream=True))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == chats["lora"]


def test_the_openai_client_with_an_adapter(url, forget):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", "merged", "lora", "noisy"]
    text = client.completions.create(model="lora", prompt=prompt(forget[9]), temperature=0, max_tokens=32)
    assert text.choices[0].text == text_of(url, "merged", forget[9])


def verify(url: str, **body) -> dict:
    r = post(url, "/v1/verify", body, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_verify_an_adapter_against_the_base(url):
    lora = verify(url, model="lora", benchmark="builtin:micro", split="forget10")
    merged = verify(url, model="merged", benchmark="builtin:micro", split="forget10")
    base = verify(url, model="base", benchmark="builtin:micro", split="forget10")
    assert lora["base_model"] == "base" and lora["aggregate"]["items"] == 27
    for metric in ("es", "probability", "loss", "mink"):
        assert lora["aggregate"]["model"][metric] == pytest.approx(merged["aggregate"]["model"][metric], abs=1e-4)
        assert lora["aggregate"]["base"][metric] == pytest.approx(base["aggregate"]["model"][metric], abs=1e-6)
    assert [i["forgotten"] for i in lora["items"]] == [i["forgotten"] for i in merged["items"]]
    noisy = verify(url, model="noisy", benchmark="builtin:micro", split="forget10", max_items=5)
    assert noisy["aggregate"]["model"]["loss"] > noisy["aggregate"]["base"]["loss"]


def test_verify_audit_of_an_adapter(url, lora_run):
    """The run's audit record holds the adapter's hashes (output_adapter): re-checked for the adapter's id."""
    report = verify(url, model="lora", audit=True)
    assert report["audit"]["ok"] is True and report["audit"]["record"]["output_adapter"]["path"] == "adapter"
    assert "adapter files" in report["audit"]["check"]
    assert verify(url, model="merged", audit=True)["audit"]["ok"] is True
    err = assert_error(post(url, "/v1/verify", {"model": "noisy", "audit": True}, headers=AUTH), 404,
                       "audit_not_found")
    assert "no audit record" in err["message"]


def test_unknown_model_lists_adapters_too(url):
    err = assert_error(post(url, "/v1/completions", {"model": "nope", "prompt": "x"}, headers=AUTH), 404,
                       "model_not_found")
    assert "base, merged, lora, noisy" in err["message"]
    assert_error(requests.get(url + "/v1/models/nope", timeout=30), 404, "model_not_found")
