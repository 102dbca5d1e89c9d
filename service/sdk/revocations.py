"""Live revocation state for enforcement points, and the two feeds that keep it current.

:class:`RevocationState` answers "is this verified credential dead?" in O(1) with the
same semantics as the service's own ``service.revocation.DenyState``:

* target ``credential`` → that jti hash is dead;
* target ``task``       → every id in ``task_ids`` is closed (sub-tasks included);
* target ``agent``      → credentials of ``agent_id`` with ``iat <= cutoff`` are dead
  (and its ``task_ids`` closed);
* target ``cutoff``     → credentials with ``iat <= cutoff`` are dead, for ``agent_id``
  or for everyone when ``agent_id`` is None.

Revocations only ever add to the state (nothing is un-revoked), so applying an event
twice, or out of order, gives the same state: replaying a topic that was never compacted
(tansu does not compact) is harmless.

Two feeds fill it, both satisfying :class:`RevocationFeed`:

* :class:`KafkaRevocationFeed` — replays the revocation topic from the beginning (no
  consumer group: every guard sees every record), marks itself ready once it has reached
  the end offsets captured at start, then follows the topic.
* :class:`SseRevocationFeed` — follows ``GET /v1/revocations/stream`` for resource servers
  without Kafka access; resumes with ``Last-Event-ID`` after a disconnect.

A feed's ``last_heard`` is the ``time.monotonic()`` of the last proof that the source is
alive (a completed Kafka fetch, even an empty one; an SSE event or heartbeat). The guard
fails closed when it is older than its staleness bound.

This module imports nothing from litestar or the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, Protocol

import httpx
import msgspec
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from service import kafka
from service.config import Settings
from service.events import RevocationEvent
from service.sdk.sse import SseParser

__all__ = [
    "KafkaRevocationFeed",
    "RevocationFeed",
    "RevocationState",
    "SseRevocationFeed",
    "jti_key",
]

log = logging.getLogger("killswitch.sdk.revocations")

_revocation_decoder = msgspec.json.Decoder(RevocationEvent)


def jti_key(jti_hash: str) -> int | str:
    """The in-memory form of a jti hash: its first 128 bits as an int.

    A 64-character hex string costs ~113 bytes as ``str``; a 128-bit ``int`` costs 44.
    Two distinct SHA-256 values share a 128-bit prefix with probability 2**-128 per pair,
    and a collision could only deny (never allow) a credential. Anything that is not hex
    is kept as given.
    """
    try:
        return int(jti_hash[:32], 16)
    except ValueError:
        return jti_hash


class RevocationState:
    """What is dead, held in memory. Mirrors ``service.revocation.DenyState``."""

    __slots__ = (
        "agent_cutoffs",
        "applied",
        "closed_tasks",
        "global_cutoff",
        "last_seq",
        "revoked_jtis",
    )

    def __init__(self) -> None:
        self.revoked_jtis: set[int | str] = set()
        self.closed_tasks: dict[str, str] = {}
        self.agent_cutoffs: dict[str, float] = {}
        self.global_cutoff = 0.0
        self.last_seq = 0
        """Highest ``seq`` applied (the SSE resume point)."""
        self.applied = 0
        """Events applied so far (duplicates included)."""

    def apply(self, event: RevocationEvent) -> None:
        status = "completed" if event.source == "task_end" else "revoked"
        match event.target:
            case "credential":
                if event.jti_hash is not None:
                    self.revoked_jtis.add(jti_key(event.jti_hash))
            case "task":
                pass
            case "agent" | "cutoff":
                at = event.cutoff if event.cutoff is not None else event.at
                if event.target == "agent" and event.agent_id is None:
                    log.warning("agent revocation %s without agent_id", event.revocation_id)
                else:
                    self.cut_off(event.agent_id, at)
        for task_id in event.task_ids:
            self.closed_tasks.setdefault(task_id, status)
        self.last_seq = max(self.last_seq, event.seq)
        self.applied += 1

    def cut_off(self, agent_id: str | None, at: float) -> None:
        if agent_id is None:
            self.global_cutoff = max(self.global_cutoff, at)
        else:
            self.agent_cutoffs[agent_id] = max(self.agent_cutoffs.get(agent_id, 0.0), at)

    def reason_denied(self, jti_hash: str, task_id: str, agent_id: str, iat: float) -> str | None:
        """Why a credential is dead, or None. (The guard inlines this with a precomputed key.)"""
        return self.reason_denied_key(jti_key(jti_hash), task_id, agent_id, iat)

    def reason_denied_key(
        self, key: int | str, task_id: str, agent_id: str, iat: float
    ) -> str | None:
        if key in self.revoked_jtis:
            return "credential revoked"
        status = self.closed_tasks.get(task_id)
        if status is not None:
            return f"task {status}"
        if iat <= self.global_cutoff:
            return "issued before the global cut-off"
        cutoff = self.agent_cutoffs.get(agent_id)
        if cutoff is not None and iat <= cutoff:
            return "issued before the agent's cut-off"
        return None


class RevocationFeed(Protocol):
    """A source of revocations that keeps a :class:`RevocationState` current."""

    state: RevocationState
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
    def __init__(self, state: RevocationState | None) -> None:
        self.state = state if state is not None else RevocationState()
        self.ready = asyncio.Event()
        self.last_heard = float("-inf")
        self.undecodable = 0
        self._task: asyncio.Task[None] | None = None

    def stale(self, now: float, bound: float) -> bool:
        return not self.ready.is_set() or now - self.last_heard > bound

    def _apply_raw(self, raw: bytes) -> None:
        try:
            event = _revocation_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            # Not ours to dead-letter: the publisher's DLQ holds it. Counting is enough.
            self.undecodable += 1
            log.warning("undecodable revocation record skipped: %s", exc)
            return
        self.state.apply(event)

    async def _run(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=type(self).__name__)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class KafkaRevocationFeed(_FeedBase):
    """Replays then follows the revocation topic with a group-less consumer.

    Ready means: every partition's position has reached the end offset read when the
    replay began (an empty topic is ready at once), so a guard that reports ready knows
    everything revoked before it started. Each completed fetch refreshes ``last_heard``
    (aiokafka's ``last_poll_timestamp`` moves even when the fetch brought nothing).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        state: RevocationState | None = None,
        client_id: str = "killswitch-guard",
        poll_ms: int = 100,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(state)
        self.settings = settings
        self.topic = settings.kafka_revocations_topic
        self.client_id = client_id
        self.poll_ms = poll_ms
        self.consumer_options = consumer_options or {}
        self.errors = 0

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError) as exc:
                self.errors += 1
                log.warning("revocation feed error (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _partitions(self, consumer: Any) -> list[TopicPartition]:
        while True:
            parts = await kafka.partitions_of(consumer, self.topic)
            if parts:
                return [TopicPartition(self.topic, p) for p in sorted(parts)]
            log.warning("revocation topic %s does not exist yet", self.topic)
            await asyncio.sleep(0.5)

    async def _consume(self) -> None:
        options: dict[str, Any] = {"auto_offset_reset": "earliest", **self.consumer_options}
        consumer = kafka.consumer(self.settings, client_id=self.client_id, group_id=None, **options)
        await consumer.start()
        try:
            tps = await self._partitions(consumer)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end: dict[TopicPartition, int] = await consumer.end_offsets(tps)
            self.last_heard = time.monotonic()
            polled: dict[TopicPartition, int | None] = dict.fromkeys(tps)
            pending = {tp for tp in tps if end[tp] > 0}
            if not pending:
                self.ready.set()
            while True:
                batch = await consumer.getmany(*tps, timeout_ms=self.poll_ms)
                for records in batch.values():
                    for record in records:
                        if record.value is not None:  # a tombstone revokes nothing
                            self._apply_raw(record.value)
                for tp in tps:
                    stamp = consumer.last_poll_timestamp(tp)
                    if stamp is not None and stamp != polled[tp]:
                        polled[tp] = stamp
                        self.last_heard = time.monotonic()
                if pending:
                    for tp in list(pending):
                        if await consumer.position(tp) >= end[tp]:
                            pending.discard(tp)
                    if not pending:
                        self.ready.set()
                        log.info(
                            "revocation feed ready: %d events replayed from %s",
                            self.state.applied,
                            self.topic,
                        )
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()


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
        state: RevocationState | None = None,
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
            while True:
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
