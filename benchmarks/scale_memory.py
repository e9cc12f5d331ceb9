"""Peak memory per worker of SOUL unlearning under each strategy, at 2 workers, side by side.

What it measures. A random-init Llama model (default ~134M parameters: hidden 768, 12 layers,
vocabulary 32000, untied head) is unlearned for `--steps` optimizer steps of the config's default
objective (NPO + retain NLL: the frozen reference model runs too) with Sophia (GNB Hessian at the
first step) on random token sequences, by `ray_unlearn.loop.Unlearner` in `--workers` local
processes over gloo (`ray_unlearn.parallel.local`'s process group, no Ray), once per strategy:

- ddp: a full copy of parameters, gradients, Sophia's m and h and the reference model per worker;
- fsdp2: all of it sharded (rank 0 loads the model, the others start on the meta device, as with zero3);
- zero2 / zero3: DeepSpeed ZeRO stage 2 (optimizer state and gradients partitioned) and 3 (and the
  parameters and the reference model).

Per worker it records (also as it stands once the model is loaded and wrapped: "at start-up", where
only rank 0 of fsdp2 and zero3 holds a full copy) the resident set's high-water mark (VmHWM) minus the resident set before the
model was built (Python, torch, deepspeed, the process group), so the figure is what the model, its
training state and the steps added; the worker with the largest peak stands for the strategy. The
workers run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=131072): by default glibc
raises it after large frees and keeps freed tensors in the heap, so the resident set would only
grow and the high-water mark would count memory no tensor held any more. CPU memory
is what this measures here; on GPUs the same script measures host memory, not device memory.
The last line is

    peak memory per worker vs ddp: fsdp2 R1, zero2 R2, zero3 R3

(goal: fsdp2 and zero3 <= 0.6). Each strategy runs in fresh processes, one after another.

    python benchmarks/scale_memory.py                       # ~134M parameters, 2 steps: a few minutes
    python benchmarks/scale_memory.py --hidden 256 --layers 4 --vocab 4096   # a quick look (~10M)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import torch

STRATEGIES = {"ddp": ["ray.strategy=ddp"], "fsdp2": ["ray.strategy=fsdp2"],
              "zero2": ["ray.strategy=deepspeed", "ray.zero_stage=2"],
              "zero3": ["ray.strategy=deepspeed", "ray.zero_stage=3"]}


def _rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _model(args: argparse.Namespace, meta: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=12 if args.hidden % 12 == 0 else 8,
                         num_key_value_heads=4, max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        return LlamaForCausalLM(config)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, overrides: list[str], out: str) -> None:
    """One worker: build, wrap, take the steps, write its peak."""
    from ray_unlearn.config import load_config
    from ray_unlearn.loop import LoopEnv, UnlearnData, Unlearner, strategy_options
    from ray_unlearn.parallel import STRATEGIES as REGISTRY
    from ray_unlearn.parallel.local import rank_group
    from ray_unlearn.parallel.zero import _import_deepspeed

    with rank_group(rank, world, port):  # joins, then leaves together and ends the process
        cfg = load_config(None, [*overrides, f"ray.num_workers={world}", f"train.max_steps={args.steps}",
                                 "train.batch_size=2", f"train.global_batch_size={2 * world}", "optim.hessian=gnb",
                                 "eval.enabled=false"])
        _import_deepspeed(torch.device("cpu"))  # every strategy's baseline holds the same libraries
        baseline = _rss_kib("VmRSS")
        on_meta = REGISTRY[cfg.ray.strategy].starts_on_meta(**strategy_options(cfg))
        model = _model(args, on_meta and rank != 0)
        ref = _model(args, True) if on_meta else copy.deepcopy(model)
        gen = torch.Generator().manual_seed(1)
        items = [{"input_ids": ids, "labels": [-100] * (args.seq // 2) + ids[args.seq // 2:]}
                 for ids in torch.randint(0, args.vocab, (16, args.seq), generator=gen).tolist()]
        data = UnlearnData(forget=items[:8], retain=items[8:], forget_idk=items[:8])
        env = LoopEnv(rank=rank, world_size=world, checkpoint_dir=Path(out) / f"rank{rank}")
        unlearner = Unlearner(cfg, model, ref, data, 0, env)
        del model, ref
        start = (_rss_kib("VmHWM") - baseline) / 2**20  # loading, wrapping and sharding
        for _ in range(args.steps):
            unlearner.train_step()
        peak = (_rss_kib("VmHWM") - baseline) / 2**20
        Path(out, f"peak{rank}.json").write_text(json.dumps({"peak_gib": peak, "start_gib": start}))


def measure(name: str, args: argparse.Namespace) -> float:
    """The largest per-worker peak (GiB) of one strategy's run."""
    import torch.multiprocessing as mp

    from ray_unlearn.parallel.local import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(args.workers, free_port(), args, STRATEGIES[name], out), nprocs=args.workers)
        figures = [json.loads(Path(out, f"peak{r}.json").read_text()) for r in range(args.workers)]
    peaks = [f["peak_gib"] for f in figures]
    print(f"{name:6s} peak per worker (GiB): " + ", ".join(f"rank {r} {p:.2f}" for r, p in enumerate(peaks))
          + "; at start-up: " + ", ".join(f"rank {r} {f['start_gib']:.2f}" for r, f in enumerate(figures)),
          flush=True)
    return max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    # glibc raises its mmap threshold after large frees, so freed tensors stay in the heap and the resident
    # set only grows; a fixed threshold keeps every large tensor in its own mapping, returned when freed,
    # and the high-water mark tracks the tensors alive at once (set here: the workers inherit it at start)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    params = sum(p.numel() for p in _model(args, True).parameters())
    print(f"model: random-init Llama, {params / 1e6:.0f}M parameters ({params * 4 / 2**30:.2f} GiB in fp32); "
          f"{args.workers} workers, {args.steps} steps of Sophia (GNB) + NPO + retain NLL", flush=True)
    names = args.strategies.split(",")
    peaks = {name: measure(name, args) for name in names}
    others = [n for n in names if n != "ddp"]
    if "ddp" in peaks and others:
        print("peak memory per worker vs ddp: " + ", ".join(f"{n} {peaks[n] / peaks['ddp']:.2f}" for n in others))


if __name__ == "__main__":
    main()
