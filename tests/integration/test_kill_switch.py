"""The kill switch end to end, on real brokers: the embedded tansu and Apache Kafka 4.x.

The whole system runs as `killswitch up` runs it (broker, `killswitch serve`, `python -m
detectors`); an in-process resource server sits behind the guard SDK. An agent opens a
task with a narrow scope, works inside it, makes one out-of-scope request; the detector
revokes the task; the guard denies the agent's next request. The revocation's reason
names the rule that fired.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from litestar import Litestar, get
from litestar.params import FromPath
from litestar.testing import AsyncTestClient

from service.brokers import BrokerProcess, start_apache_kafka, start_tansu
from service.config import Settings
from service.sdk import Guard, GuardMiddleware, KafkaRevocationFeed, UsageEmitter
from service.stack import Stack, up

AUD = "https://tools.kill.test"
GATEWAY = "http://tools.kill.test"
# Quick group joins on tansu (docs/kafka.md); harmless on Apache Kafka.
FAST = {
    "KS_KAFKA_SESSION_TIMEOUT_MS": "1000",
    "KS_KAFKA_HEARTBEAT_INTERVAL_MS": "250",
}


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("tansu", marks=pytest.mark.tansu),
        pytest.param("apache", marks=pytest.mark.kafka_apache),
    ],
)
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    started = start_tansu() if request.param == "tansu" else start_apache_kafka()
    with started as running:
        yield running


@pytest.fixture(scope="module")
def stack(broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = Path(tmp_path_factory.mktemp("stack")) / "ks"
    with up(data, kafka=broker.bootstrap, settings_env=FAST, progress=False) as running:
        yield running


@get("/tools/{name:str}", sync_to_thread=False)
def call_tool(name: FromPath[str]) -> dict[str, str]:
    return {"tool": name}


def _resource(scope: Any) -> str:
    return "tool/" + str(scope["path"]).removeprefix("/tools/")


@pytest_asyncio.fixture
async def gateway(stack: Stack) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, **_fast_settings())
    guard = Guard(
        issuer=stack.url,
        audience=AUD,
        feed=KafkaRevocationFeed(settings),
        usage=UsageEmitter(settings),
    )
    await guard.start()
    await asyncio.wait_for(guard.wait_ready(), timeout=30)
    app = GuardMiddleware(
        Litestar([call_tool]), guard, action_for=lambda _s: "call", resource_for=_resource
    )
    try:
        async with AsyncTestClient(app, base_url=GATEWAY) as client:  # type: ignore[arg-type]
            yield client
    finally:
        await guard.stop()


def _fast_settings() -> dict[str, Any]:
    return {"kafka_session_timeout_ms": 1000, "kafka_heartbeat_interval_ms": 250}


def _agent_and_task(stack: Stack, agent_id: str) -> tuple[str, str]:
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    with httpx.Client(base_url=stack.url, timeout=10) as api:
        r = api.post(
            "/v1/agents",
            headers=admin,
            json={"id": agent_id, "ceiling": {"grants": ["call:tool/*"], "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        secret = r.json()["client_secret"]
        basic = base64.b64encode(f"{agent_id}:{secret}".encode()).decode()
        r = api.post(
            "/v1/tasks",
            headers={"Authorization": f"Basic {basic}"},
            json={"scope": {"grants": ["call:tool/search.web"], "audiences": [AUD]}, "ttl": 300},
        )
        assert r.status_code == 201, r.text
        return r.json()["task"]["id"], r.json()["access_token"]


async def test_out_of_scope_use_is_revoked_and_the_next_request_denied(
    stack: Stack, gateway: AsyncTestClient[Any]
) -> None:
    task_id, token = _agent_and_task(stack, f"worker-{int(time.time() * 1000)}")
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        r = await gateway.get("/tools/search.web", headers=auth)
        assert r.status_code == 200, r.text

    r = await gateway.get("/tools/payments.send", headers=auth)
    assert r.status_code == 403, r.text
    violated_at = time.monotonic()

    denied: httpx.Response | None = None
    while time.monotonic() - violated_at < 20:
        r = await gateway.get("/tools/search.web", headers=auth)
        if r.status_code != 200:
            denied = r
            break
        await asyncio.sleep(0.01)
    assert denied is not None, "the task was not revoked within 20 s"
    assert denied.status_code == 403
    assert "revoked" in denied.json()["detail"]

    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as api:
        revocations = (await api.get("/v1/revocations", headers=admin)).json()["items"]
        task = (await api.get(f"/v1/tasks/{task_id}", headers=admin)).json()
    mine = [v for v in revocations if v["target"].get("task_id") == task_id]
    assert len(mine) == 1, mine
    assert mine[0]["source"] == "detector"
    assert mine[0]["reason"].startswith("scope.out_of_scope")
    assert task["status"] == "revoked"


async def test_in_scope_work_is_never_revoked(stack: Stack, gateway: AsyncTestClient[Any]) -> None:
    task_id, token = _agent_and_task(stack, f"good-{int(time.time() * 1000)}")
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(30):
        r = await gateway.get("/tools/search.web", headers=auth)
        assert r.status_code == 200, r.text
    await asyncio.sleep(1.0)  # time for a (wrong) revocation to arrive, if one were coming
    r = await gateway.get("/tools/search.web", headers=auth)
    assert r.status_code == 200, r.text
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as api:
        revocations = (await api.get("/v1/revocations", headers=admin)).json()["items"]
    assert not [v for v in revocations if v["target"].get("task_id") == task_id]
