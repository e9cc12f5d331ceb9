"""Job configs: defaults, YAML files plus dotted overrides, and one-line errors naming the key."""

import json
import os

import pytest
import yaml

from ray_unlearn.config import RECIPES, JobConfig, dump_config, load_config, parse_overrides, to_dict
from ray_unlearn.errors import UnlearnError
from ray_unlearn.loop import strategy_options


def expect_error(match, path=None, overrides=()):
    """load_config must raise UnlearnError matching `match`, on a single line."""
    with pytest.raises(UnlearnError, match=match) as info:
        load_config(path, list(overrides))
    assert "\n" not in str(info.value)
    return str(info.value)


def write_yaml(tmp_path, data, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# ---------------------------------------------------------------------------- loading


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, JobConfig)
    assert cfg.optim.name == "sophia"
    assert cfg.optim.lr == 1e-4
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.objective.terms == {"npo": 1.0, "retain_nll": 2.0}
    assert cfg.train.max_steps == 110
    assert cfg.ray.num_workers == 2
    assert cfg.model.trust_remote_code is False


def test_defaults_are_not_shared_between_instances():
    a, b = load_config(), load_config()
    a.objective.terms["ga"] = 1.0
    a.optim.betas[0] = 0.5
    assert b.objective.terms == {"npo": 1.0, "retain_nll": 2.0}
    assert b.optim.betas == [0.9, 0.95]
    assert JobConfig().objective.terms == {"npo": 1.0, "retain_nll": 2.0}


def test_yaml_file_plus_overrides(tmp_path):
    path = write_yaml(tmp_path, {"name": "demo", "optim": {"name": "adamw", "lr": "1e-3"},
                                 "train": {"max_steps": 7}})
    cfg = load_config(path, ["optim.lr=1e-4", "train.batch_size=3", "ray.use_gpu=true"])
    assert cfg.name == "demo"
    assert cfg.optim.name == "adamw"
    # YAML 1.1 reads 1e-4 (no dot) as a string; the float field turns it into a number
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-4
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == 3
    assert cfg.ray.use_gpu is True
    assert cfg.optim.weight_decay == 0.1  # untouched defaults stay


def test_yaml_string_number_in_file_becomes_float(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 5e-5\n  rho: 1\n")  # written by hand: 5e-5 is a string to YAML 1.1
    cfg = load_config(path)
    assert cfg.optim.lr == 5e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.rho == 1.0 and isinstance(cfg.optim.rho, float)


def test_override_adds_a_term_to_the_default_terms():
    cfg = load_config(None, ["objective.terms.ga=1"])
    assert cfg.objective.terms == {"npo": 1.0, "retain_nll": 2.0, "ga": 1.0}
    assert isinstance(cfg.objective.terms["ga"], float)


def test_file_terms_replace_the_defaults(tmp_path):
    path = write_yaml(tmp_path, {"objective": {"terms": {"ga": 1.0}}})
    assert load_config(path).objective.terms == {"ga": 1.0}
    # ... and an override then adds to the file's terms
    assert load_config(path, ["objective.terms.retain_nll=0.5"]).objective.terms == {"ga": 1.0, "retain_nll": 0.5}


def test_file_without_terms_keeps_default_terms(tmp_path):
    path = write_yaml(tmp_path, {"objective": {"npo_beta": 0.2}})
    cfg = load_config(path)
    assert cfg.objective.terms == {"npo": 1.0, "retain_nll": 2.0}
    assert cfg.objective.npo_beta == 0.2


def test_empty_objective_section_behaves_like_a_missing_one(tmp_path):
    path = write_yaml(tmp_path, "objective:\ntrain:\n  max_steps: 4\n")
    assert load_config(path).objective.terms == {"npo": 1.0, "retain_nll": 2.0}
    assert load_config(path, ["objective.terms.ga=1"]).objective.terms == {"npo": 1.0, "retain_nll": 2.0, "ga": 1.0}


def _model_dir(tmp_path, **fields):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(fields))
    return d


def test_the_dataclass_defaults_are_the_benchmark_recipe():
    cfg = JobConfig()
    assert (cfg.objective.terms, cfg.optim.lr, cfg.train.max_steps) == (
        RECIPES["benchmark"]["objective"]["terms"], RECIPES["benchmark"]["optim"]["lr"],
        RECIPES["benchmark"]["train"]["max_steps"])
    assert load_config().recipe == "benchmark"  # no model.path: the built-in benchmark's target


@pytest.mark.parametrize("fields, recipe", [({"hidden_size": 576}, "pretrained"), ({"n_embd": 768}, "pretrained"),
                                            ({"hidden_size": 64}, "benchmark"), ({"hidden_size": 511}, "benchmark")])
def test_auto_recipe_follows_the_model_width(tmp_path, fields, recipe):
    cfg = load_config(None, [f"model.path={_model_dir(tmp_path, **fields)}"])
    assert cfg.recipe == recipe
    assert cfg.objective.terms == RECIPES[recipe]["objective"]["terms"]
    assert (cfg.optim.lr, cfg.train.max_steps) == (RECIPES[recipe]["optim"]["lr"], RECIPES[recipe]["train"]["max_steps"])


def test_a_hub_id_is_pretrained_and_a_missing_dir_is_left_to_the_loader():
    assert load_config(None, ["model.path=HuggingFaceTB/SmolLM2-135M-Instruct"]).recipe == "pretrained"
    assert load_config(None, ["model.path=/no/such/model"]).recipe == "benchmark"


def test_what_a_job_sets_wins_over_its_recipe(tmp_path):
    model = _model_dir(tmp_path, hidden_size=1024)
    cfg = load_config(None, [f"model.path={model}", "optim.lr=3e-6", "objective.terms.retain_kl=1"])
    assert cfg.recipe == "pretrained" and cfg.optim.lr == 3e-6 and cfg.train.max_steps == 30
    assert cfg.objective.terms == {"idk_dpo": 1.0, "retain_nll": 2.0, "retain_kl": 1.0}  # added to the recipe's
    path = write_yaml(tmp_path, {"model": {"path": str(model)}, "objective": {"terms": {"npo": 1.0}},
                                 "train": {"max_steps": 7}})
    cfg = load_config(path)
    assert (cfg.objective.terms, cfg.optim.lr, cfg.train.max_steps) == ({"npo": 1.0}, 2e-5, 7)
    explicit = load_config(None, [f"model.path={model}", "recipe=benchmark"])
    assert (explicit.recipe, explicit.optim.lr) == ("benchmark", 1e-4)


def test_a_dumped_config_reloads_to_the_same_values_whatever_the_model(tmp_path):
    cfg = load_config(None, ["recipe=pretrained"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(cfg)


def test_an_unknown_recipe_is_a_one_line_error():
    with pytest.raises(UnlearnError, match=r"^recipe: 'fast' is not one of auto, benchmark, pretrained$"):
        load_config(None, ["recipe=fast"])
    with pytest.raises(UnlearnError, match="recipe"):
        JobConfig(recipe="fast")


def test_empty_file_gives_defaults(tmp_path):
    path = write_yaml(tmp_path, "")
    assert to_dict(load_config(path)) == to_dict(load_config())


def test_later_override_wins():
    assert load_config(None, ["train.max_steps=3", "train.max_steps=5"]).train.max_steps == 5


def test_override_value_with_equals_sign():
    cfg = load_config(None, ["data.prompt_template=Q={question} A="])
    assert cfg.data.prompt_template == "Q={question} A="


def test_parse_overrides_nests_and_parses_yaml():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]", "f="]) == \
        {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2], "f": ""}


def test_dump_config_round_trip(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "objective.terms.ga=0.5", "optim.betas=[0.8, 0.9]",
                             "model.trust_remote_code=true", "name=rt"])
    path = tmp_path / "dumped.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 3e-4


# ---------------------------------------------------------------------------- bad keys and types


def test_unknown_top_level_key(tmp_path):
    msg = expect_error("unknown config key foo", write_yaml(tmp_path, {"foo": 1}))
    assert "valid:" in msg and "optim" in msg
    expect_error("unknown config key bogus", overrides=["bogus=1"])


def test_unknown_nested_key():
    msg = expect_error(r"unknown config key optim\.lrr", overrides=["optim.lrr=1e-3"])
    assert "lr" in msg.split("valid:")[1]


def test_unknown_nested_key_in_file(tmp_path):
    expect_error(r"unknown config key train\.maxsteps", write_yaml(tmp_path, {"train": {"maxsteps": 3}}))


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.max_steps=true", "train.max_steps"),
    ("ray.use_gpu=3", "ray.use_gpu"),
    ("ray.use_gpu=yess", "ray.use_gpu"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.betas=0.9", "optim.betas"),
    ("optim.betas=[0.9, x]", r"optim.betas\[1\]"),
    ("objective.terms=3", "objective.terms"),
    ("name=[a, b]", "name"),
    ("optim=1", "optim"),
    ("optim.lr.x=1", "optim.lr"),
])
def test_wrong_type_names_the_key(override, key):
    expect_error(f"^{key}: expected", overrides=[override])


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1e-4", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.hessian=exact", "optim.hessian"),
    ("benchmark.size=huge", "benchmark.size"),
    ("data.overlap=maybe", "data.overlap"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("optim.betas=[-0.1, 0.9]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.lr_schedule=step", "train.lr_schedule"),
    ("ray.num_workers=-1", "ray.num_workers"),
    ("model.dtype=int8", "model.dtype"),
    ("data.prompt_template=no placeholder", "data.prompt_template"),
    ("objective.terms.ga=.inf", "objective.terms.ga"),
    ("objective.terms.ga=true", "objective.terms.ga"),
    ("objective.npo_beta=0", "objective.npo_beta"),
    ("ray.strategy=zero", "ray.strategy"),
    ("train.global_batch_size=-8", "train.global_batch_size"),
    ("model.max_shard_size=5 gigabytes", "model.max_shard_size"),
])
def test_invalid_value_names_the_key(override, key):
    expect_error(f"^{key}", overrides=[override])


def test_unknown_strategy_lists_the_valid_ones():
    expect_error(r"^ray.strategy: 'deepspeed3' is not one of ddp, fsdp2, deepspeed$", overrides=["ray.strategy=deepspeed3"])


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed"])
def test_sharded_strategies_run_hutchinson_by_a_difference_of_gradients(strategy):
    assert load_config(None, [f"ray.strategy={strategy}", "optim.hessian=hutchinson"]).optim.hvp == "difference"
    expect_error(rf"^optim.hvp=double_backward needs every parameter whole .* ray.strategy={strategy} .* "
                 "use optim.hvp=difference$",
                 overrides=[f"ray.strategy={strategy}", "optim.hessian=hutchinson", "optim.hvp=double_backward"])
    load_config(None, ["ray.strategy=ddp", "optim.hessian=hutchinson", "optim.hvp=double_backward"])
    expect_error("^optim.hvp: 'exact' is not one of difference, double_backward$", overrides=["optim.hvp=exact"])


def test_hutchinson_by_difference_needs_float32_compute():
    expect_error(r"^optim.hvp=difference takes H\*u from gradients eps apart, .* or optim.hvp=double_backward$",
                 overrides=["optim.hessian=hutchinson", "train.mixed_precision=bf16"])
    expect_error(r"^optim.hvp=difference .* optim.hessian=gnb$",
                 overrides=["ray.strategy=fsdp2", "optim.hessian=hutchinson", "model.dtype=bfloat16"])
    load_config(None, ["optim.hessian=gnb", "train.mixed_precision=bf16"])
    load_config(None, ["optim.hessian=hutchinson", "optim.hvp=double_backward", "train.mixed_precision=bf16"])


def test_deepspeed_options():
    cfg = load_config(None, ["ray.strategy=deepspeed"])
    assert cfg.ray.zero_stage is None and cfg.ray.zero == 2 and cfg.ray.offload == "none"
    assert load_config(None, ["ray.strategy=deepspeed", "ray.zero_stage=3"]).ray.zero == 3
    cfg = load_config(None, ["ray.strategy=deepspeed", "ray.zero_stage=3", "ray.offload=params", "ray.use_gpu=true"])
    assert cfg.ray.offload == "params"
    cfg = load_config(None, ["ray.strategy=fsdp2", "ray.offload=params", "ray.use_gpu=true"])  # FSDP2's CPU offload
    assert cfg.ray.offload == "params" and strategy_options(cfg) == {"offload": "params"}
    # its checkpoints resume on any worker count, so its runs can be elastic
    cfg = load_config(None, ["ray.strategy=deepspeed", "ray.num_workers=[1, 2]", "train.global_batch_size=16"])
    assert cfg.ray.elastic and cfg.ray.strategy == "deepspeed"


@pytest.mark.parametrize("overrides, message", [
    (["ray.zero_stage=2"], r"^ray.zero_stage is a DeepSpeed option; set ray.strategy=deepspeed or drop it$"),
    (["ray.strategy=fsdp2", "ray.offload=optimizer", "ray.use_gpu=true"],
     r"^ray.offload=optimizer is DeepSpeed's; fsdp2 offloads .* use ray.offload=params$"),
    (["ray.offload=params", "ray.use_gpu=true"], r"^ray.offload=params needs a sharded strategy: ray.strategy=fsdp2"),
    (["ray.strategy=fsdp2", "ray.offload=params"], r"^ray.offload=params moves state from the GPU .* "
                                                   r"set ray.use_gpu=true or ray.offload=none$"),
    (["ray.strategy=deepspeed", "ray.zero_stage=4"], r"^ray.zero_stage: 4 is not one of 1, 2, 3$"),
    (["ray.strategy=deepspeed", "ray.offload=disk"], r"^ray.offload: 'disk' is not one of none, optimizer, params$"),
    (["ray.strategy=deepspeed", "ray.offload=params", "ray.use_gpu=true"], r"^ray.offload=params needs ray.zero_stage=3"),
    (["ray.strategy=deepspeed", "ray.offload=optimizer"], r"^ray.offload=optimizer moves state from the GPU .* "
                                                          r"set ray.use_gpu=true or ray.offload=none$"),
    (["ray.cpus_per_worker=0"], r"^ray.cpus_per_worker: must be > 0"),
    (["ray.max_failures=-1"], r"^ray.max_failures: must be >= 0"),
])
def test_bad_deepspeed_and_worker_options(overrides, message):
    expect_error(message, overrides=overrides)


def test_global_batch_size_sets_the_accumulation_for_any_worker_count():
    cfg = load_config(None, ["train.batch_size=2", "train.global_batch_size=8", "ray.num_workers=2"])
    assert [cfg.train.accumulation(w) for w in (0, 1, 2, 4)] == [4, 4, 2, 1]
    assert load_config(None, ["train.grad_accum=3"]).train.accumulation(4) == 3  # 0 = grad_accum as given
    expect_error(r"^train.global_batch_size=8 is not a multiple of train.batch_size=3 x 2 workers",
                 overrides=["train.batch_size=3", "train.global_batch_size=8", "ray.num_workers=2"])


def test_invalid_value_in_file(tmp_path):
    expect_error("^optim.hessian: 'exact' is not one of gnb, hutchinson, empirical",
                 write_yaml(tmp_path, {"optim": {"hessian": "exact"}}))


@pytest.mark.parametrize("override", ["optim.lr", "=1", "optim.lr 1e-3"])
def test_malformed_override(override):
    expect_error("expected key=value", overrides=[override])


# ---------------------------------------------------------------------------- bad files


def test_missing_job_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = expect_error("does not exist", missing)
    assert str(missing) in msg


def test_job_file_is_a_directory(tmp_path):
    expect_error(f"job file {tmp_path} does not exist or is not a file", tmp_path)


def test_unreadable_job_file(tmp_path):
    path = write_yaml(tmp_path, {"name": "x"})
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        expect_error(f"job file {path} cannot be read", path)
    finally:
        path.chmod(0o644)


def test_job_file_not_utf8(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: \xff\xfe\xfa\n")
    expect_error("cannot be read", path)


def test_invalid_yaml(tmp_path):
    path = write_yaml(tmp_path, "optim: {lr: [1e-4\ntrain: : :\n")
    msg = expect_error("is not valid YAML", path)
    assert str(path) in msg


def test_top_level_list(tmp_path):
    expect_error("expected a mapping of sections", write_yaml(tmp_path, "- optim\n- train\n"))


def test_top_level_scalar(tmp_path):
    expect_error("expected a mapping of sections", write_yaml(tmp_path, "just text\n"))


def test_section_that_is_not_a_mapping(tmp_path):
    expect_error("^optim: expected a mapping", write_yaml(tmp_path, {"optim": [1, 2]}))
    expect_error("^objective: expected a mapping", write_yaml(tmp_path, {"objective": "npo"}))


def test_whole_mapping_override_replaces_instead_of_merging():
    cfg = load_config(None, ["objective.terms={ga: 1, retain_nll: 2}"])
    assert cfg.objective.terms == {"ga": 1.0, "retain_nll": 2.0}
    assert load_config(None, ["objective.terms.ga=1"]).objective.terms == {"npo": 1.0, "retain_nll": 2.0, "ga": 1.0}


def test_elastic_worker_range():
    cfg = load_config(None, ["ray.num_workers=[1, 4]", "train.batch_size=1", "train.global_batch_size=12"])
    assert (cfg.ray.elastic, cfg.ray.min_workers, cfg.ray.max_workers) == (True, 1, 4)
    assert [cfg.train.accumulation(w) for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    fixed = load_config(None, ["ray.num_workers=3"])
    assert (fixed.ray.elastic, fixed.ray.min_workers, fixed.ray.max_workers) == (False, 3, 3)
    assert load_config(None, ["ray.num_workers=[2, 2]", "train.global_batch_size=16"]).ray.max_workers == 2


@pytest.mark.parametrize("overrides, match", [
    (["ray.num_workers=[4, 2]", "train.global_batch_size=16"], r"^ray.num_workers: elastic sizes need \[min, max\] "
                                                                 r"with 1 <= min <= max, got \[4, 2\]$"),
    (["ray.num_workers=[0, 2]", "train.global_batch_size=16"], r"1 <= min <= max, got \[0, 2\]"),
    (["ray.num_workers=[1, 2, 3]", "train.global_batch_size=16"], r"got \[1, 2, 3\]"),
    (["ray.num_workers=[1, 4]"], r"^ray.num_workers=\[min, max\] \(elastic\) needs train.global_batch_size"),
    (["ray.num_workers=[1, 3]", "train.global_batch_size=16", "train.batch_size=2"],
     r"^train.global_batch_size=16 is not a multiple of train.batch_size=2 x 3 workers"),
    (["ray.num_workers=two"], r"^ray.num_workers: expected int or a list, got 'two'$"),
])
def test_bad_elastic_sizes(overrides, match):
    expect_error(match, overrides=overrides)


# ---------------------------------------------------------------------------- per-term settings


def test_term_settings_from_a_file_and_overrides(tmp_path):
    path = write_yaml(tmp_path, {"objective": {"terms": {"rmu": 1.0}, "rmu": {"layer": 1, "steering_coeff": 6}}})
    cfg = load_config(path, ["objective.pdu.dual_init=10", "objective.rmu.trainable_params=model\\.layers\\.1\\..*"])
    assert cfg.objective.terms == {"rmu": 1.0}
    assert (cfg.objective.rmu.layer, cfg.objective.rmu.steering_coeff) == (1, 6.0)
    assert isinstance(cfg.objective.rmu.steering_coeff, float)
    assert cfg.objective.rmu.trainable_params == r"model\.layers\.1\..*"
    assert cfg.objective.pdu.dual_init == 10.0 and cfg.objective.pdu.dual_step_size == 5.0
    dump_config(cfg, tmp_path / "dumped.yaml")
    assert load_config(tmp_path / "dumped.yaml") == cfg


def test_term_setting_defaults_are_open_unlearnings():
    o = load_config().objective
    assert (o.rmu.layer, o.rmu.steering_coeff, o.rmu.trainable_params) == (7, 2.0, "")
    assert (o.undial.beta, o.wga.beta, o.satimp.beta1, o.satimp.beta2, o.ce_u.skip_first) == (10.0, 1.0, 5.0, 1.0, 1)
    assert (o.pdu.dual_init, o.pdu.dual_step_size, o.pdu.retain_eps, o.pdu.gamma) == (100.0, 5.0, 0.3, 1.0)


@pytest.mark.parametrize("override, key", [
    ("objective.rmu.layer=seven", "objective.rmu.layer"),
    ("objective.rmu.layer=1.5", "objective.rmu.layer"),
    ("objective.rmu.steering_coeff=big", "objective.rmu.steering_coeff"),
    ("objective.rmu.trainable_params=[a, b]", "objective.rmu.trainable_params"),
    ("objective.pdu.dual_init=true", "objective.pdu.dual_init"),
    ("objective.ce_u.skip_first=one", "objective.ce_u.skip_first"),
    ("objective.rmu=3", "objective.rmu"),
])
def test_term_setting_of_the_wrong_type_names_the_term_and_setting(override, key):
    expect_error(f"^{key}: expected", overrides=[override])


@pytest.mark.parametrize("override, key", [
    ("objective.rmu.layer=-1", "objective.rmu.layer"),
    ("objective.rmu.steering_coeff=0", "objective.rmu.steering_coeff"),
    ("objective.rmu.trainable_params=model.(", "objective.rmu.trainable_params"),
    ("objective.undial.beta=-1", "objective.undial.beta"),
    ("objective.pdu.dual_step_size=-5", "objective.pdu.dual_step_size"),
    ("objective.pdu.retain_eps=.nan", "objective.pdu.retain_eps"),
    ("objective.ce_u.skip_first=-1", "objective.ce_u.skip_first"),
])
def test_invalid_term_setting_names_it(override, key):
    expect_error(f"^{key}", overrides=[override])


def test_unknown_term_setting_lists_the_valid_ones():
    msg = expect_error(r"^unknown config key objective\.rmu\.layers ", overrides=["objective.rmu.layers=3"])
    assert "layer, retain_weight, steering_coeff, trainable_params" in msg


def test_mia_selection():
    assert load_config(None).eval.mia == "auto" and load_config(None).eval.mia_k == 0.4
    assert load_config(None, ["eval.mia=[gradnorm, min_k]"]).eval.mia == ["gradnorm", "min_k"]
    assert load_config(None, ["eval.mia=[]"]).eval.mia == []
    with pytest.raises(UnlearnError, match=r"^eval.mia: unknown membership-inference attack 'mink' \(valid: loss, "
                                           r"zlib, min_k, min_k_plus_plus, reference, gradnorm; or auto, or \[\] "
                                           r"for none\)$"):
        load_config(None, ["eval.mia=[loss, mink]"])
    with pytest.raises(UnlearnError, match=r"^eval.mia: 'all' is not auto or a list of attacks"):
        load_config(None, ["eval.mia=all"])
    with pytest.raises(UnlearnError, match=r"^eval.mia_k: must be in \(0, 1\], got 1.5$"):
        load_config(None, ["eval.mia_k=1.5"])


def test_mia_help_names_every_attack():
    import dataclasses

    from ray_unlearn.config import EvalConfig
    from ray_unlearn.eval.registry import MIA_ATTACKS

    help_text = next(f.metadata["help"] for f in dataclasses.fields(EvalConfig) if f.name == "mia")
    assert all(name in help_text for name in MIA_ATTACKS)
