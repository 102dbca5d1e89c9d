"""Propagation: a committed revocation reaches every enforcement point.

Write path (inside the revocation's own database transaction, see service.revocation):
the :class:`~service.kernel.events.RevocationEvent` — and a ``closed`` TaskEvent per task it
ended — are queued in the ``outbox`` table. Nothing is published before the commit, and
nothing committed is lost: after a crash the relay finds the rows on start.

After the commit, :meth:`Propagator.committed`
1. applies the event to the service's own deny state (introspection answers at once),
2. hands it to the :class:`RevocationHub`, which pushes it to every SSE subscriber,
3. wakes the :class:`OutboxRelay`, which publishes the queued rows to Kafka at once
   (no polling interval: a one-second timer is only a safety net) and deletes them when
   the broker has acknowledged them and lists their topic. A crash between publish and
   delete re-publishes: harmless, because consumers apply revocations idempotently.

The relay also keeps the revocation topic whole (``service.revocation_log``): a topic
that is new, empty or reset is rebuilt from the database before guards can become
ready on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Generic, TypeVar

from service import kafka
from service.config import Settings
from service.kernel.clock import Clock
from service.kernel.deny import DenyState
from service.kernel.events import RevocationEvent, TaskEvent, encoder, revocation_key
from service.revocation_log import LogReset, RevocationLog
from service.storage import repository as repo
from service.storage.database import Database

log = logging.getLogger("killswitch.propagation")

T = TypeVar("T")

REVOCATIONS = "revocations"
TASKS = "tasks"


async def enqueue_revocation(db: Database, event: RevocationEvent) -> None:
    await repo.insert_outbox(
        db, topic=REVOCATIONS, key=revocation_key(event), value=encoder.encode(event), at=event.at
    )


async def enqueue_task_event(db: Database, event: TaskEvent) -> None:
    await repo.insert_outbox(
        db, topic=TASKS, key=event.task_id, value=encoder.encode(event), at=event.at
    )


class Subscription(Generic[T]):
    """One SSE listener's queue. A listener that falls too far behind is cut off (it
    reconnects with Last-Event-ID and replays from the database) rather than letting an
    unbounded queue grow."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self.overflowed = False


class Hub(Generic[T]):
    """Fan-out of committed items to every live SSE listener of this process."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self._subscribers: set[Subscription[T]] = set()
        self._maxsize = maxsize

    def subscribe(self) -> Subscription[T]:
        sub: Subscription[T] = Subscription(self._maxsize)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription[T]) -> None:
        self._subscribers.discard(sub)

    def publish(self, item: T) -> None:
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(item)
            except asyncio.QueueFull:
                sub.overflowed = True
                self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


class RevocationHub(Hub[RevocationEvent]):
    """Committed revocations, for ``GET /v1/revocations/stream``."""


class OutboxRelay:
    """Publishes outbox rows to Kafka as soon as a commit wakes it.

    Before the first row, and every ``verify_interval`` seconds after, it has the
    :class:`~service.revocation_log.RevocationLog` verify the revocation topic (and
    rebuild it from the database when it is new, empty or reset). A row is deleted only
    once the broker acknowledged it *and* fresh metadata lists its topic; an
    acknowledgement whose offset went backwards means the broker's log was reset under
    us: the topic is rebuilt and the rows are sent again.
    """

    BATCH = 500

    def __init__(
        self, db: Database, settings: Settings, clock: Clock, *, verify_interval: float = 1.0
    ) -> None:
        self.db = db
        self.settings = settings
        self.topics = {
            REVOCATIONS: settings.kafka_revocations_topic,
            TASKS: settings.kafka_tasks_topic,
        }
        self.log = RevocationLog(db, settings, clock)
        self.verify_interval = verify_interval
        self.published = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._producer: Any = None
        self._verified_at = float("-inf")

    def notify(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._wake.set()  # rows left by a crash are published at once
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=10)
        await self._drop_producer()
        await self.log.close()

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.verify_interval)
            self._wake.clear()
            try:
                if self._producer is None:
                    await kafka.ensure_topics(self.settings)
                    producer = kafka.producer(self.settings, "killswitch-outbox")
                    await producer.start()
                    self._producer = producer
                    self._verified_at = float("-inf")
                loop_time = asyncio.get_running_loop().time()
                if loop_time - self._verified_at >= self.verify_interval:
                    await self.log.ensure_whole(self._producer)
                    self._verified_at = loop_time
                while await self._drain_once():
                    pass
                failures = 0
            except LogReset as exc:
                log.warning("outbox relay: revocation log reset (%s); rebuilding", exc)
                self._verified_at = float("-inf")
                self._wake.set()
            except (Exception, asyncio.CancelledError) as exc:
                # Broker down: keep the rows, retry with backoff. A cancellation aiokafka
                # leaked from a dropped connection is that too; our own stop() is not.
                if isinstance(exc, asyncio.CancelledError) and not kafka.cancellation_leaked():
                    raise
                failures += 1
                log.warning("outbox relay: %s (retry %d)", exc, failures)
                await self._drop_producer()
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                self._wake.set()

    async def _drain_once(self) -> bool:
        rows = await repo.pending_outbox(self.db, self.BATCH)
        if not rows:
            return False
        producer = self._producer
        sends = [
            await producer.send(
                self.topics[row["topic"]], value=row["value"].encode(), key=row["key"].encode()
            )
            for row in rows
        ]
        revocations = self.topics[REVOCATIONS]
        for metadata in await asyncio.gather(*sends):
            if metadata.topic == revocations:
                self.log.acknowledged(metadata.partition, metadata.offset)
        # An acknowledgement is not enough: a broker that restarted empty acknowledges
        # writes to topics it does not list. Delete only what a listed topic holds.
        for name in {self.topics[row["topic"]] for row in rows}:
            if not await kafka.listed_partitions(producer, name):
                raise LogReset(f"topic {name} is not listed by the broker")
        await repo.delete_outbox(self.db, [row["seq"] for row in rows])
        self.published += len(rows)
        return len(rows) == self.BATCH


class Propagator:
    def __init__(self, deny: DenyState, hub: RevocationHub, relay: OutboxRelay | None) -> None:
        self.deny = deny
        self.hub = hub
        self.relay = relay
        self._seen: dict[int, float] = {}

    @property
    def outbox_enabled(self) -> bool:
        return self.relay is not None

    def committed(self, revocations: list[RevocationEvent], *, tasks_changed: bool) -> None:
        for event in revocations:
            self.observed(event)
        if self.relay is not None and (revocations or tasks_changed):
            self.relay.notify()

    def observed(self, event: RevocationEvent) -> bool:
        """Apply and announce a committed revocation once, whichever path brought it
        (this replica's commit, or the :class:`RevocationTail`). True if it was new."""
        if event.seq in self._seen:
            return False
        self._seen[event.seq] = event.at
        self.deny.apply(event)
        self.hub.publish(event)
        return True

    def forget_before(self, at: float) -> None:
        self._seen = {seq: when for seq, when in self._seen.items() if when >= at}


class RevocationTail:
    """Revocations committed by *other* replicas (or processes) reach this replica's deny
    state and SSE listeners within ``interval`` seconds.

    It polls the revocations of the last ``window`` seconds (indexed by ``created_at``)
    rather than "seq > last": on PostgreSQL a lower seq can commit after a higher one, and
    a seq-cursor would skip it. Everything is applied through :meth:`Propagator.observed`,
    so what this replica committed itself is never announced twice.
    """

    def __init__(
        self,
        db: Database,
        propagator: Propagator,
        clock: Clock,
        *,
        interval: float = 0.1,
        window: float = 10.0,
    ) -> None:
        self.db = db
        self.propagator = propagator
        self.clock = clock
        self.interval = interval
        self.window = window
        self.applied = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="revocation-tail")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def poll_once(self) -> int:
        since = self.clock.now() - self.window
        new = 0
        for event in await repo.revocation_events_since(self.db, since=since):
            new += self.propagator.observed(event)
        self.propagator.forget_before(since - self.window)
        self.applied += new
        return new

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception as exc:  # a database hiccup must not end the tail
                log.warning("revocation tail: %s", exc)
            await asyncio.sleep(self.interval)
