"""Background usage traffic for ``bench/kill.py``: benign, in-scope ``UsageEvent``s at a
fixed rate, produced from a process of its own (``multiprocessing``, spawn).

The events are encoded once, before the clock starts (a pool that is cycled; every pool
entry has its own ``event_id``), and produced with ``service.kafka.producer`` keyed by
agent id exactly as a guard's ``UsageEmitter`` does, but with a longer linger so that
thousands of events per second cost a few produce requests per partition, not thousands.
The loop is open: every tick (``tick_s``) it sends what the schedule says is due by now,
so a slow tick is caught up, never silently dropped (at most ``max_catch_up_s`` worth at
once). Counters (sent, acknowledged, failed) are published in shared memory every tick
so the parent can compute the acknowledged rate over any window with its own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

POOL_SIZE = 20_000


@dataclass(frozen=True)
class Target:
    """One benign task the traffic is attributed to (it exists on the service)."""

    agent_id: str
    task_id: str
    jti_hash: str
    action: str
    resource: str


@dataclass
class Config:
    bootstrap: str
    settings_env: dict[str, str]
    targets: list[Target]
    audience: str
    rate: float
    linger_ms: int = 5
    tick_s: float = 0.005
    max_catch_up_s: float = 0.25
    cpu: int | None = None


def _pool(config: Config) -> list[tuple[bytes, bytes]]:
    from service.kernel.events import Decision, Source, UsageEvent, encoder

    now = time.time()
    prefix = f"bg{os.getpid()}-"
    source = Source(address="10.0.0.7", user_agent="bench-agent/1")
    out: list[tuple[bytes, bytes]] = []
    targets = config.targets
    for i in range(POOL_SIZE):
        t = targets[i % len(targets)]
        event = UsageEvent(
            event_id=prefix + str(i),
            at=now,
            agent_id=t.agent_id,
            task_id=t.task_id,
            jti_hash=t.jti_hash,
            action=t.action,
            resource=t.resource,
            audience=config.audience,
            decision=Decision.ALLOW,
            bytes_out=512,
            source=source,
            guard="bench-background",
        )
        out.append((t.agent_id.encode(), encoder.encode(event)))
    return out


async def _produce(config: Config, stop: Any, counters: Any, ready: Any) -> None:
    from service import kafka
    from service.config import Settings

    settings = Settings.from_env({**config.settings_env, "KS_KAFKA_BOOTSTRAP": config.bootstrap})
    pool = _pool(config)
    producer = kafka.producer(
        settings, "killswitch-bench-usage-load", linger_ms=config.linger_ms, acks="all"
    )
    await producer.start()
    acked = failed = sent = 0

    def done(fut: asyncio.Future[Any]) -> None:
        nonlocal acked, failed
        if fut.cancelled() or fut.exception() is not None:
            failed += 1
        else:
            acked += 1

    topic = settings.kafka_usage_topic
    rate = config.rate
    cap = max(1, int(rate * config.max_catch_up_s))
    index = 0
    ready.set()
    started = time.perf_counter()
    try:
        while not stop.is_set():
            due = int(rate * (time.perf_counter() - started)) - sent
            if due > cap:  # fell far behind (machine busy): resume the schedule from here
                started += (due - cap) / rate
                due = cap
            for _ in range(due):
                key, value = pool[index]
                index += 1
                if index == POOL_SIZE:
                    index = 0
                fut = await producer.send(topic, value=value, key=key)
                fut.add_done_callback(done)
            sent += max(0, due)
            counters[0], counters[1], counters[2] = sent, acked, failed
            await asyncio.sleep(config.tick_s)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.flush(), timeout=10)
        counters[0], counters[1], counters[2] = sent, acked, failed
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()


def run(config: Config, stop: Any, counters: Any, ready: Any) -> None:
    """Process entry point (picklable). ``counters`` = shared array [sent, acked, failed]."""
    if config.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {config.cpu})
    try:
        import uvloop

        uvloop.run(_produce(config, stop, counters, ready))
    except ImportError:  # pragma: no cover
        asyncio.run(_produce(config, stop, counters, ready))
