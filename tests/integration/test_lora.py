"""LoRA adapters at scale and end to end: ddp and fsdp2 on 2 real gloo processes (no Ray) train the same
adapter, and `ray-unlearn run ... model.lora.r=4` writes the adapter directory beside the merged model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from ray_unlearn.job import resolve_inputs
from ray_unlearn.models.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS
from ray_unlearn.parallel.local import merge_checkpoint, run_local

pytestmark = pytest.mark.slow


def test_ddp_and_fsdp2_train_the_same_adapter(micro_bench, bench_cache, tmp_path):
    """NPO + retain NLL (the reference: the sharded model with its adapters disabled) with AdamW, 2 workers x 2
    accumulation steps: adapters and merged weights agree within 1e-5 and moved far more than that."""
    from ray_unlearn.config import load_config

    finals = {}
    for strategy in ("ddp", "fsdp2"):
        cfg = load_config(None, [f"benchmark.size=micro", f"benchmark.cache_dir={bench_cache}", "ray.num_workers=2",
                                 f"ray.strategy={strategy}", "train.max_steps=3", "train.batch_size=2",
                                 "train.global_batch_size=8", "optim.name=adamw", "optim.lr=1e-3",
                                 "train.checkpoint_every=2",
                                 "model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj, down_proj]"])
        finals[strategy] = run_local(cfg, resolve_inputs(cfg), 2, tmp_path / strategy)
    # fsdp2's checkpoint at step 2 holds the adapter's shards (and their optimizer state), not the frozen base;
    # resumed on one worker, it ends where the uninterrupted run does
    step2 = merge_checkpoint(tmp_path / "fsdp2", 2)
    saved = FileSystemReader(str(step2)).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all(".lora_" in k for k in weights), [k for k in weights if ".lora_" not in k][:3]
    resumed = run_local(cfg, resolve_inputs(cfg), 1, tmp_path / "resumed", resume_from=step2)
    for name in (f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}", "model.safetensors"):
        a, b = load_file(str(resumed / name)), load_file(str(finals["fsdp2"] / name))
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    target = load_file(str(micro_bench.target_dir / "model.safetensors"))
    for name in (f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}", "model.safetensors"):
        ddp, fsdp2 = (load_file(str(finals[s] / name)) for s in ("ddp", "fsdp2"))
        assert set(ddp) == set(fsdp2)
        for key in ddp:
            torch.testing.assert_close(fsdp2[key], ddp[key], atol=1e-5, rtol=0)
    assert len(ddp) == len(target) and (finals["fsdp2"] / ADAPTER_DIR / ADAPTER_CONFIG).is_file()
    moved = (ddp["model.layers.0.self_attn.q_proj.weight"] - target["model.layers.0.self_attn.q_proj.weight"]).abs()
    assert moved.max() > 1e-3
    assert torch.equal(ddp["model.layers.0.self_attn.k_proj.weight"], target["model.layers.0.self_attn.k_proj.weight"])


def test_run_writes_the_adapter_and_the_merged_model(ray_session, micro_bench, bench_cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ray_unlearn.cli import main

    out = tmp_path / "run"
    assert main(["run", "benchmark.size=micro", f"benchmark.cache_dir={bench_cache}", "ray.num_workers=0",
                 "model.lora.r=4", "train.max_steps=2", "optim.lr=1e-2", "eval.enabled=false",
                 f"output_dir={out}"]) == 0
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in (out / "adapter").iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_bench.target_dir), out / "adapter")
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)
    audit = json.loads((out / "audit.json").read_text())["output_model"]  # the audit hashes the merged model
    assert audit["path"] == "model" and "model.safetensors" in audit["files"]
    adapter = json.loads((out / "audit.json").read_text())["output_adapter"]  # and the adapter beside it
    assert adapter["path"] == "adapter" and ADAPTER_WEIGHTS in adapter["files"]
