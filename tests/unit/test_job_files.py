"""Every example job in jobs/ is a complete, valid config; cluster manifests parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray_unlearn.config import JobConfig, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]


JOB_FILES = [p for p in sorted((ROOT / "jobs").glob("*.yaml")) if not p.name.startswith("serve")]  # serve*: SERVE.yaml


@pytest.mark.parametrize("job", JOB_FILES, ids=lambda p: p.name)
def test_example_jobs_load(job: Path) -> None:
    cfg = load_config(job)
    assert isinstance(cfg, JobConfig)
    assert cfg.name == job.stem or cfg.name  # every job names its run


def test_default_job_file_is_the_built_in_default() -> None:
    """`ray-unlearn run` with no file and jobs/soul_npo.yaml describe the same unlearning."""
    default, soul = to_dict(load_config(None)), to_dict(load_config(ROOT / "jobs" / "soul_npo.yaml"))
    for section in ("benchmark", "data", "objective", "optim", "train", "ray", "eval"):
        assert default[section] == soul[section], section


@pytest.mark.parametrize("manifest", sorted((ROOT / "clusters").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_manifests_parse(manifest: Path) -> None:
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert docs and all(isinstance(d, dict) for d in docs)
