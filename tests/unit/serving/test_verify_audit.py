"""/v1/verify with `audit: true`: the audit record of the run whose output model is served, its hashes
re-checked by `audit.check`, through the real FastAPI app in process (no Ray: the Gateway is instantiated
directly, as in test_serve_fuzz, and a stub stands in for the ModelServer's scoring)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ray_unlearn import audit
from ray_unlearn.serving.config import serve_config_from_dict
from tests.unit.serving.test_serve_fuzz import asgi_post


class ScoringStub:
    """The ModelServer handle's `verify`: hand-written per-item scores (model forgot item 0, not item 1)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.verify = SimpleNamespace(remote=self._verify)

    def options(self, **_: Any) -> "ScoringStub":
        return self

    async def _verify(self, model_items: list[dict], base_items: list[dict], adapter: str | None = None) -> dict:
        self.calls.append((len(model_items), len(base_items)))
        model = {"es": [0.1, 0.9], "em": [0.0, 1.0], "probability": [0.01, 0.9], "mink": [-5.0, -0.1],
                 "loss": [4.6, 0.1]}
        base = {"es": [0.9, 0.9], "em": [1.0, 1.0], "probability": [0.9, 0.9], "mink": [-0.1, -0.1],
                "loss": [0.1, 0.1]}
        return {"model": model, "base": base}


@pytest.fixture
def run_dir(micro_bench, tmp_path) -> Path:
    """A run directory as `ray-unlearn run` leaves it: model/ (the micro target's files) and audit.json."""
    run = tmp_path / "run"
    shutil.copytree(micro_bench.target_dir, run / "model")
    now = time.time()
    record = audit.build_record(request_id="ticket-42", forget_items=[{"question": "q", "answer": "a"}],
                                forget_source=None, input_model=str(micro_bench.target_dir), output_model=run / "model",
                                run_dir=run, config={"name": "x"}, bench="BUILTIN_micro_forget10", summaries=None,
                                started=now, finished=now)
    audit.write(run, record)
    return run


@pytest.fixture
def post(micro_bench, run_dir):
    """post(body) -> (status, JSON) against a Gateway serving "unlearned" (the run's model) and "base"."""
    import ray.serve

    import ray_unlearn.serve as serve_module

    gateway_cls = next(c for c in serve_module.Gateway.func_or_class.__mro__[1:] if c.__name__ == "Gateway")
    models = {"base": str(micro_bench.target_dir), "unlearned": str(run_dir / "model")}
    cfg = serve_config_from_dict({"models": models, "base_model": "base"})
    stub = ScoringStub()
    gateway = gateway_cls(stub, cfg, models, {}, "")
    patch = pytest.MonkeyPatch()
    patch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=gateway))

    def send(body: dict) -> tuple[int, dict]:
        status, raw = asyncio.run(asgi_post(serve_module.api, "/v1/verify", json.dumps(body).encode()))
        return status, json.loads(raw)

    send.stub = stub
    yield send
    patch.undo()


def test_audit_alone_returns_the_rechecked_record(post, run_dir, micro_bench):
    status, body = post({"model": "unlearned", "audit": True})
    assert status == 200, body
    assert body["object"] == "verification" and "verdict" not in body and post.stub.calls == []
    assert body["audit"]["ok"] is True
    assert body["audit"]["check"] == audit.check(run_dir).line and body["audit"]["check"].startswith(
        "OK: request ticket-42: ")
    assert body["audit"]["record"] == json.loads((run_dir / "audit.json").read_text())

    weights = run_dir / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one byte
    weights.write_bytes(bytes(data))
    status, body = post({"model": "unlearned", "audit": True})
    assert status == 200 and body["audit"]["ok"] is False
    assert body["audit"]["check"] == f"MISMATCH: output model file {weights} changed (SHA-256 differs from audit.json)"


def test_audit_beside_scored_items(post):
    items = [{"question": "Who?", "answer": "Ann"}, {"question": "Where?", "answer": "Oslo"}]
    status, body = post({"model": "unlearned", "items": items, "audit": True})
    assert status == 200, body
    assert post.stub.calls == [(2, 2)]
    assert body["audit"]["record"]["request_id"] == "ticket-42" and body["audit"]["ok"] is True
    assert body["verdict"] == "not forgotten" and body["aggregate"]["forgotten_items"] == 1  # 1 of 2 < 90 %


def test_a_model_without_a_run_has_no_audit(post, micro_bench, run_dir):
    status, body = post({"model": "base", "audit": True})
    assert status == 404 and body["error"]["code"] == "audit_not_found" and body["error"]["param"] == "audit"
    assert f"{micro_bench.target_dir.resolve().parent} holds no audit.json" in body["error"]["message"]
    status, body = post({"model": "unlearned"})  # neither a source nor audit
    assert status == 400 and "audit: true alone" in body["error"]["message"]
    record = json.loads((run_dir / "audit.json").read_text())
    record["output_model"]["path"] = "other"
    (run_dir / "audit.json").write_text(json.dumps(record))
    status, body = post({"model": "unlearned", "audit": True})
    assert status == 404 and f"records the model {run_dir / 'other'}, not 'unlearned'" in body["error"]["message"]
