"""LoRA adapters (peft): wrap a model, check its target modules, and turn a trained adapter model's
weights into the two outputs of a run: the adapter directory (`adapter_config.json` +
`adapter_model.safetensors`, what peft's `save_pretrained` writes and `PeftModel.from_pretrained`
reads) and the merged model's weights under the base model's own names (what `merge_and_unload`
gives: W + (alpha / r)·B@A per adapted Linear).

Both are computed from a full state dict of the peft model, so every strategy produces them the
same way from what it has at hand (ddp: the module's own state; fsdp2: the weights gathered to rank 0).
peft is imported lazily: only runs with `model.lora.r > 0` need it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ray_unlearn.errors import UnlearnError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# where a checkpoint keeps them: beside the merged weights, from_pretrained(checkpoint) would apply them twice
ADAPTER_DIR = "adapter"
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the base model's parameter names
ADAPTER = "default"  # the adapter's name inside the peft model


def is_lora(module: Any) -> bool:
    """Whether `module` (unwrapped) is a peft model with adapters."""
    return isinstance(getattr(module, "peft_config", None), dict) and hasattr(module, "disable_adapter")


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules LoRA can adapt (torch Linear, GPT-2's Conv1D) by name, the output head left out."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head}


def check_lora_targets(target_modules: list[str], model: torch.nn.Module) -> None:
    """One-line error when a target module name matches no Linear of `model` (which may be on the meta
    device), listing the names there are."""
    linears = _linear_modules(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    for target in target_modules:
        if not any(name == target or name.endswith("." + target) for name in linears):
            raise UnlearnError(f"model.lora.target_modules: {target!r} matches no Linear module of the model; "
                               f"its Linear modules are {', '.join(leaves)}")


def apply_lora(model: torch.nn.Module, lora: Any, seed: int) -> torch.nn.Module:
    """`model` wrapped by peft with LoRA adapters as `lora` (config.LoraConfig) says; only the adapters
    train, in the model's dtype (one dtype per FSDP2 unit; bf16 weights train bf16 adapters). A is drawn from
    `seed` (B starts at 0, so the wrapped model computes what `model` did)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(lora.target_modules, model)
    targets = list(lora.target_modules) or sorted({name.rsplit(".", 1)[-1] for name in _linear_modules(model)})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=targets, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config, autocast_adapter_dtype=False)


def base_name(key: str) -> str:
    """The base model's name of a peft model's parameter or module name."""
    return key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".").removesuffix(".base_layer")


def merged_state(module: torch.nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The merged model's weights (base names) from `state`, a full state dict of the peft model
    `module`: W + scaling·B@A for every adapted layer (transposed for fan-in-fan-out Conv1D), computed in
    float32 and stored in W's dtype; the adapter tensors themselves dropped."""
    merged = {base_name(k): v for k, v in state.items() if ".lora_" not in k}
    for name, layer in module.named_modules():
        scaling = getattr(layer, "scaling", None)
        if not isinstance(scaling, dict) or ADAPTER not in scaling:
            continue
        a, b = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]
        delta = scaling[ADAPTER] * (b.float() @ a.float())
        weight = state[f"{name}.base_layer.weight"]
        delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
        merged[base_name(name) + ".weight"] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
    return merged


def write_adapter(out: Path, module: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Write the adapter directory (its two files) as `out`/adapter from `state` (a full state dict of `module`)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out) / ADAPTER_DIR
    out.mkdir(exist_ok=True)
    adapter = get_peft_model_state_dict(module, state_dict=state, adapter_name=ADAPTER, save_embedding_layers=False)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(Path(out) / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    module.peft_config[ADAPTER].save_pretrained(str(out))


def load_adapter(module: torch.nn.Module, path: Path) -> None:
    """Load the adapter `write_adapter` wrote into `path` into the peft model `module` (its base weights are
    the input model's, frozen); every adapter tensor must be there."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not file.is_file():
        raise UnlearnError(f"{path} holds no {ADAPTER_WEIGHTS}: it was not written by a model.lora run; resume it "
                           "with model.lora.r=0, or start fresh with a new name/output_dir")
    saved = json.loads((Path(path) / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    ours = module.peft_config[ADAPTER]
    if saved.get("r") != ours.r or saved.get("lora_alpha") != ours.lora_alpha:
        raise UnlearnError(f"{path} holds an adapter of r={saved.get('r')}, alpha={saved.get('lora_alpha')}; this run "
                           f"has model.lora.r={ours.r}, alpha={ours.lora_alpha}: set those, or start fresh")
    result = set_peft_model_state_dict(module, load_file(str(file)), adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing:
        raise UnlearnError(f"{path}: its adapter lacks {missing[0]}; it was written for other target modules")
