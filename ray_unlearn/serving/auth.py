"""API-key check of the HTTP API: `Authorization: Bearer <key>`, compared in constant time. Ray-free."""

from __future__ import annotations

import hmac

from ray_unlearn.serving.schemas import APIError


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def key_matches(expected: str, authorization: str | None) -> bool:
    """Whether the header carries `expected`; always True when no key is configured ('')."""
    if not expected:
        return True
    token = bearer_token(authorization)
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


def require_key(expected: str, authorization: str | None) -> None:
    """Raise a 401 (OpenAI's invalid_api_key) unless the header carries the configured key."""
    if key_matches(expected, authorization):
        return
    what = "missing" if bearer_token(authorization) is None else "incorrect"
    raise APIError(401, f"API key {what}: send the server's key as 'Authorization: Bearer <key>'",
                   code="invalid_api_key")
