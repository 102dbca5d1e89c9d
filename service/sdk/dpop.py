"""DPoP keys for agents (RFC 9449): a key that never leaves the process, and its proofs.

``DPoPKey.generate()`` makes an in-memory key; ``key.jkt`` is what a task declares
(``dpop_jkt``) so its credentials carry ``cnf.jkt``; ``key.proof(method, url,
access_token=...)`` signs the ``DPoP`` header for one request (§4.2: ``typ dpop+jwt``,
the public ``jwk`` in the header, ``jti``, ``htm``, ``htu`` without query and fragment,
``iat``, ``ath`` when a token is presented, ``nonce`` when the server asked for one).
Guards check proofs with ``service.kernel.dpop``. Imports nothing from litestar or the
database.
"""

from __future__ import annotations

import secrets
import time
from typing import Final

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from service.kernel.dpop import PROOF_TYPE, access_token_hash
from service.kernel.jwk import public_jwk, thumbprint
from service.kernel.jws import b64url, der_to_raw

__all__ = ["DPoPKey"]

_ECDSA: Final = ec.ECDSA(hashes.SHA256())


class DPoPKey:
    """One proof-of-possession key, held in memory only (its repr shows the ``jkt``)."""

    def __init__(self, private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
        self._private = private
        if isinstance(private, ed25519.Ed25519PrivateKey):
            self.alg = "EdDSA"
        elif isinstance(private.curve, ec.SECP256R1):
            self.alg = "ES256"
        else:
            raise ValueError("DPoP keys are Ed25519 or P-256")
        self.public_jwk = public_jwk(private.public_key())
        self.jkt = thumbprint(self.public_jwk)
        self._header = {"typ": PROOF_TYPE, "alg": self.alg, "jwk": self.public_jwk}

    @classmethod
    def generate(cls, alg: str = "EdDSA") -> DPoPKey:
        if alg == "EdDSA":
            return cls(ed25519.Ed25519PrivateKey.generate())
        if alg == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        raise ValueError(f"unsupported DPoP algorithm {alg!r}; use EdDSA or ES256")

    def __repr__(self) -> str:
        return f"DPoPKey({self.alg}, jkt={self.jkt})"

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        iat: float | None = None,
    ) -> str:
        """The ``DPoP`` header value for one request to ``method url``."""
        claims: dict[str, object] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": url.split("#", 1)[0].split("?", 1)[0],
            "iat": int(time.time() if iat is None else iat),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        signing_input = (
            b64url(msgspec.json.encode(self._header)) + "." + b64url(msgspec.json.encode(claims))
        ).encode()
        private = self._private
        if isinstance(private, ed25519.Ed25519PrivateKey):
            signature = private.sign(signing_input)
        else:
            signature = der_to_raw(private.sign(signing_input, _ECDSA))
        return signing_input.decode() + "." + b64url(signature)
