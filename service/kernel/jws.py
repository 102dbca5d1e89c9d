"""JWS compact serialization pieces (RFC 7515) for the two algorithms killswitch uses.

Owns: base64url without padding (RFC 7515 §2), splitting a compact JWS into its three
parts (§7.1), the ES256 signature codec — JWS carries ``R || S``, 32 bytes each
(RFC 7518 §3.4), while ``cryptography`` speaks DER — and signature verification for
EdDSA/Ed25519 (RFC 8037 §3.1) and ES256. Signing with a private key is the issuer's
business (``service.credentials``); this module only verifies and converts.

Pure: no I/O, no clock, no key storage.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

__all__ = [
    "ALGORITHMS",
    "PublicKey",
    "b64url",
    "b64url_decode",
    "der_to_raw",
    "raw_to_der",
    "verify_signature",
]

#: The JWS algorithms killswitch signs and accepts (never ``none``, never HMAC).
ALGORITHMS: Final = frozenset({"EdDSA", "ES256"})
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
_ES256_HALF: Final = 32
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; raises ``ValueError`` on junk."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not base64url: {exc}") from None


def der_to_raw(der: bytes) -> bytes:
    """DER ``ECDSA-Sig-Value`` (what ``cryptography`` signs) → JWS ``R || S``."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(_ES256_HALF, "big") + s.to_bytes(_ES256_HALF, "big")


def raw_to_der(raw: bytes) -> bytes:
    """JWS ``R || S`` → DER. Raises ``ValueError`` unless exactly 64 bytes (§3.4)."""
    if len(raw) != 2 * _ES256_HALF:
        raise ValueError("an ES256 signature is 64 bytes")
    return encode_dss_signature(
        int.from_bytes(raw[:_ES256_HALF], "big"), int.from_bytes(raw[_ES256_HALF:], "big")
    )


def verify_signature(alg: str, key: PublicKey, signing_input: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``signing_input`` verifies under ``key`` with ``alg``.

    The algorithm must fit the key type: an Ed25519 key verifies only EdDSA, a P-256 key
    only ES256 (RFC 8725 §3.1: the key, not the token, decides the algorithm).
    """
    try:
        if alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signing_input)
            return True
        if alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, ec.SECP256R1):
                return False
            key.verify(raw_to_der(signature), signing_input, _ECDSA_SHA256)
            return True
    except (InvalidSignature, ValueError):
        return False
    return False
