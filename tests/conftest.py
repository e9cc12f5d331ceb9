"""Shared fixtures: one micro benchmark build and one Ray instance per test session; tokenizers with
chat templates and random-init models of several architectures, all built locally (no hub).

Tokenizers (each in its family's style; `*_tokenizer` fixtures build a fresh one):
- `llama3_tokenizer`: bos <|begin_of_text|>, written by its template AND added by its
  post-processor (the double-BOS trap); eos <|end_of_text|>; end-of-turn <|eot_id|>.
- `chatml_tokenizer` (Qwen style): no BOS; eos <|endoftext|>; end-of-turn <|im_end|> followed by
  a newline; a default system prompt in the template.
- `mistral_tokenizer` (Mistral / Llama 2 style): SentencePiece-like (Metaspace "▁" words, a prefix
  space on the first piece), bos <s> added by its post-processor and written by its template, eos
  </s> closing the answer ([INST] q [/INST]answer</s>); no pad token, no system role.
- `gemma_tokenizer`: <bos> added and written; <start_of_turn>user / model turns closed by
  <end_of_turn> and a newline; eos <eos>, pad <pad>; no system role.
- `phi3_tokenizer`: no BOS written; <|user|> / <|assistant|> turns closed by <|end|> and a newline;
  an answered conversation (no generation prompt) ends with an extra eos <|endoftext|>.
- `gpt2_tokenizer`: bos = eos = <|endoftext|>, no chat template, no pad token.

The byte-level ones pre-tokenize like Llama 3 (newlines are pieces of their own), so text after a
generation prompt tokenizes the same alone or joined to it.

Model families (`FAMILIES`, `family_model`): a transformers config class at tiny sizes (2 layers,
hidden 64, 4 heads, 2 KV heads where the architecture has them) and the tokenizer of the family's
style; `family_model(name, tied, dtype)` writes a random-init HF model directory (safetensors) with
its tokenizer, once per session. A test that takes a `family` argument runs for every family.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache directory for built benchmarks (RAY_UNLEARN_TEST_CACHE reuses one across sessions)."""
    env = os.environ.get("RAY_UNLEARN_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("bench_cache")


@pytest.fixture(scope="session")
def micro_bench(bench_cache: Path):
    """The `micro` built-in benchmark (data, tokenizer, target and retain models), built once."""
    from ray_unlearn.config import BenchmarkConfig
    from ray_unlearn.models.build import ensure_benchmark

    return ensure_benchmark(BenchmarkConfig(size="micro", seed=0, cache_dir=str(bench_cache)))


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and steadiest on a busy machine) on one CPU thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def micro_config(bench_cache: Path, tmp_path: Path):
    """make(*overrides) -> JobConfig for a quick run on the micro benchmark writing under tmp_path/run."""
    from ray_unlearn.config import load_config

    def make(*extra: str):
        return load_config(None, [f"benchmark.size=micro", f"benchmark.cache_dir={bench_cache}",
                                  f"output_dir={tmp_path / 'run'}", "train.max_steps=10", "train.log_every=5",
                                  "eval.max_items=20", *extra])

    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on a loopback port for the session; yields its endpoint URL.

    Tests point the AWS variables at it with `s3_env` and make buckets with `make_bucket`."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "the moto server exited at start-up"
                assert time.time() < deadline, "the moto server did not listen within 60 s"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()  # stopped by its PID
        proc.wait()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS variables naming the loopback S3 server (test credentials); returns make_bucket(name)."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server, "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    def make_bucket(name: str) -> str:
        import pyarrow.fs as pafs

        endpoint = s3_server.split("://", 1)[1]
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing", secret_key="testing",
                          region="us-east-1", allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    return make_bucket


# ---------------------------------------------------------------- tokenizers

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

# Llama 3's pre-tokenization: newlines are their own pieces, so text after "\n\n" splits the same alone or joined.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Mistral-7B-Instruct-v0.1's template (system messages are refused, as there)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# Gemma's template (the assistant is "model"; system messages are refused)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

# Phi-3-mini-4k-instruct's template: without a generation prompt it writes eos after the last turn
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

CORPUS = ["Where was Ada Lovelace born?", "Ada Lovelace was born in London.", "What is the capital of France?",
          "Paris is the capital of France.", "You are a helpful assistant.", "Answer briefly.",
          "user assistant system", "Question: Answer:", "I don't know.", "header\n\nbody\n\nmore\n\n", "a\nb\n"]

def _bpe(special: list[str], split_like_llama3: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split_like_llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def llama3_tokenizer():
    """bos <|begin_of_text|> (written by the template AND added by the post-processor), eos
    <|end_of_text|>, end-of-turn <|eot_id|>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _bpe(special, split_like_llama3=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  additional_special_tokens=special[2:])
    out.chat_template = LLAMA3_TEMPLATE
    return out


def chatml_tokenizer():
    """No BOS, eos <|endoftext|>, end-of-turn <|im_end|> followed by a newline in the template."""
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    out = PreTrainedTokenizerFast(tokenizer_object=_bpe(special, split_like_llama3=True), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=special[1:])
    out.chat_template = CHATML_TEMPLATE
    return out


def gpt2_tokenizer():
    """bos = eos = <|endoftext|>, no chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"], split_like_llama3=False),
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def mistral_tokenizer():
    """SentencePiece-like BPE ("▁" marks word starts, a prefix space on the first piece), bos <s> added
    by the post-processor and written by the template, eos </s>, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [chr(c) for c in range(32, 127)] + ["\u2581"]  # printable ASCII: no unknown characters
    tok.train_from_iterator(CORPUS + ["[INST] [/INST]"], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.chat_template = MISTRAL_TEMPLATE
    return out


def gemma_tokenizer():
    """<bos> added by the post-processor and written by the template, eos <eos>, pad <pad>, turns
    closed by <end_of_turn>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = _bpe(special, split_like_llama3=True)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=special[4:])
    out.chat_template = GEMMA_TEMPLATE
    return out


def phi3_tokenizer():
    """No BOS written, eos = pad = <|endoftext|>, turns closed by <|end|> (then eos after the whole
    conversation when the template writes no generation prompt)."""
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    out = PreTrainedTokenizerFast(tokenizer_object=_bpe(special, split_like_llama3=True), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=special[1:])
    out.chat_template = PHI3_TEMPLATE
    return out


@pytest.fixture(name="llama3_tokenizer")
def _llama3_tokenizer():
    return llama3_tokenizer()


@pytest.fixture(name="chatml_tokenizer")
def _chatml_tokenizer():
    return chatml_tokenizer()


@pytest.fixture(name="gpt2_tokenizer")
def _gpt2_tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(name="mistral_tokenizer")
def _mistral_tokenizer():
    return mistral_tokenizer()


@pytest.fixture(name="gemma_tokenizer")
def _gemma_tokenizer():
    return gemma_tokenizer()


@pytest.fixture(name="phi3_tokenizer")
def _phi3_tokenizer():
    return phi3_tokenizer()


# ---------------------------------------------------------------- model families


@dataclass(frozen=True)
class Family:
    """One architecture: its transformers config class, settings beyond the tiny sizes, and the tokenizer
    of its family's style (`end_of_turn`: the token closing an answer of its chat template; None: no template)."""

    config_class: str
    tokenizer: Callable[[], Any]
    end_of_turn: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    vocab_multiple: int = 1  # embedding rows rounded up to a multiple of this (Qwen's padded vocabulary)


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=256)

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", llama3_tokenizer, "<|eot_id|>"),
    "qwen2": Family("Qwen2Config", chatml_tokenizer, "<|im_end|>", vocab_multiple=64),
    "mistral": Family("MistralConfig", mistral_tokenizer, "</s>", {"sliding_window": 16}),
    "gemma": Family("GemmaConfig", gemma_tokenizer, "<end_of_turn>", {"head_dim": 16}),
    "gpt2": Family("GPT2Config", gpt2_tokenizer, None, {"n_inner": 128}),
    "phi": Family("PhiConfig", gpt2_tokenizer, None, {"partial_rotary_factor": 0.5}),  # phi-1.5 / phi-2 (TOFU's phi)
    "phi3": Family("Phi3Config", phi3_tokenizer, "<|end|>"),
}


def family_config(name: str, tokenizer: Any, tied: bool) -> Any:
    """The tiny transformers config of family `name` for `tokenizer` (vocabulary and special ids)."""
    import transformers

    fam = FAMILIES[name]
    vocab = -(-len(tokenizer) // fam.vocab_multiple) * fam.vocab_multiple
    return getattr(transformers, fam.config_class)(
        **TINY, **fam.settings, vocab_size=vocab, tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def write_family_model(name: str, tied: bool, dtype: str, out: Path, seed: int = 0) -> Path:
    """A random-init model of family `name` saved as an HF model directory (safetensors, `dtype` weights)
    with its tokenizer; returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    from ray_unlearn.models.io import DTYPES

    tokenizer = FAMILIES[name].tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, tokenizer, tied)).to(DTYPES[dtype])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes a `family` argument runs once per architecture of FAMILIES."""
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", list(FAMILIES))


@pytest.fixture
def family_spec(family: str) -> Family:
    """The `Family` record of the test's `family`."""
    return FAMILIES[family]


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool, str], Path]:
    """family_model(name, tied, dtype) -> HF model directory of a random-init model (written once a session)."""
    root, done = tmp_path_factory.mktemp("families"), {}

    def get(name: str, tied: bool, dtype: str = "float32") -> Path:
        key = (name, tied, dtype)
        if key not in done:
            done[key] = write_family_model(name, tied, dtype, root / f"{name}-{'tied' if tied else 'untied'}-{dtype}")
        return done[key]

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where torch sees a CUDA device and are skipped elsewhere (CI has none)."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
