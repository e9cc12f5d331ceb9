"""The same answer at every scale (issue 6, point 4), on the micro benchmark, without Ray.

Every run unlearns the same model on the same global batches (batch_size items per micro-batch,
so workers x accumulation steps is constant) with NPO + retain NLL (the reference model runs, and is
sharded under fsdp2 and ZeRO 3) and Sophia with the GNB Hessian estimated over the global batch every other
step. Runs go through `ray_unlearn.parallel.local.run_local`: real processes over gloo, the same
loop and strategy objects Ray Train's workers run.

Tolerances. AdamW: max abs difference <= 1e-5. Sophia: its step is lr * sign(m) * min(|m|/(rho*bs*h), 1),
so a coordinate whose momentum is within rounding of zero can move by +lr in one run and -lr in
another, however small the rounding difference that tipped it; we require at most 1e-4 of the
coordinates to differ by more than 1e-6 (and check the runs moved the weights far more than that).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ray_unlearn.job import resolve_inputs
from ray_unlearn.parallel.local import merge_checkpoint, run_local

pytestmark = pytest.mark.slow

SOPHIA = ["optim.name=sophia", "optim.hessian=gnb", "optim.hessian_interval=2", "optim.lr=1e-3"]
ADAMW = ["optim.name=adamw", "optim.lr=1e-3"]
HUTCHINSON = ("optim.name=sophia", "optim.hessian=hutchinson", "optim.hessian_interval=2", "optim.lr=1e-3")
ZERO = {stage: (f"ray.zero_stage={stage}",) for stage in (1, 2, 3)}  # extra overrides of a deepspeed run
GLOBAL_ITEMS = 8  # forget items per optimizer step (and as many retain items)


@pytest.fixture(scope="module")
def runs(micro_bench, bench_cache, tmp_path_factory):
    """runs(strategy, workers, optim, resume_from=None, every=0, items=GLOBAL_ITEMS) -> (final weights, run root);
    cached."""
    from ray_unlearn.config import load_config

    done: dict[tuple, tuple[dict, Path]] = {}

    def run(strategy: str, workers: int, optim: tuple[str, ...] = tuple(SOPHIA), resume_from: Path | None = None,
            every: int = 0, items: int = GLOBAL_ITEMS):
        key = (strategy, workers, optim, str(resume_from), every, items)
        if key not in done:
            cfg = load_config(None, [f"benchmark.size=micro", f"benchmark.cache_dir={bench_cache}",
                                     f"ray.strategy={strategy}", f"ray.num_workers={workers}", "train.max_steps=4",
                                     "train.batch_size=2",
                                     f"train.global_batch_size={items}", f"train.checkpoint_every={every}",
                                     "train.log_every=1", *optim])
            root = tmp_path_factory.mktemp(f"{strategy}-{workers}")
            final = run_local(cfg, resolve_inputs(cfg), workers, root, resume_from)
            done[key] = (load_file(str(final / "model.safetensors")), root)
        return done[key]

    return run


def _target(micro_bench) -> dict[str, torch.Tensor]:
    return load_file(str(micro_bench.target_dir / "model.safetensors"))


# ZeRO against ddp with accumulation: ZeRO's reduce-scatter adds each micro-batch's reduced gradient into the
# partition (ddp reduces the accumulated sum once), a rounding difference Sophia's unclipped coordinates carry
# further. Measured on micro at 2 workers x 2 micro-batches: ZeRO 3 1 of 156k coordinates off by more than 1e-6
# (max 3.8e-5), ZeRO 2 2 (max 6.6e-5): inside the project's 1e-4. Without accumulation ZeRO 3 is ddp bit for bit
# (test_zero3_without_accumulation_is_ddp_bit_for_bit); until its decoder blocks were made leaf modules its hooks
# also regrouped a gradient sum inside every block (zero._gather_per_block): then 1.67e-4 here (25 of 150k), and
# ZeRO 3 needed a bound of its own.


def assert_sophia_close(a: dict, b: dict, bound: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    frac = float((diff > 1e-6).double().mean())
    assert frac <= bound, f"{frac:.2e} of coordinates differ by more than 1e-6 (max {float(diff.max()):.2e})"


def assert_moved(final: dict, start: dict) -> None:
    moved = torch.cat([(final[k] - start[k]).abs().flatten() for k in final if k in start])
    assert float((moved > 1e-4).double().mean()) > 0.5  # far above the tolerances: the runs really trained


def test_ddp_and_fsdp2_agree_at_two_workers(runs, micro_bench):
    ddp, _ = runs("ddp", 2)
    fsdp2, _ = runs("fsdp2", 2)
    assert_moved(ddp, _target(micro_bench))
    assert_sophia_close(ddp, fsdp2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_workers_times_accumulation_gives_the_same_result(runs, strategy):
    reference, _ = runs("ddp", 2)
    for workers in (1, 4):
        assert_sophia_close(reference, runs(strategy, workers)[0])


def test_adamw_ddp_and_fsdp2_within_1e_5(runs, micro_bench):
    ddp, _ = runs("ddp", 2, tuple(ADAMW))
    fsdp2, _ = runs("fsdp2", 2, tuple(ADAMW))
    assert_moved(ddp, _target(micro_bench))
    for k in ddp:
        torch.testing.assert_close(fsdp2[k], ddp[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_with_another_worker_count_equals_the_uninterrupted_run(runs, strategy):
    """A 2-worker run checkpointed at step 2; resumed from there by 1 and (fsdp2, whose DCP shards are
    resharded on load) by 4 workers. ddp's checkpoint is the full state whatever the count."""
    uninterrupted, root = runs(strategy, 2, every=2)
    halfway = merge_checkpoint(root, 2)
    for workers in ((1, 4) if strategy == "fsdp2" else (1,)):
        resumed, _ = runs(strategy, workers, resume_from=halfway)
        assert_sophia_close(uninterrupted, resumed)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_activation_checkpointing_changes_nothing_but_memory(runs, strategy):
    reference, _ = runs("ddp", 2)
    checkpointed, _ = runs(strategy, 2, (*SOPHIA, "train.activation_checkpointing=true"))
    assert_sophia_close(reference, checkpointed)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_agrees_with_ddp_at_two_workers(runs, micro_bench, stage):
    """Sophia on ZeRO's flat partitions, its GNB Hessian folded in through an engine step."""
    ddp, _ = runs("ddp", 2)
    zero, _ = runs("deepspeed", 2, (*SOPHIA, *ZERO[stage]))
    assert_moved(zero, _target(micro_bench))
    assert_sophia_close(ddp, zero)


def test_zero3_without_accumulation_is_ddp_bit_for_bit(runs):
    """2 workers x 1 micro-batch: nothing is reduced in another order, and ZeRO 3's backward pass is ddp's (each
    decoder block a ZeRO-3 leaf module: zero._gather_per_block), so it ends at ddp's weights bit for bit, and so
    does its step-2 checkpoint resumed by 1 worker (the plain optimizer). Before the blocks were leaf modules
    ZeRO 3's gradients were ~1 ulp off in most coordinates from the first backward pass on; Sophia amplified that
    to 2 to 78 of 156k coordinates off by more than 1e-6 on the micro models of benchmark seeds 0-5, and to 0.78 %
    in CI's Ray run (a sign step flipped in steps 1-2 moved the logits at step 2's GNB estimate by up to 7e-3 on
    seed 5, within 23x of changing a sampled label; one changed label alone moves 1.3 % of the coordinates)."""
    ddp, _ = runs("ddp", 2, items=4)
    zero, root = runs("deepspeed", 2, (*SOPHIA, *ZERO[3]), every=2, items=4)
    resumed, _ = runs("deepspeed", 1, (*SOPHIA, *ZERO[3]), resume_from=merge_checkpoint(root, 2), items=4)
    for k in ddp:
        assert torch.equal(zero[k], ddp[k]), k
        assert torch.equal(resumed[k], ddp[k]), k


@pytest.mark.parametrize("stage, workers", [(2, 1), (3, 4)])
def test_deepspeed_workers_times_accumulation_gives_the_same_result(runs, stage, workers):
    """Against ddp 2 x 2: ZeRO 2 on 1 worker x 4, ZeRO 3 on 4 workers x 1 (each pairing also ran the other
    way when this was written; CI keeps one per stage for time)."""
    reference, _ = runs("ddp", 2)
    assert_sophia_close(reference, runs("deepspeed", workers, (*SOPHIA, *ZERO[stage]))[0])


@pytest.mark.parametrize("stage", [2, 3])
def test_adamw_deepspeed_within_1e_5_of_ddp(runs, stage):
    """ZeRO 2 within 1e-5 everywhere. ZeRO 3 rounds each micro-batch's reduce-scatter on its own (see the note
    above assert_sophia_close), and Adam divides by sqrt(v): a coordinate whose gradient is within rounding of zero
    takes a near-sign step either way, as Sophia's do. So ZeRO 3: at most 2e-5 of the coordinates beyond 1e-5, none
    beyond 1e-4 (measured on the AMD EPYC CI runs on: 1 of 150k off by 1.8e-5; 0 elsewhere)."""
    ddp, _ = runs("ddp", 2, tuple(ADAMW))
    zero, _ = runs("deepspeed", 2, (*ADAMW, *ZERO[stage]))
    if stage == 2:
        for k in ddp:
            torch.testing.assert_close(zero[k], ddp[k], rtol=0, atol=1e-5)
        return
    diff = torch.cat([(zero[k] - ddp[k]).abs().flatten() for k in ddp])
    assert float((diff > 1e-5).double().mean()) <= 2e-5 and float(diff.max()) <= 1e-4, float(diff.max())


@pytest.mark.parametrize("stage, workers", [(2, 1), (3, 2)])
def test_deepspeed_resume_equals_the_uninterrupted_run(runs, stage, workers):
    """A 2-worker ZeRO run checkpointed at step 2 (each parameter's fp32 master and Sophia state whole, every
    rank writing its share), resumed by as many workers (ZeRO 3) and by 1 (ZeRO 2: the plain optimizer)."""
    uninterrupted, root = runs("deepspeed", 2, (*SOPHIA, *ZERO[stage]), every=2)
    halfway = merge_checkpoint(root, 2)
    assert {p.name for p in (halfway / "deepspeed").iterdir()} == {
        "optimizer.json", "state-00000-of-00002.safetensors", "state-00001-of-00002.safetensors"}
    resumed, _ = runs("deepspeed", workers, (*SOPHIA, *ZERO[stage]), resume_from=halfway)
    assert_sophia_close(uninterrupted, resumed)


def test_deepspeed_checkpoint_of_one_worker_resumes_on_four(runs):
    """The other way: a 1-worker checkpoint (the plain optimizer's state) split over 4 ZeRO 2 partitions."""
    uninterrupted, root = runs("deepspeed", 1, (*SOPHIA, *ZERO[2]), every=2)
    resumed, _ = runs("deepspeed", 4, (*SOPHIA, *ZERO[2]), resume_from=merge_checkpoint(root, 2))
    assert_sophia_close(uninterrupted, resumed)


@pytest.mark.parametrize("strategy, extra", [("fsdp2", ()), ("deepspeed", ZERO[2])])
def test_mixed_precision_keeps_float32_weights_and_trains_as_float32_does(runs, micro_bench, strategy, extra):
    """train.mixed_precision=bf16 (FSDP2's MixedPrecisionPolicy; DeepSpeed's bf16 mode with fp32 masters):
    the weights written are float32 masters; the loss follows the float32 run within bf16's rounding
    (measured: within 0.6 % at every step; 2 % allowed); and the weights differ from the float32 run's
    (the forward really ran in bf16: measured, 97-99 % of coordinates differ by more than 1e-6)."""
    import json

    fp32, fp32_root = runs("ddp", 2, tuple(ADAMW))
    mixed, mixed_root = runs(strategy, 2, (*ADAMW, "train.mixed_precision=bf16", *extra))
    assert all(t.dtype == torch.float32 for t in mixed.values())
    assert_moved(mixed, _target(micro_bench))
    diff = torch.cat([(mixed[k] - fp32[k]).abs().flatten() for k in fp32])
    assert float((diff > 1e-6).double().mean()) > 0.5

    def losses(root: Path) -> list[float]:
        state = max(root.rglob("state.json"), key=lambda p: json.loads(p.read_text())["step"])
        return [h["loss/total"] for h in json.loads(state.read_text())["history"]]

    a, b = losses(fp32_root), losses(mixed_root)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 0.02 * abs(x), (a, b)


def test_stateful_and_layer_terms_give_the_same_result_at_every_scale(runs, micro_bench):
    """RMU (a hooked decoder layer's output, a seeded random direction) and PDU (a dual variable updated
    from the step's retain loss, averaged over ranks): 1 worker x 4, ddp 2 x 2 and fsdp2 2 x 2 end at the
    same weights (AdamW, 1e-5) and the same λ at every step."""
    import json

    terms = (*ADAMW, "objective.terms={rmu: 1, pdu: 0.5}", "objective.rmu.layer=0", "objective.pdu.dual_init=1",
             "objective.pdu.retain_eps=0.01")
    results = {name: runs(strategy, workers, terms) for name, strategy, workers in
               (("ddp1", "ddp", 1), ("ddp2", "ddp", 2), ("fsdp2", "fsdp2", 2))}

    def lambdas(root: Path) -> list[float]:
        state = max(root.rglob("state.json"), key=lambda p: json.loads(p.read_text())["step"])
        return [h["pdu/lambda"] for h in json.loads(state.read_text())["history"]]

    ddp2, root = results["ddp2"]
    assert_moved(ddp2, _target(micro_bench))
    assert len(set(lambdas(root))) > 1  # the dual variable moved
    for name in ("ddp1", "fsdp2"):
        weights, other = results[name]
        for k in ddp2:
            torch.testing.assert_close(weights[k], ddp2[k], rtol=0, atol=1e-5, msg=f"{name}: {k}")
        assert lambdas(other) == pytest.approx(lambdas(root), rel=1e-6, abs=1e-7)


def test_influence_unlearning_gives_the_same_result_at_every_scale(runs, micro_bench):
    """optim.name=influence: the retain Fisher (folded from reduced global-batch gradients) and the
    preconditioned steps are the same for 1 x 4, ddp 2 x 2, fsdp2 2 x 2 and ZeRO 3 2 x 2, and the forget NLL
    rises while the run steps.

    Tolerance: 1e-5 plus 1e-4 of each coordinate's own update. lr / damping = 1 makes the steps large (up to
    0.68 in 4 steps) wherever F is small, and ZeRO 3's reduce-scatter rounds each micro-batch's gradient on its
    own, so a rounding difference in g and F scales with the update: measured on micro, ZeRO 3 vs ddp up to
    1.03e-5 (on an update of 0.68; 4.9e-6 above 1e-4 of the update), ddp 1 and fsdp2 1.2e-7."""
    import json

    influence = ("optim.name=influence", "optim.lr=1e-4", "optim.damping=1e-4", "optim.grad_clip=0",
                 "objective.terms={ga: 1}")
    ddp2, root = runs("ddp", 2, influence)
    assert_moved(ddp2, _target(micro_bench))
    state = max(root.rglob("state.json"), key=lambda p: json.loads(p.read_text())["step"])
    history = json.loads(state.read_text())["history"]
    assert history[0]["fisher_batches"] > 1 and history[-1]["nll/forget"] > 2 * history[0]["nll/forget"]
    start = _target(micro_bench)
    for strategy, workers, extra in (("ddp", 1, ()), ("fsdp2", 2, ()), ("deepspeed", 2, ZERO[3])):
        weights, _ = runs(strategy, workers, (*influence, *extra))
        for k in ddp2:
            off = (weights[k] - ddp2[k]).abs() - 1e-4 * (ddp2[k] - start[k]).abs()
            assert float(off.max()) <= 1e-5, f"{strategy} {workers}: {k} off by {float(off.max()):.2e}"


GRIN = ("localize.method=grin", "localize.fraction=0.05", "localize.noise=0.01")


@pytest.mark.parametrize("optim,scope", [(tuple(ADAMW), "global"), (tuple(SOPHIA), "per_tensor")])
def test_grin_selects_the_same_entries_and_moves_only_them_at_every_scale(runs, micro_bench, optim, scope):
    """GRIN (localize.method=grin): the ratio of mean forget to mean retain gradients (reduced global-batch
    gradients), its top 5 %, the noise and the masked fine-tune are the same for ddp 1 x 4, ddp 2 x 2 and
    fsdp2 2 x 2 (whose masks are sharded like the parameters): the same masks, AdamW within 1e-5 (measured
    7.7e-8), Sophia within its bound (measured 1.9e-9); every unselected entry is bit-identical to the
    target's, every selected one moved (noise, then training); fsdp2 checkpointed at step 2 and resumed on
    1 worker keeps the masks and ends where the uninterrupted run does."""
    run = (*optim, *GRIN, f"localize.scope={scope}")
    target = _target(micro_bench)
    ddp1, root = runs("ddp", 1, run)
    masks = load_file(str(merge_checkpoint(root, 4) / "localize.safetensors"))
    assert masks.keys() == ddp1.keys() - {"lm_head.weight"} or masks.keys() == ddp1.keys()
    total = sum(m.numel() for m in masks.values())
    if scope == "global":  # the top 5 % of the whole model (ties kept)
        assert round(0.05 * total) <= sum(int(m.sum()) for m in masks.values()) <= 0.0505 * total
    else:  # each tensor its own top 5 %
        assert all(round(0.05 * m.numel()) <= int(m.sum()) <= 0.06 * m.numel() + 1 for m in masks.values())
    for k, m in masks.items():
        kept = m == 0
        assert torch.equal(ddp1[k][kept], target[k][kept]), f"an unselected entry of {k} moved"
        assert bool((ddp1[k][~kept] != target[k][~kept]).all()), f"a selected entry of {k} did not move"
    for strategy, workers, every in (("ddp", 2, 0), ("fsdp2", 2, 2)):
        weights, other = runs(strategy, workers, run, every=every)
        other_masks = load_file(str(merge_checkpoint(other, 4) / "localize.safetensors"))
        assert all(torch.equal(other_masks[k], masks[k]) for k in masks), f"{strategy} {workers} chose others"
        close = assert_sophia_close if optim == tuple(SOPHIA) else (
            lambda a, b: [torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5) for k in b])
        close(weights, ddp1)
        for k, m in masks.items():
            assert torch.equal(weights[k][m == 0], target[k][m == 0])
    _, fsdp2_root = runs("fsdp2", 2, run, every=2)
    resumed, _ = runs("fsdp2", 1, run, resume_from=merge_checkpoint(fsdp2_root, 2))
    close(resumed, ddp1)
    for k, m in masks.items():
        assert torch.equal(resumed[k][m == 0], target[k][m == 0])


def test_hutchinson_by_difference_under_every_strategy(runs, micro_bench):
    """Sophia-H with H*u as a central difference of reduced gradients (optim.hvp=difference, the default)
    runs sharded. ddp and fsdp2 at 2 workers reduce alike and end bit-identical. Other partitions (1 x 4,
    ZeRO's separately reduced g+ and g-) are held to a looser bound, for a reason the double backward does
    not have: each gradient carries float32 rounding of ~1e-7 |g|, which the difference divides by 2 eps
    (1e-4), and once the weights differ by an ulp that rounding no longer matches between the runs. Measured
    on micro (fraction of coordinates off by > 1e-6, max abs): 1 x 4 4.9e-3 / 2.7e-5, ZeRO 1 3.4e-3 / 2.5e-5,
    ZeRO 2 1.0e-2 / 2.7e-5, ZeRO 3 5.7e-3 / 4.0e-5; the double backward's 1 x 4 vs 2 x 2 is 0 / 4.5e-7.
    A momentum within that noise of zero can flip its sign step (off by 2 lr = 2e-3), as the module docstring
    says of every Sophia run: on a micro model built on another day, 1 x 4 flipped 1 of 156k coordinates
    (576 off by > 1e-6). So at most 1e-4 of the coordinates may be off by more than 1e-4."""
    ddp, _ = runs("ddp", 2, HUTCHINSON)
    assert_moved(ddp, _target(micro_bench))
    assert_sophia_close(ddp, runs("fsdp2", 2, HUTCHINSON)[0])
    # ZeRO 2 too: in float32 its masters are the module's weights (zero._share_fp32_masters), so theta is kept
    # before the module moves to theta + eps*u (2026-12-07: 5.1e-3 / 4.2e-5; ZeRO 1 5.2e-3 / 5.8e-5)
    for other in (runs("fsdp2", 1, HUTCHINSON)[0], runs("deepspeed", 2, (*HUTCHINSON, *ZERO[3]))[0],
                  runs("deepspeed", 2, (*HUTCHINSON, *ZERO[2]))[0]):
        diff = torch.cat([(ddp[k] - other[k]).abs().flatten() for k in ddp])
        off, flipped = float((diff > 1e-6).double().mean()), float((diff > 1e-4).double().mean())
        assert off <= 3e-2 and flipped <= 1e-4, f"{off:.2e} off by > 1e-6, {flipped:.2e} by > 1e-4"
