"""One set of ``at+jwt`` rules: the service's verifier and the guard decide every token alike.

They used to differ (``nbf`` required vs optional, ``aud`` list vs string, ``iat`` int vs
number, ``sub`` checked by one only, the scope claim parsed by one only). Both now call
``service.kernel.tokens``; this test pins the chosen behaviour and holds the two to it,
with a real key store (keys generated at run time) and a real ``Guard``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service.credentials.keys import KeyStore, sign
from service.credentials.rfc9068 import TokenVerifier
from service.kernel.clock import SystemClock
from service.kernel.errors import TokenRejected
from service.kernel.jws import b64url
from service.kernel.tokens import jti_hash
from service.sdk import Guard, SseRevocationFeed

ISSUER = "http://127.0.0.1:9"
AUD = "https://tools.test"
NOW = int(time.time())


def base_claims() -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "sub": "spiffe://ks.test/agent/a/task/t",
        "aud": [AUD],
        "client_id": "a",
        "scope": "call:tool/search",
        "jti": "jti-1",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 300,
        "task": {"id": "t", "agent_id": "a", "parent_id": None, "deadline": NOW + 300},
    }


def without(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda claims: claims.pop(name)


def setting(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda claims: claims.__setitem__(name, value)


# (case, mutation of the claims, accepted?)
CASES: list[tuple[str, Callable[[dict[str, Any]], None], bool]] = [
    ("valid", lambda c: None, True),
    ("aud as a string (RFC 7519 §4.1.3)", setting("aud", AUD), True),
    ("iat as a float NumericDate", setting("iat", NOW + 0.25), True),
    ("aud for another audience", setting("aud", ["https://other"]), False),
    ("aud missing", without("aud"), False),
    ("aud of numbers", setting("aud", [1]), False),
    ("nbf missing", without("nbf"), False),
    ("nbf in the future", setting("nbf", NOW + 3600), False),
    ("iat as a boolean", setting("iat", True), False),
    ("iat in the future", setting("iat", NOW + 3600), False),
    ("exp in the past", setting("exp", NOW - 3600), False),
    ("exp as a string", setting("exp", str(NOW + 300)), False),
    ("sub missing", without("sub"), False),
    ("jti empty", setting("jti", ""), False),
    ("client_id missing", without("client_id"), False),
    ("task without an id", setting("task", {"agent_id": "a"}), False),
    ("task not an object", setting("task", "t"), False),
    ("scope not a string", setting("scope", ["call:tool/search"]), False),
    ("scope that does not parse", setting("scope", "nocolon"), False),
    ("issuer of someone else", setting("iss", "https://evil.test"), False),
]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    store = KeyStore(
        Path(tmp_path_factory.mktemp("keys")),
        alg="EdDSA",
        clock=SystemClock(),
        credential_ttl=300,
        leeway=5,
    )
    store.load_or_create()
    return store


def _guard(keys: KeyStore) -> Guard:
    # A real guard; its feed is never started: only verification is exercised here.
    guard = Guard(ISSUER, AUD, SseRevocationFeed(ISSUER, "unused"))
    guard.add_keys(keys.jwks())
    return guard


def _service_verdict(verifier: TokenVerifier, token: str) -> str | None:
    try:
        verifier.verify(token, audience=AUD)
    except TokenRejected as exc:
        return exc.detail
    return None


def _guard_verdict(guard: Guard, token: str) -> str | None:
    admitted = guard._admit(token, time.time())
    return admitted.reason if hasattr(admitted, "reason") else None


@pytest.mark.parametrize(("case", "mutate", "accepted"), CASES, ids=[c[0] for c in CASES])
def test_service_and_guard_decide_alike(
    keys: KeyStore,
    case: str,
    mutate: Callable[[dict[str, Any]], None],
    accepted: bool,
) -> None:
    claims = base_claims()
    mutate(claims)
    token = sign(claims, keys.active)
    verifier = TokenVerifier(keys, issuer=ISSUER, clock=SystemClock(), leeway=5)
    service = _service_verdict(verifier, token)
    guard = _guard_verdict(_guard(keys), token)
    assert (service is None) is accepted, (case, service)
    assert service == guard, (case, service, guard)


def _with_header(keys: KeyStore, header: dict[str, Any]) -> str:
    key = keys.active
    assert key.private_key is not None
    signing_input = (
        b64url(msgspec.json.encode(header)) + "." + b64url(msgspec.json.encode(base_claims()))
    )
    signature = key.private_key.sign(signing_input.encode())  # type: ignore[call-arg]
    return signing_input + "." + b64url(signature)


@pytest.mark.parametrize(
    ("case", "header", "accepted"),
    [
        ("at+jwt", {"typ": "at+jwt"}, True),
        ("application/at+jwt", {"typ": "application/at+jwt"}, True),
        ("plain JWT type", {"typ": "JWT"}, False),
        ("no type", {}, False),
        ("a critical extension", {"typ": "at+jwt", "crit": ["exp"], "exp": 1}, False),
        ("ES256 claimed for an Ed25519 key", {"typ": "at+jwt", "alg": "ES256"}, False),
    ],
)
def test_header_rules_are_the_same(
    keys: KeyStore, case: str, header: dict[str, Any], accepted: bool
) -> None:
    token = _with_header(keys, {"alg": "EdDSA", "kid": keys.active.kid, **header})
    verifier = TokenVerifier(keys, issuer=ISSUER, clock=SystemClock(), leeway=5)
    service = _service_verdict(verifier, token)
    guard = _guard_verdict(_guard(keys), token)
    assert (service is None) is accepted, (case, service)
    assert service == guard, (case, service, guard)


def test_jti_hash_is_one_function() -> None:
    # What is stored, propagated and compared everywhere: SHA-256 of the jti, hex.
    assert jti_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
