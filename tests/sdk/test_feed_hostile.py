"""Hostile records on the revocation topic never stop a guard (on the real tansu broker).

A single junk record used to kill the feed task: running guards went stale for good,
guards started later never became ready, and ``Guard.stop()`` re-raised. Now every
record that does not decode is skipped and counted by reason, and the revocations around
it still apply.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from service import kafka
from service.config import Settings
from service.kernel.events import RevocationEvent, encoder, revocation_key
from service.kernel.tokens import jti_hash
from service.sdk import Guard, KafkaRevocationFeed, Outcome
from tests.sdk.conftest import Service, eventually, kafka_guard, revocation

TOOL = "tool/invoices.read"
JUNK_RECORDS = 10_000


def _junk(rng: random.Random, valid: bytes) -> bytes:
    """One record a broken or hostile producer might write."""
    kind = rng.randrange(9)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    if kind == 1:
        return valid[: rng.randrange(1, len(valid))]  # truncated JSON
    if kind == 2:
        return b'{"type":"revocation","version":1,"seq":"one"}'  # wrong types
    if kind == 3:
        return b'{"type":"revocation","version":2}'  # a schema we do not know
    if kind == 4:
        reason = "x" * rng.randrange(3_000, 200_000)  # a field far over its limit
        return valid.replace(b'"reason":"test"', b'"reason":"' + reason.encode() + b'"')
    if kind == 5:
        return rng.choice([b"null", b"[]", b"0", b'"revocation"', b"{}", b"\xff\xfe"])
    if kind == 6:
        return b'{"type":"checkpoint","epoch":""}'  # an empty epoch is not an id
    if kind == 7:
        return b"[" * 10_000  # deep nesting
    return valid.replace(b'"target":"credential"', b'"target":"everything"')


async def _produce(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    producer = kafka.producer(settings, "hostile", max_request_size=2_000_000)
    await producer.start()
    try:
        futures = [
            await producer.send(settings.kafka_revocations_topic, value, key=key)
            for key, value in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def _record(event: RevocationEvent) -> tuple[bytes, bytes]:
    return revocation_key(event).encode(), encoder.encode(event)


async def test_ten_thousand_hostile_records_never_stop_a_guard(
    service: Service, settings: Settings
) -> None:
    rng = random.Random(9)
    issued = [await service.open_task() for _ in range(4)]
    template = encoder.encode(revocation("credential", jti_hash=jti_hash("template")))
    async with kafka_guard(service, settings) as running:
        assert all(running.check_sync(i["access_token"], "call", TOOL).allowed for i in issued)
        records: list[tuple[bytes, bytes]] = [
            (b"junk", _junk(rng, template)) for _ in range(JUNK_RECORDS)
        ]
        # Two real revocations hidden among them, one early and one at the very end.
        records.insert(17, _record(revocation("credential", jti_hash=jti_hash(issued[0]["jti"]))))
        records.append(_record(revocation("task", task_ids=[issued[1]["task"]["id"]])))
        await _produce(settings, records)

        feed = running.feed
        assert isinstance(feed, KafkaRevocationFeed)
        deadline = time.monotonic() + 60
        while feed.undecodable < JUNK_RECORDS and time.monotonic() < deadline:
            assert feed.ready.is_set()  # never stopped, never reset by junk
            await asyncio.sleep(0.05)
        assert feed.undecodable == JUNK_RECORDS
        assert feed.resets == 0
        assert running.ready
        verdicts = [running.check_sync(i["access_token"], "call", TOOL) for i in issued]
        assert [v.reason for v in verdicts] == [
            "credential revoked",
            "task revoked",
            "allowed",
            "allowed",
        ]
        assert all(reason for reason in feed.skipped)  # each skip says why

        # A guard started after the junk replays past all of it and becomes ready.
        async with kafka_guard(service, settings) as fresh:
            fresh_feed = fresh.feed
            assert isinstance(fresh_feed, KafkaRevocationFeed)
            assert fresh_feed.undecodable == JUNK_RECORDS
            assert fresh.check_sync(issued[0]["access_token"], "call", TOOL).outcome is (
                Outcome.REVOKED
            )
    # Leaving both ``async with`` blocks stopped both guards without raising.


async def test_a_single_junk_record_leaves_running_and_new_guards_working(
    service: Service, settings: Settings
) -> None:
    token = (await service.open_task())["access_token"]
    async with kafka_guard(service, settings) as running:
        await _produce(settings, [(b"k", b"this is not JSON")])
        feed: Any = running.feed
        await eventually(lambda: feed.undecodable == 1, within=10)
        assert running.check_sync(token, "call", TOOL).allowed
        guard: Guard
        async with kafka_guard(service, settings) as guard:
            assert guard.check_sync(token, "call", TOOL).allowed
