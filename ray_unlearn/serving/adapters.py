"""LoRA adapters served as model ids on one shared base model (Ray-free).

Every adapter of the serve config (`adapters: {id: adapter_dir}`, peft's format: what a `model.lora`
run writes to `<output_dir>/adapter`) is loaded by peft onto ONE copy of the base model per replica.
Rows of different adapters decode in one forward pass: peft's mixed batch takes one adapter name per
row (`BASE`, "__base__", for the base model's own rows), computes every layer's base output for the
whole batch and adds each adapter's B·A·x only to its own rows, so a row's output is what its adapter
(or the base) computes alone.

peft applies the per-row names through forward pre-hooks that it registers on the shared LoRA layers
for the length of one call: two calls running at once would apply each other's names. `SharedBase`
therefore serializes its forward passes with a lock (the decode loop and /v1/verify run in different
threads), and a forward without names runs every row on the base, never on a loaded adapter.

Start-up checks (`check_adapter`), each a one-line `UnlearnError`: the directory exists; it is a
peft LoRA adapter (adapter_config.json with peft_type LORA and no DoRA, adapter_model.safetensors:
safetensors only); it fits the served base: the config of the base it was trained on (its
`base_model_name_or_path`, when that is a readable directory) agrees on the architecture fields, and
every module it adapts exists in the served base with the input and output sizes of its weights.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ray_unlearn.errors import UnlearnError
from ray_unlearn.models.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
# config fields that must agree between the adapter's base and the served base (getattr of a transformers
# config: GPT-2's n_embd / n_layer / n_head answer to hidden_size / num_hidden_layers / num_attention_heads)
ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
               "num_attention_heads", "num_key_value_heads", "head_dim")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


# ---------------------------------------------------------------- start-up checks


def read_adapter_config(adapter_id: str, path: Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter directory, or a one-line error saying what `path` is instead."""
    where = f"adapters.{adapter_id}"
    if not path.exists():
        raise UnlearnError(f"{where}: {path} does not exist; give a LoRA adapter directory "
                           f"(a model.lora run writes <output_dir>/{ADAPTER_DIR})")
    if not path.is_dir():
        raise UnlearnError(f"{where}: {path} is a file, not a LoRA adapter directory")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        hint = (f"; did you mean {path / ADAPTER_DIR}?" if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file() else
                "; a full model directory goes under models, not adapters" if (path / "config.json").is_file() else
                f" (a model.lora run writes one to <output_dir>/{ADAPTER_DIR})")
        raise UnlearnError(f"{where}: {path} is not a LoRA adapter: it holds no {ADAPTER_CONFIG}{hint}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise UnlearnError(f"{where}: {config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise UnlearnError(f"{where}: {path} is not a LoRA adapter (peft_type {kind!r}); only LoRA adapters "
                           "are served")
    if config.get("use_dora"):
        raise UnlearnError(f"{where}: {path} is a DoRA adapter, which cannot be batched with other adapters; "
                           "serve its merged model under models instead")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise UnlearnError(f"{where}: {path} holds no {ADAPTER_WEIGHTS} (only safetensors weights are loaded; "
                           "save the adapter with save_pretrained(..., safe_serialization=True))")
    return config


def config_differences(adapter_base: Any, served_base: Any) -> list[str]:
    """`field adapter-base-value != served-value` for each architecture field the two configs disagree on."""
    out = []
    for name in ARCH_FIELDS:
        a, b = getattr(adapter_base, name, None), getattr(served_base, name, None)
        if a is not None and b is not None and a != b:
            out.append(f"{name} {a} != {b}")
    return out


def _local_config(source: str | None) -> Any | None:
    """The transformers config of a local model directory, or None (no name, a hub id, gone, unreadable)."""
    from transformers import AutoConfig

    if not source or not (Path(source).expanduser() / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(str(Path(source).expanduser()))
    except (OSError, ValueError):
        return None


def adapted_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """Module name (the base model's) -> (in_features, out_features) of every module the adapter at `path`
    adapts, read from the shapes of its lora_A [r, in] and lora_B [out, r] weights (no tensor is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            match = _LORA_KEY.match(key)
            if match is None:
                continue
            module, which = match.groups()
            dims = f.get_slice(key).get_shape()
            shapes.setdefault(module, [0, 0])[0 if which == "A" else 1] = dims[1] if which == "A" else dims[0]
    return {m: (i, o) for m, (i, o) in shapes.items()}


def module_sizes(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or GPT-2 Conv1D module (its weight is [in, out]); None otherwise."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


def check_fits(adapter_id: str, shapes: Mapping[str, tuple[int, int]], base: torch.nn.Module,
               base_id: str) -> None:
    """One-line error unless every module of `shapes` exists in `base` (on any device, meta too) with those
    sizes."""
    modules = dict(base.named_modules())
    layers = getattr(base.config, "num_hidden_layers", None)
    for name, (n_in, n_out) in sorted(shapes.items()):
        if name not in modules:
            raise UnlearnError(f"adapters.{adapter_id}: its base model differs from the served base {base_id!r}: "
                               f"it adapts {name}, which the served base does not have (num_hidden_layers "
                               f"{layers}); serve it with the base it was trained on")
        sizes = module_sizes(modules[name])
        if sizes != (n_in, n_out):
            raise UnlearnError(f"adapters.{adapter_id}: its base model differs from the served base {base_id!r}: "
                               f"{name} is {n_in} -> {n_out} in the adapter, {sizes[0] if sizes else '?'} -> "
                               f"{sizes[1] if sizes else '?'} in the served base (hidden_size / intermediate_size "
                               "differ); serve it with the base it was trained on")


def check_adapter(adapter_id: str, path: str | Path, base_source: str, base_id: str,
                  trust_remote_code: bool = False, base: torch.nn.Module | None = None) -> None:
    """Every start-up check of one adapter against the served base (see the module docstring). `base`: the
    served base on the meta device when the caller built it already (one for all adapters)."""
    from ray_unlearn.models.io import empty_model

    path = Path(path).expanduser()
    config = read_adapter_config(adapter_id, path)
    if base is None:
        base = empty_model(base_source, "float32", trust_remote_code)  # the meta device: shapes, no memory
    trained_on = _local_config(config.get("base_model_name_or_path"))
    differ = config_differences(trained_on, base.config) if trained_on is not None else []
    if differ:
        raise UnlearnError(f"adapters.{adapter_id}: its base model differs from the served base {base_id!r} "
                           f"({config['base_model_name_or_path']}: {', '.join(differ)}); serve it with the base "
                           "it was trained on")
    shapes = adapted_shapes(path)
    if not shapes:
        raise UnlearnError(f"adapters.{adapter_id}: {path / ADAPTER_WEIGHTS} holds no LoRA weights "
                           "(lora_A / lora_B); it is not a LoRA adapter")
    check_fits(adapter_id, shapes, base, base_id)


# ---------------------------------------------------------------- the shared base


class SharedBase(torch.nn.Module):
    """A base model with every adapter loaded (peft), called with one adapter per row.

    `forward(adapters=[id or None per row], **model_kwargs)`: each row through its adapter (None: the
    base); `adapters` omitted = every row on the base. Forward passes are serialized (a lock: peft's
    per-row hooks live on the shared layers). `bound(adapter)` is a model whose every row uses one adapter.
    """

    def __init__(self, peft_model: torch.nn.Module, names: Mapping[str, str]) -> None:
        super().__init__()
        self.peft = peft_model
        self.names = dict(names)  # adapter (model) id -> its name inside the peft model
        self.config = peft_model.config
        self.generation_config = getattr(peft_model, "generation_config", None)
        self.lock = threading.Lock()

    @property
    def adapter_ids(self) -> frozenset[str]:
        return frozenset(self.names)

    def forward(self, adapters: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        rows = kwargs["input_ids"].shape[0]
        adapters = [None] * rows if adapters is None else list(adapters)
        if len(adapters) != rows:
            raise ValueError(f"{len(adapters)} adapter names for {rows} rows")
        unknown = sorted({a for a in adapters if a is not None and a not in self.names})
        if unknown:
            raise ValueError(f"adapter(s) {', '.join(unknown)} not loaded; loaded: {', '.join(self.names)}")
        names = [BASE if a is None else self.names[a] for a in adapters]
        with self.lock:
            return self.peft(adapter_names=names, **kwargs)

    def bound(self, adapter: str | None) -> "BoundAdapter":
        """This model with every row on `adapter` (None: the base)."""
        return BoundAdapter(self, adapter)


class BoundAdapter(torch.nn.Module):
    """A SharedBase seen as one model: every row through one adapter (None: the base). For scoring code that
    calls a plain model."""

    def __init__(self, shared: SharedBase, adapter: str | None) -> None:
        super().__init__()
        self.shared, self.adapter = shared, adapter
        self.config, self.generation_config = shared.config, shared.generation_config

    def forward(self, **kwargs: Any) -> Any:
        return self.shared(adapters=[self.adapter] * kwargs["input_ids"].shape[0], **kwargs)


def load_adapters(model: torch.nn.Module, adapters: Mapping[str, str | Path]) -> SharedBase:
    """`model` (the base, loaded) with every adapter of `adapters` (id -> adapter directory) loaded onto it by
    peft, in eval mode, as a SharedBase. The base's weights are shared, not copied."""
    from peft import PeftModel

    if not adapters:
        raise ValueError("load_adapters: no adapters")
    names = {adapter_id: f"adapter_{i}" for i, adapter_id in enumerate(adapters)}  # peft names: no dots
    items = list(adapters.items())
    first_id, first_path = items[0]
    peft_model = PeftModel.from_pretrained(model, str(first_path), adapter_name=names[first_id], is_trainable=False)
    for adapter_id, path in items[1:]:
        peft_model.load_adapter(str(path), adapter_name=names[adapter_id], is_trainable=False)
    return SharedBase(peft_model.eval(), names).eval()

