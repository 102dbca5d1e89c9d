"""What each task actually did, for the SOC console: a digest of the usage topic.

Guards report every check as a :class:`~service.kernel.events.UsageEvent` on
``killswitch.usage.v1``. :class:`UsageDigest` folds them per task into counts an analyst
reads — calls checked, denied, bytes out, first and last use, the resources touched and
the sources (address, user agent, workload, proof key) seen, each with a count — and
:class:`UsageFollower` keeps it current: a group-less consumer that replays the topic
from the beginning (as far as the broker retains it) and then follows it.

It is a view, not a record: held in memory, bounded (the least recently used tasks are
dropped past ``max_tasks``; per task at most ``max_items`` distinct resources and
sources, the rest only counted), rebuilt from the topic on start, and never written to
the database (the usage topic is the record). It never revokes or alerts — that is the
detector's job. Records that do not decode are skipped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiokafka.structs import TopicPartition

from service import kafka
from service.config import Settings
from service.kernel.events import Decision, UsageEvent

__all__ = ["TaskUsage", "UsageDigest", "UsageFollower"]

log = logging.getLogger("killswitch.usage")

_usage_decoder: Final = msgspec.json.Decoder(UsageEvent)
POLL_MS: Final = 200


@dataclass
class TaskUsage:
    """One task's use, as its guards reported it."""

    calls: int = 0
    denied: int = 0
    bytes_out: int = 0
    first_at: float | None = None
    last_at: float | None = None
    resources: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    denied_reasons: Counter[str] = field(default_factory=Counter)
    other_resources: int = 0
    """Calls to resources beyond the ``max_items`` kept by name."""


class UsageDigest:
    """Per-task usage folded from events; O(1) per event, bounded memory."""

    def __init__(self, *, max_tasks: int = 50_000, max_items: int = 50) -> None:
        self.max_tasks = max_tasks
        self.max_items = max_items
        self._tasks: OrderedDict[str, TaskUsage] = OrderedDict()
        self.events = 0
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def of(self, task_id: str) -> TaskUsage | None:
        return self._tasks.get(task_id)

    def observe(self, event: UsageEvent) -> None:
        tasks = self._tasks
        usage = tasks.get(event.task_id)
        if usage is None:
            usage = tasks[event.task_id] = TaskUsage()
            if len(tasks) > self.max_tasks:
                tasks.popitem(last=False)
        else:
            tasks.move_to_end(event.task_id)
        self.events += 1
        usage.calls += 1
        usage.bytes_out += event.bytes_out
        if event.decision is Decision.DENY:
            usage.denied += 1
            if event.reason:
                _count(usage.denied_reasons, event.reason[:120], self.max_items)
        usage.first_at = event.at if usage.first_at is None else min(usage.first_at, event.at)
        usage.last_at = event.at if usage.last_at is None else max(usage.last_at, event.at)
        if not _count(usage.resources, f"{event.action} {event.resource[:300]}", self.max_items):
            usage.other_resources += 1
        source = event.source
        for label, value in (
            ("address", source.address),
            ("user agent", source.user_agent),
            ("workload", source.workload),
            ("proof key", source.jkt),
        ):
            if value:
                _count(usage.sources, f"{label} {value[:200]}", self.max_items)

    def observe_raw(self, raw: bytes | None) -> None:
        try:
            event = _usage_decoder.decode(raw if raw is not None else b"")
        except msgspec.DecodeError:
            self.skipped += 1  # the detector dead-letters it; the view just skips it
            return
        self.observe(event)


def _count(counter: Counter[str], key: str, limit: int) -> bool:
    """Count ``key`` if it is known or there is room; False when it was left out."""
    if key in counter or len(counter) < limit:
        counter[key] += 1
        return True
    return False


class UsageFollower:
    """Replays and follows the usage topic into a :class:`UsageDigest` (no group)."""

    def __init__(self, settings: Settings, digest: UsageDigest) -> None:
        self.settings = settings
        self.digest = digest
        self.errors = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-follower")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                await self._follow()
            except asyncio.CancelledError:
                if self._stopping or not kafka.cancellation_leaked():
                    raise
            except Exception as exc:  # broker trouble: the view waits, nothing else does
                log.warning("usage follower: %s: %s", type(exc).__name__, exc)
            self.errors += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _follow(self) -> None:
        consumer: Any = kafka.consumer(
            self.settings, client_id="killswitch-usage-view", group_id=None
        )
        await consumer.start()
        try:
            topic = self.settings.kafka_usage_topic
            parts: set[int] = set()
            while not parts and not self._stopping:
                parts = await kafka.partitions_of(consumer, topic)
                if not parts:
                    await asyncio.sleep(0.5)
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not self._stopping:
                batch = await consumer.getmany(*tps, timeout_ms=POLL_MS, max_records=5_000)
                for records in batch.values():
                    for record in records:
                        self.digest.observe_raw(record.value)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
