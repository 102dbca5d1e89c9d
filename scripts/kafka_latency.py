"""Produce→consume latency and consumer-group join time, default vs tuned aiokafka settings.

One producer (acks=all, linger_ms=0, no idempotence) sends a message every ``--gap-ms``;
a consumer in a group, already assigned and idle in a fetch, receives it. Latency is
receive time minus the moment ``send`` was called (same process, monotonic clock).

    python scripts/kafka_latency.py tansu
    python scripts/kafka_latency.py apache [--version 4.4.0]
    python scripts/kafka_latency.py --bootstrap HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.brokers import (
    DEFAULT_KAFKA_VERSION,
    FAST_CONSUMER,
    BrokerProcess,
    start_apache_kafka,
    start_tansu,
)

PROFILES: dict[str, dict[str, Any]] = {
    # aiokafka 0.14 defaults (fetch_max_wait_ms=500, fetch_min_bytes=1, linger_ms=0)
    "defaults": {},
    "tuned": {"fetch_max_wait_ms": 5},
    # + short session: tansu holds the first JoinGroup ~session_timeout_ms/2
    "fast": dict(FAST_CONSUMER),
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def run_profile(bootstrap: str, name: str, n: int, gap_ms: int) -> dict[str, float]:
    topic = f"latency-{name}-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=0
    )
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{topic}",
        auto_offset_reset="latest",
        **PROFILES[name],
    )
    await producer.start()
    t0 = time.perf_counter()
    await consumer.start()
    while not consumer.assignment():  # noqa: ASYNC110 - aiokafka has no event for it
        await asyncio.sleep(0.01)
    # make sure the fetch position is set before producing
    for tp in consumer.assignment():
        await consumer.position(tp)
    join = time.perf_counter() - t0
    lat: list[float] = []

    async def receive() -> None:
        while len(lat) < n:
            msg = await consumer.getone()
            (sent,) = struct.unpack(">d", msg.value)
            lat.append((time.perf_counter() - sent) * 1000)

    rx = asyncio.create_task(receive())
    await asyncio.sleep(0.2)
    for _ in range(n):
        await producer.send_and_wait(topic, struct.pack(">d", time.perf_counter()), key=b"k")
        await asyncio.sleep(gap_ms / 1000)
        if rx.done():
            break
    await asyncio.wait_for(rx, 30)
    await consumer.stop()
    await producer.stop()
    return {
        "join_s": join,
        "p50_ms": statistics.median(lat),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", nargs="?", choices=["tansu", "apache"])
    ap.add_argument("--version", default=DEFAULT_KAFKA_VERSION)
    ap.add_argument("--bootstrap")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--gap-ms", type=int, default=20)
    a = ap.parse_args()
    broker: BrokerProcess | None = None
    if a.bootstrap:
        bootstrap = a.bootstrap
    elif a.kind == "tansu":
        broker = start_tansu()
    elif a.kind == "apache":
        broker = start_apache_kafka(version=a.version)
    else:
        ap.error("give a kind or --bootstrap")
    if broker:
        bootstrap = broker.bootstrap
        print(f"{broker.kind} {broker.version} ready in {broker.ready_seconds:.2f}s")
    try:
        for name in PROFILES:
            r = asyncio.run(run_profile(bootstrap, name, a.n, a.gap_ms))
            print(
                f"{name:<9} group join {r['join_s']:.2f}s  "
                f"latency p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                f"max {r['max_ms']:.1f} ms  (n={a.n}, one message every {a.gap_ms} ms)"
            )
    finally:
        if broker:
            broker.stop()


if __name__ == "__main__":
    main()
