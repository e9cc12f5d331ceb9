"""The strategy component on a world of one (multi-rank behaviour: tests/integration/test_scale_equality.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_unlearn import config
from ray_unlearn.errors import UnlearnError
from ray_unlearn.parallel import STRATEGIES, DDPStrategy, FSDP2Strategy, build_strategy, load_hf_weights
from ray_unlearn.parallel.base import tied_names
from ray_unlearn.parallel.fsdp2 import _blocks, _units


def _tiny(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=tied))


def test_registry_matches_the_config_choices():
    assert tuple(STRATEGIES) == config.STRATEGIES


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(UnlearnError, match="ray.strategy: 'zero' is not one of ddp, fsdp2, deepspeed"):
        build_strategy("zero")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_world_of_one_is_the_plain_model(name):
    model = _tiny()
    s = build_strategy(name)
    wrapped = s.wrap(model)
    assert wrapped is model and s.unwrap(wrapped) is model
    assert s.grad_average_factor == 1
    t = torch.tensor([3.0])
    assert s.all_reduce_sum_(t) is t and t.item() == 3.0
    with s.accumulate(wrapped, sync=False):
        model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    params = [p for p in model.parameters()]
    expected = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    assert s.clip_grad_norm(params, 1e-3) == pytest.approx(expected, rel=1e-5)
    total = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    assert total == pytest.approx(1e-3, rel=1e-3)  # clipped
    ref = s.wrap_reference(_tiny())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_fsdp2_shards_each_decoder_block():
    model = _tiny()
    assert [type(b).__name__ for b in _blocks(model)] == ["LlamaDecoderLayer", "LlamaDecoderLayer"]


def test_fsdp2_shards_untied_embeddings_on_their_own():
    """Untied: the input and output embeddings are units of their own (gathered only while they run);
    tied: one parameter, left to the root."""
    untied, tied = _tiny(tied=False), _tiny(tied=True)
    assert _units(untied)[2:] == [untied.get_input_embeddings(), untied.get_output_embeddings()]
    assert _units(tied) == _blocks(tied)


def test_tied_weights_keep_the_name_save_pretrained_keeps(tmp_path: Path):
    from safetensors.torch import load_file

    assert tied_names(_tiny(tied=True)) == {"lm_head.weight"}
    _tiny(tied=True).save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    assert tied_names(_tiny(tied=False)) == set()


def test_full_weights_of_a_plain_fsdp2_run_load_like_ddp_ones(tmp_path: Path):
    from safetensors.torch import load_file

    model = _tiny()
    (tmp_path / "ddp").mkdir()
    (tmp_path / "fsdp2").mkdir()
    DDPStrategy().save_full_weights(tmp_path / "ddp", model)
    FSDP2Strategy().save_full_weights(tmp_path / "fsdp2", model)
    a, b = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(tmp_path / "fsdp2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2", use_safetensors=True)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_full_weights_that_are_views_of_padded_buffers_are_written(tmp_path: Path):
    """FSDP2 gathers a parameter whose first dimension the world size does not divide (an odd vocabulary on
    2 workers) into a padded buffer: the full tensor is a view of a larger storage, which safetensors
    refuses to write unless copied."""
    from ray_unlearn.parallel.base import write_hf_weights

    model = _tiny(tied=True)
    state = dict(model.state_dict())
    weight = state["model.embed_tokens.weight"]
    padded = torch.zeros(weight.shape[0] + 1, weight.shape[1])
    padded[:-1] = weight
    state["model.embed_tokens.weight"] = padded[:-1]
    write_hf_weights(tmp_path, model, state, "5GB")
    fresh = _tiny(tied=True)
    with torch.no_grad():
        fresh.get_input_embeddings().weight.zero_()
    load_hf_weights(fresh, tmp_path)
    assert torch.equal(fresh.get_input_embeddings().weight, weight)


def test_checkpoint_of_another_strategy_is_refused():
    with pytest.raises(UnlearnError, match=r"^checkpoint ckpt was written by ray.strategy=ddp, this run uses "
                                           r"ray.strategy=fsdp2; rerun with ray.strategy=ddp"):
        FSDP2Strategy().check_checkpoint(Path("ckpt"), "ddp")
    DDPStrategy().check_checkpoint(Path("ckpt"), "ddp")


@pytest.mark.parametrize("strategy", [DDPStrategy, FSDP2Strategy])
def test_full_weights_above_the_shard_size_are_split_with_an_index(tmp_path: Path, strategy):
    import json

    from transformers import AutoModelForCausalLM

    model = _tiny(tied=False)
    strategy(max_shard_size="20KB").save_full_weights(tmp_path, model)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "model.safetensors").exists()
    fresh = _tiny(tied=False)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_hf_weights(fresh, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)  # what save_pretrained reads
    for (name, a), b, c in zip(model.state_dict().items(), fresh.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_weights_of_another_model_are_refused(tmp_path: Path):
    DDPStrategy().save_full_weights(tmp_path, _tiny(tied=True))
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                          num_key_value_heads=2, intermediate_size=32))
    with pytest.raises(UnlearnError, match=r"lacks 10 weights of the model \(e.g. lm_head.weight\)"):
        load_hf_weights(bigger, tmp_path)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_mixed_precision_forward_computes_in_bf16_and_returns_float32_logits(name):
    """A world of one (and ddp at any size) runs mixed precision as autocast: matmuls in bf16, float32
    parameters and gradients, logits upcast for the losses; without it the forward is untouched."""
    model = _tiny()
    seen: list[torch.dtype] = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    ids, mask = torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)
    plain = build_strategy(name).forward(model, ids, mask)
    mixed = build_strategy(name, compute_dtype=torch.bfloat16).forward(model, ids, mask)
    assert seen == [torch.float32, torch.bfloat16]
    assert plain.dtype == mixed.dtype == torch.float32
    assert 0 < float((plain - mixed).detach().abs().max()) < 0.1  # bf16 rounding, no more
    mixed.sum().backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_mixed_precision_needs_float32_parameters():
    from ray_unlearn.config import load_config

    with pytest.raises(UnlearnError, match="train.mixed_precision=bf16 keeps float32 parameters"):
        load_config(None, ["train.mixed_precision=bf16", "model.dtype=bfloat16"])
    with pytest.raises(UnlearnError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=fp8"])


def test_sharded_parameters_start_on_the_meta_device_off_rank_0():
    """Which strategies build the model on the meta device on every rank but 0 (rank 0's weights fill it)."""
    assert FSDP2Strategy.starts_on_meta() and not DDPStrategy.starts_on_meta()
    ds = STRATEGIES["deepspeed"]
    assert ds.starts_on_meta(zero_stage=3) and not ds.starts_on_meta(zero_stage=2) and not ds.starts_on_meta()


@pytest.mark.parametrize("optim", ["sophia", "adamw"])
def test_deepspeed_checkpoint_round_trips_every_parameter_and_optimizer_state(tmp_path: Path, optim):
    """A world of one writes the per-parameter format every worker count reads: weights, each state tensor
    and the step count come back exactly, and the next step of the restored run equals the original's."""
    from ray_unlearn.optim.sophia import SophiaG

    def setup():
        model = _tiny(tied=False)
        model.model.layers[1].requires_grad_(False)  # a frozen part is not in the checkpoint
        params = [p for p in model.parameters() if p.requires_grad]
        opt = SophiaG(params, lr=1e-2) if optim == "sophia" else torch.optim.AdamW(params, lr=1e-2)
        return model, opt

    def train_step(model, opt):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        if optim == "sophia":
            opt.update_hessian()
        opt.step()
        opt.zero_grad(set_to_none=True)

    strategy = build_strategy("deepspeed")
    model, opt = setup()
    for _ in range(2):
        train_step(model, opt)
    strategy.save_state(tmp_path, model, opt)
    assert sorted(p.name for p in (tmp_path / "deepspeed").iterdir()) == [
        "optimizer.json", "state-00000-of-00001.safetensors"]
    restored, restored_opt = setup()
    strategy.load_state(tmp_path, restored, restored_opt)
    for (name, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name
        if a.requires_grad:
            sa, sb = opt.state[a], restored_opt.state[b]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    train_step(model, opt)
    train_step(restored, restored_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))


def test_deepspeed_checkpoint_in_another_format_is_refused(tmp_path: Path):
    model = _tiny()
    with pytest.raises(UnlearnError, match=r"^checkpoint .* holds no per-parameter DeepSpeed state under deepspeed/"):
        build_strategy("deepspeed").load_state(tmp_path, model, torch.optim.AdamW(model.parameters()))


def test_zero3_gathers_each_decoder_block_whole():
    """ZeRO 3 installs no hook inside a decoder block (zero._gather_per_block): its per-module hooks put a block's
    inner inputs through autograd functions of their own, which regroups the residual stream's gradient sum
    (residual add + RMSNorm) and made ZeRO 3's gradients differ from ddp's by rounding (issue 6). The blocks are
    leaf modules, nothing else is; a model that names no blocks is left as it is."""
    from ray_unlearn.parallel.zero import _gather_per_block, _import_deepspeed

    _import_deepspeed(torch.device("cpu"))
    from deepspeed.utils import z3_leaf_module

    model = _tiny()
    _gather_per_block(model)
    blocks = {id(m) for m in model.model.layers}
    assert len(blocks) == 2 and all(z3_leaf_module(m) for m in model.model.layers)
    assert not any(z3_leaf_module(m) for m in model.modules() if id(m) not in blocks)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    _gather_per_block(plain)
    assert not any(z3_leaf_module(m) for m in plain.modules())


def test_zero3_fp32_masters_share_the_model_partitions():
    """zero._share_fp32_masters: a float32 master becomes the model's own partition (same storage, its values,
    the optimizer's tensor keeps its identity); a bf16 partition keeps its float32 master, and an empty
    (swapped-out) master is left alone. DeepSpeed means to share in float32 but its device check never matches
    (a torch.device against a device-name string), so each rank held its parameters twice."""
    from types import SimpleNamespace

    from ray_unlearn.parallel.zero import _share_fp32_masters

    low, master = torch.arange(6.0), torch.arange(6.0) + 0.5  # the masters are what the optimizer stepped
    low16, master16 = torch.arange(4.0).bfloat16(), torch.arange(4.0)
    swapped = torch.empty(0)
    zero3 = SimpleNamespace(fp16_partitioned_groups_flat=[low, low16, torch.zeros(3)],
                            fp32_partitioned_groups_flat=[master, master16, swapped])
    ident = id(master)
    assert _share_fp32_masters(zero3) == 1
    assert id(zero3.fp32_partitioned_groups_flat[0]) == ident
    assert master.untyped_storage().data_ptr() == low.untyped_storage().data_ptr()
    assert torch.equal(low, torch.arange(6.0) + 0.5) and torch.equal(master, low)
    master.add_(1.0)  # a step on the master is a step on the model's partition
    assert torch.equal(low, torch.arange(6.0) + 1.5)
    assert master16.untyped_storage().data_ptr() != low16.untyped_storage().data_ptr()
    assert swapped.numel() == 0
    assert _share_fp32_masters(zero3) == 1  # again: nothing more to do
    assert _share_fp32_masters(SimpleNamespace()) == 0  # not a ZeRO 3 optimizer
