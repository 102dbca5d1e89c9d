"""RFC 9449 DPoP proofs: is this request signed by the key the credential is bound to?

A DPoP-bound credential carries ``cnf.jkt`` (RFC 9449 §6.1), the RFC 7638 thumbprint of
the holder's public key. Each request then carries a *proof*: a JWT in the ``DPoP``
header, signed with that key, naming the request. :func:`verify_proof` checks one
proof as §4.3 lists, in order:

1. a compact JWS of three parts (a caller passes exactly one ``DPoP`` header, item 1);
2. header ``typ`` is ``dpop+jwt`` (item 4);
3. ``alg`` is EdDSA or ES256 — asymmetric, never ``none`` (item 5);
4. ``jwk`` is a public key of that algorithm, without private members (items 7, 6);
5. the signature verifies with that ``jwk`` (item 6);
6. claims ``jti`` (a string), ``htm``, ``htu``, ``iat`` present (item 3);
7. ``htm`` equals the request method (item 8);
8. ``htu`` equals the request URL, both without query and fragment and normalised by
   RFC 3986 §6.2.2-6.2.3 (item 9; ``service.kernel.resources.canonical``);
9. ``nonce`` equals the server's, when the server asked for one (item 10);
10. ``iat`` within ``max_age`` seconds in the past (plus leeway into the future) (item 11);
11. ``ath`` is the base64url SHA-256 of the access token, when a token is presented
    (§4.3 item 12, §4.2);
12. the key's thumbprint equals the credential's ``cnf.jkt`` (§4.3 item 12, §6.1) — the
    caller passes the expected ``jkt``.

Replay (§11.1) is the caller's to stop: it must remember each accepted ``jti`` for
``max_age`` (the guard keeps a bounded cache). Pure: time comes in as ``now``.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Final

import msgspec

from service.kernel.errors import DPoPProofRejected, KillSwitchError
from service.kernel.jwk import load_public_jwk, thumbprint
from service.kernel.jws import ALGORITHMS, PublicKey, b64url, b64url_decode, verify_signature
from service.kernel.resources import ResourceRefused, canonical

__all__ = [
    "PROOF_TYPE",
    "DPoPProof",
    "ReplayCache",
    "access_token_hash",
    "htu_of",
    "verify_proof",
]

PROOF_TYPE: Final = "dpop+jwt"
MAX_PROOF_LENGTH: Final = 8_192
_decode_json = msgspec.json.decode


class DPoPProof(msgspec.Struct, frozen=True, kw_only=True):
    """A proof that checked out: who signed it, and what replay cache entry it needs."""

    jkt: str
    """RFC 7638 thumbprint of the proof's key (compare with ``cnf.jkt``)."""
    jti: str
    iat: float
    htm: str
    htu: str


def access_token_hash(token: str) -> str:
    """``ath`` (RFC 9449 §4.2): base64url SHA-256 of the ASCII access token."""
    return b64url(hashlib.sha256(token.encode("ascii", "replace")).digest())


def htu_of(url: str) -> str:
    """A URL as ``htu`` compares it: no query or fragment, RFC 3986-normalised."""
    base = url.split("#", 1)[0].split("?", 1)[0]
    try:
        return canonical(base)
    except ResourceRefused:
        return base


def _reject(reason: str) -> DPoPProofRejected:
    return DPoPProofRejected(reason)


@functools.lru_cache(maxsize=4096)
def _header_key(segment: str) -> tuple[str, PublicKey, str]:
    """(alg, public key, jkt) of a proof header; cached, as one key signs many proofs."""
    try:
        header = _decode_json(b64url_decode(segment))
    except (msgspec.DecodeError, ValueError):
        raise _reject("DPoP proof header is not JSON") from None
    if not isinstance(header, dict):
        raise _reject("DPoP proof header is not an object")
    if header.get("typ") != PROOF_TYPE:
        raise _reject("DPoP proof typ must be dpop+jwt (RFC 9449 §4.2)")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise _reject(f"DPoP proof algorithm {alg!r} not accepted")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise _reject("DPoP proof has no jwk header")
    if "crit" in header:
        raise _reject("DPoP proof has an unsupported critical header")
    try:
        key_alg, key = load_public_jwk(jwk)
        jkt = thumbprint(jwk)
    except KillSwitchError as exc:
        raise _reject(f"DPoP proof jwk: {exc.detail}") from None
    if key_alg != alg:
        raise _reject(f"DPoP proof algorithm {alg} does not fit its key ({key_alg})")
    return alg, key, jkt


def verify_proof(
    proof: str,
    *,
    method: str,
    url: str,
    now: float,
    access_token: str | None = None,
    jkt: str | None = None,
    nonce: str | None = None,
    max_age: float = 60.0,
    leeway: float = 5.0,
) -> DPoPProof:
    """Check one DPoP proof (see the module docstring). Raises ``DPoPProofRejected``."""
    if not proof or len(proof) > MAX_PROOF_LENGTH:
        raise _reject("DPoP proof missing or too long")
    parts = proof.split(".")
    if len(parts) != 3:
        raise _reject("DPoP proof is not a compact JWS")
    header_b64, payload_b64, signature_b64 = parts
    alg, key, key_jkt = _header_key(header_b64)
    try:
        signature = b64url_decode(signature_b64)
        signing_input = proof[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
    except (ValueError, UnicodeEncodeError):
        raise _reject("DPoP proof signature is invalid") from None
    if not verify_signature(alg, key, signing_input, signature):
        raise _reject("DPoP proof signature is invalid")
    try:
        claims = _decode_json(b64url_decode(payload_b64))
    except (msgspec.DecodeError, ValueError):
        raise _reject("DPoP proof payload is not JSON") from None
    if not isinstance(claims, dict):
        raise _reject("DPoP proof payload is not an object")
    jti, htm, htu, iat = (claims.get(k) for k in ("jti", "htm", "htu", "iat"))
    if not (isinstance(jti, str) and jti and len(jti) <= 256):
        raise _reject("DPoP proof jti must be a string")
    if not isinstance(htm, str) or not isinstance(htu, str):
        raise _reject("DPoP proof htm and htu must be strings")
    if not isinstance(iat, int | float) or isinstance(iat, bool):
        raise _reject("DPoP proof iat must be a number")
    if htm != method:
        raise _reject(f"DPoP proof is for method {htm[:16]!r}, not {method[:16]!r}")
    if htu_of(htu) != htu_of(url):
        raise _reject("DPoP proof is for another URL (htu)")
    if nonce is not None and claims.get("nonce") != nonce:
        raise _reject("DPoP proof nonce is missing or stale")
    if iat > now + leeway:
        raise _reject("DPoP proof issued in the future")
    if iat < now - max_age:
        raise _reject("DPoP proof too old (iat)")
    if access_token is not None and claims.get("ath") != access_token_hash(access_token):
        raise _reject("DPoP proof ath does not match the access token")
    if jkt is not None and key_jkt != jkt:
        raise _reject("DPoP proof key is not the one the credential is bound to (cnf.jkt)")
    return DPoPProof(jkt=key_jkt, jti=jti, iat=float(iat), htm=htm, htu=htu)


class ReplayCache:
    """The proofs seen, each until it could no longer pass the ``iat`` check (§11.1).

    Bounded: when full of proofs that are all still live it refuses the new one rather
    than forget an old one (fail closed). Not thread-safe; one per event loop.
    """

    __slots__ = ("_seen", "max_age", "max_entries")

    def __init__(self, max_age: float, max_entries: int = 1_000_000) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self._seen: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, proof: DPoPProof, now: float, leeway: float) -> str | None:
        """Remember ``proof``; None if it is new, else why it must be refused."""
        seen = self._seen
        key = f"{proof.jkt}:{proof.jti}"
        if key in seen:
            return "DPoP proof replayed (its jti was seen before)"
        if len(seen) >= self.max_entries:
            for old in [k for k, until in seen.items() if until <= now]:
                del seen[old]
            if len(seen) >= self.max_entries:
                return "DPoP replay cache full: try again"
        seen[key] = proof.iat + self.max_age + leeway
        return None
