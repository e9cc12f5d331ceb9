"""`ray-unlearn submit` before anything reaches a cluster: one `error:` line and exit 2 for a missing or
unshippable job file, bad overrides, unknown flags and an address where no Ray cluster answers; how the
cluster token is found; which line of a failed job's logs is its error. No Ray is started here (the
integration test tests/integration/test_a_job_submission.py submits to a real head)."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from ray_unlearn.cli import main
from ray_unlearn.errors import UnlearnError
from ray_unlearn.jobs import auth_token, error_line, resolve_address

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Run from the repository (the shipped directory), with no cluster address or token in the environment."""
    monkeypatch.chdir(REPO)
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(capsys, *args: str) -> tuple[int, list[str]]:
    rc = main(["submit", *args])
    return rc, capsys.readouterr().err.splitlines()


def test_no_cluster_at_the_address_says_what_was_tried(capsys, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}"
    rc, err = submit(capsys, "jobs/micro_smoke.yaml", "--address", url)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: no Ray cluster answers at {url} (from --address; tried GET {url}/api/version: "
                             "nothing listens there)") and "ray start --head" in err[0]

    monkeypatch.setenv("RAY_ADDRESS", url.removeprefix("http://"))  # no scheme: http:// is assumed
    rc, err = submit(capsys, "jobs/micro_smoke.yaml")
    assert rc == 2 and f"at {url} (from RAY_ADDRESS;" in err[0]


class NotRay(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_that_is_not_ray_is_named_with_its_answer(capsys):
    server = HTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        rc, err = submit(capsys, "jobs/micro_smoke.yaml", "--address", url)
    finally:
        server.shutdown()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: no Ray cluster answers at {url} (from --address; tried GET {url}/api/version: "
                             "Version check returned 404.")


@pytest.mark.parametrize("args, match", [
    (["jobs/no_such_job.yaml"], "job file jobs/no_such_job.yaml does not exist"),
    (["jobs/micro_smoke.yaml", "optim.nam=1"], "unknown config key optim.nam"),
    (["jobs/micro_smoke.yaml", "optim.name=adamx"], "optim.name: unknown optimizer 'adamx'"),
    (["jobs/micro_smoke.yaml", "jobs/rmu.yaml"], "unexpected argument 'jobs/rmu.yaml'"),
    (["train.max_steps=3"], "submit needs a job file"),
])
def test_bad_job_or_overrides_are_refused_before_any_cluster_is_asked(capsys, args, match):
    rc, err = submit(capsys, *args, "--address", f"http://127.0.0.1:{_closed_port()}")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and match in err[0]


def test_a_job_file_that_would_not_be_shipped_is_refused(capsys, tmp_path):
    outside = tmp_path / "job.yaml"
    outside.write_text("train: {max_steps: 3}\n")
    rc, err = submit(capsys, str(outside))
    assert rc == 2 and "is outside the shipped directory" in err[0] and "--working-dir" in err[0]

    (tmp_path / ".rayignore").write_text("private/\n")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "job.yaml").write_text("train: {max_steps: 3}\n")
    rc, err = submit(capsys, str(tmp_path / "private" / "job.yaml"), "--working-dir", str(tmp_path))
    assert rc == 2 and "is excluded from the upload" in err[0], err


def test_unknown_flags_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["submit", "jobs/micro_smoke.yaml", "--adress", "http://x:8265"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--adress" in err[0] and "--help" in err[0], err


def test_the_token_is_found_where_ray_looks_for_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert auth_token()[0] is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token()[0] is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UnlearnError, match="RAY_AUTH_TOKEN_PATH=.*missing is not a readable file"):
        auth_token()


def test_addresses():
    assert resolve_address("10.0.0.5:8265") == ("http://10.0.0.5:8265", "--address")
    assert resolve_address("https://head.example.com/") == ("https://head.example.com", "--address")
    assert resolve_address(None) == ("http://127.0.0.1:8265", "the default")
    with pytest.raises(UnlearnError, match="not a dashboard address"):
        resolve_address("ray://head:10001")


def test_the_jobs_error_is_its_last_error_line_else_rays_message():
    logs = "step 1/3\nerror: first\nTraceback...\nerror: ray.num_workers=4 needs 4 CPUs\n"
    assert error_line("Job entrypoint command failed with exit code 2", logs) == "ray.num_workers=4 needs 4 CPUs"
    assert error_line("Job entrypoint command failed with exit code 1, last logs:\nboom", "no error line") == \
        "Job entrypoint command failed with exit code 1, last logs:"


@pytest.mark.parametrize("command", ["run", "tune", "finetune"])
def test_the_entrypoint_runs_the_named_command_with_the_overrides(command):
    from ray_unlearn.jobs import prepare

    job = {"run": "jobs/micro_smoke.yaml", "tune": "jobs/tune_soul.yaml", "finetune": "jobs/finetune.yaml"}[command]
    sub = prepare([command, job, "train.max_steps=3"], ".")
    assert sub.entrypoint == f"ray-unlearn {command} {job} train.max_steps=3" and sub.job_file == job
    assert prepare([job], ".").entrypoint == f"ray-unlearn run {job}"  # no command: run


@pytest.mark.parametrize("args, match", [
    (["tune", "jobs/micro_smoke.yaml"], "tune.space"),  # a job with no search space is not a search
    (["tune", "jobs/tune_soul.yaml", "output_dir=s3://bucket/runs"], "keep output_dir local"),
    (["finetune", "jobs/finetune.yaml", "output_dir=s3://bucket/runs"], "ray-unlearn finetune writes its models"),
    (["tune"], "submit needs a job file"),
])
def test_each_command_checks_its_own_config_before_any_cluster_is_asked(capsys, args, match):
    rc, err = submit(capsys, *args, "--address", f"http://127.0.0.1:{_closed_port()}")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and match in err[0], err
