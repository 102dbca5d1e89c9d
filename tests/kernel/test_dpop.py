"""RFC 9449 §4.3 proof checks (service.kernel.dpop) with real keys made at run time."""

from __future__ import annotations

import time

import msgspec
import pytest

from service.kernel.dpop import access_token_hash, verify_proof
from service.kernel.errors import DPoPProofRejected
from service.kernel.jws import b64url
from service.sdk.dpop import DPoPKey

URL = "https://tools.test/v1/invoices/42"
TOKEN = "header.payload.signature"


@pytest.fixture(params=["EdDSA", "ES256"])
def key(request: pytest.FixtureRequest) -> DPoPKey:
    return DPoPKey.generate(str(request.param))


def check(proof: str, key: DPoPKey, **overrides: object) -> object:
    args: dict[str, object] = {
        "method": "GET",
        "url": URL,
        "now": time.time(),
        "access_token": TOKEN,
        "jkt": key.jkt,
    }
    args.update(overrides)
    return verify_proof(proof, **args)  # type: ignore[arg-type]


def test_a_good_proof_names_its_key(key: DPoPKey) -> None:
    proven = check(key.proof("GET", URL, access_token=TOKEN), key)
    assert proven.jkt == key.jkt


def test_query_fragment_and_url_case_are_ignored_by_htu(key: DPoPKey) -> None:
    proof = key.proof("GET", "https://TOOLS.test:443/v1/invoices/42?page=2", access_token=TOKEN)
    check(proof, key, url=URL + "#frag")


@pytest.mark.parametrize(
    ("why", "make", "overrides"),
    [
        ("another method", lambda k: k.proof("POST", URL, access_token=TOKEN), {}),
        ("another URL", lambda k: k.proof("GET", URL + "/x", access_token=TOKEN), {}),
        (
            "another host",
            lambda k: k.proof("GET", "https://evil.test/v1/invoices/42", access_token=TOKEN),
            {},
        ),
        ("no ath", lambda k: k.proof("GET", URL), {}),
        ("ath of another token", lambda k: k.proof("GET", URL, access_token="other"), {}),
        ("stale iat", lambda k: k.proof("GET", URL, access_token=TOKEN, iat=time.time() - 600), {}),
        (
            "future iat",
            lambda k: k.proof("GET", URL, access_token=TOKEN, iat=time.time() + 600),
            {},
        ),
        (
            "nonce asked, none sent",
            lambda k: k.proof("GET", URL, access_token=TOKEN),
            {"nonce": "n1"},
        ),
        ("another key", lambda k: DPoPKey.generate().proof("GET", URL, access_token=TOKEN), {}),
    ],
)
def test_a_proof_for_something_else_is_refused(
    key: DPoPKey, why: str, make: object, overrides: dict[str, object]
) -> None:
    proof = make(key)  # type: ignore[operator]
    with pytest.raises(DPoPProofRejected):
        check(proof, key, **overrides)


def _forged(key: DPoPKey, header: dict[str, object], claims: dict[str, object]) -> str:
    """A proof with a chosen header/claims, signed by ``key`` (or not at all)."""
    good = key.proof("GET", URL, access_token=TOKEN)
    _, _, signature = good.split(".")
    return ".".join(
        [b64url(msgspec.json.encode(header)), b64url(msgspec.json.encode(claims)), signature]
    )


def test_header_rules(key: DPoPKey) -> None:
    claims = {
        "jti": "j",
        "htm": "GET",
        "htu": URL,
        "iat": int(time.time()),
        "ath": access_token_hash(TOKEN),
    }
    base = {"typ": "dpop+jwt", "alg": key.alg, "jwk": key.public_jwk}
    for header in (
        {**base, "typ": "JWT"},
        {**base, "alg": "none"},
        {**base, "alg": "HS256"},
        {**base, "jwk": {**key.public_jwk, "d": "AAAA"}},
        {k: v for k, v in base.items() if k != "jwk"},
        base,  # the signature is over other bytes: invalid
    ):
        with pytest.raises(DPoPProofRejected):
            check(_forged(key, header, claims), key)


def test_junk_is_refused(key: DPoPKey) -> None:
    for junk in ("", "a.b", "a.b.c", "x" * 10_000, "..", "e30.e30.e30"):
        with pytest.raises(DPoPProofRejected):
            check(junk, key)
