"""The same answer at every strategy on other architectures than the built-in Llama, without Ray.

Two random-init families of tests/conftest.py, run as in test_scale_equality.py (2 gloo processes through
`ray_unlearn.parallel.local.run_local`, Sophia with the GNB Hessian over the global batch every other step,
NPO + retain NLL so that the reference model runs and is sharded under fsdp2 and ZeRO 3), given as paths
(`model.path`, `data.forget_path`, `data.retain_path`):

- Qwen2, untied embeddings: the input and output embeddings are fsdp2 units of their own; q/k/v biases.
- Gemma, tied embeddings: one parameter in the root unit; the scaled embedding's non-persistent buffer;
  norm weights stored as offsets from 1; an odd vocabulary (371 rows), which fsdp2 shards unevenly over
  2 workers (the full tensor it gathers is a view of a padded buffer).

ddp, fsdp2 and DeepSpeed ZeRO 3 end at the same weights within test_scale_equality.py's Sophia
tolerance (at most 1e-4 of the coordinates off by more than 1e-6). ZeRO 2 (the same flat-partition
optimizer path as ZeRO 3, without partitioned parameters) agreed too and is left to test_scale_equality.py
to keep CI's time.

Not here: GPT-2 (tied) agrees too except on its attention key biases, whose gradient is identically zero
(adding a constant to every key's score leaves the softmax unchanged): Sophia moves such a coordinate by
±lr on the sign of its rounding noise, a different sign under each reduction order, without changing
what the model computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ray_unlearn.job import resolve_inputs
from ray_unlearn.parallel.local import run_local

pytestmark = pytest.mark.slow

SOPHIA = ["optim.name=sophia", "optim.hessian=gnb", "optim.hessian_interval=2", "optim.lr=1e-3"]
STRATEGIES = {"ddp": (), "fsdp2": (), "zero2": ("ray.zero_stage=2",), "zero3": ("ray.zero_stage=3",)}
ITEMS = [{"question": f"Where was {name} born?", "answer": f"{name} was born in {city}."}
         for name, city in [("Ada Lovelace", "London"), ("Alan Turing", "Maida Vale"), ("Grace Hopper", "New York"),
                            ("Edsger Dijkstra", "Rotterdam"), ("Barbara Liskov", "Los Angeles"),
                            ("Donald Knuth", "Milwaukee"), ("Frances Allen", "Peru, New York"),
                            ("John Backus", "Philadelphia")]]


@pytest.fixture(scope="module")
def runs(family_model, tmp_path_factory):
    """runs(family, tied, strategy) -> final weights of 3 steps on 2 workers; cached."""
    from ray_unlearn.config import load_config

    data = tmp_path_factory.mktemp("data")
    (data / "forget.json").write_text(json.dumps(ITEMS[:4]))
    (data / "retain.json").write_text(json.dumps(ITEMS[4:]))
    done: dict[tuple, dict[str, torch.Tensor]] = {}

    def run(family: str, tied: bool, strategy: str) -> dict[str, torch.Tensor]:
        key = (family, tied, strategy)
        if key not in done:
            root = tmp_path_factory.mktemp(f"{family}-{strategy}")
            name = "deepspeed" if strategy.startswith("zero") else strategy
            cfg = load_config(None, [f"model.path={family_model(family, tied)}", f"ray.strategy={name}",
                                     f"data.forget_path={data / 'forget.json'}",
                                     f"data.retain_path={data / 'retain.json'}",
                                     "ray.num_workers=2", "train.max_steps=3", "train.batch_size=1",
                                     "train.global_batch_size=4", "train.log_every=1", f"output_dir={root / 'out'}",
                                     *SOPHIA, *STRATEGIES[strategy]])
            final = run_local(cfg, resolve_inputs(cfg), 2, root)
            done[key] = load_file(str(final / "model.safetensors"))
        return done[key]

    return run


def assert_sophia_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    frac = float((diff > 1e-6).double().mean())
    assert frac <= 1e-4, f"{frac:.2e} of coordinates differ by more than 1e-6 (max {float(diff.max()):.2e})"


@pytest.mark.parametrize("name, tied", [("qwen2", False), ("gemma", True)], ids=["qwen2-untied", "gemma-tied"])
def test_strategies_agree_with_ddp(runs, family_model, name, tied):
    """fsdp2 and ZeRO 3 against ddp (the argument is `name`: a `family` one runs every family)."""
    start = load_file(str(family_model(name, tied) / "model.safetensors"))
    if name == "gemma":  # keep covering fsdp2's uneven shards
        assert start["model.embed_tokens.weight"].shape[0] % 2 == 1
    ddp = runs(name, tied, "ddp")
    moved = torch.cat([(ddp[k] - start[k]).abs().flatten() for k in ddp])
    assert float((moved > 1e-4).double().mean()) > 0.5  # far above the tolerance: the runs really trained
    assert ("lm_head.weight" in ddp) == (not tied)
    for strategy in ("fsdp2", "zero3"):
        assert_sophia_close(ddp, runs(name, tied, strategy))
