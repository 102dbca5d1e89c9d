"""Time to rebuild revocation state after a restart, on both sides of the kill switch.

* service: ``repository.load_deny_state`` over a SQLite database holding N revoked, unexpired
  credentials and N closed tasks (what a restarted service reads before it serves);
* guard: a fresh ``KafkaRevocationFeed`` replaying N RevocationEvents from the embedded
  broker until it reports ready (what a restarted guard does before it allows anything);

each next to the library limit measured in the same run: sqlite3 reading the same rows,
and msgspec decoding the same events.

    python bench/rebuild.py [--n 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sqlite3
import tempfile
import time
from pathlib import Path

from service.brokers import start_tansu
from service.config import Settings
from service.kafka import ensure_topics, producer
from service.kernel.events import (
    CHECKPOINT_KEY,
    FeedCheckpoint,
    RevocationEvent,
    decoder,
    encoder,
    revocation_key,
)
from service.sdk import KafkaRevocationFeed
from service.storage import repository as repo
from service.storage.database import SqliteDatabase
from service.storage.migrations import migrate


def _hash(i: int) -> str:
    return hashlib.sha256(f"jti-{i}".encode()).hexdigest()


async def service_side(n: int, directory: Path) -> tuple[float, float]:
    path = directory / "rebuild.db"
    db = SqliteDatabase(path)
    await migrate(db)
    await db.close()
    now = time.time()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO agents (id, name, ceiling, status, created_at) VALUES "
        "('a', 'a', '{\"grants\":[\"x:y\"]}', 'active', ?)",
        (now,),
    )
    conn.executemany(
        "INSERT INTO tasks (id, agent_id, spiffe_id, scope, purpose, status, created_at,"
        " deadline, closed_at) VALUES (?, 'a', 's', '{}', '', 'revoked', ?, ?, ?)",
        ((f"t{i:08d}", now, now + 600, now) for i in range(n)),
    )
    conn.executemany(
        "INSERT INTO credentials (jti_hash, task_id, kid, issued_at, expires_at, revoked_at)"
        " VALUES (?, ?, 'k', ?, ?, ?)",
        ((_hash(i), f"t{i:08d}", now, now + 300, now) for i in range(n)),
    )
    conn.commit()
    started = time.perf_counter()
    rows = conn.execute(
        "SELECT c.jti_hash, t.id, t.status FROM credentials c JOIN tasks t ON t.id = c.task_id"
    ).fetchall()
    raw = time.perf_counter() - started
    assert len(rows) == n
    conn.close()
    db = SqliteDatabase(path)
    started = time.perf_counter()
    state = await repo.load_deny_state(db, now)
    loaded = time.perf_counter() - started
    await db.close()
    assert len(state.revoked_jtis) == n
    assert len(state.closed_tasks) == n
    return loaded, raw


async def guard_side(n: int) -> tuple[float, float, int]:
    with start_tansu() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        await ensure_topics(settings)
        events = [
            RevocationEvent(
                revocation_id=f"r{i}",
                seq=i + 1,
                at=1.0,
                target="credential",
                jti_hash=_hash(i),
                reason="bench",
                actor="bench",
                source="analyst",
            )
            for i in range(n)
        ]
        encoded = [encoder.encode(e) for e in events]
        started = time.perf_counter()
        for raw in encoded:
            decoder.decode(raw)
        decode = time.perf_counter() - started
        p = producer(settings, "bench-rebuild", linger_ms=20, max_batch_size=1 << 20)
        await p.start()
        try:
            for event, raw in zip(events, encoded, strict=True):
                await p.send(
                    settings.kafka_revocations_topic, raw, key=revocation_key(event).encode()
                )
            # What the service writes once the topic is whole: guards wait for it.
            checkpoint = FeedCheckpoint(epoch="bench", at=1.0, through_seq=n, republished=n)
            await p.send(
                settings.kafka_revocations_topic,
                encoder.encode(checkpoint),
                key=CHECKPOINT_KEY.encode(),
            )
            await p.flush()
        finally:
            await p.stop()
        feed = KafkaRevocationFeed(settings)
        started = time.perf_counter()
        await feed.start()
        await asyncio.wait_for(feed.ready.wait(), timeout=300)
        replay = time.perf_counter() - started
        applied = feed.state.applied
        await feed.stop()
        assert applied == n, f"ready after {applied} of {n} revocations"
        return replay, decode, applied


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="revocations (default %(default)s)")
    args = parser.parse_args()
    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        loaded, raw = asyncio.run(service_side(n, Path(tmp)))
    replay, decode, applied = asyncio.run(guard_side(n))
    print(f"Rebuilding revocation state for {n:,} revocations\n")
    print(f"{'what':<70} {'seconds':>8} {'per second':>12}")
    print(f"{'-' * 70} {'-' * 8} {'-' * 12}")
    rows = [
        ("service: load_deny_state (SQLite, credentials + tasks)", loaded),
        ("  limit: sqlite3 reading the same rows (one SELECT)", raw),
        (f"guard: KafkaRevocationFeed replay to ready ({applied:,} applied, tansu)", replay),
        ("  limit: msgspec decoding the same events", decode),
    ]
    for what, seconds in rows:
        print(f"{what:<70} {seconds:>8.3f} {n / seconds:>12,.0f}")


if __name__ == "__main__":
    main()
