"""The running control plane's parts, wired once at start and handed to every edge.

:func:`start` opens the database, applies migrations, loads (or creates) signing keys,
rebuilds the in-memory deny state and makes sure an admin exists. Nothing here speaks
HTTP: the litestar app and the CLI both sit on top of :class:`Services`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from service.alerts import AlertHub, AlertIngester
from service.config import Settings
from service.credentials.keys import KeyStore
from service.credentials.rfc9068 import TokenVerifier
from service.kernel.clock import Clock, SystemClock
from service.kernel.deny import DenyState
from service.kernel.dpop import ReplayCache
from service.kernel.ids import validate_trust_domain
from service.metrics import Metrics
from service.propagation import OutboxRelay, Propagator, RevocationHub, RevocationTail
from service.revocation import Revoker
from service.storage import repository as repo
from service.storage.database import Database, open_database
from service.storage.migrations import migrate
from service.usage import UsageDigest, UsageFollower

log = logging.getLogger("killswitch")


@dataclass
class Services:
    settings: Settings
    clock: Clock
    db: Database
    keys: KeyStore
    verifier: TokenVerifier
    deny: DenyState
    revoker: Revoker
    metrics: Metrics
    hub: RevocationHub
    propagator: Propagator
    relay: OutboxRelay | None
    alert_hub: AlertHub
    ingester: AlertIngester | None
    """Reads the alerts topic into the database; None without KS_KAFKA_BOOTSTRAP."""
    tail: RevocationTail
    """Brings revocations committed by other replicas into this one within ~0.1 s."""
    usage: UsageDigest = field(default_factory=UsageDigest)
    """What each task did, folded from the usage topic (empty without Kafka)."""
    usage_follower: UsageFollower | None = None
    dpop_proofs: ReplayCache = field(default_factory=lambda: ReplayCache(max_age=60.0))
    """DPoP proofs accepted on this replica (RFC 9449 §11.1 replay protection)."""
    bootstrap_admin_token: str | None = None
    """Set only on the start that generated the first admin's token; printed once, never
    logged. None when there already was an admin or KS_BOOTSTRAP_ADMIN_TOKEN was used."""

    async def close(self) -> None:
        await self.tail.stop()
        if self.ingester is not None:
            await self.ingester.stop()
        if self.usage_follower is not None:
            await self.usage_follower.stop()
        if self.relay is not None:
            await self.relay.stop()
        await self.db.close()


async def start(
    settings: Settings, clock: Clock | None = None, *, bootstrap: bool = True
) -> Services:
    """Open and prepare everything; ``bootstrap=False`` skips creating a first admin
    (offline CLI commands must not create one whose token nobody sees)."""
    from service.operators import ensure_admin, ensure_detector

    clock = clock or SystemClock()
    validate_trust_domain(settings.trust_domain)
    db = await open_database(settings.effective_database_url)
    try:
        applied = await migrate(db)
        if applied:
            log.info("applied migrations %s", applied)
        keys = KeyStore(
            settings.effective_key_dir,
            alg=settings.signing_alg,
            clock=clock,
            credential_ttl=settings.credential_ttl,
            leeway=settings.leeway,
        )
        keys.load_or_create()
        deny = await repo.load_deny_state(db, clock.now())
        hub = RevocationHub()
        relay = OutboxRelay(db, settings, clock) if settings.kafka_bootstrap else None
        propagator = Propagator(deny, hub, relay)
        metrics = Metrics()
        alert_hub = AlertHub()
        ingester = (
            AlertIngester(db, settings, alert_hub, metrics, clock)
            if settings.kafka_bootstrap
            else None
        )
        services = Services(
            settings=settings,
            clock=clock,
            db=db,
            keys=keys,
            verifier=TokenVerifier(
                keys, issuer=settings.effective_issuer, clock=clock, leeway=settings.leeway
            ),
            deny=deny,
            revoker=Revoker(db, propagator, clock, settings.leeway),
            metrics=metrics,
            hub=hub,
            propagator=propagator,
            relay=relay,
            alert_hub=alert_hub,
            ingester=ingester,
            tail=RevocationTail(db, propagator, clock),
        )
        if bootstrap:
            services.bootstrap_admin_token = await ensure_admin(services)
            await ensure_detector(services)
        await services.tail.poll_once()  # recent revocations are "seen" before serving
        await services.tail.start()
        if relay is not None:
            await relay.start()
        if ingester is not None:
            await ingester.start()
        if settings.kafka_bootstrap:
            services.usage_follower = UsageFollower(settings, services.usage)
            await services.usage_follower.start()
    except BaseException:
        await db.close()
        raise
    return services
