"""The ``at+jwt`` rules: when is a presented killswitch credential genuine and current?

One set of checks for every place that verifies a credential — the service
(introspection, sub-task issuance, ``/v1`` routes), the guard SDK and the detector — so
they cannot drift apart. In order (RFC 9068 §4, RFC 7515 §5.2, RFC 8725):

1. compact JWS of three base64url parts, at most :data:`MAX_TOKEN_LENGTH` characters;
2. header (:func:`parse_header`): a JSON object; ``typ`` is ``at+jwt`` or
   ``application/at+jwt`` (RFC 9068 §4 item 1); ``alg`` EdDSA or ES256; ``kid`` a string;
   no ``crit`` (RFC 7515 §4.1.11: we understand no extension);
3. the ``kid``'s key is known and ``alg`` equals the algorithm that key was made for, so
   ``alg: none`` or an HMAC with a public key as the secret never reach a verifier;
4. signature (:func:`service.kernel.jws.verify_signature`);
5. payload (:func:`check_claims`): a JSON object with ``iss`` equal to the issuer
   (item 3); ``aud`` a string or a list of strings (RFC 7519 §4.1.3) containing the
   audience when one is asked for (item 4); ``exp``, ``nbf`` and ``iat`` NumericDates
   (numbers, not booleans) with ``exp > now - leeway``, ``nbf <= now + leeway``,
   ``iat <= now + leeway``; ``sub``, ``jti`` and ``client_id`` non-empty strings; ``task``
   an object whose ``id`` is a non-empty string; ``scope`` a string of valid grants
   (``service.kernel.scopes.from_scope_claim``).

``nbf`` is required (every killswitch credential carries it: a token without one was not
made by us). Revocation status is *not* decided here: see :mod:`service.kernel.deny`.

Pure: time comes in as ``now``; keys come in through a lookup function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final

import msgspec

from service.kernel.errors import KillSwitchError, TokenRejected
from service.kernel.jws import ALGORITHMS, PublicKey, b64url_decode, verify_signature
from service.kernel.scopes import ScopeSpec, from_scope_claim

__all__ = [
    "MAX_TOKEN_LENGTH",
    "TOKEN_TYPES",
    "UNKNOWN_KID",
    "KeyLookup",
    "TokenClaims",
    "TokenHeader",
    "check_claims",
    "jti_hash",
    "parse_header",
    "verify_jws",
]

TOKEN_TYPES: Final = frozenset({"at+jwt", "application/at+jwt"})
MAX_TOKEN_LENGTH: Final = 16_384
UNKNOWN_KID: Final = "unknown signing key (kid)"

#: ``kid`` → (JWS alg the key was made for, public key), or None if unknown.
KeyLookup = Callable[[str], "tuple[str, PublicKey] | None"]

_decode_json = msgspec.json.decode


def jti_hash(jti: str) -> str:
    """What is stored and propagated instead of a jti: its SHA-256, hex."""
    return hashlib.sha256(jti.encode()).hexdigest()


class TokenHeader(msgspec.Struct, frozen=True):
    alg: str
    kid: str


class TokenClaims(msgspec.Struct, frozen=True, kw_only=True):
    """A credential whose signature and claims check out (revocation not yet checked)."""

    claims: dict[str, Any]
    kid: str
    jti: str
    jti_hash: str
    issuer: str
    subject: str
    agent_id: str
    task_id: str
    parent_id: str | None
    audiences: tuple[str, ...]
    scope: str
    scope_spec: ScopeSpec
    """``scope`` and ``aud`` parsed by the grant grammar (``service.kernel.scopes``)."""
    iat: float
    nbf: float
    exp: float

    @property
    def cnf_jkt(self) -> str | None:
        """RFC 9449 §6.1: the thumbprint of the key this credential is bound to."""
        cnf = self.claims.get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        return jkt if isinstance(jkt, str) else None


def _reject(reason: str) -> TokenRejected:
    return TokenRejected(reason, permanent=True)


def parse_header(header_b64: str) -> TokenHeader:
    """Step 2: the protected header's rules. Raises :class:`TokenRejected` (permanent)."""
    try:
        header = _decode_json(b64url_decode(header_b64))
    except (msgspec.DecodeError, ValueError):
        raise _reject("malformed token: header is not JSON") from None
    if not isinstance(header, dict):
        raise _reject("malformed token: header is not an object")
    if header.get("typ") not in TOKEN_TYPES:
        raise _reject("token type must be at+jwt (RFC 9068 §4)")
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise _reject(f"algorithm {alg!r} not accepted")
    if not isinstance(kid, str):
        raise _reject("malformed token: no kid")
    if "crit" in header:
        raise _reject("unsupported critical JOSE header")
    return TokenHeader(alg, kid)


def verify_jws(
    token: str,
    keys: KeyLookup,
    *,
    header_cache: dict[str, TokenHeader] | None = None,
) -> tuple[TokenHeader, dict[str, Any]]:
    """Steps 1-4 and the payload's JSON: returns the header and the (unchecked) claims.

    Raises :class:`TokenRejected`; ``permanent`` is false only for an unknown ``kid``
    (the caller may refetch its keys and try again). ``header_cache`` (bounded by the
    caller) saves re-parsing the header every credential of one key shares.
    """
    if not token:
        raise _reject("missing token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise _reject("malformed token: too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise _reject("malformed token: not a compact JWS")
    header_b64, payload_b64, signature_b64 = parts
    header = header_cache.get(header_b64) if header_cache is not None else None
    if header is None:
        header = parse_header(header_b64)
        if header_cache is not None and len(header_cache) < 256:
            header_cache[header_b64] = header
    found = keys(header.kid)
    if found is None:
        raise TokenRejected(UNKNOWN_KID, permanent=False)
    key_alg, key = found
    if header.alg != key_alg:
        raise _reject(f"algorithm {header.alg} is not the key's ({key_alg})")
    try:
        signature = b64url_decode(signature_b64)
        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
    except (ValueError, UnicodeEncodeError):
        raise _reject("invalid signature") from None
    if not verify_signature(key_alg, key, signing_input, signature):
        raise _reject("invalid signature")
    try:
        claims = _decode_json(b64url_decode(payload_b64))
    except (msgspec.DecodeError, ValueError):
        raise _reject("malformed token: payload is not JSON") from None
    if not isinstance(claims, dict):
        raise _reject("malformed token: payload is not an object")
    return header, claims


def _numeric_date(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _reject(f"malformed token: {name} must be a number")
    return value


def _string(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise _reject(f"malformed token: {name} must be a non-empty string")
    return value


def check_claims(
    claims: dict[str, Any],
    *,
    kid: str,
    issuer: str,
    audience: str | None,
    now: float,
    leeway: float,
) -> TokenClaims:
    """Step 5. ``audience=None`` skips the audience check (the caller checks it later)."""
    if claims.get("iss") != issuer:
        raise _reject("wrong issuer")
    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else aud
    if not isinstance(audiences, list | tuple) or not all(isinstance(a, str) for a in audiences):
        raise _reject("malformed token: aud must be a string or a list of strings")
    if audience is not None and audience not in audiences:
        raise _reject("token not issued for this audience")
    exp = _numeric_date(claims, "exp")
    nbf = _numeric_date(claims, "nbf")
    iat = _numeric_date(claims, "iat")
    subject = _string(claims, "sub")
    jti = _string(claims, "jti")
    agent_id = _string(claims, "client_id")
    task = claims.get("task")
    task_id = task.get("id") if isinstance(task, dict) else None
    if not isinstance(task_id, str) or not task_id:
        raise _reject("malformed token: task claim")
    assert isinstance(task, dict)
    parent_id = task.get("parent_id")
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise _reject("malformed token: scope must be a string")
    try:
        scope_spec = from_scope_claim(scope, tuple(audiences))
    except KillSwitchError as exc:
        raise _reject(f"invalid scope claim: {exc.detail}") from None
    if exp <= now - leeway:
        raise TokenRejected("token expired", permanent=False)
    if nbf > now + leeway:
        raise TokenRejected("token not yet valid", permanent=False)
    if iat > now + leeway:
        raise TokenRejected("token issued in the future", permanent=False)
    return TokenClaims(
        claims=claims,
        kid=kid,
        jti=jti,
        jti_hash=jti_hash(jti),
        issuer=issuer,
        subject=subject,
        agent_id=agent_id,
        task_id=task_id,
        parent_id=parent_id if isinstance(parent_id, str) else None,
        audiences=tuple(audiences),
        scope=scope,
        scope_spec=scope_spec,
        iat=iat,
        nbf=nbf,
        exp=exp,
    )
