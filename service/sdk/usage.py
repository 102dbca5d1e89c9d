"""Usage reporting: every guard check becomes one ``UsageEvent`` on the usage topic.

:meth:`UsageEmitter.emit` is synchronous and never blocks or awaits: it appends to a
bounded in-memory queue and returns. A background task drains the queue in batches and
produces them to ``settings.kafka_usage_topic`` keyed by agent id (all of an agent's
events land on one partition, see docs/events.md). When the queue is full the event is
dropped and counted in ``dropped`` — the request path never waits for Kafka.
Delivery is at-most-once: a batch the broker refuses is counted in ``failed`` and logged.

This module imports nothing from litestar or the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from typing import Any

from aiokafka.errors import KafkaError

from service import kafka
from service.config import Settings
from service.kernel.events import UsageEvent, encoder

__all__ = ["UsageEmitter"]

log = logging.getLogger("killswitch.sdk.usage")


class UsageEmitter:
    """Bounded, non-blocking queue of usage events with a background Kafka producer."""

    def __init__(
        self,
        settings: Settings,
        *,
        capacity: int = 100_000,
        batch_size: int = 1_000,
        client_id: str = "killswitch-guard-usage",
        producer_options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.kafka_usage_topic
        self.capacity = capacity
        self.batch_size = batch_size
        self.client_id = client_id
        # A few ms of linger batches a burst into one request; usage is not kill-critical
        # in the way a revocation is, but the detector's latency starts here, so keep it small.
        self.producer_options = {"linger_ms": 2, **(producer_options or {})}
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._queue: deque[UsageEvent] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sleeping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._producer: Any = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def emit(self, event: UsageEvent) -> bool:
        """Queue ``event`` for sending; False (and counted) if the queue is full."""
        queue = self._queue
        if len(queue) >= self.capacity:
            self.dropped += 1
            return False
        queue.append(event)
        if self._sleeping:
            self._sleeping = False
            self._wake()
        return True

    def _wake(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._resume()
        else:  # a guard called from a worker thread (e.g. a sync framework)
            loop.call_soon_threadsafe(self._resume)

    def _resume(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        producer = kafka.producer(self.settings, self.client_id, **self.producer_options)
        await producer.start()
        self._producer = producer
        self._task = asyncio.create_task(self._run(), name="usage-emitter")

    async def _run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._sleeping = True
                self._wakeup.clear()
                if queue:  # raced with an emit between the check and the flag
                    self._sleeping = False
                else:
                    self._idle.set()
                    await self._wakeup.wait()
            self._idle.clear()
            batch = [queue.popleft() for _ in range(min(len(queue), self.batch_size))]
            await self._send(batch)

    async def _send(self, batch: list[UsageEvent]) -> None:
        producer = self._producer
        try:
            futures = [
                await producer.send(
                    self.topic, value=encoder.encode(event), key=event.agent_id.encode()
                )
                for event in batch
            ]
            results = await asyncio.gather(*futures, return_exceptions=True)
        except (KafkaError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not kafka.cancellation_leaked():
                raise
            self.failed += len(batch)
            log.warning("usage batch of %d lost: %s", len(batch), exc)
            return
        failures = [r for r in results if isinstance(r, BaseException)]
        self.failed += len(failures)
        self.sent += len(batch) - len(failures)
        if failures:
            log.warning("%d usage events lost: %s", len(failures), failures[0])

    async def flush(self) -> None:
        """Wait until every event queued so far has been sent and acknowledged.

        Bound it with ``asyncio.timeout`` if the broker may be down.
        """
        if self._task is None:
            raise RuntimeError("UsageEmitter.flush() before start()")
        while True:
            await self._idle.wait()
            if not self._queue:
                break
            await asyncio.sleep(0)  # a wake-up from another thread is on its way
        await self._producer.flush()

    async def stop(self, grace: float = 10.0) -> None:
        """Flush what is queued (for at most ``grace`` seconds), then stop the producer."""
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(grace):
                await self.flush()
        except TimeoutError:
            log.warning("usage emitter stopped with %d events unsent", len(self._queue))
        finally:
            self._task = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self._producer.stop()
