"""ServeConfig: YAML + overrides, checks, API-key policy, registry resolution; the example serve files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ray_unlearn.errors import UnlearnError
from ray_unlearn.serving.config import (API_KEY_ENV, ServeConfig, is_loopback, load_serve_config, resolve_api_key,
                                        resolve_benchmarks, resolve_models, serve_config_from_dict)

ROOT = Path(__file__).resolve().parents[3]


def test_example_serve_yaml_loads():
    cfg = load_serve_config(ROOT / "jobs" / "serve.yaml")
    assert set(cfg.models) == {"base", "retain"} and cfg.base_model == "base"
    assert cfg.http.host == "127.0.0.1" and cfg.batching.enabled


def test_prompt_format_fields():
    from ray_unlearn.data.collate import PromptFormat, prompt_format

    cfg = load_serve_config(ROOT / "jobs" / "serve.yaml")
    assert (cfg.chat_template, cfg.system_prompt) == ("auto", "")
    cfg = load_serve_config(None, ["chat_template=false", "system_prompt=Be brief."])
    assert prompt_format(cfg, prefix="") == PromptFormat(cfg.prompt_template, False, "Be brief.")


def test_overrides_add_models_to_the_registry():
    cfg = load_serve_config(ROOT / "jobs" / "serve.yaml", ["models.unlearned=runs/unlearn/model", "http.port=9000"])
    assert cfg.models["unlearned"] == "runs/unlearn/model" and "base" in cfg.models and cfg.http.port == 9000
    default = load_serve_config(None, ["models.unlearned=/tmp/x"])
    assert set(default.models) == {"base", "unlearned"}


@pytest.mark.parametrize("data, words", [
    ({"modles": {}}, "unknown config key modles"),
    ({"base_model": "nope"}, "base_model"),
    ({"models": {"a": "builtin:micro:forget"}, "base_model": "a"}, "builtin:<size>:target"),
    ({"models": {"a": "builtin:huge:target"}, "base_model": "a"}, "huge"),
    ({"models": {"a b": "/x"}, "base_model": "a b"}, "without spaces"),
    ({"http": {"port": 0}}, "http.port"),
    ({"limits": {"max_tokens": 0}}, "limits.max_tokens"),
    ({"limits": {"max_tokens": 8, "default_max_tokens": 16}}, "default_max_tokens"),
    ({"deployment": {"max_models_per_replica": 1}}, "max_models_per_replica"),
    ({"batching": {"max_batch_size": 64}}, "max_ongoing_requests"),
    ({"batching": {"max_queued_requests": 0}}, "batching.max_queued_requests: must be > 0"),
    ({"verify": {"es_threshold": 1.5}}, "verify.es_threshold"),
    ({"prompt_template": "no slot"}, "prompt_template"),
    ({"chat_template": "maybe"}, "chat_template: 'maybe' is not one of auto, true, false"),
    ({"chat_template": 1}, "chat_template: expected str or bool"),
])
def test_bad_configs_name_the_key(data, words):
    with pytest.raises(UnlearnError, match=re.escape(words)):
        serve_config_from_dict(data)


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(UnlearnError, match="does not exist"):
        load_serve_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(UnlearnError, match="not valid YAML"):
        load_serve_config(bad)


@pytest.mark.parametrize("host, loop", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                        ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                        ("example.com", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


def test_api_key_policy():
    loop, public = ServeConfig(), serve_config_from_dict({"http": {"host": "0.0.0.0"}})
    assert resolve_api_key(loop, {}) == ""  # loopback: open unless a key is set
    with pytest.raises(UnlearnError, match="not loopback and no API key"):
        resolve_api_key(public, {})
    assert resolve_api_key(public, {API_KEY_ENV: "from-env"}) == "from-env"
    keyed = serve_config_from_dict({"http": {"host": "0.0.0.0"}, "auth": {"api_key": "from-config"}})
    assert resolve_api_key(keyed, {API_KEY_ENV: "from-env"}) == "from-config"
    strict = serve_config_from_dict({"auth": {"require_on_loopback": True}})
    with pytest.raises(UnlearnError, match="require_on_loopback"):
        resolve_api_key(strict, {})
    assert resolve_api_key(strict, {API_KEY_ENV: "k"}) == "k"


def test_registry_resolution(micro_bench, tmp_path):
    cache = str(micro_bench.root.parents[1])
    cfg = serve_config_from_dict({"models": {"base": "builtin:micro:target", "gold": "builtin:micro:retain",
                                             "copy": str(micro_bench.target_dir)},
                                  "benchmark": {"cache_dir": cache}})
    models = resolve_models(cfg)
    assert models == {"base": str(micro_bench.target_dir), "gold": str(micro_bench.retain_dir),
                      "copy": str(micro_bench.target_dir.resolve())}
    assert resolve_benchmarks(cfg) == {"builtin:micro": str(micro_bench.data_dir)}
    with pytest.raises(UnlearnError, match="does not exist"):
        resolve_models(serve_config_from_dict({"models": {"base": str(tmp_path / "none")}}))
    with pytest.raises(UnlearnError, match="no <split>.jsonl"):
        resolve_benchmarks(serve_config_from_dict({"models": {"base": str(tmp_path)},
                                                   "benchmarks": {"mine": str(tmp_path)}}))


def test_deploy_file_is_a_serve_config_with_valid_args():
    """jobs/serve_deploy.yaml: the schema `serve deploy` accepts, args that make a ServeConfig."""
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((ROOT / "jobs" / "serve_deploy.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app,) = schema.applications
    assert app.import_path == "ray_unlearn.serve:app_builder"
    cfg = serve_config_from_dict(app.args)
    assert cfg.http.host == schema.http_options.host and cfg.http.port == schema.http_options.port
    assert {d.name for d in app.deployments} == {"ModelServer", "Gateway"}


def test_example_adapters_yaml_loads():
    cfg = load_serve_config(ROOT / "jobs" / "serve_adapters.yaml")
    assert cfg.adapters == {"lora_npo": "runs/lora_npo/adapter"} and cfg.base_model == "base"
    assert load_serve_config(ROOT / "jobs" / "serve.yaml", ["adapters.a=/x"]).adapters == {"a": "/x"}


@pytest.mark.parametrize("adapters, words", [({"base": "/x"}, "adapters.base: the id is also a model id"),
                                             ({"a b": "/x"}, "adapters: id 'a b' must be non-empty"),
                                             ({"a": ""}, "adapters.a: empty path")])
def test_bad_adapter_entries_are_one_line_errors(adapters, words):
    with pytest.raises(UnlearnError, match=words):
        serve_config_from_dict({"models": {"base": "/m"}, "adapters": adapters})
