"""ray_unlearn.storage against a real S3-protocol server (moto) on loopback, and its one-line errors."""

from __future__ import annotations

import pickle
import socket
import uuid

import pytest

from ray_unlearn import storage
from ray_unlearn.errors import UnlearnError


def _bucket(make_bucket) -> str:
    return make_bucket(f"b-{uuid.uuid4().hex[:12]}")


def test_join_keeps_uri_options_and_local_paths(tmp_path):
    assert storage.join("s3://b/run", "ray", "x") == "s3://b/run/ray/x"
    assert storage.join("s3://b/run/", "ray") == "s3://b/run/ray"
    assert storage.join("s3://b/run?scheme=http&endpoint_override=h:9", "ray") == \
        "s3://b/run/ray?scheme=http&endpoint_override=h:9"
    assert storage.join(str(tmp_path), "ray") == str(tmp_path / "ray")
    assert storage.is_remote("gs://b/x") and storage.is_remote("s3://b") and not storage.is_remote("runs/x")
    assert not storage.is_remote(f"file://{tmp_path}")


@pytest.mark.parametrize("location, message", [
    ("hdfs://nn/x", "output_dir: no filesystem for hdfs:// URIs"),
    ("s3:///path", "output_dir: 's3:///path' names no bucket"),
])
def test_unusable_locations_are_refused_without_network(location, message):
    with pytest.raises(UnlearnError, match=message):
        storage.check_location("output_dir", location)


def test_config_refuses_a_bucket_for_driver_mode_and_an_unknown_scheme():
    from ray_unlearn.config import load_config

    with pytest.raises(UnlearnError, match="ray.num_workers=0 runs in the driver"):
        load_config(None, ["output_dir=s3://b/run", "ray.num_workers=0"])
    with pytest.raises(UnlearnError, match="ray.storage_path: no filesystem for ftp://"):
        load_config(None, ["ray.storage_path=ftp://host/x"])
    cfg = load_config(None, ["output_dir=s3://b/run", "ray.storage_path=gs://c/ckpts"])
    assert cfg.output_dir == "s3://b/run" and cfg.ray.storage_path == "gs://c/ckpts"


def test_upload_download_and_listing_round_trip(s3_env, tmp_path):
    run = storage.join(_bucket(s3_env), "runs", "a")
    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    (src / "config.yaml").write_text("name: a\n")
    (src / "model" / "model.safetensors").write_bytes(b"\x00" * 1000)
    storage.check_writable("output_dir", run)
    storage.upload(src, run)
    assert storage.subdirs(run) == ["model"]
    assert storage.read_text(storage.join(run, "config.yaml")) == "name: a\n"
    assert storage.read_text(storage.join(run, "missing.json")) is None
    assert storage.subdirs(storage.join(run, "nothing-here")) == []
    back = storage.download(run, tmp_path / "back")
    assert (back / "model" / "model.safetensors").read_bytes() == b"\x00" * 1000
    assert not [n for n in storage.subdirs(run) if n.startswith(".ray_unlearn_write_check")]


def test_the_filesystem_carries_endpoint_and_keys_to_other_processes(s3_env, tmp_path, monkeypatch):
    """Ray Train pickles the filesystem to its controller and workers, whose environment may lack the
    driver's AWS variables: the unpickled filesystem must still reach the same server."""
    run = storage.join(_bucket(s3_env), "r")
    fs, path = storage.filesystem(run)
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    elsewhere = pickle.loads(pickle.dumps(fs))
    with elsewhere.open_output_stream(f"{path}/f.txt") as f:
        f.write(b"x")
    with fs.open_input_stream(f"{path}/f.txt") as f:
        assert f.read() == b"x"


def test_a_missing_bucket_is_one_line(s3_env):
    with pytest.raises(UnlearnError) as err:
        storage.check_writable("output_dir", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run")
    assert "output_dir: bucket 'no-such-bucket-" in str(err.value) and "does not exist" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_unreachable_endpoint_is_one_line(s3_env, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UnlearnError) as err:
        storage.check_writable("ray.storage_path", "s3://bucket/run")
    assert str(err.value).startswith("ray.storage_path: cannot write to s3://bucket/run: ")
    assert "\n" not in str(err.value)
