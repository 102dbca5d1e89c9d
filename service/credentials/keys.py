"""Signing keys: generated on first start, kept on disk 0600, rotated, published as JWKS.

A key directory holds, per key, ``<kid>.json`` (public JWK, alg, created/retired times)
and, while the key signs, ``<kid>.pem`` (PKCS#8, mode 0600). Rotation makes a new key the
signer and deletes the old private key at once — it will never sign again — while its
public half stays in the JWKS until every token it signed has expired
(``retired_at + credential_ttl + leeway``).

The ``kid`` is the RFC 7638 thumbprint of the public key. Signing (JWS compact
serialization, RFC 7515 §7.1) happens here too, so private key material never leaves
this module and is never logged.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from service.contracts import KeyView
from service.kernel.clock import Clock
from service.kernel.errors import ClientError
from service.kernel.jwk import PrivateKey, PublicKey, load_public_jwk, public_jwk, thumbprint
from service.kernel.jws import b64url, b64url_decode, der_to_raw, verify_signature


class KeyMeta(msgspec.Struct, kw_only=True):
    kid: str
    alg: str
    created_at: float
    public_jwk: dict[str, str]
    retired_at: float | None = None


@dataclass(eq=False)
class SigningKey:
    meta: KeyMeta
    public_key: PublicKey
    private_key: PrivateKey | None = field(repr=False, default=None)

    @property
    def kid(self) -> str:
        return self.meta.kid

    @property
    def alg(self) -> str:
        return self.meta.alg


def generate_private_key(alg: str) -> PrivateKey:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ClientError(f"unsupported signing algorithm {alg!r}; use EdDSA or ES256")


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class KeyStore:
    def __init__(
        self,
        directory: Path,
        *,
        alg: str,
        clock: Clock,
        credential_ttl: int,
        leeway: int,
    ) -> None:
        self.directory = directory
        self.alg = alg
        self.clock = clock
        self.publish_window = credential_ttl + leeway
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None
        self._mtime_ns = -1
        self._checked_at = 0.0
        self.on_change: list[Callable[[], None]] = []

    # -- loading ------------------------------------------------------------------------

    def load_or_create(self) -> SigningKey:
        """Load every key; create the first one if the directory holds none."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        self._load()
        if self._active is None:
            self._create()
            self._load()
        assert self._active is not None
        return self._active

    def refresh_if_changed(self, *, max_age: float = 0.0) -> bool:
        """Reload when another process (``killswitch keys rotate --offline``) changed the dir.

        ``max_age`` lets hot paths skip the ``stat`` if one happened that recently.
        """
        now = time.monotonic()
        if max_age and now - self._checked_at < max_age:
            return False
        self._checked_at = now
        try:
            mtime = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self._mtime_ns:
            return False
        self._load()
        return True

    def _load(self) -> None:
        self._mtime_ns = self.directory.stat().st_mtime_ns
        keys: dict[str, SigningKey] = {}
        for meta_path in sorted(self.directory.glob("*.json")):
            meta = msgspec.json.decode(meta_path.read_bytes(), type=KeyMeta)
            _, public = load_public_jwk(meta.public_jwk)
            private: PrivateKey | None = None
            pem = self.directory / f"{meta.kid}.pem"
            if meta.retired_at is None and pem.exists():
                if pem.stat().st_mode & 0o077:
                    raise PermissionError(
                        f"signing key {pem} is readable by group/others; chmod 600 it"
                    )
                loaded = serialization.load_pem_private_key(pem.read_bytes(), password=None)
                if not isinstance(loaded, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
                    raise ValueError(f"{pem} is not an Ed25519 or P-256 key")
                private = loaded
            keys[meta.kid] = SigningKey(meta=meta, public_key=public, private_key=private)
        signers = [k for k in keys.values() if k.private_key is not None]
        for signer in signers:
            self.probe(signer)
        self._keys = keys
        self._active = max(signers, key=lambda k: k.meta.created_at) if signers else None
        for callback in self.on_change:
            callback()

    def _create(self, alg: str | None = None) -> SigningKey:
        private = generate_private_key(alg or self.alg)
        public = private.public_key()
        jwk = public_jwk(public)
        kid = thumbprint(jwk)
        meta = KeyMeta(kid=kid, alg=alg or self.alg, created_at=self.clock.now(), public_jwk=jwk)
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(self.directory / f"{kid}.pem", pem)
        _write_public(self.directory / f"{kid}.json", msgspec.json.encode(meta))
        return SigningKey(meta=meta, public_key=public, private_key=private)

    @staticmethod
    def probe(key: SigningKey) -> None:
        """Sign and verify a probe before a key may sign credentials.

        The issuer checks its own output once per key instead of once per token: a
        signature check costs 3x the signing, and a key (and the code path around it)
        that produced a valid signature keeps doing so.
        """
        verify_own_signature(sign({"probe": key.kid}, key), key)

    # -- use ----------------------------------------------------------------------------

    @property
    def active(self) -> SigningKey:
        if self._active is None:
            raise RuntimeError("no signing key loaded; call load_or_create() first")
        return self._active

    def rotate(self, alg: str | None = None) -> SigningKey:
        """Make a fresh key the signer; retire (and delete the private half of) the old one."""
        old = self._active
        new = self._create(alg)
        if old is not None:
            old.meta.retired_at = self.clock.now()
            _write_public(self.directory / f"{old.kid}.json", msgspec.json.encode(old.meta))
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{old.kid}.pem").unlink()
        self._load()
        return new

    def _published(self, key: SigningKey, now: float) -> bool:
        retired = key.meta.retired_at
        return retired is None or now < retired + self.publish_window

    def verification_key(self, kid: str) -> SigningKey | None:
        key = self._keys.get(kid)
        if key is None or not self._published(key, self.clock.now()):
            return None
        return key

    def jwks(self) -> dict[str, Any]:
        now = self.clock.now()
        keys = [
            {**k.meta.public_jwk, "kid": k.kid, "alg": k.alg, "use": "sig"}
            for k in sorted(self._keys.values(), key=lambda k: -k.meta.created_at)
            if self._published(k, now)
        ]
        return {"keys": keys}

    def describe(self) -> list[KeyView]:
        now = self.clock.now()
        return [
            KeyView(
                kid=k.kid,
                alg=k.alg,
                created_at=k.meta.created_at,
                active=k is self._active,
                retired_at=k.meta.retired_at,
                published_until=(
                    None if k.meta.retired_at is None else k.meta.retired_at + self.publish_window
                ),
            )
            for k in sorted(self._keys.values(), key=lambda k: -k.meta.created_at)
            if self._published(k, now)
        ]


# --------------------------------------------------------------------------- signing

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
        signature = der_to_raw(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return signing_input.decode() + "." + b64url(signature)


def verify_own_signature(token: str, key: SigningKey) -> None:
    """The issuer checks what it just signed, so a broken key never reaches a client."""
    signing_input, _, signature_b64 = token.rpartition(".")
    if not verify_signature(
        key.alg, key.public_key, signing_input.encode(), b64url_decode(signature_b64)
    ):
        raise RuntimeError(f"signing key {key.kid} produced an invalid signature")
