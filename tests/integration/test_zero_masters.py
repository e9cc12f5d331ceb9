"""ZeRO in float32 holds each rank's parameters once (zero._share_fp32_masters), on DeepSpeed's real engine.

Two gloo ranks wrap a tiny Llama with Sophia as the client optimizer of ZeRO 1, 2 and 3: every fp32 master
partition is the model's own partition (same storage), and after a step the model's (gathered) weights are
the masters' (the values the optimizer stepped, read through DeepSpeed's per-parameter views). Guards the fix
against a DeepSpeed upgrade that renames what it reads: the bit-for-bit and equality tests in
test_scale_equality.py would still pass with a second copy, only the memory would come back
(benchmarks/scale_memory.py measures it).
"""

from __future__ import annotations


import pytest
import torch

from ray_unlearn.parallel.local import free_port, rank_group

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, stage: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_unlearn.optim.sophia import SophiaG
    from ray_unlearn.parallel import build_strategy

    with rank_group(rank, 2, port):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False)
        with torch.device("cpu" if rank == 0 or stage < 3 else "meta"):
            model = LlamaForCausalLM(config)
        strategy = build_strategy("deepspeed", rank=rank, world_size=2, zero_stage=stage)
        engine, optimizer = strategy.wrap_with_optimizer(model, lambda params: SophiaG(params, lr=1e-2))
        zero = engine.optimizer
        if stage == 3:
            pairs = list(zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat))
        else:
            pairs = [(zero.parallel_partitioned_bit16_groups[i][rank], master)
                     for i, master in enumerate(zero.single_partition_of_fp32_groups)]
        assert pairs and all(low.data_ptr() == master.data_ptr() for low, master in pairs)
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        before = [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]
        ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
        strategy.backward(engine, engine(input_ids=ids, labels=ids).loss)
        strategy.step(engine, optimizer, 1.0)
        moved = 0
        for p, old in zip(engine.module.parameters(), before):
            master = safe_get_full_fp32_param(p)
            with deepspeed.zero.GatheredParameters([p]):
                assert torch.equal(p.detach(), master)
            moved += int(not torch.equal(master, old))
        assert moved == len(before)  # Sophia moved every weight, and the model has the moved values


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_float32_masters_are_the_model_partitions(stage):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(free_port(), stage), nprocs=2, join=True)
