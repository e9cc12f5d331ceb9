"""The unlearning loop in plain PyTorch (no Ray) on the micro benchmark's target model.

Parameters change, metrics are logged and move the right way, checkpoints are written and
resume to exactly the weights of an uninterrupted run, and a NaN loss stops the run before a
bad checkpoint is written.
"""

import copy
import json
import math
import random

import pytest
import torch

from ray_unlearn import loop
from ray_unlearn.errors import UnlearnError
from ray_unlearn.logprobs import batch_nll
from ray_unlearn.loop import (LoopEnv, UnlearnData, Unlearner, batch_slot_indices, checkpoint_history, encode_data,
                              load_checkpoint_weights, lr_factor)
from ray_unlearn.models.io import load_model, load_tokenizer
from ray_unlearn.data.collate import pad_batch

BASE = ["ray.num_workers=0", "train.max_steps=4", "train.batch_size=4", "train.log_every=1",
        "optim.weight_decay=0"]
GA_ONLY = ["objective.terms.npo=0", "objective.terms.retain_nll=0", "objective.terms.ga=1"]


class Interrupted(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one CPU thread is fastest


@pytest.fixture(scope="module")
def bench(micro_bench):
    """(tokenizer, 8 forget items, 8 retain items, target model path) of the micro benchmark."""
    splits = micro_bench.splits()
    return (load_tokenizer(str(micro_bench.target_dir)), splits["forget10"][:8], splits["retain"][:8],
            str(micro_bench.target_dir))


@pytest.fixture
def make(bench, micro_config, tmp_path):
    """make(*overrides, ckpt=, resume_from=, ref=, report=, data=, freeze=) -> (Unlearner, model, cfg)."""
    tok, forget, retain, target = bench

    def build(*overrides, ckpt="ckpt", resume_from=None, ref=True, report=None, data=None, freeze=()):
        cfg = micro_config(*BASE, *overrides)
        model = load_model(target)
        for name, p in model.named_parameters():
            if name in freeze:
                p.requires_grad_(False)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False) if ref else None
        env = LoopEnv(checkpoint_dir=tmp_path / ckpt, resume_from=resume_from)
        if report is not None:
            env.report = report
        data = data if data is not None else encode_data(cfg, tok, forget, retain)
        return Unlearner(cfg, model, ref_model, data, tok.pad_token_id, env), model, cfg

    return build


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def forget_nll(model, data, pad_id):
    with torch.no_grad():
        batch = pad_batch(data.forget, pad_id)
        return batch_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                         batch["labels"]).item()


# ---------------------------------------------------------------------------- training moves things


@pytest.mark.parametrize("optim", [["optim.name=adamw", "optim.lr=1e-3"],
                                   ["optim.name=sophia", "optim.lr=1e-3", "optim.hessian=gnb"]])
def test_every_trainable_parameter_changes(make, optim):
    u, model, _ = make(*optim, "train.max_steps=3", freeze={"model.norm.weight"})
    frozen = model.model.norm.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    u.run()
    for name, p in model.named_parameters():
        if p is frozen:
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), f"{name} did not change"
    assert all(p is not frozen for group in u.optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("optim, extra", [("adamw", set()), ("sophia", {"clip_rate"})])
def test_history_is_logged(make, optim, extra):
    u, _, _ = make(f"optim.name={optim}", "train.log_every=2")
    history = u.run()
    assert [h["step"] for h in history] == [2, 4]
    expected = {"step", "lr", "grad_norm", "loss/total", "loss/npo", "loss/retain_nll", "nll/forget",
                "nll/retain"} | extra
    w = u.cfg.objective.terms  # the logged terms are unweighted; the total weighs them
    for h in history:
        assert expected <= set(h), expected - set(h)
        assert all(math.isfinite(v) for v in h.values())
        assert h["loss/total"] == pytest.approx(w["npo"] * h["loss/npo"] + w["retain_nll"] * h["loss/retain_nll"],
                                                rel=1e-5)
        assert h["loss/retain_nll"] == pytest.approx(h["nll/retain"], rel=1e-5)
        if "clip_rate" in extra:
            assert 0.0 <= h["clip_rate"] <= 1.0


def test_gradient_ascent_raises_forget_nll(make):
    u, model, _ = make("optim.name=adamw", "optim.lr=1e-3", *GA_ONLY, ref=False)
    assert u.ref_streams == [] and u.streams == ["forget"]
    before = forget_nll(model, u.data, u.pad_id)
    history = u.run()
    after = forget_nll(model, u.data, u.pad_id)
    assert after > before + 1.0, (before, after)
    for h in history:  # GA's loss is minus the forget NLL, measured before the step's update
        assert h["loss/ga"] == pytest.approx(-h["nll/forget"], rel=1e-5)
        assert h["loss/total"] == pytest.approx(h["loss/ga"], rel=1e-6)
    assert history[-1]["nll/forget"] > history[0]["nll/forget"]


def test_logged_lr_is_the_lr_of_that_step(make):
    # peak 1e-3, warmup 2 of 4 steps, then linear decay: factors (0+1)/2, (1+1)/2, 1 - 0/2, 1 - 1/2
    u, _, _ = make("optim.name=adamw", "optim.lr=1e-3", "train.warmup_steps=2", "train.lr_schedule=linear")
    history = u.run()
    assert [h["lr"] for h in history] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_written_at_the_end(make, tmp_path):
    reports = []
    u, model, _ = make("optim.name=adamw", "train.max_steps=3", "train.log_every=5",
                       report=lambda logs, ckpt: reports.append((logs["step"], ckpt)))
    history = u.run()
    ckpt = tmp_path / "ckpt" / "step-000003"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000003"]
    assert reports == [(3, ckpt)]
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                "optimizer.pt", "scheduler.pt", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3
    assert [h["step"] for h in history] == [3]
    assert checkpoint_history(ckpt) == history
    fresh = copy.deepcopy(u.ref)  # the untrained target
    load_checkpoint_weights(fresh, ckpt)
    trained = weights(model)
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("optim", [["optim.name=adamw"],
                                   ["optim.name=sophia", "optim.hessian=empirical"],
                                   ["optim.name=sophia", "optim.hessian=gnb"],
                                   ["optim.name=sophia", "optim.hessian=gnb", "ray.strategy=fsdp2"]],
                         ids=["adamw", "sophia-empirical", "sophia-gnb", "sophia-gnb-fsdp2-checkpoint"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(make, optim):
    common = [*optim, "optim.lr=1e-3", "train.checkpoint_every=2", "train.warmup_steps=1",
              "train.lr_schedule=cosine", "train.log_every=1"]

    torch.manual_seed(0)
    full, full_model, _ = make(*common, ckpt="full")
    full_history = full.run()

    def stop_at_2(logs, ckpt):
        if ckpt is not None and logs["step"] == 2:
            raise Interrupted

    torch.manual_seed(0)
    first, _, _ = make(*common, ckpt="parts", report=stop_at_2)
    with pytest.raises(Interrupted):
        first.run()
    assert first.step == 2

    torch.manual_seed(0)  # gnb's samples are keyed by (seed, step, item): no RNG state to restore
    resumed, resumed_model, _ = make(*common, ckpt="parts", resume_from=first.env.checkpoint_dir / "step-000002")
    assert resumed.step == 2 and len(resumed.history) == 2
    resumed_history = resumed.run()
    assert resumed.step == 4
    a, b = weights(full_model), weights(resumed_model)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert [h["step"] for h in resumed_history] == [1, 2, 3, 4]
    for h_full, h_res in zip(full_history, resumed_history):
        assert h_res["loss/total"] == pytest.approx(h_full["loss/total"], rel=1e-5)
        assert h_res["lr"] == pytest.approx(h_full["lr"])


def test_resuming_a_finished_run_reports_its_checkpoint(make, tmp_path):
    u, model, _ = make("optim.name=adamw", "train.max_steps=2")
    u.run()
    reports = []
    done, _, _ = make("optim.name=adamw", "train.max_steps=2", ckpt="ckpt",
                      resume_from=tmp_path / "ckpt" / "step-000002",
                      report=lambda logs, ckpt: reports.append((logs["step"], ckpt)))
    history = done.run()
    assert done.step == 2 and [h["step"] for h in history] == [1, 2]
    assert reports == [(2, tmp_path / "ckpt" / "step-000002")]


def test_nan_loss_stops_before_a_bad_checkpoint(make, tmp_path, monkeypatch):
    real = loop.combined_loss
    calls = []

    def nan_at_step_2(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), logs

    monkeypatch.setattr(loop, "combined_loss", nan_at_step_2)
    u, model, _ = make("optim.name=adamw", "train.checkpoint_every=1")
    with pytest.raises(UnlearnError, match="non-finite") as info:
        u.run()
    assert "at step 2" in str(info.value) and "\n" not in str(info.value)
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert ckpts == ["step-000001"]
    assert json.loads((tmp_path / "ckpt" / "step-000001" / "state.json").read_text())["step"] == 1
    # the model is untouched by the bad step: it still holds step 1's weights
    saved = copy.deepcopy(u.ref)
    load_checkpoint_weights(saved, tmp_path / "ckpt" / "step-000001")
    now = weights(model)
    assert all(torch.equal(v, now[k]) for k, v in saved.state_dict().items())


def test_failed_checkpoint_write_leaves_no_partial_checkpoint(make, tmp_path, monkeypatch):
    real_save = torch.save
    saves = []

    def disk_full_on_second(obj, path, *args, **kwargs):
        saves.append(path)
        if "step-000002" in str(path):
            raise OSError("No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second)
    u, _, _ = make("optim.name=adamw", "train.checkpoint_every=1")
    with pytest.raises(OSError, match="No space left"):
        u.run()
    # step 2's checkpoint was half written: it is neither visible as step-000002 nor left behind
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000001"]
    assert checkpoint_history(tmp_path / "ckpt" / "step-000001")[-1]["step"] == 1


# ---------------------------------------------------------------------------- what the objective needs


def test_reference_model_required(make):
    with pytest.raises(UnlearnError, match="needs a reference model"):
        make("objective.terms.npo=1", ref=False)


def test_retain_stream_required(make, bench, micro_config):
    tok, forget, _, _ = bench
    data = encode_data(micro_config(*BASE), tok, forget, [])
    with pytest.raises(UnlearnError, match="needs the retain stream but it is empty; give retain data"):
        make(data=data)


def test_refusal_stream_needs_question_answer_forget_data(make):
    text_data = UnlearnData(forget=[{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}], retain=[], forget_idk=[])
    with pytest.raises(UnlearnError, match="forget_idk stream but it is empty; give question/answer forget data"):
        make("objective.terms.npo=0", "objective.terms.retain_nll=0", "objective.terms.refusal=1",
             data=text_data, ref=False)


# ---------------------------------------------------------------------------- terms with layers, state, settings

RMU = ["objective.terms={rmu: 1}", "objective.rmu.layer=0", "objective.rmu.steering_coeff=4"]
PDU = ["objective.terms={pdu: 1}", "objective.pdu.dual_init=1", "objective.pdu.dual_step_size=5",
       "objective.pdu.retain_eps=0.01"]  # the micro target's retain NLL is near 0: a small ε keeps λ moving


def test_rmu_steers_the_layer_and_trains_only_the_matching_parameters(make):
    u, model, _ = make(*RMU, r"objective.rmu.trainable_params=model\.layers\.0\.mlp\..*", "optim.name=adamw",
                       "optim.lr=3e-3", "train.max_steps=3")
    assert (u.layers, u.streams, u.ref_streams) == ([0], ["forget", "retain"], ["retain"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.0.mlp.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = u.run()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name
    assert {"loss/rmu", "rmu/forget_act", "rmu/retain_act"} <= set(history[0])
    assert history[-1]["rmu/forget_act"] < history[0]["rmu/forget_act"]  # the forget activations move to c·u
    assert u.states["rmu"]["u"].shape == (model.config.hidden_size,)


def test_rmu_trains_only_what_its_layer_reaches(make):
    # layer 0 of 2: layer 1 and the final norm get no gradient (DDP needs every trained parameter to get one)
    u, model, _ = make(*RMU, "optim.name=adamw", "train.max_steps=1")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.norm.",
                                                                              "lm_head."))}
    assert "model.embed_tokens.weight" not in frozen


def test_rmu_layer_out_of_range_is_one_line_naming_the_valid_range(make):
    with pytest.raises(UnlearnError) as info:
        make("objective.terms={rmu: 1}", "objective.rmu.layer=2")
    assert str(info.value) == "objective.rmu.layer=2 is out of range: the model has 2 decoder layers, valid 0..1"


def test_pdu_updates_lambda_every_step_from_the_logged_retain_loss(make):
    u, _, _ = make(*PDU, "optim.name=adamw", "optim.lr=1e-3")
    history = u.run()
    lambdas = [h["pdu/lambda"] for h in history] + [u.states["pdu"]["lambda"].item()]
    assert lambdas[0] == 1.0
    for h, lam, nxt in zip(history, lambdas, lambdas[1:]):  # λ <- max(0, λ + η·(L_r − ε))
        assert nxt == pytest.approx(max(0.0, lam + 5 * (h["pdu/retain_loss"] - 0.01)), rel=1e-12)
        assert h["loss/pdu"] == pytest.approx(h["pdu/forget_loss"] + lam * (h["pdu/retain_loss"] - 0.01), rel=1e-5)
    assert len(set(lambdas)) == len(lambdas) and min(lambdas) > 0


@pytest.mark.parametrize("name, terms", [("pdu", PDU), ("rmu", RMU)])
def test_term_state_survives_resume(make, name, terms):
    """The resumed run continues with the interrupted run's λ / u: its weights, logs and state are an
    uninterrupted run's."""
    common = [*terms, "optim.name=adamw", "optim.lr=1e-3", "train.checkpoint_every=2"]
    full, full_model, _ = make(*common, ckpt="full")
    full_history = full.run()

    def stop_at_2(logs, ckpt):
        if ckpt is not None and logs["step"] == 2:
            raise Interrupted

    first, _, _ = make(*common, ckpt="parts", report=stop_at_2)
    with pytest.raises(Interrupted):
        first.run()
    assert (first.env.checkpoint_dir / "step-000002" / "term_state.pt").is_file()
    resumed, resumed_model, _ = make(*common, ckpt="parts", resume_from=first.env.checkpoint_dir / "step-000002")
    for key, value in first.states[name].items():  # restored, not drawn again
        assert torch.equal(resumed.states[name][key], value), key
    resumed_history = resumed.run()
    a, b = weights(full_model), weights(resumed_model)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    for h_full, h_res in zip(full_history, resumed_history):
        assert h_res["loss/total"] == pytest.approx(h_full["loss/total"], rel=1e-5)
        if "pdu/lambda" in h_full:
            assert h_res["pdu/lambda"] == pytest.approx(h_full["pdu/lambda"], rel=1e-9)
    for key, value in full.states[name].items():
        assert torch.allclose(resumed.states[name][key], value, rtol=1e-9, atol=0), key


def test_rmu_vector_comes_from_the_seed(make):
    from ray_unlearn.objectives.rmu import rmu_init_state

    a, _, _ = make(*RMU, "train.seed=3", ckpt="a")
    b, model, _ = make(*RMU, "train.seed=3", ckpt="b")
    c, _, _ = make(*RMU, "train.seed=4", ckpt="c")
    assert torch.equal(a.states["rmu"]["u"], b.states["rmu"]["u"])  # every rank draws the same u
    assert not torch.equal(a.states["rmu"]["u"], c.states["rmu"]["u"])
    assert torch.equal(a.states["rmu"]["u"], rmu_init_state(None, model.config.hidden_size, 3)["u"])


# ---------------------------------------------------------------------------- batches and schedules


def test_batch_slot_indices_by_hand():
    n, seed = 5, 3
    epoch0, epoch1 = list(range(n)), list(range(n))
    random.Random(seed * 1_000_003 + 0).shuffle(epoch0)
    random.Random(seed * 1_000_003 + 1).shuffle(epoch1)
    assert batch_slot_indices(n, 2, 0, seed) == epoch0[0:2]
    assert batch_slot_indices(n, 2, 2, seed) == [epoch0[4], epoch1[0]]  # positions 4, 5 straddle the epochs
    assert batch_slot_indices(n, 3, 3, seed) == [epoch1[4], *batch_slot_indices(n, 2, 5, seed)]  # 9 | 10, 11


def test_batch_slot_indices_deterministic_and_cover_each_epoch():
    assert batch_slot_indices(10, 4, 7, seed=1) == batch_slot_indices(10, 4, 7, seed=1)
    assert [batch_slot_indices(10, 5, s, seed=1) for s in range(4)] != \
        [batch_slot_indices(10, 5, s, seed=2) for s in range(4)]
    for epoch in range(3):  # 10 items, batch 5: slots 2e and 2e+1 are exactly epoch e
        seen = batch_slot_indices(10, 5, 2 * epoch, 1) + batch_slot_indices(10, 5, 2 * epoch + 1, 1)
        assert sorted(seen) == list(range(10))


def test_accumulation_and_workers_pick_the_same_items(make):
    """1 worker x 2 accumulation steps sees what 2 workers x 1 step see: slot (step*accum+micro)*world+rank."""
    accum, _, _ = make("train.grad_accum=2", "optim.name=adamw")
    ranks = []
    for r in range(2):
        u, _, _ = make("train.grad_accum=1", "optim.name=adamw")
        u.env.rank, u.env.world_size = r, 2
        ranks.append(u)
    for step in (0, 1, 5):
        accum.step = step
        for u in ranks:
            u.step = step
        for micro, u in enumerate(ranks):
            a, b = accum.micro_batch(micro), u.micro_batch(0)
            assert set(a) == set(b) == {"forget", "retain"}
            for stream in a:
                for key in a[stream]:
                    assert torch.equal(a[stream][key], b[stream][key]), (step, micro, stream, key)
    # ... and different slots hold different batches
    accum.step = 0
    assert not torch.equal(accum.micro_batch(0)["forget"]["input_ids"], accum.micro_batch(1)["forget"]["input_ids"])


def test_lr_factor_by_hand():
    assert [lr_factor(s, 10, 0, "constant") for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    # warmup 4: (s + 1) / 4
    assert [lr_factor(s, 10, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # after warmup, frac = (s - 4) / (10 - 4)
    assert lr_factor(4, 10, 4, "linear") == 1.0
    assert lr_factor(7, 10, 4, "linear") == pytest.approx(0.5)          # 1 - 3/6
    assert lr_factor(10, 10, 4, "linear") == 0.0
    assert lr_factor(12, 10, 4, "linear") == 0.0                       # clamped past the end
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)          # (1 + cos(pi/2)) / 2
    assert lr_factor(5, 10, 4, "cosine") == pytest.approx(0.9330127)    # (1 + cos(pi/6)) / 2
    assert lr_factor(10, 10, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(12, 10, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(0, 8, 0, "linear") == 1.0 and lr_factor(2, 8, 0, "linear") == 0.75
    assert lr_factor(4, 4, 4, "linear") == 1.0                         # warmup == total: no division by 0


def test_checkpoint_of_an_older_version_is_refused_in_one_line(make, tmp_path):
    u, _, _ = make("optim.name=adamw", "train.max_steps=1")
    u.run()
    ckpt = tmp_path / "ckpt" / "step-000001"
    state = json.loads((ckpt / "state.json").read_text())
    del state["strategy"]
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(UnlearnError, match="^checkpoint .* was written by an older ray_unlearn .* start fresh"):
        make("optim.name=adamw", "train.max_steps=2", resume_from=ckpt)


@pytest.mark.parametrize("optim", [["optim.hessian=gnb"], ["optim.hessian=hutchinson", "optim.hessian_interval=1"],
                                   ["optim.hessian=hutchinson", "optim.hvp=double_backward", "optim.hessian_interval=1"]],
                         ids=["gnb", "hutchinson", "hutchinson-double-backward"])
def test_activation_checkpointing_gives_the_same_weights(make, optim):
    common = ["optim.name=sophia", "optim.lr=1e-3", "train.max_steps=2", *optim]
    plain, plain_model, _ = make(*common, ckpt="plain")
    plain.run()
    ac, ac_model, _ = make(*common, "train.activation_checkpointing=true", ckpt="ac")
    assert ac.module.is_activation_checkpointing
    ac.run()
    a, b = weights(plain_model), weights(ac_model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_encode_data_uses_the_jobs_prompt_format(llama3_tokenizer):
    """Forget, forget_idk and retain streams go through data.chat_template / data.system_prompt."""
    from ray_unlearn.config import load_config
    from ray_unlearn.data.collate import encode_qa, prompt_format

    item = {"question": "Where was Ada Lovelace born?", "answer": "Ada Lovelace was born in London."}
    seen = []
    for overrides in ([], ["data.system_prompt=Answer briefly."], ["data.chat_template=false"]):
        cfg = load_config(None, overrides)
        fmt = prompt_format(cfg.data)
        data = encode_data(cfg, llama3_tokenizer, [item], [item])
        expected = encode_qa(llama3_tokenizer, item["question"], item["answer"], cfg.data.max_length, fmt)
        assert data.forget == data.retain == [expected]
        assert data.forget_idk == [encode_qa(llama3_tokenizer, item["question"], cfg.data.refusal,
                                             cfg.data.max_length, fmt)]
        seen.append(data.forget[0]["input_ids"])
    assert len({tuple(ids) for ids in seen}) == 3  # three different encodings


def test_dropout_is_off_while_unlearning(family_model, tmp_path):
    """GPT-2's config has dropout 0.1. Unlearning runs without it: two runs drawing different dropout masks
    (another global RNG state) end at the same weights, NPO's first loss is that of a policy equal to its
    reference, (2/beta) log 2, and the saved config keeps its rates."""
    from ray_unlearn.config import load_config

    path = family_model("gpt2", True)
    tok = load_tokenizer(str(path))
    items = [{"question": f"Where was person {i} born?", "answer": f"Person {i} was born in town {i}."}
             for i in range(4)]
    cfg = load_config(None, [*BASE, "optim.name=adamw", "optim.lr=1e-3", "train.max_steps=2", "train.batch_size=2"])
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = load_model(str(path))
        assert model.config.resid_pdrop == 0.1
        env = LoopEnv(checkpoint_dir=tmp_path / f"run{seed}")
        u = Unlearner(cfg, model, copy.deepcopy(model), encode_data(cfg, tok, items[:2], items[2:]), tok.pad_token_id,
                      env)
        history = u.run()
        assert history[0]["loss/npo"] == pytest.approx(2 / cfg.objective.npo_beta * math.log(2), rel=1e-6)
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    saved = json.loads((tmp_path / "run1" / "step-000002" / "config.json").read_text())
    assert saved["resid_pdrop"] == saved["embd_pdrop"] == saved["attn_pdrop"] == 0.1
