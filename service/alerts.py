"""Alerts: from the detector's alerts topic into the database, and out to analysts.

The detector publishes :class:`~service.kernel.events.AlertEvent` records on the alerts topic
(key = agent id, deterministic ``alert_id``). :class:`AlertIngester` consumes them in its
own consumer group and, per batch:

1. decodes each record with the one typed decoder; a record that is not a valid
   AlertEvent is logged, counted (``killswitch_alert_records_total{outcome="rejected"}``)
   and skipped — nothing on the topic can stop ingestion;
2. stores the alerts in one database transaction, ``alert_id`` UNIQUE, so a redelivered
   record is a no-op (retrying the same batch until the database takes it);
3. after the commit, counts each newly stored alert, measures kill latency where the
   evidence allows it, and hands it to the :class:`AlertHub` (SSE listeners);
4. only then commits the Kafka offsets. A crash before that redelivers the batch, which
   step 2 makes harmless (at-least-once in, exactly-once stored).

Acknowledging an alert and the per-minute timeline are service functions here too; the
HTTP edge (``service.api.alerts``) only parses, authorises and delegates. This module
never raises an alert itself and never revokes: deciding is the detector's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec

from service import kafka
from service.config import Settings
from service.contracts import AlertView, TimelinePoint
from service.kernel.clock import Clock
from service.kernel.errors import NotFound
from service.kernel.events import AlertEvent, decoder
from service.metrics import Metrics
from service.propagation import Hub
from service.storage import repository as repo
from service.storage.database import Database


class AlertDeps(Protocol):
    """What reading and acknowledging alerts needs from the running service."""

    @property
    def db(self) -> Database: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def alert_hub(self) -> AlertHub: ...


log = logging.getLogger("killswitch.alerts")

CLIENT_ID = "killswitch-service-alerts"
MAX_BATCH = 500
POLL_MS = 200
_BACKOFF_CAP = 5.0
STOP_TIMEOUT = 5.0
"""A batch normally finishes in milliseconds; past this the task is cancelled, and an
uncommitted batch is simply read again on the next start."""


@dataclass(frozen=True, slots=True)
class AlertMessage:
    """What the hub carries: a newly stored alert, or an alert just acknowledged."""

    kind: Literal["alert", "ack"]
    alert: AlertView


class AlertHub(Hub[AlertMessage]):
    """Stored and acknowledged alerts, for ``GET /v1/alerts/stream``."""


class _Stopping(Exception):
    """Stop was requested while a batch was not yet durable: leave it uncommitted."""


class AlertIngester:
    """The alerts-topic consumer (started by ``service.core.start`` with Kafka configured)."""

    def __init__(
        self, db: Database, settings: Settings, hub: AlertHub, metrics: Metrics, clock: Clock
    ) -> None:
        self.db = db
        self.settings = settings
        self.hub = hub
        self.metrics = metrics
        self.clock = clock
        self.stored = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Never blocks start-up on the broker: the task connects (and reconnects) itself.
        self._task = asyncio.create_task(self._run(), name="alert-ingester")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, timeout=STOP_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            log.warning("alert ingester did not stop in time; cancelled")

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await self._consume()
                return
            except _Stopping:
                return
            except (Exception, asyncio.CancelledError) as exc:
                # Broker or database trouble (a cancellation aiokafka leaked from a dropped
                # connection included): back off, reconnect. Our own cancellation stops.
                if isinstance(exc, asyncio.CancelledError) and not kafka.cancellation_leaked():
                    raise
                failures += 1
                log.warning("alert ingester: %s: %s (retry %d)", type(exc).__name__, exc, failures)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._stop.wait(), timeout=min(0.1 * 2**failures, _BACKOFF_CAP)
                    )

    async def _consume(self) -> None:
        await kafka.ensure_topics(self.settings)
        consumer = kafka.consumer(
            self.settings,
            self.settings.kafka_alerts_topic,
            client_id=CLIENT_ID,
            group_id=self.settings.alerts_group_id,
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_BATCH)
                if not batches:
                    continue
                records = [record for part in batches.values() for record in part]
                await self._store_until_durable(records)
                offsets = {tp: part[-1].offset + 1 for tp, part in batches.items() if part}
                try:
                    await consumer.commit(offsets)
                except Exception as exc:  # a rebalance: the batch comes again, harmlessly
                    log.warning("alert ingester: offset commit failed: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def _decode(self, record: Any) -> AlertEvent | None:
        where = f"{record.topic}/{record.partition}@{record.offset}"
        try:
            event = decoder.decode(record.value if record.value is not None else b"")
        except msgspec.DecodeError as exc:
            reason = str(exc)
        else:
            if isinstance(event, AlertEvent):
                return event
            reason = f"a {type(event).__name__}, not an AlertEvent"
        self.metrics.alert_records.labels(outcome="rejected").inc()
        log.warning("alert ingester: skipped %s: %s", where, reason[:300])
        return None

    async def _store_until_durable(self, records: list[Any]) -> None:
        alerts = [a for a in (self._decode(r) for r in records) if a is not None]
        if not alerts:
            return
        failures = 0
        while True:
            try:
                stored = await store(self.db, alerts, received_at=self.clock.now())
                break
            except Exception as exc:  # the database is down: retry the same batch
                failures += 1
                if self._stop.is_set():
                    raise _Stopping from exc
                log.warning("alert ingester: storing failed: %s (retry %d)", exc, failures)
                await asyncio.sleep(min(0.1 * 2**failures, _BACKOFF_CAP))
        self.metrics.alert_records.labels(outcome="duplicate").inc(len(alerts) - len(stored))
        self.metrics.alert_records.labels(outcome="stored").inc(len(stored))
        self.stored += len(stored)
        for view in stored:
            self.metrics.alerts.labels(severity=view.severity.value, rule=view.rule).inc()
            await self._observe_kill_latency(view)
            self.hub.publish(AlertMessage("alert", view))

    async def _observe_kill_latency(self, view: AlertView) -> None:
        """Observed only when it can be measured honestly: the detector revoked (created
        the revocation, not found an existing one) and the evidence carries the offending
        use's time, ``event_at``. Both ends are wall clocks (guard's and service's)."""
        evidence = view.evidence
        event_at, revocation_id = evidence.get("event_at"), evidence.get("revocation_id")
        if (
            view.action != "revoke"
            or evidence.get("revocation") != "revoked"
            or not isinstance(revocation_id, str)
            or isinstance(event_at, bool)
            or not isinstance(event_at, int | float)
        ):
            return
        committed = await repo.revocation_created_at(self.db, revocation_id)
        if committed is not None and committed >= event_at:
            self.metrics.kill_latency.observe(committed - event_at)


async def store(db: Database, alerts: list[AlertEvent], *, received_at: float) -> list[AlertView]:
    """Store ``alerts`` in one transaction; returns those not stored before, in order."""
    async with db.transaction() as tx:
        stored = [await repo.insert_alert(tx, alert, received_at=received_at) for alert in alerts]
    return [view for view in stored if view is not None]


async def get(services: AlertDeps, alert_id: str) -> AlertView:
    view = await repo.get_alert(services.db, alert_id)
    if view is None:
        raise NotFound(f"no alert {alert_id}")
    return view


async def acknowledge(
    services: AlertDeps, alert_id: str, *, actor: str, note: str | None
) -> tuple[AlertView, bool]:
    """Acknowledge once: the first ack wins and is audited; acknowledging an acknowledged
    alert changes nothing and returns it as it is (True only for the first)."""
    now = services.clock.now()
    async with services.db.transaction() as tx:
        changed = await repo.ack_alert(tx, alert_id, at=now, by=actor, note=note)
        if changed:
            await repo.append_audit(
                tx,
                at=now,
                actor=actor,
                action="alert.ack",
                subject=f"alert:{alert_id}",
                detail={"note": note},
            )
        view = await repo.get_alert(tx, alert_id)
    if view is None:
        raise NotFound(f"no alert {alert_id}")
    if changed:
        services.alert_hub.publish(AlertMessage("ack", view))
    return view, bool(changed)


async def timeline(services: AlertDeps, minutes: int) -> list[TimelinePoint]:
    """The last ``minutes`` whole minutes up to and including the current one, oldest
    first, zeros included, so a chart can plot the list as it is."""
    current = math.floor(services.clock.now() / 60) * 60.0
    start = current - (minutes - 1) * 60
    alerts, kills = await repo.per_minute(services.db, start=start, end=current + 60)
    return [
        TimelinePoint(minute=start + 60 * i, alerts=alerts.get(i, 0), revocations=kills.get(i, 0))
        for i in range(minutes)
    ]
