"""Resolving a job's inputs in the driver: benchmark or user data, model paths, and the checks."""

import json

import pytest

from ray_unlearn.errors import UnlearnError
from ray_unlearn.job import load_checked, resolve_inputs
from ray_unlearn.models import build
from ray_unlearn.pipeline import validate


@pytest.fixture
def no_build(monkeypatch):
    """Make any benchmark build or lookup fail: the job must not need the built-in benchmark."""
    def refuse(*args, **kwargs):
        raise AssertionError("the built-in benchmark was used")

    monkeypatch.setattr(build, "ensure_benchmark", refuse)


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return str(path)


def test_builtin_benchmark_inputs(micro_bench, micro_config):
    inputs = resolve_inputs(micro_config())
    splits = micro_bench.splits()
    assert inputs.bench == "BUILTIN_micro_forget10"
    assert inputs.model_path == inputs.tokenizer_path == str(micro_bench.target_dir)
    assert inputs.retain_model_path == str(micro_bench.retain_dir)
    assert inputs.kind == "qa"
    assert inputs.forget == splits["forget10"]
    assert inputs.retain == splits["retain"]  # the built-in splits do not overlap
    assert set(inputs.eval_splits) == {"forget", "retain", "world_facts", "holdout"}
    assert inputs.eval_splits["holdout"] == splits["holdout"]  # MIA non-members: never trained on
    assert inputs.mia_reference_path == str(micro_bench.retain_dir)
    assert inputs.build_figures == micro_bench.manifest


def test_builtin_forget_split_choice(micro_bench, micro_config):
    inputs = resolve_inputs(micro_config("data.forget_split=forget01"))
    assert inputs.bench == "BUILTIN_micro_forget01"
    assert inputs.forget == micro_bench.splits()["forget01"]
    assert 0 < len(inputs.forget) < len(micro_bench.splits()["forget10"])


def test_unknown_builtin_forget_split(micro_bench, micro_config):
    with pytest.raises(UnlearnError, match="data.forget_split: 'forget99' is not one of forget01, forget05, forget10"):
        resolve_inputs(micro_config("data.forget_split=forget99"))


def test_user_model_and_data_need_no_benchmark(micro_bench, micro_config, tmp_path, no_build):
    forget = micro_bench.splits()["forget10"][:4]
    retain = micro_bench.splits()["retain"][:6]
    cfg = micro_config(f"model.path={micro_bench.target_dir}",
                       f"data.forget_path={write_jsonl(tmp_path / 'f.jsonl', forget)}",
                       f"data.retain_path={write_jsonl(tmp_path / 'r.jsonl', retain)}")
    inputs = resolve_inputs(cfg)
    assert inputs.bench == "CUSTOM"
    assert inputs.model_path == inputs.tokenizer_path == str(micro_bench.target_dir)
    assert inputs.retain_model_path is None  # no retrained model known for a user's model
    assert [it["question"] for it in inputs.forget] == [it["question"] for it in forget]
    assert len(inputs.retain) == 6
    assert set(inputs.eval_splits) == {"forget", "retain"}  # no holdout: eval.mia=auto runs no attack
    assert inputs.build_figures is None and inputs.mia_reference_path is None


def test_user_model_on_builtin_data_has_no_retain_model(micro_bench, micro_config):
    inputs = resolve_inputs(micro_config(f"model.path={micro_bench.retain_dir}"))
    assert inputs.model_path == str(micro_bench.retain_dir)
    assert inputs.retain_model_path is None
    explicit = resolve_inputs(micro_config(f"model.path={micro_bench.retain_dir}",
                                           f"model.retain_model={micro_bench.target_dir}",
                                           f"model.tokenizer={micro_bench.root / 'tokenizer'}"))
    assert explicit.retain_model_path == str(micro_bench.target_dir)
    assert explicit.tokenizer_path == str(micro_bench.root / "tokenizer")


def test_text_forget_corpus(micro_bench, micro_config, tmp_path, no_build):
    corpus = tmp_path / "forget.txt"
    corpus.write_text("Zorvan Kettle wrote Silent River.\n\nQuell lives in Norhaven.\n")
    retain = write_jsonl(tmp_path / "r.jsonl", micro_bench.splits()["retain"][:3])
    inputs = resolve_inputs(micro_config(f"model.path={micro_bench.target_dir}", f"data.forget_path={corpus}",
                                         f"data.retain_path={retain}"))
    assert inputs.kind == "text"
    assert [it["text"] for it in inputs.forget] == ["Zorvan Kettle wrote Silent River.", "Quell lives in Norhaven."]
    assert set(inputs.eval_splits) == {"retain"}  # no questions to evaluate the forget set on


def test_a_text_corpus_with_refusal_terms_is_a_one_line_error_naming_the_recipe(micro_bench, micro_config, tmp_path,
                                                                                 no_build):
    corpus = tmp_path / "forget.txt"
    corpus.write_text("Zorvan Kettle wrote Silent River.\n")
    retain = write_jsonl(tmp_path / "r.jsonl", micro_bench.splits()["retain"][:3])
    data = [f"model.path={micro_bench.target_dir}", f"data.forget_path={corpus}", f"data.retain_path={retain}"]
    with pytest.raises(UnlearnError, match=r"^objective.terms \(the pretrained recipe's\): idk_dpo trains refusals "
                                           r"to forget questions, .* is a text corpus; set objective.terms for text"):
        resolve_inputs(micro_config(*data, "recipe=pretrained"))
    with pytest.raises(UnlearnError, match=r"^objective.terms: refusal trains refusals"):
        resolve_inputs(micro_config(*data, "objective.terms={npo: 1.0, refusal: 1.0}"))


def test_overlap_warn_drops_and_error_raises(micro_bench, micro_config, tmp_path, no_build):
    forget = micro_bench.splits()["forget10"][:5]
    retain = [{k: v for k, v in it.items() if k != "index"}
              for it in micro_bench.splits()["retain"][:6] + forget[:2]]
    args = [f"model.path={micro_bench.target_dir}", f"data.forget_path={write_jsonl(tmp_path / 'f.jsonl', forget)}",
            f"data.retain_path={write_jsonl(tmp_path / 'r.jsonl', retain)}"]
    with pytest.warns(UserWarning, match="^2 retain items also appear in the forget set"):
        inputs = resolve_inputs(micro_config(*args))
    assert len(inputs.retain) == 6
    with pytest.raises(UnlearnError, match="^2 retain items also appear in the forget set"):
        resolve_inputs(micro_config(*args, "data.overlap=error"))


def test_load_checked(micro_bench, micro_config, tmp_path):
    inputs = resolve_inputs(micro_config())
    model, tokenizer = load_checked(micro_config(), inputs)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.pad_token_id is not None

    tokenizer.add_tokens(["zzextra0"])
    tokenizer.save_pretrained(tmp_path / "tok")
    inputs.tokenizer_path = str(tmp_path / "tok")
    with pytest.raises(UnlearnError, match=f"tokenizer has {len(tokenizer)} tokens but model embeds only"):
        load_checked(micro_config(), inputs)


# ---------------------------------------------------------------------------- pipeline.validate


def test_validate_accepts_the_defaults(micro_config):
    validate(micro_config())
    validate(micro_config("optim.name=adamw", "objective.terms.simnpo=0.5"))


@pytest.mark.parametrize("override, match", [
    ("objective.terms.foo=1", "unknown objective term 'foo' \\(valid: ce_u, ga, idk_dpo, nll, npo, pdu, refusal, "),
    ("optim.name=lion", "optim.name: unknown optimizer 'lion' \\(valid: adamw, influence, sophia\\)"),
    ("objective.terms.nll=1", "^objective.terms.nll fine-tunes on the answers it is given \\(ray-unlearn finetune\\); an "
                              "unlearning run keeps the retain answers with retain_nll: use that instead$"),
])
def test_validate_rejects_unknown_names(micro_config, override, match):
    with pytest.raises(UnlearnError, match=match):
        validate(micro_config(override))


def test_validate_rejects_all_zero_weights(micro_config):
    with pytest.raises(UnlearnError, match="every weight is 0"):
        validate(micro_config("objective.terms.npo=0", "objective.terms.retain_nll=0"))


# ---------------------------------------------------------------------------- the cluster


@pytest.mark.slow
def test_more_workers_than_the_cluster_has_cpus(ray_session, micro_config):
    from ray_unlearn.train import init_ray

    init_ray(micro_config("ray.num_workers=2"))  # the session cluster has 2 CPUs: this fits
    with pytest.raises(UnlearnError, match="^ray.num_workers=8 .* needs 8 CPUs but the cluster has 2; "
                                           "lower ray.num_workers$"):
        init_ray(micro_config("ray.num_workers=8"))
    with pytest.raises(UnlearnError, match="needs 3 CPUs but the cluster has 2"):
        init_ray(micro_config("ray.num_workers=2", "ray.cpus_per_worker=1.5"))
    with pytest.raises(UnlearnError, match="ray.use_gpu=true needs 2 GPUs but the cluster has 0"):
        init_ray(micro_config("ray.num_workers=2", "ray.use_gpu=true"))


@pytest.mark.slow
def test_too_many_workers_fail_before_anything_is_written(ray_session, micro_config):
    from pathlib import Path

    from ray_unlearn.pipeline import run_job

    cfg = micro_config("ray.num_workers=64")
    with pytest.raises(UnlearnError, match="^ray.num_workers=64 .* needs 64 CPUs"):
        run_job(cfg)
    assert not Path(cfg.output_dir).exists()


def test_chat_template_true_needs_one_before_any_worker_starts(micro_bench, micro_config):
    """The built-in tokenizer has no chat template: auto falls back to prompt_template, true is refused."""
    _, tokenizer = load_checked(micro_config(), resolve_inputs(micro_config()), meta=True)
    assert not getattr(tokenizer, "chat_template", None)
    cfg = micro_config("data.chat_template=true")
    with pytest.raises(UnlearnError, match="^data.chat_template is true but the tokenizer has no chat template"):
        load_checked(cfg, resolve_inputs(cfg), meta=True)


def test_holdout_path_gives_mia_non_members(micro_bench, micro_config, tmp_path, no_build):
    splits = micro_bench.splits()
    data = [f"model.path={micro_bench.target_dir}",
            f"data.forget_path={write_jsonl(tmp_path / 'f.jsonl', splits['forget10'][:4])}",
            f"data.retain_path={write_jsonl(tmp_path / 'r.jsonl', splits['retain'][:6])}"]
    holdout = write_jsonl(tmp_path / "h.jsonl", splits["holdout"][:5])
    inputs = resolve_inputs(micro_config(*data, f"data.holdout_path={holdout}", "eval.mia=[loss, min_k]"))
    assert [it["question"] for it in inputs.eval_splits["holdout"]] == [it["question"] for it in splits["holdout"][:5]]
    reference = resolve_inputs(micro_config(*data, f"data.holdout_path={holdout}",
                                            f"eval.mia_reference_model={micro_bench.retain_dir}"))
    assert reference.mia_reference_path == str(micro_bench.retain_dir) and reference.retain_model_path is None
    members = write_jsonl(tmp_path / "m.jsonl", splits["forget10"][:2] + splits["holdout"][:2])
    with pytest.raises(UnlearnError, match=r"^data.holdout_path: 2 item\(s\) are also forget items; .*remove them$"):
        resolve_inputs(micro_config(*data, f"data.holdout_path={members}"))


def test_mia_without_a_holdout_split_is_one_line(micro_bench, micro_config, tmp_path, no_build):
    splits = micro_bench.splits()
    data = [f"model.path={micro_bench.target_dir}",
            f"data.forget_path={write_jsonl(tmp_path / 'f.jsonl', splits['forget10'][:4])}",
            f"data.retain_path={write_jsonl(tmp_path / 'r.jsonl', splits['retain'][:6])}"]
    resolve_inputs(micro_config(*data))  # auto: no holdout, no attack, no error
    with pytest.raises(UnlearnError, match=r"^eval.mia: membership inference needs a holdout split .* set "
                                           r"data.holdout_path, use a built-in forget split .*eval.mia=\[\]$"):
        resolve_inputs(micro_config(*data, "eval.mia=[min_k]"))
    holdout = write_jsonl(tmp_path / "h.jsonl", splits["holdout"][:5])
    with pytest.raises(UnlearnError, match="^eval.mia: the reference attack needs a reference model; set "
                                           "eval.mia_reference_model or model.retain_model"):
        resolve_inputs(micro_config(*data, f"data.holdout_path={holdout}", "eval.mia=[reference]"))
