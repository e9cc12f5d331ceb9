"""Load and save HF causal LMs and tokenizers, with one-line errors for bad paths.

Only safetensors weights are loaded, remote code only when the config allows it, and saving
goes to a temporary sibling directory that is renamed when complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ray_unlearn.errors import UnlearnError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def looks_like_path(source: str) -> bool:
    """True for strings meant as local paths (hub ids look like `org/name`)."""
    return source.startswith(("/", ".", "~")) or os.path.exists(source) or source.count("/") > 1


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise UnlearnError(f"model path {path} does not exist; give an HF model directory or a hub id")
    if not (path / "config.json").is_file():
        raise UnlearnError(f"model path {path} holds no model (no config.json); give an HF model directory")
    if not any(path.glob("*.safetensors")):
        raise UnlearnError(f"model path {path} has no .safetensors weights; only safetensors are loaded "
                           "(convert with save_pretrained(..., safe_serialization=True))")


def load_model(source: str, dtype: str = "float32", trust_remote_code: bool = False) -> Any:
    """AutoModelForCausalLM from a local directory or a hub id (safetensors weights only)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if looks_like_path(source):
        _check_model_dir(Path(source).expanduser())
        source = str(Path(source).expanduser())
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: corrupt or truncated weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"cannot load model {source}: {first}") from None
    return model


def empty_model(source: str, dtype: str = "float32", trust_remote_code: bool = False) -> Any:
    """The model of `source`'s config on the meta device: its shapes, no memory, no weights (sharded
    strategies build it on every rank but the one that loads the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if looks_like_path(source):
        _check_model_dir(Path(source).expanduser())
    path = str(Path(source).expanduser()) if looks_like_path(source) else source
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"cannot load model config {source}: {first}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    if looks_like_path(source) and not Path(source).expanduser().exists():
        raise UnlearnError(f"tokenizer path {source} does not exist; give a tokenizer directory or a hub id")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if looks_like_path(source) else source,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"cannot load tokenizer {source}: {first}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(model: Any, tokenizer: Any, where: str = "model") -> None:
    """The tokenizer must not produce ids the model has no embedding for."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UnlearnError(f"tokenizer has {len(tokenizer)} tokens but {where} embeds only {rows}; "
                           "use the tokenizer the model was trained with (model.tokenizer)")


def atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of `final` to write into before `commit_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by the completed `tmp` directory (the old one is removed only after)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_write(out_dir: str | Path) -> Iterator[Path]:
    """A fresh temporary sibling of `out_dir` to fill; it replaces `out_dir` when the block ends
    without an error, and is removed either way."""
    final = Path(out_dir)
    tmp = atomic_dir(final)
    try:
        tmp.mkdir()
        yield tmp
        commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write model (safetensors) and tokenizer to `out_dir` atomically; returns the path."""
    with atomic_write(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def publish_model(weights_dir: str | Path, tokenizer: Any, out_dir: str | Path,
                  patterns: Sequence[str] | None = None) -> Path:
    """Copy an HF model directory's weight files (config, safetensors, shard index; or the files matching
    `patterns`) from `weights_dir` (a final checkpoint) to `out_dir` with the tokenizer, atomically; the
    weights are never loaded."""
    from ray_unlearn.parallel import HF_FILES

    with atomic_write(out_dir) as tmp:
        for pattern in patterns or HF_FILES:
            for f in Path(weights_dir).glob(pattern):
                shutil.copy2(f, tmp / f.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
