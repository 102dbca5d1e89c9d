"""Generation and hashing of the bearer secrets killswitch hands out.

Client secrets (``ksa_…``) and operator tokens (``kso_…``) are 256 random bits, so a
plain SHA-256 is the right hash: there is nothing to brute-force, and a slow KDF would
only slow every request. Only the hash is stored; comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

AGENT_SECRET_PREFIX = "ksa_"  # noqa: S105 - a prefix, not a secret
OPERATOR_TOKEN_PREFIX = "kso_"  # noqa: S105 - a prefix, not a secret


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_hash: str | None) -> bool:
    if stored_hash is None:
        return False
    return hmac.compare_digest(hash_secret(secret), stored_hash)
