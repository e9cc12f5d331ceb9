"""LoRA adapters as model ids on one shared base (serving.adapters), checked against each model served alone.

A tiny random-init Llama base (the char vocabulary of `stubs`) and adapters made with peft, their B weights
drawn nonzero so that each adapter computes something else than the base. In a mixed batch every row must
get what its own model gives alone: the base rows the base's logits and tokens, an adapter's rows those of
`PeftModel.from_pretrained(base, adapter)` with that adapter only.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ray_unlearn.errors import UnlearnError
from ray_unlearn.serving.adapters import SharedBase, check_adapter, load_adapters
from ray_unlearn.serving.engine import (DecodeBatch, Delta, GenerationRequest, LoadedModel, SamplingParams, generate,
                                        score_items)
from ray_unlearn.serving.scheduler import Scheduler
from tests.unit.serving.stubs import VOCAB, CharTokenizer

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama_config(**sizes):
    from transformers import LlamaConfig

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(VOCAB))
    shape.update(sizes)
    return LlamaConfig(max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=None, **shape)


def _write_base(path: Path, seed: int = 0, **sizes) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(_llama_config(**sizes)).save_pretrained(path)
    return path


def _write_adapter(base_dir: Path, path: Path, seed: int, r: int = 4) -> Path:
    """An adapter (peft's save_pretrained) for the base at `base_dir`, with random nonzero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = _write_base(root / "base")
    return {"root": root, "base": base, "a": _write_adapter(base, root / "a", seed=1),
            "b": _write_adapter(base, root / "b", seed=2)}


def _base(dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()


def _alone(dirs, name):
    """The model of `name` served alone: the base, or the base with that one adapter (peft's usual way)."""
    from peft import PeftModel

    return _base(dirs) if name is None else PeftModel.from_pretrained(_base(dirs), str(dirs[name])).eval()


@pytest.fixture(scope="module")
def shared(dirs):
    return load_adapters(_base(dirs), {"a": str(dirs["a"]), "b.v2": str(dirs["b"])})


IDS = torch.tensor([[1, 3, 4, 5, 6, 7], [1, 8, 9, 10, 3, 4], [1, 5, 5, 6, 11, 12], [1, 12, 11, 10, 9, 8]])
ROWS = [None, "a", "b.v2", "a"]
FILES = {None: None, "a": "a", "b.v2": "b"}  # adapter id -> its directory's key in `dirs`


@torch.no_grad()
def _logits(model, ids, **kw):
    return model(input_ids=ids, **kw).logits


# ---------------------------------------------------------------- one forward pass


def test_a_mixed_batch_gives_each_row_its_own_model(dirs, shared):
    mixed = _logits(shared, IDS, adapters=ROWS)
    for i, adapter in enumerate(ROWS):
        alone = _logits(_alone(dirs, FILES[adapter]), IDS[i:i + 1])[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
    base = _logits(_base(dirs), IDS)
    assert (mixed[1] - base[1]).abs().max() > 0.1 and (mixed[2] - base[2]).abs().max() > 0.1  # adapters matter


def test_an_adapter_row_is_the_merged_model(dirs, shared):
    """Hand-checkable: W + (alpha / r) B A in every adapted layer, what merge_and_unload computes."""
    merged = _base(dirs)
    adapter = load_adapters(_base(dirs), {"a": str(dirs["a"])}).peft
    weights = {k: v for k, v in adapter.state_dict().items()}
    with torch.no_grad():
        for name, module in merged.named_modules():
            key = f"base_model.model.{name}.lora_A.adapter_0.weight"
            if key in weights:
                a, b = weights[key], weights[key.replace("lora_A", "lora_B")]
                module.weight += (8 / 4) * b @ a
    torch.testing.assert_close(_logits(shared, IDS, adapters=["a"] * 4), _logits(merged, IDS), atol=1e-5, rtol=0)


def test_no_adapter_names_means_the_base_not_the_active_adapter(dirs, shared):
    torch.testing.assert_close(_logits(shared, IDS), _logits(_base(dirs), IDS), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(shared.bound(None), IDS), _logits(_base(dirs), IDS), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(shared.bound("a"), IDS), _logits(_alone(dirs, "a"), IDS), atol=1e-5, rtol=0)


def test_unknown_adapter_or_wrong_row_count_raises(shared):
    with pytest.raises(ValueError, match="not loaded"):
        shared(input_ids=IDS, adapters=["zz", None, None, None])
    with pytest.raises(ValueError, match="3 adapter names for 4 rows"):
        shared(input_ids=IDS, adapters=[None, None, None])


def test_forwards_from_two_threads_never_see_each_others_adapters(dirs, shared):
    """peft's per-row names live in hooks on the shared layers for one call: the lock keeps calls apart."""
    want = {name: _logits(_alone(dirs, FILES[name]), IDS) for name in (None, "a", "b.v2")}
    bad = []

    def hammer(name):
        for _ in range(15):
            got = _logits(shared, IDS, adapters=[name] * 4)
            if not torch.allclose(got, want[name], atol=1e-5, rtol=0):
                bad.append(name)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in (None, "a", "b.v2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


# ---------------------------------------------------------------- decoding


class NoEosTokenizer(CharTokenizer):
    """No EOS: every row decodes its max_tokens (a random model would often end at once)."""

    eos_token_id = None


def _req(prompt, adapter=None, **params):
    params = {"max_tokens": 8, "temperature": 0, **params}
    return GenerationRequest("base", tuple(prompt), SamplingParams(**params), adapter)


PROMPTS = [[1, 3, 4], [1, 8, 9, 10, 3], [1, 5], [1, 12, 11, 10], [1, 6, 7, 8, 9, 10, 11]]
ADAPTERS = [None, "a", "b.v2", "a", None]


def _alone_tokens(dirs, requests):
    """Each request decoded alone by its own model."""
    tok = NoEosTokenizer()
    return [generate(_alone(dirs, FILES[r.adapter]), tok, [GenerationRequest("m", r.prompt_ids, r.params)])[0]
            for r in requests]


@pytest.mark.parametrize("sampled", [False, True])
def test_decoding_a_mixed_batch_equals_each_request_alone(dirs, shared, sampled):
    params = {"temperature": 1.0, "top_p": 0.9} if sampled else {}
    requests = [_req(p, a, seed=i, **params) for i, (p, a) in enumerate(zip(PROMPTS, ADAPTERS))]
    together = generate(shared, NoEosTokenizer(), requests)
    alone = _alone_tokens(dirs, requests)
    assert [d.token_ids for d in together] == [d.token_ids for d in alone]
    assert all(d.error is None and len(d.token_ids) == 8 for d in together)
    assert together[0].token_ids != together[1].token_ids or together[1].token_ids != together[2].token_ids


def test_rows_that_join_a_running_batch_keep_their_adapter(dirs, shared):
    """Continuous batching: an adapter row joins base rows mid-decode (cache padded), a base row joins later."""
    requests = [_req(PROMPTS[4]), _req(PROMPTS[1], "a"), _req(PROMPTS[2], "b.v2"), _req(PROMPTS[0])]
    batch, out = DecodeBatch(shared, NoEosTokenizer()), {i: Delta("") for i in range(4)}

    def take(deltas):
        for key, d in deltas.items():
            out[key].add(d)

    take(batch.join([(0, requests[0])]))
    take(batch.step())
    take(batch.join([(1, requests[1]), (2, requests[2])]))
    take(batch.step())
    take(batch.join([(3, requests[3])]))
    while len(batch):
        take(batch.step())
    assert [out[i].token_ids for i in range(4)] == [d.token_ids for d in _alone_tokens(dirs, requests)]


def test_an_adapter_the_model_does_not_have_fails_that_request_alone(dirs, shared):
    results = generate(shared, NoEosTokenizer(), [_req(PROMPTS[0], "nope"), _req(PROMPTS[1], "a")])
    assert results[0].error.status == 404 and "'nope' is not loaded" in results[0].error.message
    alone = _alone_tokens(dirs, [_req(PROMPTS[1], "a")])[0]
    assert results[1].error is None and results[1].token_ids == alone.token_ids
    plain = generate(_base(dirs), NoEosTokenizer(), [_req(PROMPTS[0], "a")])[0]  # a model without adapters
    assert plain.error.status == 404


def test_the_scheduler_batches_adapter_rows_with_the_base_rows(dirs, shared):
    requests = [_req(p, a) for p, a in zip(PROMPTS, ADAPTERS)]
    loaded = LoadedModel(shared, NoEosTokenizer())
    scheduler = Scheduler(max_running=8, max_waiting=8, idle_wait_s=0.2)  # the first arrival waits for the rest

    async def run():
        results = await asyncio.gather(*(scheduler.complete(loaded, r) for r in requests))
        await scheduler.close()
        return results

    results = asyncio.run(run())
    assert [d.token_ids for d in results] == [d.token_ids for d in _alone_tokens(dirs, requests)]
    assert scheduler.stats()["largest"] >= 3  # rows of the base and of both adapters decoded together


def test_verification_scores_through_the_adapter(dirs, shared):
    items = [{"input_ids": [1, 3, 4, 5, 6, 2], "labels": [-100, -100, -100, 5, 6, 2]},
             {"input_ids": [1, 8, 9, 2], "labels": [-100, -100, 9, 2]}]
    for adapter in (None, "a"):
        got = score_items(shared.bound(adapter), 0, items, batch_size=2)
        want = score_items(_alone(dirs, FILES[adapter]), 0, items, batch_size=2)
        for metric in want:
            assert got[metric] == pytest.approx(want[metric], abs=1e-5, nan_ok=True)


# ---------------------------------------------------------------- start-up errors


def _error(adapter_dir, base_dir, adapter_id="x") -> str:
    with pytest.raises(UnlearnError) as e:
        check_adapter(adapter_id, adapter_dir, str(base_dir), "base")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"adapters.{adapter_id}: ")
    return message


def test_a_missing_directory(dirs):
    assert "does not exist; give a LoRA adapter directory" in _error(dirs["root"] / "missing", dirs["base"])


def test_a_directory_that_is_not_a_lora_adapter(dirs, tmp_path):
    assert "goes under models, not adapters" in _error(dirs["base"], dirs["base"])  # a full model
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    assert f"did you mean {tmp_path / 'run' / 'adapter'}?" in _error(tmp_path / "run", dirs["base"])  # a run dir
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    assert "not a LoRA adapter (peft_type 'PREFIX_TUNING')" in _error(prefix, dirs["base"])
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert "holds no adapter_model.safetensors" in _error(prefix, dirs["base"])
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error(tmp_path / "file", dirs["base"])


@pytest.mark.parametrize("sizes, named", [({"hidden_size": 48}, "hidden_size 48 != 32"),
                                          ({"num_hidden_layers": 3}, "num_hidden_layers 3 != 2"),
                                          ({"vocab_size": 20}, "vocab_size 20 != 13")])
def test_an_adapter_of_another_base_names_the_differing_fields(dirs, tmp_path, sizes, named):
    other = _write_base(tmp_path / "other", **sizes)
    adapter = _write_adapter(other, tmp_path / "adapter", seed=3)
    message = _error(adapter, dirs["base"])
    assert "its base model differs from the served base 'base'" in message and named in message


def test_an_adapter_of_another_base_that_is_gone_is_caught_by_its_shapes(dirs, tmp_path):
    """Without its base's config at hand, the adapter's weight shapes still tell: a layer the served base
    lacks, or another width."""
    import shutil

    for sizes, named in (({"num_hidden_layers": 3}, "model.layers.2.mlp.down_proj, which the served base does "
                                                    "not have (num_hidden_layers 2)"),
                         ({"hidden_size": 48}, "down_proj is 64 -> 48 in the adapter, 64 -> 32 in the served base")):
        other = _write_base(tmp_path / "other", **sizes)
        adapter = _write_adapter(other, tmp_path / "adapter", seed=3)
        shutil.rmtree(other)
        assert named in _error(adapter, dirs["base"])
        shutil.rmtree(adapter)


def test_a_good_adapter_passes(dirs):
    check_adapter("a", dirs["a"], str(dirs["base"]), "base")


def test_serve_refuses_a_bad_adapter_before_ray_starts(dirs, tmp_path, capsys, monkeypatch):
    from ray_unlearn.cli import main

    monkeypatch.delenv("RAY_UNLEARN_API_KEY", raising=False)
    assert main(["serve", f"models.base={dirs['base']}", f"adapters.x={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: adapters.x: ") and "does not exist" in err and len(err.splitlines()) == 1
    other = _write_adapter(_write_base(tmp_path / "other", hidden_size=48), tmp_path / "adapter", seed=3)
    assert main(["serve", f"models.base={dirs['base']}", f"adapters.x={other}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "hidden_size 48 != 32" in err and len(err.splitlines()) == 1


def test_shared_base_is_one_copy_of_the_base(dirs):
    base = _base(dirs)
    weight = base.model.layers[0].self_attn.k_proj.weight
    shared = load_adapters(base, {"a": str(dirs["a"]), "b": str(dirs["b"])})
    assert isinstance(shared, SharedBase) and shared.adapter_ids == {"a", "b"}
    assert any(p is weight for p in shared.parameters())  # the base's own tensors, not copies
    assert sum(p.numel() for n, p in shared.named_parameters() if ".lora_" not in n) == \
        sum(p.numel() for p in _base(dirs).parameters())


# ---------------------------------------------------------------- the gateway's routing (in process, no Ray)


class RecordingServer:
    """Stands in for the ModelServer handle: records the multiplexed id each call was routed by and what it got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def options(self, multiplexed_model_id: str, stream: bool = False) -> SimpleNamespace:
        async def complete(request):
            self.calls.append(("complete", multiplexed_model_id, request))
            return Delta("text", "stop", 1)

        async def stream_(request):
            self.calls.append(("stream", multiplexed_model_id, request))
            yield Delta("text", "stop", 1)

        async def verify(model_items, base_items, adapter=None):
            self.calls.append(("verify", multiplexed_model_id, adapter))
            scores = {m: [0.5] * len(model_items) for m in ("es", "em", "probability", "mink", "loss")}
            return {"model": scores, "base": scores}

        return SimpleNamespace(complete=SimpleNamespace(remote=complete), stream=SimpleNamespace(remote=stream_),
                               verify=SimpleNamespace(remote=verify))


@pytest.fixture(scope="module")
def gateway():
    """(ASGI app, Gateway, RecordingServer) of a Gateway serving "base" and "other", adapters "a" and "b"."""
    import ray.serve

    import ray_unlearn.serve as serve_module
    from ray_unlearn.models.tiny import train_tokenizer
    from ray_unlearn.serving.config import serve_config_from_dict

    gateway_cls = next(c for c in serve_module.Gateway.func_or_class.__mro__[1:] if c.__name__ == "Gateway")
    models = {"base": "unused", "other": "unused"}
    cfg = serve_config_from_dict({"models": models, "base_model": "base", "adapters": {"a": "x", "b": "y"}})
    server = RecordingServer()
    gw = gateway_cls(server, cfg, models, {}, "", {"a": "/runs/a/adapter", "b": "/runs/b/adapter"})
    tokenizer = train_tokenizer(["Question: what is the capital of France?\nAnswer: Paris."] * 20, 300)
    gw.tokenizers.update(base=tokenizer, other=tokenizer)
    patch = pytest.MonkeyPatch()
    patch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=gw))
    yield serve_module.api, gw, server
    patch.undo()


def _post(app, path: str, body: dict) -> tuple[int, Any]:
    from tests.unit.serving.test_serve_fuzz import asgi_post

    status, raw = asyncio.run(asgi_post(app, path, json.dumps(body).encode()))
    text = raw.decode()
    return status, (json.loads(text) if text.startswith("{") else text)


def test_models_list_the_adapters_with_their_parent(gateway):
    _, gw, _ = gateway
    body = json.loads(asyncio.run(gw.list_models(SimpleNamespace(headers={}))).body)
    assert [(m["id"], m.get("parent")) for m in body["data"]] == [("base", None), ("other", None), ("a", "base"),
                                                                 ("b", "base")]
    one = json.loads(asyncio.run(gw.get_model("b", SimpleNamespace(headers={}))).body)
    assert one["id"] == "b" and one["parent"] == "base"


@pytest.mark.parametrize("model, routed, adapter", [("a", "base", "a"), ("base", "base", None),
                                                    ("other", "other", None)])
def test_requests_for_an_adapter_are_routed_by_the_base_model(gateway, model, routed, adapter):
    app, _, server = gateway
    server.calls.clear()
    status, body = _post(app, "/v1/completions", {"model": model, "prompt": "Question: what", "max_tokens": 2})
    assert status == 200 and body["model"] == model
    status, _ = _post(app, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}]})
    assert status == 200
    status, body = _post(app, "/v1/chat/completions", {"model": model, "stream": True,
                                                       "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and "[DONE]" in body
    status, body = _post(app, "/v1/verify", {"model": model, "texts": ["Paris is the capital"]})
    assert status == 200 and body["model"] == model and body["base_model"] == "base"
    calls = [(kind, by, r if kind == "verify" else (r.model_id, r.adapter)) for kind, by, r in server.calls]
    assert calls == [("complete", routed, (routed, adapter)), ("complete", routed, (routed, adapter)),
                     ("stream", routed, (routed, adapter)), ("verify", routed, adapter)]


def test_an_unknown_id_lists_the_adapters_too(gateway):
    status, body = _post(gateway[0], "/v1/completions", {"model": "c", "prompt": "x"})
    assert status == 404 and "available: base, other, a, b" in body["error"]["message"]
