"""Usage events leave the guard without blocking and arrive on the real usage topic."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.structs import TopicPartition

from service import kafka
from service.config import Settings
from service.kernel.events import Decision, Source, UsageEvent, decoder
from service.kernel.tokens import jti_hash
from service.sdk import UsageEmitter
from tests.sdk.conftest import Service, eventually, kafka_guard
from tests.support.harness import AUD


async def consume_all(settings: Settings, expected: int) -> list[tuple[bytes, Any]]:
    consumer = kafka.consumer(settings, client_id="test-reader", group_id=None)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(settings.kafka_usage_topic)
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(settings.kafka_usage_topic)
        tps = [TopicPartition(settings.kafka_usage_topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        found: list[tuple[bytes, Any]] = []
        async with asyncio.timeout(10):
            while len(found) < expected:
                batch = await consumer.getmany(timeout_ms=100)
                for records in batch.values():
                    found += [(r.key, decoder.decode(r.value)) for r in records]
        await asyncio.sleep(0.2)  # and nothing more than expected
        for records in (await consumer.getmany(timeout_ms=100)).values():
            found += [(r.key, decoder.decode(r.value)) for r in records]
        return found
    finally:
        await consumer.stop()


async def test_every_check_emits_one_usage_event(service: Service, settings: Settings) -> None:
    issued = await service.open_task()
    token, agent_id = issued["access_token"], issued["task"]["agent_id"]
    source = Source(address="10.0.0.7", user_agent="pytest", workload="spiffe://x/y")
    async with kafka_guard(service, settings, usage=True, guard_id="rs-1") as guard:
        assert (await guard.check(token, "call", "tool/invoices.read", bytes_out=42)).allowed
        assert guard.check_sync(token, "call", "tool/invoices.read", source=source).allowed
        assert not guard.check_sync(token, "call", "tool/payments.send").allowed
        assert not guard.check_sync("garbage", "call", "tool/invoices.read").allowed
        assert guard.usage is not None
        async with asyncio.timeout(10):
            await guard.usage.flush()
        assert guard.usage.sent == 4
        assert guard.usage.dropped == 0
    found = await consume_all(settings, 4)
    assert len(found) == 4
    events = sorted((e for _, e in found), key=lambda e: int(e.event_id.rsplit("-", 1)[1]))
    assert all(isinstance(e, UsageEvent) for e in events)
    first, second, scope_deny, garbage = events
    assert first.decision is Decision.ALLOW
    assert (first.bytes_out, first.reason, first.audience, first.guard) == (42, None, AUD, "rs-1")
    assert first.agent_id == agent_id
    assert first.task_id == issued["task"]["id"]
    assert first.jti_hash == jti_hash(issued["jti"])
    assert second.source == source
    assert scope_deny.decision is Decision.DENY
    assert scope_deny.reason is not None
    assert "outside the scope" in scope_deny.reason
    assert (scope_deny.action, scope_deny.resource) == ("call", "tool/payments.send")
    assert garbage.decision is Decision.DENY
    assert garbage.agent_id == "-"
    assert garbage.reason == "malformed token: not a compact JWS"
    keys = {key for key, _ in found}
    assert keys == {agent_id.encode(), b"-"}  # keyed by agent id
    assert len({e.event_id for e in events}) == 4


async def test_full_queue_drops_and_counts_without_blocking(settings: Settings) -> None:
    emitter = UsageEmitter(settings, capacity=10)
    event = UsageEvent(
        event_id="e",
        at=0.0,
        agent_id="a",
        task_id="t",
        jti_hash="j",
        action="call",
        resource="r",
        audience=AUD,
        decision=Decision.ALLOW,
    )
    # Not started: nothing drains, so the 11th event is dropped at once.
    accepted = [emitter.emit(event) for _ in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert (emitter.queued, emitter.dropped) == (10, 5)
    await emitter.start()
    try:
        async with asyncio.timeout(10):
            await emitter.flush()
        assert (emitter.sent, emitter.queued) == (10, 0)
    finally:
        await emitter.stop()
    assert len(await consume_all(settings, 10)) == 10


async def test_emit_from_another_thread_is_delivered(settings: Settings) -> None:
    emitter = UsageEmitter(settings)
    await emitter.start()
    try:
        event = UsageEvent(
            event_id="t1",
            at=0.0,
            agent_id="a",
            task_id="t",
            jti_hash="j",
            action="call",
            resource="r",
            audience=AUD,
            decision=Decision.DENY,
            reason="x",
        )
        await asyncio.sleep(0.05)  # let the sender go to sleep first
        await asyncio.to_thread(emitter.emit, event)
        await eventually(lambda: emitter.sent >= 1, within=10)
    finally:
        await emitter.stop()
