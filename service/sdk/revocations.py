"""Live revocation state for enforcement points, and the two feeds that keep it current.

The state is the kernel's :class:`~service.kernel.deny.DenyState` — the very rules the
service applies to itself — so a guard and the service cannot disagree about what is
dead. Two feeds fill it, both satisfying :class:`RevocationFeed`:

* :class:`KafkaRevocationFeed` — replays the revocation topic from the beginning (no
  consumer group: every guard sees every record), then follows it. It is ready only once
  it has reached the end offsets read when the replay began *and* has seen a
  :class:`~service.kernel.events.FeedCheckpoint` — the service's word that the topic is
  whole — so an empty, new or half-rebuilt topic never vouches for anything.
* :class:`SseRevocationFeed` — follows ``GET /v1/revocations/stream`` for resource servers
  without Kafka access; resumes with ``Last-Event-ID`` after a disconnect.

**Fail closed, and know when the log was reset.** The Kafka feed goes not-ready, replays
from the start and only then allows again when it finds that the log under it changed:

* the high-water mark a fetch reports is below the feed's position (a broker that
  restarted empty, a topic recreated and shorter), or the topic is no longer listed;
* the broker answers "offset out of range" (auto reset is off: nothing is skipped
  silently);
* a checkpoint of a *different* epoch arrives after the feed was ready (the service
  rebuilt the topic: records before the feed's position may be new);
* the offset of the newest checkpoint it saw no longer holds that checkpoint (read back
  every ``verify_interval`` by a second consumer): a log rebuilt under the feed can grow
  past the feed's position with its new checkpoint *behind* that position, which none
  of the signs above would show.

Any other error (a dropped connection, a broker away for a while) is not a reset: the
feed reconnects and resumes at the position it had reached, still ready, and goes stale
if the outage outlasts the guard's bound; resuming there is what makes a reset that
happened meanwhile visible.

A record that does not decode (junk bytes, truncated JSON, wrong types, a newer schema)
is skipped and counted in :attr:`_FeedBase.skipped` by reason — it never stops the feed.

A feed's ``last_heard`` is the ``time.monotonic()`` of the last proof that the source is
alive *and consistent*: for Kafka, a completed fetch (even an empty one) whose high-water
mark is not below the feed's position, on a topic that broker metadata listed within the
last ``2 × verify_interval`` seconds; for SSE, an event or heartbeat. The guard fails
closed when it is older than its staleness bound.

Ready means caught up to the high-water mark a fetch reported *after* the replay began
(``ListOffsets`` is not used: tansu answers it with a count of batches, not records).

This module imports nothing from litestar or the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from typing import Any, Protocol

import httpx
import msgspec
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import TopicPartition

from service import kafka
from service.config import Settings
from service.kernel.deny import DenyState
from service.kernel.events import FeedCheckpoint, RevocationEvent, revocation_record_decoder
from service.sdk.sse import SseParser

__all__ = [
    "KafkaRevocationFeed",
    "RevocationFeed",
    "SseRevocationFeed",
]

log = logging.getLogger("killswitch.sdk.revocations")

#: Longest excerpt of a skip reason kept (the reason is msgspec's message).
_REASON_CHARS = 200


class LogReset(Exception):
    """The log under a running feed changed: replay from the start before allowing again."""


class RevocationFeed(Protocol):
    """A source of revocations that keeps a :class:`DenyState` current."""

    state: DenyState
    ready: asyncio.Event
    """Set once everything revoked before the feed started has been applied."""
    last_heard: float
    """``time.monotonic()`` of the last proof that the source is alive."""

    async def start(self) -> None:
        """Begin replaying and following in the background; returns at once."""
        ...

    async def stop(self) -> None:
        """Stop following (idempotent)."""
        ...

    def stale(self, now: float, bound: float) -> bool:
        """Whether the feed cannot vouch for the state: not ready, or silent > bound."""
        ...


class _FeedBase:
    def __init__(self, state: DenyState | None) -> None:
        self.state = state if state is not None else DenyState()
        self.ready = asyncio.Event()
        self.last_heard = float("-inf")
        self.skipped: Counter[str] = Counter()
        """Records skipped because they did not decode, by reason (DLQ-style)."""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def undecodable(self) -> int:
        """How many records were skipped (all reasons)."""
        return sum(self.skipped.values())

    def stale(self, now: float, bound: float) -> bool:
        return not self.ready.is_set() or now - self.last_heard > bound

    def _decode(self, raw: bytes) -> RevocationEvent | FeedCheckpoint | None:
        """The record, or None after counting why it was skipped. Never raises."""
        try:
            return revocation_record_decoder.decode(raw)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            reason = str(exc)[:_REASON_CHARS] or type(exc).__name__
        except Exception as exc:  # hostile input must never end the feed
            reason = f"{type(exc).__name__}: {exc}"[:_REASON_CHARS]
        # Not ours to dead-letter: the publisher's DLQ holds it. Counting is enough.
        self.skipped[reason] += 1
        log.warning("undecodable revocation record skipped: %s", reason)
        return None

    def _apply_raw(self, raw: bytes) -> FeedCheckpoint | None:
        """Apply a revocation; return a checkpoint for the caller to judge."""
        record = self._decode(raw)
        if isinstance(record, RevocationEvent):
            self.state.apply(record)
            return None
        return record

    async def _run(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=type(self).__name__)

    async def stop(self) -> None:
        """Stop following (idempotent). Cancels until the task is gone: a cancellation
        that lands inside a library's own timeout can come back as a ``TimeoutError``,
        which the retry loop would otherwise take for a broker error."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if not task.cancelled() and task.exception() is not None:
            log.warning("revocation feed ended with %r", task.exception())


class KafkaRevocationFeed(_FeedBase):
    """Replays then follows the revocation topic with a group-less consumer.

    Ready means: every partition's position has reached the high-water mark of a fetch
    made after the replay began, and a :class:`FeedCheckpoint` has been seen, so a guard
    that reports ready knows everything revoked before it started. See the module
    docstring for how a reset of the log is detected; :attr:`resets` counts them.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        state: DenyState | None = None,
        client_id: str = "killswitch-guard",
        poll_ms: int = 100,
        verify_interval: float = 0.5,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(state)
        self.settings = settings
        self.topic = settings.kafka_revocations_topic
        self.client_id = client_id
        self.poll_ms = poll_ms
        self.verify_interval = verify_interval
        self.consumer_options = consumer_options or {}
        self.errors = 0
        self.resets = 0
        self.epoch: str | None = None
        """Epoch of the newest checkpoint seen."""
        self.last_reset_reason: str | None = None
        self._resume: dict[TopicPartition, int] = {}
        """Positions reached while ready: where a reconnect carries on."""
        self._checkpoint_at: tuple[TopicPartition, int] | None = None
        """Where the newest checkpoint seen sits (verified every ``verify_interval``)."""

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                await self._consume()
            except LogReset as exc:
                self._reset(str(exc))
                backoff = 0.1
                continue
            except asyncio.CancelledError:
                if self._stopping or not kafka.cancellation_leaked():
                    raise
                problem = "the broker connection dropped"  # aiokafka's own cancellation
            except Exception as exc:
                # Whatever broke — the broker, the network, aiokafka itself: reconnect.
                problem = f"{type(exc).__name__}: {exc}"
            if self.ready.is_set():
                backoff = 0.1  # it had been working: retry soon
            # Still ready: nothing was forgotten. The next attempt resumes at the position
            # reached, so a log that was reset meanwhile shows at once (a high-water mark
            # below it, or offset out of range); a silent outage goes stale on its own.
            self.errors += 1
            log.warning("revocation feed: %s; reconnecting in %.1fs", problem, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _reset(self, reason: str) -> None:
        self.resets += 1
        self.last_reset_reason = reason
        self.ready.clear()
        self._resume.clear()
        self._checkpoint_at = None
        log.warning("revocation log reset (%s): replaying %s from the start", reason, self.topic)

    async def _partitions(self, consumer: Any) -> list[TopicPartition]:
        while True:
            parts = await kafka.partitions_of(consumer, self.topic)
            if parts:
                return [TopicPartition(self.topic, p) for p in sorted(parts)]
            log.warning("revocation topic %s does not exist yet", self.topic)
            await asyncio.sleep(0.5)

    async def _check_log(self, consumer: Any, tps: list[TopicPartition]) -> bool:
        """Raise :class:`LogReset` if a fetch saw a high-water mark below our position.

        The high-water mark is the one the last *fetch* brought back, not ``ListOffsets``
        (tansu answers that with a count of batches, not records). Returns whether every
        partition has been fetched at least once and is caught up to that mark.
        """
        caught_up = True
        for tp in tps:
            high = consumer.highwater(tp)
            position = await consumer.position(tp)
            if high is None:
                caught_up = False
            elif high < position:
                raise LogReset(f"high-water mark {high} below position {position} of {tp}")
            elif position < high:
                caught_up = False
        return caught_up

    async def _listed(self, consumer: Any, tps: list[TopicPartition]) -> None:
        parts = await kafka.partitions_of(consumer, self.topic)
        if {tp.partition for tp in tps} - parts:
            raise LogReset("topic or partition gone")

    async def _consume(self) -> None:
        # No silent auto-reset: an out-of-range offset is a reset we must see.
        options: dict[str, Any] = {"auto_offset_reset": "none", **self.consumer_options}
        consumer = kafka.consumer(self.settings, client_id=self.client_id, group_id=None, **options)
        # A second consumer only reads the checkpoint back (see _verify_checkpoint).
        probe = kafka.consumer(
            self.settings, client_id=self.client_id + "-probe", group_id=None, **options
        )
        await consumer.start()
        await probe.start()
        try:
            tps = await self._partitions(consumer)
            consumer.assign(tps)
            resume = self._resume if self.ready.is_set() else {}
            if resume and set(resume) == set(tps):
                for tp in tps:
                    consumer.seek(tp, resume[tp])
            else:
                self.ready.clear()
                self._checkpoint_at = None
                await consumer.seek_to_beginning(*tps)
            polled: dict[TopicPartition, int | None] = dict.fromkeys(tps)
            checkpointed = False
            replayed_from = self.state.applied
            listed_at = verified_at = float("-inf")  # a resumed feed proves itself first
            while True:
                try:
                    batch = await consumer.getmany(*tps, timeout_ms=self.poll_ms)
                except OffsetOutOfRangeError as exc:
                    raise LogReset(f"offset out of range: {exc}") from None
                for tp_of, records in batch.items():
                    for record in records:
                        if record.value is None:  # a tombstone revokes nothing
                            continue
                        checkpoint = self._apply_raw(record.value)
                        if checkpoint is None:
                            continue
                        if self.ready.is_set() and checkpoint.epoch != self.epoch:
                            self.epoch = checkpoint.epoch
                            raise LogReset(f"topic rebuilt (epoch {checkpoint.epoch})")
                        self.epoch = checkpoint.epoch
                        self._checkpoint_at = (tp_of, record.offset)
                        checkpointed = True
                caught_up = await self._check_log(consumer, tps)
                if self.ready.is_set():
                    for tp in tps:
                        self._resume[tp] = await consumer.position(tp)
                now = time.monotonic()
                if now - listed_at >= self.verify_interval:
                    await self._listed(consumer, tps)
                    listed_at = now
                    if await self._verify_checkpoint(probe):
                        verified_at = now
                # Proof of life: a fetch completed since the last look, on a log that is
                # still listed and not behind us.
                fetched = False
                for tp in tps:
                    stamp = consumer.last_poll_timestamp(tp)
                    if stamp is not None and stamp != polled[tp]:
                        polled[tp] = stamp
                        fetched = True
                if fetched and now - verified_at < 2 * self.verify_interval:
                    self.last_heard = now
                if not self.ready.is_set() and caught_up and checkpointed:
                    self.ready.set()
                    log.info(
                        "revocation feed ready: %d events replayed from %s (epoch %s)",
                        self.state.applied - replayed_from,
                        self.topic,
                        self.epoch,
                    )
        finally:
            for client in (consumer, probe):
                with contextlib.suppress(Exception):
                    await client.stop()

    async def _verify_checkpoint(self, probe: Any) -> bool:
        """Is the checkpoint we last saw still at its offset? Raise :class:`LogReset` if
        the log says no; False when it cannot tell yet (no proof of life then).

        A log rebuilt under a feed can grow past the feed's position before the feed
        looks, with the new checkpoint *behind* it: neither the high-water mark nor a new
        epoch would show. The old checkpoint's record can: in a log rebuilt or recreated,
        that offset holds something else, or nothing. Until the feed has seen a
        checkpoint (replaying), there is nothing to check.
        """
        if self._checkpoint_at is None or not self.ready.is_set():
            return True
        tp, offset = self._checkpoint_at
        probe.assign([tp])
        probe.seek(tp, offset)
        try:
            batch = await probe.getmany(tp, timeout_ms=self.poll_ms, max_records=1)
        except OffsetOutOfRangeError:
            raise LogReset(f"the checkpoint at offset {offset} is gone") from None
        for record in batch.get(tp, []):
            found = self._decode(record.value) if record.value is not None else None
            if (
                record.offset != offset
                or not isinstance(found, FeedCheckpoint)
                or found.epoch != self.epoch
            ):
                raise LogReset(f"offset {offset} no longer holds checkpoint {self.epoch}")
            return True
        high = probe.highwater(tp)
        if high is not None and high <= offset:
            raise LogReset(f"high-water mark {high} at or below the checkpoint at {offset}")
        return False


class SseRevocationFeed(_FeedBase):
    """Follows the service's ``/v1/revocations/stream`` (text/event-stream).

    The service replays every revocation after ``Last-Event-ID`` first, then sends one
    ``heartbeat`` and goes live (heartbeats every ~2 s). So the first heartbeat on a
    connection proves the replay is complete: that is when the feed becomes ready. Every
    event and heartbeat refreshes ``last_heard``. On any disconnect it reconnects with
    ``Last-Event-ID: <highest seq applied>`` after a jittered backoff (0.1 s doubling to
    ``max_backoff``); ``ready`` stays set (nothing was forgotten), but the feed goes stale
    if the outage outlasts the guard's bound.
    """

    def __init__(
        self,
        service_url: str,
        token: str,
        *,
        state: DenyState | None = None,
        http: httpx.AsyncClient | None = None,
        max_backoff: float = 5.0,
        read_timeout: float = 10.0,
    ) -> None:
        super().__init__(state)
        self.url = service_url.rstrip("/") + "/v1/revocations/stream"
        self._token = token
        self._http = http
        self.max_backoff = max_backoff
        self.read_timeout = read_timeout
        self.connects = 0
        self.errors = 0

    async def _run(self) -> None:
        own = self._http is None
        http = self._http or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=self.read_timeout))
        backoff = 0.1
        try:
            while not self._stopping:
                try:
                    await self._follow(http)
                    backoff = 0.1  # a clean end (server restart, overflow): resume at once
                except asyncio.CancelledError:
                    raise
                except (httpx.HTTPError, OSError, ValueError) as exc:
                    self.errors += 1
                    log.warning("revocation stream error (%s); reconnecting", exc)
                    await asyncio.sleep(backoff * (0.5 + random.random()))  # noqa: S311
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            if own:
                await http.aclose()

    async def _follow(self, http: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "text/event-stream"}
        if self.state.last_seq:
            headers["Last-Event-ID"] = str(self.state.last_seq)
        async with http.stream("GET", self.url, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise ValueError(
                    f"revocation stream answered {response.status_code}: {response.text[:200]}"
                )
            self.connects += 1
            parser = SseParser()
            async for line in response.aiter_lines():
                message = parser.feed(line)
                if message is not None:
                    self._dispatch(message.event, message.data)

    def _dispatch(self, event: str, data: str) -> None:
        if event == "revocation":
            self._apply_raw(data.encode())
        elif event == "heartbeat":
            self.ready.set()
        else:
            return
        self.last_heard = time.monotonic()
