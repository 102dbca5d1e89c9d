"""RFC 9068 JWT access tokens: building, signing and verifying killswitch credentials.

Issuing reads like the profile (RFC 9068 §2): build the claims (§2.2: iss, exp, aud,
sub, client_id, iat, jti; plus scope §2.2.3), put ``typ: at+jwt`` in the header (§2.1),
sign with the active key, and verify our own output before anyone sees it.

Verification follows §4 with the kernel's rules (``service.kernel.tokens``), the very
checks every guard runs: ``typ`` ``at+jwt``, the algorithm the ``kid``'s key was made for
(so ``alg: none`` and HS256 with a public key as the secret never get near a verifier),
signature, ``iss``, ``exp``/``nbf``/``iat`` with leeway, and — when the caller serves
one — ``aud``.

Revocation status is *not* decided here: see ``service.revocation``.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from service.contracts import TaskRecord
from service.credentials.keys import KeyStore, sign, verify_own_signature
from service.kernel import tokens
from service.kernel.clock import Clock
from service.kernel.jws import PublicKey, b64url
from service.kernel.scopes import to_scope_claim
from service.kernel.tokens import TOKEN_TYPES, TokenClaims, jti_hash

__all__ = [
    "TOKEN_TYPES",
    "TokenClaims",
    "TokenVerifier",
    "build_claims",
    "jti_hash",
    "sign",
    "verify_own_signature",
]


def new_jti() -> str:
    return b64url(secrets.token_bytes(16))


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


class TokenVerifier:
    """The service's verifier: the kernel's ``at+jwt`` rules against our own key store.

    Same checks, in the same order, as every guard (``service.kernel.tokens``); the only
    difference is where keys come from (the key directory, re-read when another replica
    or ``keys rotate --offline`` rotated them).
    """

    def __init__(self, keys: KeyStore, *, issuer: str, clock: Clock, leeway: int) -> None:
        self.keys = keys
        self.issuer = issuer
        self.clock = clock
        self.leeway = leeway
        self._headers: dict[str, tokens.TokenHeader] = {}

    def _key(self, kid: str) -> tuple[str, PublicKey] | None:
        key = self.keys.verification_key(kid)
        if key is None and self.keys.refresh_if_changed():
            key = self.keys.verification_key(kid)
        return None if key is None else (key.alg, key.public_key)

    def verify(self, token: str, *, audience: str | None = None) -> TokenClaims:
        """Verify signature and claims; raises ``TokenRejected`` with the reason."""
        header, claims = tokens.verify_jws(token, self._key, header_cache=self._headers)
        return tokens.check_claims(
            claims,
            kid=header.kid,
            issuer=self.issuer,
            audience=audience,
            now=self.clock.now(),
            leeway=self.leeway,
        )
