"""RFC 9068 JWT access tokens: building, signing and verifying killswitch credentials.

Issuing reads like the profile (RFC 9068 §2): build the claims (§2.2: iss, exp, aud,
sub, client_id, iat, jti; plus scope §2.2.3), put ``typ: at+jwt`` in the header (§2.1),
sign with the active key, and verify our own output before anyone sees it.

Verification follows §4: the ``typ`` must be ``at+jwt`` (or ``application/at+jwt``), the
algorithm must be the one the ``kid``'s key was made for (so ``alg: none`` and HS256
with a public key as the secret never get near a verifier), then signature, ``iss``,
``exp``/``nbf`` with leeway, and — when the caller serves one — ``aud``.

Revocation status is *not* decided here: see ``service.revocation``.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import jwt
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from service.clock import Clock
from service.contracts import TaskRecord
from service.credentials.jwk import b64url, b64url_decode
from service.credentials.keys import KeyStore, SigningKey
from service.errors import TokenRejected
from service.scopes import to_scope_claim

TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "task"]


def new_jti() -> str:
    return b64url(secrets.token_bytes(16))


def jti_hash(jti: str) -> str:
    """What we store and propagate instead of the jti itself."""
    return hashlib.sha256(jti.encode()).hexdigest()


def build_claims(
    *,
    issuer: str,
    task: TaskRecord,
    jti: str,
    issued_at: int,
    expires_at: int,
    actor_chain: dict[str, Any] | None,
) -> dict[str, Any]:
    scope = task.scope
    task_claim: dict[str, Any] = {
        "id": task.id,
        "agent_id": task.agent_id,
        "parent_id": task.parent_id,
        "deadline": int(task.deadline),
    }
    limits = msgspec.structs.asdict(scope.limits)
    if any(v is not None for v in limits.values()):
        task_claim["limits"] = {k: v for k, v in limits.items() if v is not None}
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": task.spiffe_id,
        "aud": list(scope.audiences),
        "client_id": task.agent_id,
        "scope": to_scope_claim(scope),
        "jti": jti,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": expires_at,
        "task": task_claim,
    }
    if actor_chain is not None:
        claims["act"] = actor_chain  # RFC 8693 §4.1: who acts on the subject's behalf
    if task.dpop_jkt is not None:
        claims["cnf"] = {"jkt": task.dpop_jkt}  # RFC 9449 §6.1
    return claims


_header_cache: dict[str, bytes] = {}


def _header(key: SigningKey) -> bytes:
    cached = _header_cache.get(key.kid)
    if cached is None:
        header = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
        cached = b64url(msgspec.json.encode(header)).encode()
        _header_cache[key.kid] = cached
    return cached


def sign(claims: dict[str, Any], key: SigningKey) -> str:
    """JWS compact serialization (RFC 7515 §7.1) of ``claims`` under ``key``."""
    private = key.private_key
    if private is None:
        raise RuntimeError(f"key {key.kid} is retired and cannot sign")
    signing_input = _header(key) + b"." + b64url(msgspec.json.encode(claims)).encode()
    if isinstance(private, ed25519.Ed25519PrivateKey):
        signature = private.sign(signing_input)
    else:
        r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # RFC 7518 §3.4
    return signing_input.decode() + "." + b64url(signature)


def verify_own_signature(token: str, key: SigningKey) -> None:
    """The issuer checks what it just signed, so a broken key never reaches a client."""
    signing_input, _, signature_b64 = token.rpartition(".")
    signature = b64url_decode(signature_b64)
    public = key.public_key
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, signing_input.encode())
        else:
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            public.verify(
                encode_dss_signature(r, s), signing_input.encode(), ec.ECDSA(hashes.SHA256())
            )
    except InvalidSignature:
        raise RuntimeError(f"signing key {key.kid} produced an invalid signature") from None


class VerifiedToken(msgspec.Struct, frozen=True, kw_only=True):
    """A credential whose signature and time claims check out (status not yet checked)."""

    claims: dict[str, Any]
    jti: str
    jti_hash: str
    kid: str
    task_id: str
    agent_id: str
    parent_id: str | None
    iat: int
    exp: int
    audiences: tuple[str, ...]
    scope: str


class TokenVerifier:
    def __init__(self, keys: KeyStore, *, issuer: str, clock: Clock, leeway: int) -> None:
        self.keys = keys
        self.issuer = issuer
        self.clock = clock
        self.leeway = leeway

    def verify(self, token: str, *, audience: str | None = None) -> VerifiedToken:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"malformed token: {exc}") from None
        if header.get("typ") not in TOKEN_TYPES:
            raise TokenRejected("token type must be at+jwt (RFC 9068 §4)")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenRejected("unknown signing key (kid)")
        key = self.keys.verification_key(kid)
        if key is None and self.keys.refresh_if_changed():
            # Rotated by another replica or `keys rotate --offline` since we last looked.
            key = self.keys.verification_key(kid)
        if key is None:
            raise TokenRejected("unknown signing key (kid)")
        if header.get("alg") != key.alg:
            raise TokenRejected(f"algorithm {header.get('alg')!r} is not the key's ({key.alg})")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.public_key,
                algorithms=[key.alg],
                issuer=self.issuer,
                audience=audience,
                leeway=self.leeway,
                # exp/nbf are checked below against the injected clock, not time.time().
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_aud": audience is not None,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,  # pyjwt >= 2.10 checks iat against time.time()
                },
            )
        except jwt.InvalidIssuerError:
            raise TokenRejected("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("token not issued for this audience") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"invalid token: {exc}") from None
        now = self.clock.now()
        exp, nbf = claims["exp"], claims["nbf"]
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise TokenRejected("exp must be a number")
        if not isinstance(nbf, int | float) or isinstance(nbf, bool):
            raise TokenRejected("nbf must be a number")
        if exp <= now - self.leeway:
            raise TokenRejected("token expired")
        if nbf > now + self.leeway:
            raise TokenRejected("token not yet valid")
        # jwt.decode does not look inside iat; a token claiming to be from the future lies.
        iat = claims["iat"]
        if not isinstance(iat, int) or iat > now + self.leeway:
            raise TokenRejected("token issued in the future")
        task = claims["task"]
        aud = claims["aud"]
        if not isinstance(task, dict) or not isinstance(task.get("id"), str):
            raise TokenRejected("task claim missing or malformed")
        if not isinstance(aud, list) or not all(isinstance(a, str) for a in aud):
            raise TokenRejected("aud must be a list of strings")
        jti = claims["jti"]
        if not isinstance(jti, str) or not isinstance(claims["client_id"], str):
            raise TokenRejected("jti and client_id must be strings")
        return VerifiedToken(
            claims=claims,
            jti=jti,
            jti_hash=jti_hash(jti),
            kid=key.kid,
            task_id=task["id"],
            agent_id=claims["client_id"],
            parent_id=task.get("parent_id"),
            iat=iat,
            exp=int(claims["exp"]),
            audiences=tuple(aud),
            scope=str(claims.get("scope", "")),
        )
