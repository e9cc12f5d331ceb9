"""Decoder layers of an HF causal LM, their outputs captured during a forward pass, and its dropout.

Layer ℓ is 0-based, as in `model.layers.ℓ`; its output is what HF's `output_hidden_states`
returns as `hidden_states[ℓ + 1]` (index 0 is the embeddings). A forward hook keeps only the
layers asked for, instead of every layer's output.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder blocks of `model` in order: modules of the classes HF names in `_no_split_modules`.

    `model` may be wrapped (DDP, a DeepSpeed engine): the module inside is searched. FSDP2's
    `fully_shard` swaps a block's class for a subclass (FSDPLlamaDecoderLayer), hence the MRO.
    """
    model = getattr(model, "module", model)
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if m is not model and any(c.__name__ in names for c in type(m).__mro__)]


def params_through_layer(model: Any, layer: int) -> list[str]:
    """Names of the parameters a function of decoder layer `layer`'s output depends on: the input
    embeddings' and those of layers 0..layer (not the later layers, the final norm or an untied head)."""
    embeddings = model.get_input_embeddings()
    reached = {id(p) for m in [embeddings, *decoder_layers(model)[:layer + 1]] for p in m.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in reached]


@contextmanager
def capture_layer_outputs(model: Any, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forward passes of `model` store the output of each decoder layer in `layers`
    (tensor [B, T, d], in the graph) in the yielded dict; no layers: nothing is hooked."""
    captured: dict[int, torch.Tensor] = {}
    if not layers:
        yield captured
        return
    blocks = decoder_layers(model)

    def keep(index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[i].register_forward_hook(keep(i)) for i in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout rate of `model` to 0, in place: `nn.Dropout` modules (GPT-2's attention, residual
    and embedding dropout) and the float rates HF modules keep in attributes named like `attention_dropout`
    or `dropout` (read in training mode only). The model's config, what a save writes, keeps its rates."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
