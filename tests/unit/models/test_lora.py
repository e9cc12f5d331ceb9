"""LoRA adapters (`model.lora`) on the micro benchmark's target model, in the plain process (no Ray).

Only the adapters train (the base weights stay bit-identical to the input model), the merged model is
W + (alpha / r)·B@A computed here by hand, peft loads the adapter directory and merges it to the same
weights, resume equals an uninterrupted run, and bad settings are one-line errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ray_unlearn.config import load_config
from ray_unlearn.errors import UnlearnError
from ray_unlearn.job import resolve_inputs
from ray_unlearn.loop import LoopEnv, Unlearner, load_run
from ray_unlearn.models.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, base_name

R, ALPHA = 4, 8.0
LORA = ["ray.num_workers=0", "train.max_steps=8", "train.batch_size=4", "train.log_every=1",
        "train.checkpoint_every=4", f"model.lora.r={R}", f"model.lora.alpha={ALPHA}", "optim.lr=1e-2",
        "objective.terms={npo: 1.0, retain_nll: 1.0}", "optim.name=sophia"]


def _unlearner(cfg, root: Path, resume_from: Path | None = None) -> Unlearner:
    model, ref, data, tokenizer = load_run(cfg, resolve_inputs(cfg))
    return Unlearner(cfg, model, ref, data, tokenizer.pad_token_id,
                     LoopEnv(checkpoint_dir=root, resume_from=resume_from))


@pytest.fixture(scope="module")
def lora_run(micro_bench, bench_cache, tmp_path_factory):
    """(config, the Unlearner after 8 steps of NPO + retain NLL with Sophia, its history, checkpoint root)."""
    torch.set_num_threads(1)
    cfg = load_config(None, [f"benchmark.size=micro", f"benchmark.cache_dir={bench_cache}", *LORA])
    root = tmp_path_factory.mktemp("lora")
    unlearner = _unlearner(cfg, root)
    history = unlearner.run()
    return cfg, unlearner, history, root


def test_only_adapters_train_and_the_base_stays_bit_identical(lora_run, micro_bench):
    _, unlearner, history, _ = lora_run
    target = load_file(str(micro_bench.target_dir / "model.safetensors"))
    adapters = 0
    for name, p in unlearner.module.named_parameters():
        assert p.requires_grad == (".lora_" in name), name
        if ".lora_B." in name:
            adapters += 1
            assert p.abs().max() > 0, name  # B starts at 0: it moved
        elif ".lora_" not in name:
            assert torch.equal(p.detach(), target[base_name(name)]), name
    assert adapters == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert history[-1]["nll/forget"] > 10 * history[0]["nll/forget"]  # NPO pushed the forget answers away (~80x)


def test_merged_model_is_base_plus_scaled_b_a(lora_run, micro_bench):
    _, _, _, root = lora_run
    final = root / "step-000008"
    merged, adapter = load_file(str(final / "model.safetensors")), load_file(str(final / ADAPTER_DIR / ADAPTER_WEIGHTS))
    target = load_file(str(micro_bench.target_dir / "model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]  # [r, in], [out, r]
    expected = target["model.layers.1.self_attn.v_proj.weight"] + (ALPHA / R) * (b @ a)
    torch.testing.assert_close(merged["model.layers.1.self_attn.v_proj.weight"], expected, atol=1e-6, rtol=0)
    assert not torch.equal(merged["model.layers.1.self_attn.v_proj.weight"],
                           target["model.layers.1.self_attn.v_proj.weight"])
    assert set(merged) == set(target)  # the base model's names, nothing of peft's
    assert torch.equal(merged["model.embed_tokens.weight"], target["model.embed_tokens.weight"])


def test_peft_loads_the_adapter_and_merges_to_the_same_model(lora_run, micro_bench):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, unlearner, _, root = lora_run
    final = root / "step-000008"
    assert (final / ADAPTER_DIR / ADAPTER_CONFIG).is_file() and not (final / ADAPTER_CONFIG).exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_bench.target_dir),
                                           final / ADAPTER_DIR)
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, unlearner.module(input_ids=ids).logits)
    ours = AutoModelForCausalLM.from_pretrained(final).state_dict()  # the checkpoint is the merged model's HF dir
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(theirs) == set(ours)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)


def test_resume_equals_an_uninterrupted_run(lora_run, tmp_path):
    cfg, unlearner, _, root = lora_run
    # a checkpoint before the last holds the adapter, not a copy of the (frozen) base; the last one the merged model
    assert not list((root / "step-000004").glob("*.safetensors"))
    assert (root / "step-000004" / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()
    assert (root / "step-000008" / "model.safetensors").is_file()
    resumed = _unlearner(cfg, tmp_path, resume_from=root / "step-000004")
    assert resumed.step == 4
    resumed.run()
    for (name, p), q in zip(unlearner.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(p, q), name


def test_fsdp2_finds_the_decoder_blocks_inside_the_peft_model(lora_run):
    from ray_unlearn.models.layers import decoder_layers
    from ray_unlearn.parallel.fsdp2 import _blocks, _units

    module = lora_run[1].module
    assert [type(b).__name__ for b in _blocks(module)] == ["LlamaDecoderLayer"] * 2
    assert module.get_input_embeddings().weight is module.get_output_embeddings().weight
    assert _units(module) == _blocks(module)  # the micro model's embeddings are tied: they stay in the root
    assert decoder_layers(module) == _blocks(module)


@pytest.mark.parametrize("override, message", [
    ("model.lora.r=-1", "model.lora.r: must be > 0 to train adapters, or 0 for off; got -1"),
    ("model.lora.alpha=0", "model.lora.alpha: must be > 0, got 0.0"),
    ("model.lora.dropout=1.0", "model.lora.dropout: needs a value in [0, 1), got 1.0"),
    ("model.lora.dropout=-0.1", "model.lora.dropout: needs a value in [0, 1), got -0.1"),
    ("ray.strategy=deepspeed", "model.lora trains adapters with ray.strategy=ddp or fsdp2 (DeepSpeed is not "
                               "supported); set one of them or model.lora.r=0"),
    ("localize.method=grin", "localize.method=grin selects entries of the full weights, which model.lora "
                             "freezes; drop localize or set model.lora.r=0"),
    ("objective.rmu.trainable_params=model\\.layers\\.1\\..*", "objective.rmu.trainable_params names full "
     "weights, which model.lora freezes; choose the adapted modules with model.lora.target_modules instead"),
])
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(UnlearnError) as err:
        load_config(None, ["model.lora.r=4", "objective.terms={rmu: 1.0}", override])
    assert str(err.value) == message


def test_a_target_module_matching_nothing_exits_2_writing_nothing(capsys, micro_bench, bench_cache, tmp_path):
    from ray_unlearn.cli import main

    out = tmp_path / "out"
    rc = main(["run", "benchmark.size=micro", f"benchmark.cache_dir={bench_cache}", "ray.num_workers=0",
               "model.lora.r=4", "model.lora.target_modules=[q_proj, qv_proj]", f"output_dir={out}"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and not out.exists()
    assert err == ["error: model.lora.target_modules: 'qv_proj' matches no Linear module of the model; its Linear "
                   "modules are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"]
