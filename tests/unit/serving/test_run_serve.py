"""`ray-unlearn serve` refuses to start, with a one-line error and status 2, before Ray starts."""

from __future__ import annotations

import socket

import pytest

from ray_unlearn.cli import main


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv("RAY_UNLEARN_API_KEY", raising=False)


def test_beyond_loopback_without_a_key_refuses_to_start(capsys):
    assert main(["serve", "http.host=0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: http.host 0.0.0.0 is not loopback and no API key is set")
    assert len(err.splitlines()) == 1


def test_a_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", f"http.port={port}"]) == 2
    assert f"cannot bind 127.0.0.1:{port}" in capsys.readouterr().err


def test_bad_serve_config_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "models.base=builtin:micro:wrong"]) == 2
    assert "builtin:<size>:target" in capsys.readouterr().err
