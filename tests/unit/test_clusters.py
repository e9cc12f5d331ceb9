"""clusters/ and the Dockerfile deploy (issue 9, point 6), checked without a cloud or a Kubernetes cluster:

- the cluster-launcher YAMLs pass Ray's own preparation and validation (`prepare_config` with the provider's
  defaults, then `validate_config` against ray-schema.json), as `ray up` runs them;
- the KubeRay objects match the ray.io/v1 schema of tests/unit/kuberay_v1_schema.py, and keep the rules that
  make them deployable: autoscaling on, GPU tolerations, requests = limits on every container, every volume
  and claim defined next to them, secrets only as Secret references;
- the RayService's serveConfigV2 passes Ray Serve's deploy schema and its args make a ServeConfig that requires
  the API key;
- every job file a definition names exists and loads with its overrides; the Dockerfile builds FROM the Ray
  image of the lock, pins what the lock pins, and COPYs files that exist.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray_unlearn.config import load_config
from ray_unlearn.pipeline import validate

from tests.unit.kuberay_v1_schema import schema_of

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-rayservice.yaml"]
LOCK = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ray-unlearn:{VERSION}"
IMAGE_ROOT = "/app"  # the Dockerfile's WORKDIR: /app/jobs/x.yaml is jobs/x.yaml here
SECRETS = {"ray-unlearn-token", "ray-unlearn-api-key", "ray-unlearn-tls"}


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d]


def ray_object(name: str) -> dict:
    return next(d for d in docs(name) if d["apiVersion"] == "ray.io/v1")


def cluster_spec(obj: dict) -> dict:
    return obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig") or obj["spec"]


# ---------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTERS / name).read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does before touching the cloud
    assert cfg["docker"]["image"] == IMAGE and cfg["docker"]["pull_before_run"]
    assert {"--env RAY_AUTH_MODE=token"} <= set(cfg["docker"]["run_options"])
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs drivers, never training
    workers = [t for k, t in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)  # autoscaled
    node = workers[0]["node_config"]
    assert node.get("InstanceType", "").startswith(("g5.", "g6.", "p4", "p5")) or node.get("guestAccelerators")


def test_rays_validation_is_live():
    """The validator refuses what `ray up` refuses: an unknown field, a head type that is not defined."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    with pytest.raises(jsonschema.ValidationError, match="gpu_workers"):
        validate_config(prepare_config({**copy.deepcopy(cfg), "gpu_workers": 4}))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config({**copy.deepcopy(cfg), "head_node_type": "cpu_head"}))


# ---------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_object_matches_the_ray_io_v1_schema(name):
    obj = ray_object(name)
    jsonschema.validate(obj, schema_of(obj["kind"]))
    spec = cluster_spec(obj)
    assert spec["rayVersion"] == LOCK["ray"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-unlearn-token"}


def test_the_schema_refuses_what_the_crd_refuses():
    obj = ray_object("kuberay-raycluster.yaml")
    for path, value, match in [(("headGroupSpec", "rayStartParams", "num-cpus"), 0, "is not of type 'string'"),
                               (("workerGroupSpecs", 0, "minReplica"), 0, "Additional properties"),
                               (("authOptions", "mode"), "password", "is not one of")]:
        bad = copy.deepcopy(obj)
        *parents, last = path
        node = bad["spec"]
        for p in parents:
            node = node[p]
        node[last] = value
        with pytest.raises(jsonschema.ValidationError, match=match):
            jsonschema.validate(bad, schema_of("RayCluster"))


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(obj)
    return [("head", spec["headGroupSpec"]["template"]["spec"]),
            *((g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", []))]


@pytest.mark.parametrize("name", KUBERAY)
def test_pods_are_schedulable_and_sized(name):
    claims = {d["metadata"]["name"] for d in docs("kuberay-storage.yaml") if d["kind"] == "PersistentVolumeClaim"}
    for group, pod in pod_templates(ray_object(name)):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["image"] == IMAGE, (group, c["image"])
            res = c["resources"]
            assert res["requests"] == res["limits"] and {"cpu", "memory"} <= set(res["limits"]), group
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, (group, mount)  # every mount's volume is defined in the pod
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims  # the claim is in kuberay-storage.yaml
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in pod["containers"]):
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    workers = cluster_spec(ray_object(name))["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in workers)


def test_secrets_are_references_never_values():
    storage = (CLUSTERS / "kuberay-storage.yaml").read_text()
    for name in KUBERAY:
        text = (CLUSTERS / name).read_text()
        for obj in docs(name):
            for _, pod in pod_templates(obj) if obj["apiVersion"] == "ray.io/v1" else []:
                for env in (e for c in pod["containers"] for e in c.get("env", [])):
                    if re.search("KEY|TOKEN|SECRET|PASSWORD", env["name"]):
                        assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] in SECRETS, env
        assert not re.search(r"(api_key|auth_token|password)\s*:\s*['\"]?[A-Za-z0-9+/_-]{8,}", text), name
        for secret in set(re.findall(r"(?:secretName|name): (ray-unlearn-[a-z-]+)", text)) & SECRETS:
            assert f"create secret" in storage and secret in storage  # how to make it is written next to them


# ---------------------------------------------------------------- Serve config and TLS


def serve_app():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(ray_object("kuberay-rayservice.yaml")["spec"]
                                                             ["serveConfigV2"]))
    (app,) = schema.applications
    return schema, app


def test_rayservice_serve_config_passes_serves_deploy_schema_and_needs_the_key():
    from ray_unlearn.errors import UnlearnError
    from ray_unlearn.serving.config import resolve_api_key, serve_config_from_dict

    schema, app = serve_app()
    assert app.import_path == "ray_unlearn.serve:app_builder"
    cfg = serve_config_from_dict(app.args)
    assert (cfg.http.host, cfg.http.port) == (schema.http_options.host, schema.http_options.port)
    assert cfg.auth.api_key == ""  # the key is never in the manifest: it comes from the Secret via the env
    with pytest.raises(UnlearnError, match="no API key"):
        resolve_api_key(cfg, environ={})
    assert resolve_api_key(cfg, environ={"RAY_UNLEARN_API_KEY": "k" * 32}) == "k" * 32
    server = next(d for d in app.deployments if d.name == "ModelServer")
    assert server.ray_actor_options.num_gpus == cfg.deployment.num_gpus  # the engine then runs on cuda
    mounts = {m["mountPath"] for _, pod in pod_templates(ray_object("kuberay-rayservice.yaml"))
              for c in pod["containers"] for m in c.get("volumeMounts", [])}
    for path in [p for p in cfg.models.values() if p.startswith("/")] + [cfg.benchmark.cache_dir]:
        assert any(path.startswith(m + "/") for m in mounts), path  # on the shared volume every pod mounts


def test_tls_ends_at_an_ingress_in_front_of_the_serve_service():
    service = ray_object("kuberay-rayservice.yaml")
    ingress = next(d for d in docs("kuberay-rayservice.yaml") if d["kind"] == "Ingress")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"] == "ray-unlearn-tls"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{service['metadata']['name']}-serve-svc", "port": {"number": 8000}}
    assert set(tls["hosts"]) == {r["host"] for r in ingress["spec"]["rules"]}


# ---------------------------------------------------------------- job files and the image


def named_jobs() -> list[tuple[str, str, list[str]]]:
    """(definition, job file, overrides) of every `ray-unlearn run|submit` a cluster definition writes: in its
    comments (how to use it) and in a RayJob's entrypoint."""
    out = []
    for path in sorted(CLUSTERS.glob("*.yaml")):
        text = re.sub(r"\\\n#\s*", " ", path.read_text())  # join the comments' continued command lines
        commands = re.findall(r"^#.*?ray-unlearn (?:run|submit) (\S+\.yaml[^\n#]*)", text, re.M)
        commands += [d["spec"]["entrypoint"].removeprefix("ray-unlearn run ") for d in docs(path.name)
                     if d.get("kind") == "RayJob"]
        for command in commands:
            job, *rest = shlex.split(command)
            out.append((path.name, job.replace(f"{IMAGE_ROOT}/", "", 1),
                        [a for a in rest if "=" in a and not a.startswith("-")]))
    return out


def test_every_job_a_definition_names_exists_and_loads():
    jobs = named_jobs()
    assert {"aws.yaml", "gcp.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"} <= {d for d, _, _ in jobs}
    for definition, job, overrides in jobs:
        assert (ROOT / job).is_file(), (definition, job)
        cfg = load_config(ROOT / job, overrides)
        validate(cfg)
        assert cfg.ray.use_gpu and cfg.ray.num_workers >= 1, (definition, overrides)
        assert cfg.output_dir.startswith(("s3://", "gs://", "/mnt/runs/")), (definition, cfg.output_dir)  # shared


def test_dockerfile_builds_the_locked_image():
    text = (ROOT / "Dockerfile").read_text()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.search(rf"^FROM rayproject/ray:{re.escape(LOCK['ray'])}-{py}-gpu$", text, re.M)
    assert f"docker build -t {IMAGE} ." in text and f"WORKDIR {IMAGE_ROOT}" in text
    pins = dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", text))  # torch==2.13.0, ...
    assert pins and all(LOCK[name] == version for name, version in pins.items()), pins
    assert re.search(r"ray\.__version__ == '([\d.]+)'", text).group(1) == LOCK["ray"]
    installs = re.findall(r"pip install ([^\\&\n]+)", text)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        sources = [s for s in line.split()[:-1] if not s.startswith("--")]
        assert sources and all((ROOT / s).exists() for s in sources), line
