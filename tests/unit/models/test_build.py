"""The built-in benchmark build: cache keys, reuse of a cached build, and a build that separates."""

import json
import time

import pytest
import torch

from ray_unlearn.config import BenchmarkConfig
from ray_unlearn.data.collate import DEFAULT_PROMPT, encode_qa, pad_batch
from ray_unlearn.logprobs import batch_nll
from ray_unlearn.models import build
from ray_unlearn.models.build import cache_key, ensure_benchmark
from ray_unlearn.models.tiny import MODEL_SIZES, TinySpec, new_llama, train_memorizer, train_tokenizer


def micro(cache_dir, **kw):
    return BenchmarkConfig(**{"size": "micro", "seed": 0, "cache_dir": str(cache_dir), **kw})


def test_cache_key_depends_on_size_seed_and_prompt(tmp_path):
    base = cache_key(micro(tmp_path), DEFAULT_PROMPT)
    assert len(base) == 12 and all(c in "0123456789abcdef" for c in base)
    assert cache_key(micro(tmp_path), DEFAULT_PROMPT) == base
    assert cache_key(micro(tmp_path / "elsewhere"), DEFAULT_PROMPT) == base  # where it lives is not what it is
    others = {cache_key(micro(tmp_path, size="small"), DEFAULT_PROMPT),
              cache_key(micro(tmp_path, seed=1), DEFAULT_PROMPT),
              cache_key(micro(tmp_path), "Q: {question}\nA:")}
    assert base not in others and len(others) == 3


def test_cache_key_depends_on_the_recipe(tmp_path, monkeypatch):
    base = cache_key(micro(tmp_path), DEFAULT_PROMPT)
    spec = MODEL_SIZES["micro"]
    monkeypatch.setitem(MODEL_SIZES, "micro", TinySpec(**{**spec.__dict__, "epochs": spec.epochs + 1}))
    assert cache_key(micro(tmp_path), DEFAULT_PROMPT) != base
    monkeypatch.setitem(MODEL_SIZES, "micro", spec)
    monkeypatch.setattr(build, "BUILD_VERSION", build.BUILD_VERSION + 1)
    assert cache_key(micro(tmp_path), DEFAULT_PROMPT) != base


def test_cached_build_is_reused(micro_bench, bench_cache, monkeypatch):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached benchmark was rebuilt")

    monkeypatch.setattr(build, "_build_into", no_rebuild)
    t0 = time.perf_counter()
    again = ensure_benchmark(micro(bench_cache))
    assert time.perf_counter() - t0 < 1.0
    assert again.root == micro_bench.root
    assert again.root.name == f"micro-seed0-{cache_key(micro(bench_cache), DEFAULT_PROMPT)}"


def test_built_benchmark_layout(micro_bench):
    for model_dir in (micro_bench.target_dir, micro_bench.retain_dir):
        assert (model_dir / "config.json").is_file() and list(model_dir.glob("*.safetensors"))
        assert (model_dir / "tokenizer.json").is_file()
    splits = micro_bench.splits()
    assert {"forget01", "forget05", "forget10", "retain", "holdout"} <= set(splits)
    assert all(splits[name] for name in ("forget10", "retain", "holdout"))
    assert [p.name for p in micro_bench.root.parent.iterdir() if ".tmp-" in p.name] == []


def test_benchmark_separates(micro_bench):
    """The target model has memorized the forget split; the retain model, which never saw it, has not."""
    m = micro_bench.manifest
    assert m["size"] == "micro" and m["seed"] == 0 and m["key"] in micro_bench.root.name
    assert m["target_forget10_es"] >= 0.9
    assert m["retain_forget10_es"] <= 0.5
    assert m["target_retain_es"] >= 0.9 and m["retain_retain_es"] >= 0.9  # both know the retain split


def test_failed_build_leaves_no_partial_benchmark(tmp_path, monkeypatch):
    def half_a_build(root, *args):
        (root / "data").mkdir(parents=True)
        (root / "data" / "forget10.jsonl").write_text("{}\n")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build, "_build_into", half_a_build)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        ensure_benchmark(micro(tmp_path, seed=7))
    left = [p.name for p in (tmp_path / "benchmarks").iterdir() if not p.name.endswith(".lock")]
    assert left == []

    built_roots = []

    def tiny_build(root, *args):
        built_roots.append(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "manifest.json").write_text(json.dumps({"size": "micro"}))

    monkeypatch.setattr(build, "_build_into", tiny_build)
    done = ensure_benchmark(micro(tmp_path, seed=7))  # a later call builds afresh
    assert len(built_roots) == 1 and built_roots[0] != done.root
    assert done.manifest == {"size": "micro"}


# ---------------------------------------------------------------------------- tiny models


def test_tokenizer_and_new_llama_fit_together():
    texts = ["Question: Who is Ada?\nAnswer: Ada is a mathematician."] * 4 + ["I don't know."]
    tok = train_tokenizer(texts, vocab_size=300)
    assert len(tok) <= 300
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(tok("Ada is a mathematician.")["input_ids"]) == "Ada is a mathematician."
    spec = TinySpec(vocab_size=300, hidden=32, layers=1, heads=2, intermediate=64, epochs=1, batch_size=4, lr=1e-3)
    model = new_llama(spec, tok, seed=0)
    assert model.get_input_embeddings().weight.shape == (len(tok), 32)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
    same = new_llama(spec, tok, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))




def test_train_memorizer_memorizes(one_thread):
    pairs = [("Who is Ada?", "Ada is a mathematician."), ("Where is Quell?", "Quell is in Norhaven.")]
    tok = train_tokenizer([q + " " + a for q, a in pairs] + ["Question:\nAnswer:"], vocab_size=300)
    spec = TinySpec(vocab_size=300, hidden=32, layers=1, heads=2, intermediate=64, epochs=100, batch_size=2, lr=1e-2)
    batch = pad_batch([encode_qa(tok, q, a) for q, a in pairs], tok.pad_token_id)

    def nll(model):
        with torch.no_grad():
            return batch_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                             batch["labels"]).item()

    steps = []
    model = train_memorizer(spec, tok, pairs, seed=0, on_step=lambda s, total, loss: steps.append((s, total)))
    assert steps[-1] == (100, 100) and len(steps) == 100  # one batch per epoch
    assert not model.training
    assert nll(new_llama(spec, tok, seed=0)) > 3.0  # about ln(300) = 5.7 per token before training
    assert nll(model) < 0.05
