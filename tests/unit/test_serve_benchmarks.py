"""The pure helpers of the serving benchmarks (benchmarks/serve_common.py, serve_soak.py), hand values."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other by name

import serve_common  # noqa: E402
import serve_soak  # noqa: E402
from serve_soak import Outcome  # noqa: E402


def test_percentile_nearest_rank():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]  # sorted: 1 2 3 4 5
    assert serve_common.percentile(xs, 0.5) == 3.0  # index int(2.5) = 2
    assert serve_common.percentile(xs, 0.99) == 5.0  # index int(4.95) = 4
    assert serve_common.percentile(xs, 0.0) == 1.0
    assert serve_common.percentile(xs, 1.0) == 5.0  # clamped to the last value
    assert math.isnan(serve_common.percentile([], 0.5))


def test_growth_after_minute_1_is_the_largest_later_rss_over_minute_1():
    mib = 2**20
    # start 400, end of minute 1: 500 (warm-up), then 510, 505: +2 % at most
    assert serve_soak.growth([400 * mib, 500 * mib, 510 * mib, 505 * mib]) == pytest.approx(0.02)
    assert serve_soak.growth([400, 500, 450]) == pytest.approx(-0.1)  # shrinking is negative growth
    assert serve_soak.growth([400, 0, 450]) == math.inf  # the process was gone at minute 1
    with pytest.raises(ValueError, match="minutes 1 and 2"):
        serve_soak.growth([400, 500])


def test_per_minute_buckets_requests_by_when_they_finished():
    outcomes = [Outcome(1.0, "chat", True, 0.2), Outcome(59.9, "stream", True, 0.4),
                Outcome(60.0, "verify", False, 0.1, "503: overloaded"), Outcome(75.0, "completion", True, 0.3),
                Outcome(121.5, "chat", True, 0.5)]  # in flight at the end of a 2-minute soak: minute 2
    rows = serve_soak.per_minute(outcomes, minutes=2)
    assert [r["requests"] for r in rows] == [2, 3]
    assert [r["errors"] for r in rows] == [0, 1]
    assert rows[0]["p50_s"] == 0.4 and rows[0]["p99_s"] == 0.4  # sorted [0.2, 0.4]: index int(1.0) = 1
    assert rows[1]["p50_s"] == 0.5 and rows[1]["p99_s"] == 0.5  # errors leave latencies out: [0.3, 0.5]


def test_check_response_needs_a_well_formed_body():
    ok_stream = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
    assert serve_soak.check_response("stream", 200, ok_stream) == ""
    assert "error event" in serve_soak.check_response("stream", 200, b'data: {"error": {"code": 1}}\n\ndata: [DONE]\n\n')
    assert "[DONE]" in serve_soak.check_response("stream", 200, b'data: {"choices": []}\n\n')
    assert serve_soak.check_response("chat", 200, b'{"choices": []}') == ""
    assert serve_soak.check_response("verify", 200, b'{"verdict": "forgotten"}') == ""
    assert "verdict" in serve_soak.check_response("verify", 200, b'{"choices": []}')
    assert serve_soak.check_response("completion", 503, b'{"error": {}}').startswith("503")


def test_request_bodies_are_valid_requests_of_the_api():
    from ray_unlearn.serving.schemas import ChatCompletionRequest, CompletionRequest, VerifyRequest, validate

    items = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)]
    rng = random.Random(0)
    schema = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
              "/v1/verify": VerifyRequest}
    for kind in serve_soak.KINDS:
        for _ in range(20):
            path, body = serve_soak.request_body(kind, rng, items)
            validate(schema[path], json.loads(body))  # raises APIError on a body the server would refuse


def test_process_labels_number_only_repeated_roles():
    labels = serve_soak.process_labels({"proxy": [30], "model replica": [12, 11], "gateway": [20]})
    assert labels == {"model replica 1": 11, "model replica 2": 12, "gateway 1": 20, "proxy": 30}
