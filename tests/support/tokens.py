"""Forging JWTs for attack tests. Everything is built at run time from a real issued
token's claims and the service's real (or a freshly generated) key; nothing is stored."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import jwt

T = TypeVar("T")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims_of(token: str) -> dict[str, Any]:
    """The payload of ``token`` without verifying anything."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def header_of(token: str) -> dict[str, Any]:
    header: dict[str, Any] = jwt.get_unverified_header(token)
    return header


def sign_eddsa(
    claims: dict[str, Any], private_key: Any, kid: str, *, typ: str | None = "at+jwt"
) -> str:
    """Sign ``claims`` with ``private_key`` (Ed25519). ``typ=None`` leaves ``typ`` out."""
    headers: dict[str, Any] = {"kid": kid, "typ": typ}
    token = jwt.encode(claims, private_key, algorithm="EdDSA", headers=headers)
    if typ is None:
        assert "typ" not in header_of(token), header_of(token)
    return token


def alg_none(claims: dict[str, Any], kid: str) -> str:
    """``header.payload.`` with ``alg: none`` and an empty signature (RFC 7519 §6)."""
    return f"{_segment({'alg': 'none', 'typ': 'at+jwt', 'kid': kid})}.{_segment(claims)}."


def hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """HS256 with ``secret`` as the HMAC key: the classic key-confusion attack."""
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid})}.{_segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def replace_payload(token: str, claims: dict[str, Any]) -> str:
    """``token`` with its payload swapped for ``claims``; header and signature kept."""
    header, _, signature = token.split(".")
    return f"{header}.{_segment(claims)}.{signature}"


async def on_app_loop(ks: Any, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run ``await fn(*args, **kwargs)`` on the app's event loop.

    litestar's AsyncTestClient runs the app (and so the asyncpg pool) on a blocking
    portal's loop in another thread. Awaiting ``ks.services.db`` (or anything that
    queries it, such as ``live_token``) straight from the test's loop crosses loops, and
    on PostgreSQL that crashes asyncpg. Requests do the same hop, so this is no slower.
    """
    portal = ks.client.blocking_portal
    result: T = portal.call(functools.partial(fn, *args, **kwargs))
    return result


async def count_rows(ks: Any, table: str) -> int:
    row = await on_app_loop(ks, ks.services.db.fetchrow, f"SELECT COUNT(*) AS n FROM {table}")
    assert row is not None
    return int(row["n"])
