"""In-training evaluation (what Tune's schedulers read): the loop calls `LoopEnv.evaluate` on rank 0
every `train.eval_every` steps and at the last step, and every rank reports at the same steps."""

from __future__ import annotations

import pytest
import torch

from ray_unlearn.loop import LoopEnv, Unlearner, encode_data
from ray_unlearn.models.io import load_model, load_tokenizer

BASE = ["ray.num_workers=0", "train.batch_size=4", "optim.name=adamw", "optim.weight_decay=0"]
GA_ONLY = ["objective.terms.npo=0", "objective.terms.retain_nll=0", "objective.terms.ga=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one CPU thread is fastest


@pytest.fixture(scope="module")
def bench(micro_bench):
    splits = micro_bench.splits()
    return load_tokenizer(str(micro_bench.target_dir)), splits["forget10"][:4], splits["retain"][:4], \
        str(micro_bench.target_dir)


def run(bench, micro_config, tmp_path, *overrides, rank=0, evaluate=True):
    """Run 5 steps; returns (history, reports as (step, metrics keys, checkpoint?), evaluated steps)."""
    tok, forget, retain, target = bench
    cfg = micro_config(*BASE, *GA_ONLY, "train.max_steps=5", *overrides)
    reports, evaluated = [], []

    def evaluation(module, step):
        assert isinstance(module, torch.nn.Module)
        evaluated.append(step)
        return {"extraction_strength": 1.0 / step, "model_utility": 0.5}

    env = LoopEnv(rank=rank, checkpoint_dir=tmp_path / f"ckpt{rank}",
                  report=lambda logs, ckpt: reports.append((logs["step"], "model_utility" in logs, ckpt is not None)),
                  evaluate=evaluation if evaluate else None)
    u = Unlearner(cfg, load_model(target), None, encode_data(cfg, tok, forget, retain), tok.pad_token_id, env)
    return u.run(), reports, evaluated


def test_evaluates_every_n_steps_and_at_the_end(bench, micro_config, tmp_path):
    history, reports, evaluated = run(bench, micro_config, tmp_path, "train.eval_every=2", "train.log_every=10")
    assert evaluated == [2, 4, 5]
    assert reports == [(2, True, False), (4, True, False), (5, True, True)]
    assert [h["step"] for h in history] == [2, 4, 5]
    assert history[0]["extraction_strength"] == 0.5 and "loss/total" in history[0]


def test_other_ranks_report_at_the_same_steps_without_evaluating(bench, micro_config, tmp_path):
    _, reports0, _ = run(bench, micro_config, tmp_path, "train.eval_every=2", "train.log_every=3")
    _, reports1, evaluated1 = run(bench, micro_config, tmp_path, "train.eval_every=2", "train.log_every=3", rank=1)
    assert evaluated1 == []
    assert [r[0] for r in reports1] == [r[0] for r in reports0] == [2, 3, 4, 5]
    assert [r[1] for r in reports0] == [True, False, True, True]
    assert not any(r[1] for r in reports1)


def test_eval_every_zero_evaluates_only_the_final_model(bench, micro_config, tmp_path):
    _, reports, evaluated = run(bench, micro_config, tmp_path, "train.eval_every=0", "train.log_every=2")
    assert evaluated == [5]
    assert reports == [(2, False, False), (4, False, False), (5, True, True)]


def test_without_an_evaluator_nothing_changes(bench, micro_config, tmp_path):
    history, reports, evaluated = run(bench, micro_config, tmp_path, "train.eval_every=2", "train.log_every=2",
                                      evaluate=False)
    assert evaluated == [] and [h["step"] for h in history] == [2, 4, 5]
    assert reports == [(2, False, False), (4, False, False), (5, False, True)]
