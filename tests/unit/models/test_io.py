"""Loading and saving models: one-line errors for bad paths, safetensors only, atomic saves."""

import shutil

import pytest
import torch

from ray_unlearn.errors import UnlearnError
from ray_unlearn.models.io import check_vocab, load_model, load_tokenizer, looks_like_path, save_model


def expect_error(match, fn, *args):
    with pytest.raises(UnlearnError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def siblings(path):
    """Names next to `path` that are leftovers of a save (temporary or old copies)."""
    return sorted(p.name for p in path.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def target(micro_bench):
    return load_model(str(micro_bench.target_dir))


@pytest.fixture
def tokenizer(micro_bench):
    return load_tokenizer(str(micro_bench.target_dir))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- load errors


def test_looks_like_path():
    assert looks_like_path("/abs/model") and looks_like_path("./m") and looks_like_path("~/m")
    assert looks_like_path("a/b/c")
    assert not looks_like_path("org/name")
    assert not looks_like_path("gpt2")


def test_load_model_missing(tmp_path):
    expect_error(f"model path {tmp_path / 'nope'} does not exist", load_model, str(tmp_path / "nope"))


def test_load_model_without_config(tmp_path):
    expect_error("holds no model \\(no config.json\\)", load_model, str(tmp_path))


def test_load_model_without_safetensors(micro_bench, tmp_path):
    shutil.copy(micro_bench.target_dir / "config.json", tmp_path / "config.json")
    expect_error("has no .safetensors weights", load_model, str(tmp_path))
    # pickled weights are never loaded
    torch.save(load_model(str(micro_bench.target_dir)).state_dict(), tmp_path / "pytorch_model.bin")
    expect_error("has no .safetensors weights", load_model, str(tmp_path))


def test_load_model_corrupt_weights(micro_bench, tmp_path):
    shutil.copy(micro_bench.target_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    expect_error(f"cannot load model {tmp_path}", load_model, str(tmp_path))
    whole = (micro_bench.target_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    expect_error(f"cannot load model {tmp_path}", load_model, str(tmp_path))


def test_load_model_invalid_config(micro_bench, tmp_path):
    shutil.copy(micro_bench.target_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    expect_error(f"cannot load model {tmp_path}", load_model, str(tmp_path))


def test_load_tokenizer_errors(tmp_path):
    expect_error("tokenizer path .* does not exist", load_tokenizer, str(tmp_path / "nope"))
    expect_error(f"cannot load tokenizer {tmp_path}", load_tokenizer, str(tmp_path))


def test_loaded_tokenizer_has_a_pad_token(tokenizer):
    assert tokenizer.pad_token_id is not None


# ---------------------------------------------------------------------------- vocab check


def test_check_vocab(target, tokenizer):
    rows = target.get_input_embeddings().weight.shape[0]
    assert len(tokenizer) == rows
    check_vocab(target, tokenizer)  # equal sizes fit
    tokenizer.add_tokens(["zzextra0", "zzextra1"])
    msg = expect_error(f"tokenizer has {rows + 2} tokens but retain model embeds only {rows}",
                       check_vocab, target, tokenizer, "retain model")
    assert "model.tokenizer" in msg


# ---------------------------------------------------------------------------- saving


def test_save_then_load_round_trip(target, tokenizer, tmp_path):
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights no file holds yet
    out = save_model(target, tokenizer, tmp_path / "out" / "model")
    assert out == tmp_path / "out" / "model"
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert siblings(out) == []
    again = load_model(str(out))
    assert same_weights(target, again)
    assert load_tokenizer(str(out)).get_vocab() == tokenizer.get_vocab()


def test_save_replaces_a_previous_model(target, tokenizer, micro_bench, tmp_path):
    out = tmp_path / "model"
    save_model(target, tokenizer, out)
    (out / "stale.txt").write_text("from the first save")
    other = load_model(str(micro_bench.retain_dir))
    save_model(other, tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert same_weights(load_model(str(out)), other)
    assert siblings(out) == []


def test_failed_save_keeps_the_previous_model(target, tokenizer, micro_bench, tmp_path, monkeypatch):
    out = tmp_path / "model"
    save_model(target, tokenizer, out)
    before = sorted(p.name for p in out.iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    other = load_model(str(micro_bench.retain_dir))
    assert not same_weights(other, target)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(other, tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert same_weights(load_model(str(out)), target)
    assert siblings(out) == []


def test_failed_first_save_leaves_nothing(target, tokenizer, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("boom")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    out = tmp_path / "model"
    with pytest.raises(OSError, match="boom"):
        save_model(target, tokenizer, out)
    assert list(tmp_path.iterdir()) == []
