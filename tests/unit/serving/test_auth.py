"""The API-key check: bearer parsing, constant-time comparison, OpenAI's 401 body."""

from __future__ import annotations

import pytest

from ray_unlearn.serving import auth
from ray_unlearn.serving.auth import bearer_token, key_matches, require_key
from ray_unlearn.serving.schemas import APIError


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_key_matches():
    assert key_matches("", None)  # no key configured: open
    assert key_matches("s3cret", "Bearer s3cret")
    assert not key_matches("s3cret", "Bearer s3cre")
    assert not key_matches("s3cret", None)
    assert not key_matches("s3cret", "s3cret")  # no scheme


def test_comparison_is_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert key_matches("k", "Bearer k")
    assert calls == [(b"k", b"k")]


@pytest.mark.parametrize("header, word", [(None, "missing"), ("Bearer nope", "incorrect")])
def test_require_key_raises_openais_401(header, word):
    with pytest.raises(APIError) as e:
        require_key("k", header)
    assert (e.value.status, e.value.code) == (401, "invalid_api_key")
    assert word in e.value.message
    require_key("k", "Bearer k")
