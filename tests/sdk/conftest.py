"""Real parts for the SDK tests: a tansu broker and ``killswitch serve`` subprocesses.

Both are module-scoped (tansu starts in ~50 ms, the service in ~1 s). Each test gets its
own topic names, so tests sharing a broker never see each other's records.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service import kafka
from service.brokers import BrokerProcess, start_tansu
from service.config import Settings
from service.kernel.events import (
    CHECKPOINT_KEY,
    FeedCheckpoint,
    RevocationEvent,
    encoder,
    revocation_key,
)
from service.sdk import Guard, KafkaRevocationFeed, UsageEmitter
from tests.support.harness import AUD
from tests.support.serve import Served, serve

CEILING = ("call:tool/invoices.*", "GET:http://tools.local/v1/**", "read:file:///data/**")


@dataclass
class Service:
    served: Served
    admin: str

    @property
    def url(self) -> str:
        return self.served.url

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)

    async def agent(self, grants: Sequence[str] = CEILING) -> tuple[str, str]:
        agent_id = f"agent-{secrets.token_hex(4)}"
        async with self.http() as http:
            r = await http.post(
                "/v1/agents",
                json={
                    "id": agent_id,
                    "ceiling": {"grants": list(grants), "audiences": [AUD], "limits": {}},
                },
                headers={"Authorization": f"Bearer {self.admin}"},
            )
        assert r.status_code == 201, r.text
        return agent_id, r.json()["client_secret"]

    async def open_task(
        self,
        agent: tuple[str, str] | None = None,
        grants: Sequence[str] = ("call:tool/invoices.read",),
        audiences: Sequence[str] = (AUD,),
    ) -> dict[str, Any]:
        agent = agent or await self.agent()
        basic = base64.b64encode(f"{agent[0]}:{agent[1]}".encode()).decode()
        async with self.http() as http:
            r = await http.post(
                "/v1/tasks",
                json={"scope": {"grants": list(grants), "audiences": list(audiences)}, "ttl": 600},
                headers={"Authorization": f"Basic {basic}"},
            )
        assert r.status_code == 201, r.text
        issued: dict[str, Any] = r.json()
        return issued

    async def admin_post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        async with self.http() as http:
            r = await http.post(path, json=body, headers={"Authorization": f"Bearer {self.admin}"})
        assert r.status_code in (200, 201), r.text
        return r.json()

    async def operator(self, role: str, audience: str | None = None) -> str:
        body: dict[str, Any] = {"name": f"{role}-{secrets.token_hex(4)}", "role": role}
        if audience:
            body["audience"] = audience
        created = await self.admin_post("/v1/operators", body)
        token: str = created["token"]
        return token


def _service(tmp_path_factory: pytest.TempPathFactory, **env: str) -> Iterator[Service]:
    admin = "kso_" + secrets.token_urlsafe(32)
    root = tmp_path_factory.mktemp("ks")
    with serve(root / "data", f"sqlite:///{root / 'ks.db'}", admin_token=admin, env=env) as srv:
        yield Service(srv, admin)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _service(tmp_path_factory)


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with start_tansu() as b:
        yield b


def topic_settings(bootstrap: str) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        kafka_bootstrap=bootstrap,
        kafka_partitions=2,
        kafka_usage_topic=f"usage-{tag}",
        kafka_tasks_topic=f"tasks-{tag}",
        kafka_revocations_topic=f"revocations-{tag}",
        kafka_alerts_topic=f"alerts-{tag}",
        kafka_dlq_topic=f"dlq-{tag}",
    )


@pytest.fixture
async def settings(broker: BrokerProcess) -> Settings:
    """Fresh topics, with the revocation topic vouched for by a checkpoint, as the service
    leaves it (these tests play the service's part themselves)."""
    s = topic_settings(broker.bootstrap)
    await kafka.ensure_topics(s)
    await publish(s, checkpoint())
    return s


def checkpoint(epoch: str | None = None) -> FeedCheckpoint:
    return FeedCheckpoint(epoch=epoch or str(uuid.uuid4()), at=time.time(), through_seq=0)


async def publish(settings: Settings, *events: RevocationEvent | FeedCheckpoint) -> None:
    producer = kafka.producer(settings, "test-publisher")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                settings.kafka_revocations_topic,
                encoder.encode(event),
                key=(
                    revocation_key(event) if isinstance(event, RevocationEvent) else CHECKPOINT_KEY
                ).encode(),
            )
    finally:
        await producer.stop()


_seq = iter(range(1, 10**9))


def revocation(target: str, **fields: Any) -> RevocationEvent:
    return RevocationEvent(
        revocation_id=str(uuid.uuid4()),
        seq=next(_seq),
        at=fields.pop("at", 0.0),
        target=target,  # type: ignore[arg-type]
        reason=fields.pop("reason", "test"),
        actor="test",
        source=fields.pop("source", "analyst"),
        **fields,
    )


@asynccontextmanager
async def kafka_guard(
    service: Service,
    settings: Settings,
    *,
    usage: bool = False,
    wait: bool = True,
    **kwargs: Any,
) -> AsyncIterator[Guard]:
    feed = KafkaRevocationFeed(settings)
    emitter = UsageEmitter(settings) if usage else None
    guard = Guard(service.url, kwargs.pop("audience", AUD), feed, usage=emitter, **kwargs)
    await guard.start()
    try:
        if wait:
            async with asyncio.timeout(15):
                await guard.wait_ready()
        yield guard
    finally:
        await guard.stop()


async def eventually(
    predicate: Callable[[], object], within: float = 5.0, step: float = 0.005
) -> float:
    """Poll ``predicate`` (sync, or returning an awaitable) until truthy; seconds taken."""
    start = time.monotonic()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"not true within {within}s")
        await asyncio.sleep(step)
