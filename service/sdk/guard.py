"""The guard: decides, at a resource server, whether a killswitch credential may do this.

``Guard.check_sync(token, action, resource)`` runs, in order — every rule from the
enforcement kernel (``service.kernel``), so the guard, the service and the detector
decide alike:

1. **Verify** (first sight of a token only): ``service.kernel.tokens`` — compact JWS,
   header ``typ`` ``at+jwt``, ``alg`` EdDSA or ES256 and equal to the algorithm of the
   ``kid``'s key in the issuer's JWKS (refetched, rate limited, when a ``kid`` is
   unknown: key rotation), signature, ``iss``, ``aud`` containing this guard's audience,
   ``exp``/``nbf``/``iat`` with leeway, the task and scope claims well formed. A verified
   token is cached by its exact string until it expires, with its scope precompiled.
2. **Expiry** against the injected clock (cached tokens too).
3. **Fail closed**: deny with ``revocation feed not ready`` / ``revocation feed stale``
   when the feed has not finished its replay (or is replaying after a reset of its log)
   or has had no proof of life for ``max_staleness`` seconds.
4. **Revocation**: the kernel's ``DenyState`` (revoked jti, closed task, global and
   per-agent cut-offs).
5. **Scope**: ``CompiledScope.check(action, resource)``, which canonicalises the
   resource first (``service.kernel.resources``: a dot-segment or an encoded slash is
   refused as out of scope).

The cached path is synchronous and allocation-light (dictionary hits, a remembered or
one regex scope decision, one ``UsageEvent``). Every check emits exactly one
``UsageEvent`` (allowed or denied, with the reason) through
:class:`~service.sdk.usage.UsageEmitter`, which never blocks.

The guard never raises for a bad token: it returns a :class:`Verdict`. It imports
nothing from litestar or the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Final

import httpx
import msgspec

from service.kernel import tokens
from service.kernel.deny import DenyState, jti_key
from service.kernel.dpop import DPoPProof, ReplayCache, verify_proof
from service.kernel.errors import DPoPProofRejected, KillSwitchError, TokenRejected
from service.kernel.events import Decision, Source, UsageEvent
from service.kernel.jwk import PublicKey, load_public_jwk
from service.kernel.jws import ALGORITHMS
from service.kernel.scopes import CompiledScope, compile_scope
from service.kernel.tokens import MAX_TOKEN_LENGTH, TOKEN_TYPES, UNKNOWN_KID, jti_hash
from service.sdk.revocations import KafkaRevocationFeed, RevocationFeed
from service.sdk.usage import UsageEmitter

__all__ = [
    "ALGORITHMS",
    "MAX_TOKEN_LENGTH",
    "TOKEN_TYPES",
    "UNKNOWN_KID",
    "Guard",
    "Outcome",
    "Verdict",
]

log = logging.getLogger("killswitch.sdk.guard")

_TEXT_MAX: Final = 2048  # service.kernel.events.Text: longer fields would dead-letter the event
_UNKNOWN: Final = "-"
_NO_SOURCE: Final = Source()


class Outcome(StrEnum):
    """Why a verdict is what it is, coarse enough to pick an HTTP status."""

    ALLOWED = "allowed"
    INVALID = "invalid_token"
    """Missing, malformed, forged, expired, or not for this audience (HTTP 401)."""
    INVALID_DPOP = "invalid_dpop_proof"
    """A DPoP-bound credential without a valid proof of possession (RFC 9449; HTTP 401)."""
    FORBIDDEN = "insufficient_scope"
    """Valid, but the action/resource is outside the declared scope (HTTP 403)."""
    REVOKED = "revoked"
    """Valid signature, but revoked: credential, task, agent or cut-off (HTTP 403)."""
    UNAVAILABLE = "unavailable"
    """The guard cannot vouch for revocation state: fail closed (HTTP 503)."""


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to one check. ``claims`` is set whenever the signature verified."""

    allowed: bool
    reason: str
    claims: dict[str, Any] | None = None
    outcome: Outcome = Outcome.INVALID
    agent_id: str = _UNKNOWN
    task_id: str = _UNKNOWN
    jti_hash: str = _UNKNOWN


class _Entry:
    """A verified token, as the cached path needs it."""

    __slots__ = (
        "agent_id",
        "allow",
        "claims",
        "expires",
        "iat",
        "jkt",
        "jti_hash",
        "key",
        "scope",
        "task_id",
    )

    def __init__(
        self,
        claims: dict[str, Any],
        scope: CompiledScope,
        expires: float,
        jti_hash: str,
        task_id: str,
        agent_id: str,
        iat: float,
    ) -> None:
        self.claims = claims
        self.scope = scope
        self.expires = expires
        self.jti_hash = jti_hash
        self.key = jti_key(jti_hash)
        self.task_id = task_id
        self.agent_id = agent_id
        self.iat = iat
        cnf = claims.get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        self.jkt: str | None = jkt if isinstance(jkt, str) else None
        """RFC 9449 §6.1: requests must carry a proof signed by this key."""
        self.allow = self.verdict(True, "allowed", Outcome.ALLOWED)

    def verdict(self, allowed: bool, reason: str, outcome: Outcome) -> Verdict:
        return Verdict(
            allowed=allowed,
            reason=reason,
            claims=self.claims,
            outcome=outcome,
            agent_id=self.agent_id,
            task_id=self.task_id,
            jti_hash=self.jti_hash,
        )


def default_guard_id() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class Guard:
    """Local verification + live revocation state + scope enforcement + usage reporting.

    ``feed`` (and ``usage``, if given) are started and stopped with the guard. ``clock``
    is wall-clock time for ``exp``/``nbf``/``iat``; feed staleness is measured with
    ``time.monotonic``.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        feed: RevocationFeed,
        *,
        jwks_url: str | None = None,
        max_staleness: float = 5.0,
        usage: UsageEmitter | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 100_000,
        leeway: float = 5.0,
        jwks_min_interval: float = 5.0,
        guard_id: str | None = None,
        http: httpx.AsyncClient | None = None,
        dpop_max_age: float = 60.0,
        dpop_replay_cache: int = 1_000_000,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.feed = feed
        self.jwks_url = jwks_url or f"{self.issuer}/.well-known/jwks.json"
        self.max_staleness = max_staleness
        if isinstance(feed, KafkaRevocationFeed):
            # Several proofs of life per staleness bound, or a healthy feed would flap.
            feed.verify_interval = min(feed.verify_interval, max_staleness / 4)
        self.usage = usage
        self.cache_size = cache_size
        self.leeway = leeway
        self.jwks_min_interval = jwks_min_interval
        self.guard_id = guard_id or default_guard_id()
        self.dpop_max_age = dpop_max_age
        self._proofs = ReplayCache(dpop_max_age, dpop_replay_cache)
        self.jwks_fetches = 0
        self._clock = clock
        self._state: DenyState = feed.state
        self._http = http
        self._own_http = http is None
        self._keys: dict[str, tuple[str, PublicKey]] = {}
        self._headers: dict[str, tokens.TokenHeader] = {}
        self._cache: dict[str, _Entry] = {}
        self._rejected: dict[str, tuple[Verdict, float]] = {}
        self._last_fetch = float("-inf")
        self._refetch: asyncio.Task[bool] | None = None
        self._event_ids = itertools.count()
        self._event_prefix = secrets.token_hex(6) + "-"
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Fetch the JWKS and start the feed (and usage emitter); returns before ready."""
        if self._started:
            return
        self._started = True
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10.0)
        if self.usage is not None:
            await self.usage.start()
        await self.feed.start()
        await self.refresh_keys(force=True)

    async def stop(self) -> None:
        """Stop the feed, flush and stop the usage emitter (idempotent)."""
        if not self._started:
            return
        self._started = False
        if self._refetch is not None:
            self._refetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refetch
        await self.feed.stop()
        if self.usage is not None:
            await self.usage.stop()
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> Guard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def ready(self) -> bool:
        """Signing keys known and the revocation feed caught up and fresh."""
        return bool(self._keys) and not self.feed.stale(time.monotonic(), self.max_staleness)

    async def wait_ready(self) -> None:
        """Wait until :attr:`ready` (bound it with ``asyncio.timeout``)."""
        await self.feed.ready.wait()
        while not self.ready:
            if not self._keys:
                await self.refresh_keys()
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ keys

    async def refresh_keys(self, *, force: bool = False) -> bool:
        """Refetch the JWKS unless one was fetched within ``jwks_min_interval``.

        Returns whether a fetch happened and succeeded. Keys are only ever added: a
        rotated-out key stays usable for the tokens it signed until they expire.
        """
        now = time.monotonic()
        if not force and now - self._last_fetch < self.jwks_min_interval:
            return False
        self._last_fetch = now
        http = self._http
        if http is None:
            return False
        self.jwks_fetches += 1
        try:
            response = await http.get(self.jwks_url)
            response.raise_for_status()
            document = msgspec.json.decode(response.content)
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            log.warning("JWKS fetch from %s failed: %s", self.jwks_url, exc)
            return False
        if self.add_keys(document) == 0:
            log.warning("JWKS at %s holds no usable key", self.jwks_url)
            return False
        return True

    def add_keys(self, jwks: object) -> int:
        """Learn the keys of a JWKS document (RFC 7517 §5); returns how many were usable.

        ``refresh_keys`` calls this with what it fetched; call it yourself to pin keys
        (an air-gapped resource server, a benchmark).
        """
        keys = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(keys, list):
            return 0
        usable = 0
        for jwk in keys:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            if not isinstance(kid, str):
                continue
            try:
                self._keys[kid] = load_public_jwk(jwk)
            except KillSwitchError as exc:
                log.warning("JWKS key %s skipped: %s", kid, exc.detail)
                continue
            usable += 1
        return usable

    def _schedule_refetch(self) -> None:
        if self._refetch is not None and not self._refetch.done():
            return
        if time.monotonic() - self._last_fetch < self.jwks_min_interval:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside the event loop: the async check() refetches
        self._refetch = loop.create_task(self.refresh_keys())

    # ------------------------------------------------------------------ checks

    async def check(
        self,
        token: str,
        action: str,
        resource: str,
        *,
        bytes_out: int = 0,
        source: Source | None = None,
        emit: bool = True,
        dpop: str | None = None,
        htm: str | None = None,
        htu: str | None = None,
    ) -> Verdict:
        """:meth:`check_sync`, but an unknown ``kid`` first refetches the JWKS (rotation)."""
        verdict = self.check_sync(token, action, resource, emit=False, dpop=dpop, htm=htm, htu=htu)
        if verdict.reason == UNKNOWN_KID:
            refetch = self._refetch
            if refetch is not None and not refetch.done():
                # shield: a cancelled request must not cancel the fetch others wait on
                await asyncio.shield(refetch)
                verdict = self.check_sync(
                    token, action, resource, emit=False, dpop=dpop, htm=htm, htu=htu
                )
        if emit:
            self.record(verdict, action, resource, bytes_out=bytes_out, source=source)
        return verdict

    def check_sync(
        self,
        token: str,
        action: str,
        resource: str,
        *,
        bytes_out: int = 0,
        source: Source | None = None,
        emit: bool = True,
        dpop: str | None = None,
        htm: str | None = None,
        htu: str | None = None,
    ) -> Verdict:
        """Decide, without awaiting anything. ``emit=False`` leaves reporting to :meth:`record`.

        ``dpop`` is the request's ``DPoP`` header (RFC 9449), required for a credential
        bound to a key (``cnf.jkt``); ``htm``/``htu`` are the HTTP method and URL it must
        name (default: ``action`` and ``resource``).
        """
        entry = self._cache.get(token)
        now = self._clock()
        if entry is None:
            admitted = self._admit(token, now)
            if isinstance(admitted, Verdict):
                if emit:
                    self.record(admitted, action, resource, bytes_out=bytes_out, source=source)
                return admitted
            entry = admitted
        if now >= entry.expires:
            self._cache.pop(token, None)
            verdict = entry.verdict(False, "token expired", Outcome.INVALID)
        elif entry.jkt is not None and isinstance(
            proven := self._possession(entry, token, dpop, htm or action, htu or resource, now),
            str,
        ):
            verdict = entry.verdict(False, proven, Outcome.INVALID_DPOP)
        else:
            feed = self.feed
            state = self._state
            if not feed.ready.is_set():
                verdict = entry.verdict(False, "revocation feed not ready", Outcome.UNAVAILABLE)
            elif time.monotonic() - feed.last_heard > self.max_staleness:
                verdict = entry.verdict(False, "revocation feed stale", Outcome.UNAVAILABLE)
            elif (
                dead := state.reason_denied_key(entry.key, entry.task_id, entry.agent_id, entry.iat)
            ) is not None:
                verdict = entry.verdict(False, dead, Outcome.REVOKED)
            elif (why := entry.scope.check(action, resource)) is None:
                verdict = entry.allow
            else:
                verdict = entry.verdict(False, why, Outcome.FORBIDDEN)
        if emit:
            self.record(verdict, action, resource, bytes_out=bytes_out, source=source)
        return verdict

    def _possession(
        self, entry: _Entry, token: str, proof: str | None, htm: str, htu: str, now: float
    ) -> DPoPProof | str:
        """RFC 9449 §4.3 and §7.1 for a bound credential: the proof, or why it fails."""
        if proof is None:
            return "DPoP proof required: the credential is bound to a key (cnf.jkt)"
        try:
            checked = verify_proof(
                proof,
                method=htm,
                url=htu,
                now=now,
                access_token=token,
                jkt=entry.jkt,
                max_age=self.dpop_max_age,
                leeway=self.leeway,
            )
        except DPoPProofRejected as exc:
            return exc.detail
        refused = self._proofs.admit(checked, now, self.leeway)
        return checked if refused is None else refused

    def record(
        self,
        verdict: Verdict,
        action: str,
        resource: str,
        *,
        bytes_out: int = 0,
        source: Source | None = None,
    ) -> None:
        """Emit the one ``UsageEvent`` of a check (never blocks; no-op without an emitter)."""
        usage = self.usage
        if usage is None:
            return
        if len(resource) > _TEXT_MAX:
            resource = resource[:_TEXT_MAX]
        if len(action) > _TEXT_MAX:
            action = action[:_TEXT_MAX]
        allowed = verdict.allowed
        if allowed and verdict.claims is not None and "cnf" in verdict.claims:
            # A bound credential passed with a valid proof: the proof's key (= cnf.jkt) is
            # the workload signal the detector weighs against theft (Source.jkt).
            cnf = verdict.claims["cnf"]
            jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
            if isinstance(jkt, str):
                source = msgspec.structs.replace(source or _NO_SOURCE, jkt=jkt)
        usage.emit(
            UsageEvent(
                event_id=self._event_prefix + str(next(self._event_ids)),
                at=self._clock(),
                agent_id=verdict.agent_id,
                task_id=verdict.task_id,
                jti_hash=verdict.jti_hash,
                action=action,
                resource=resource,
                audience=self.audience,
                decision=Decision.ALLOW if allowed else Decision.DENY,
                reason=None if allowed else verdict.reason,
                bytes_out=bytes_out,
                source=source or _NO_SOURCE,
                guard=self.guard_id,
            )
        )

    # ------------------------------------------------------------------ cold path

    def _admit(self, token: str, now: float) -> _Entry | Verdict:
        rejected = self._rejected.get(token)
        if rejected is not None:
            verdict, until = rejected
            if now < until:
                return verdict
            del self._rejected[token]
        try:
            header, claims = tokens.verify_jws(token, self._key, header_cache=self._headers)
        except TokenRejected as exc:
            if exc.detail == UNKNOWN_KID:
                self._schedule_refetch()
            verdict = Verdict(
                allowed=False,
                reason=exc.detail,
                outcome=Outcome.INVALID,
                jti_hash=jti_hash(token),
            )
            if exc.permanent:
                self._remember_rejection(token, verdict, now)
            return verdict
        try:
            entry = self._entry(header.kid, claims, now)
        except TokenRejected as exc:
            verdict = _attributed(claims, exc.detail, token)
            if exc.permanent:
                self._remember_rejection(token, verdict, now)
            return verdict
        cache = self._cache
        if len(cache) >= self.cache_size:
            self._evict(now)
        cache[token] = entry
        return entry

    def _key(self, kid: str) -> tuple[str, PublicKey] | None:
        return self._keys.get(kid)

    def _entry(self, kid: str, claims: dict[str, Any], now: float) -> _Entry:
        """The kernel's claim rules (``service.kernel.tokens``), then the scope claim."""
        checked = tokens.check_claims(
            claims, kid=kid, issuer=self.issuer, audience=self.audience, now=now, leeway=self.leeway
        )
        scope = compile_scope(checked.scope_spec)
        return _Entry(
            claims,
            scope,
            expires=checked.exp + self.leeway,
            jti_hash=checked.jti_hash,
            task_id=checked.task_id,
            agent_id=checked.agent_id,
            iat=checked.iat,
        )

    def _remember_rejection(self, token: str, verdict: Verdict, now: float) -> None:
        # A forged or foreign token stays bad: don't pay a signature check per replay.
        rejected = self._rejected
        if len(rejected) >= 10_000:
            rejected.clear()
        rejected[token] = (verdict, now + 300.0)

    def _evict(self, now: float) -> None:
        cache = self._cache
        for token in [t for t, e in cache.items() if e.expires <= now]:
            del cache[token]
        excess = len(cache) - int(self.cache_size * 0.9)
        if excess > 0:  # oldest first: dicts keep insertion order
            for token in list(itertools.islice(cache, excess)):
                del cache[token]

    @property
    def cached_tokens(self) -> int:
        return len(self._cache)


def _attributed(claims: dict[str, Any], reason: str, token: str) -> Verdict:
    """A denial for a token whose signature verified: its claims say who it was."""
    task = claims.get("task")
    task_id = task.get("id") if isinstance(task, dict) else None
    agent_id = claims.get("client_id")
    jti = claims.get("jti")
    return Verdict(
        allowed=False,
        reason=reason,
        claims=claims,
        outcome=Outcome.INVALID,
        agent_id=agent_id if isinstance(agent_id, str) and agent_id else _UNKNOWN,
        task_id=task_id if isinstance(task_id, str) and task_id else _UNKNOWN,
        jti_hash=jti_hash(jti if isinstance(jti, str) else token),
    )
