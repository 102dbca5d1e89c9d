"""JWK conversion and RFC 7638 thumbprints for the two key types killswitch signs with.

RFC 7638 §3.2: the thumbprint hashes the JSON object of the *required* members only,
in lexicographic order, with no whitespace. It is the ``kid`` of our signing keys and the
``jkt`` of RFC 9449 proof-of-possession keys.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from service.kernel.errors import ClientError
from service.kernel.jws import PublicKey as PublicKey
from service.kernel.jws import b64url, b64url_decode

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey

_REQUIRED = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y")}


def public_jwk(key: PublicKey) -> dict[str, str]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes_raw()
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    numbers = key.public_numbers()
    if not isinstance(key.curve, ec.SECP256R1):
        raise ClientError("only P-256 EC keys are supported")
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def load_public_jwk(jwk: dict[str, Any]) -> tuple[str, PublicKey]:
    """Parse a public JWK into (JWS alg, key). Raises ClientError on anything else."""
    try:
        kty, crv = jwk["kty"], jwk["crv"]
        if "d" in jwk:
            raise ClientError("a public JWK must not contain the private member 'd'")
        if kty == "OKP" and crv == "Ed25519":
            return "EdDSA", ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))
        if kty == "EC" and crv == "P-256":
            x = int.from_bytes(b64url_decode(jwk["x"]), "big")
            y = int.from_bytes(b64url_decode(jwk["y"]), "big")
            return "ES256", ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ClientError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ClientError(f"invalid public JWK: {exc}") from None
    raise ClientError("public JWK must be OKP/Ed25519 or EC/P-256")


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK SHA-256 thumbprint, base64url without padding."""
    members = _REQUIRED.get(jwk.get("kty", ""))
    if members is None:
        raise ClientError(f"unsupported JWK kty {jwk.get('kty')!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())
