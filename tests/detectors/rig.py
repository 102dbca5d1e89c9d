"""A test rig for the detector: the real embedded broker, a real ``killswitch serve``
subprocess, fresh topics per rig, and helpers that play the parts the detector listens
to (the guard's UsageEvents, the service outbox's TaskEvents and RevocationEvents).

Nothing is mocked: tasks are opened on the real service, revocations are read back from
its API, alerts and dead letters are read back from Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata, TopicPartition

from detectors.consumer import Detector
from service import kafka
from service.brokers import FAST_CONSUMER
from service.config import Settings
from service.contracts import TaskView
from service.kernel.events import (
    AlertEvent,
    DeadLetter,
    Decision,
    RevocationEvent,
    Source,
    TaskEvent,
    TaskEventKind,
    UsageEvent,
    decoder,
    encoder,
)
from service.kernel.scopes import Limits, ScopeSpec
from service.kernel.tokens import jti_hash
from tests.support.harness import basic

AUD = "https://tools.internal"
CEILING = ("call:tool/**", "GET:https://api.internal/**", "read:file:///data/**")


def rig_settings(bootstrap: str, **overrides: Any) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap=bootstrap,
        kafka_usage_topic=f"usage-{suffix}",
        kafka_tasks_topic=f"tasks-{suffix}",
        kafka_revocations_topic=f"revocations-{suffix}",
        kafka_alerts_topic=f"alerts-{suffix}",
        kafka_dlq_topic=f"dlq-{suffix}",
        kafka_partitions=2,
        kafka_fetch_max_wait_ms=FAST_CONSUMER["fetch_max_wait_ms"],
        kafka_session_timeout_ms=FAST_CONSUMER["session_timeout_ms"],
        kafka_heartbeat_interval_ms=FAST_CONSUMER["heartbeat_interval_ms"],
        detector_group_id=f"detector-{suffix}",
        detector_metrics_port=0,
        detector_denied_burst=5,
        detector_denied_window_s=10,
        detector_shutdown_grace_s=2,
    )
    return replace(settings, **overrides)


async def wait_for(
    condition: Callable[[], Any],
    *,
    within: float = 15,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Task:
    agent_id: str
    task_id: str
    jti: str
    view: TaskView
    deadline: float

    @property
    def jti_hash(self) -> str:
        return jti_hash(self.jti)


@dataclass
class Rig:
    settings: Settings
    service_url: str
    admin_token: str
    detector_token: str
    http: httpx.AsyncClient
    producer: AIOKafkaProducer
    alerts: list[AlertEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    # ---------------------------------------------------------------- the service side

    async def open_task(
        self,
        grants: Sequence[str] = ("call:tool/invoices.read",),
        audiences: Sequence[str] = (AUD,),
        limits: dict[str, Any] | None = None,
        *,
        publish: bool = True,
        ttl: int = 600,
    ) -> Task:
        """Register an agent, open a task on the real service, and (as the outbox
        would) publish its ``opened`` TaskEvent."""
        agent_id = f"agent-{secrets.token_hex(4)}"
        r = await self.http.post(
            "/v1/agents",
            json={"id": agent_id, "ceiling": {"grants": list(CEILING), "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        secret = r.json()["client_secret"]
        r = await self.http.post(
            "/v1/tasks",
            json={
                "scope": {
                    "grants": list(grants),
                    "audiences": list(audiences),
                    "limits": limits or {},
                },
                "ttl": ttl,
            },
            headers=basic(agent_id, secret),
        )
        assert r.status_code == 201, r.text
        body = r.json()
        view = msgspec.convert(body["task"], TaskView)
        task = Task(agent_id, view.id, body["jti"], view, view.deadline)
        if publish:
            await self.publish_task(task, TaskEventKind.OPENED, "active")
        return task

    async def revocations_of(self, task_id: str) -> list[dict[str, Any]]:
        r = await self.http.get("/v1/revocations", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return [item for item in r.json()["items"] if item["target"].get("task_id") == task_id]

    async def task_status(self, task_id: str) -> str:
        r = await self.http.get(f"/v1/tasks/{task_id}")
        assert r.status_code == 200, r.text
        status: str = r.json()["status"]
        return status

    # ---------------------------------------------------------------- the Kafka side

    async def publish_task(
        self, task: Task, kind: TaskEventKind, status: str, at: float | None = None
    ) -> None:
        view = task.view
        event = TaskEvent(
            event_id=uuid.uuid4().hex,
            at=at if at is not None else time.time(),
            kind=kind,
            task_id=task.task_id,
            agent_id=task.agent_id,
            status=status,
            spiffe_id=view.spiffe_id,
            scope=view.scope if kind is not TaskEventKind.CLOSED else None,
            deadline=view.deadline,
            jti_hash=task.jti_hash if kind is not TaskEventKind.CLOSED else None,
        )
        await self.producer.send_and_wait(
            self.settings.kafka_tasks_topic, encoder.encode(event), key=task.task_id.encode()
        )

    async def publish_revocation(self, task: Task, at: float) -> None:
        event = RevocationEvent(
            revocation_id=uuid.uuid4().hex,
            seq=1,
            at=at,
            target="task",
            task_ids=[task.task_id],
            agent_id=task.agent_id,
            reason="analyst: test",
            actor="operator:test",
            source="analyst",
        )
        await self.producer.send_and_wait(
            self.settings.kafka_revocations_topic,
            encoder.encode(event),
            key=f"task:{task.task_id}".encode(),
        )

    def usage(self, task: Task, **overrides: Any) -> UsageEvent:
        values: dict[str, Any] = {
            "event_id": uuid.uuid4().hex,
            "at": time.time(),
            "agent_id": task.agent_id,
            "task_id": task.task_id,
            "jti_hash": task.jti_hash,
            "action": "call",
            "resource": "tool/invoices.read",
            "audience": AUD,
            "decision": Decision.ALLOW,
            "bytes_out": 10,
            "source": Source(address="10.0.0.7", user_agent="agent-sdk/1.0"),
            "guard": "test-guard",
        }
        values.update(overrides)
        return UsageEvent(**values)

    async def produce(self, *events: UsageEvent) -> RecordMetadata:
        """Send usage events (keyed by agent id, as the guard does); the last one's metadata."""
        last: RecordMetadata | None = None
        for event in events:
            last = await self.producer.send_and_wait(
                self.settings.kafka_usage_topic,
                encoder.encode(event),
                key=event.agent_id.encode(),
            )
        assert last is not None
        return last

    async def produce_raw(self, value: bytes, key: bytes | None) -> RecordMetadata:
        metadata: RecordMetadata = await self.producer.send_and_wait(
            self.settings.kafka_usage_topic, value, key=key
        )
        return metadata

    async def processed(self, detector: Detector, metadata: RecordMetadata) -> None:
        """Wait until the detector committed past ``metadata`` (its actions are durable)."""
        tp = TopicPartition(self.settings.kafka_usage_topic, metadata.partition)
        await wait_for(
            lambda: detector.processed.get(tp, -1) > metadata.offset,
            what=f"the detector to commit past {tp}@{metadata.offset}",
        )

    async def known(self, detector: Detector, task: Task) -> None:
        def check() -> bool:
            state = detector.store.tasks.get(task.task_id)
            return state is not None and state.known

        await wait_for(check, what=f"the detector to learn task {task.task_id}")

    def alerts_of(self, task: Task) -> list[AlertEvent]:
        return [a for a in self.alerts if a.task_id == task.task_id]

    async def alert(self, task: Task, rule: str) -> AlertEvent:
        found: AlertEvent = await wait_for(
            lambda: next((a for a in self.alerts_of(task) if a.rule == rule), None),
            what=f"a {rule} alert for {task.task_id}",
        )
        return found


async def collect(settings: Settings, rig: Rig, stop: asyncio.Event) -> None:
    """Follow the alerts and DLQ topics into ``rig.alerts`` / ``rig.dead_letters``."""
    consumer = kafka.consumer(
        settings,
        settings.kafka_alerts_topic,
        settings.kafka_dlq_topic,
        client_id="test-collector",
        group_id=None,
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=50)
            for records in batch.values():
                for record in records:
                    event = decoder.decode(record.value)
                    if isinstance(event, AlertEvent):
                        rig.alerts.append(event)
                    elif isinstance(event, DeadLetter):
                        rig.dead_letters.append(event)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def create_operator(http: httpx.AsyncClient, role: str) -> str:
    r = await http.post(
        "/v1/operators", json={"name": f"{role}-{secrets.token_hex(4)}", "role": role}
    )
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


__all__ = [
    "AUD",
    "Limits",
    "Rig",
    "ScopeSpec",
    "Task",
    "collect",
    "create_operator",
    "rig_settings",
    "wait_for",
]
