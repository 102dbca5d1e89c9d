"""The agent SDK against ``killswitch serve`` with 3-second credentials (so renewal
happens within the test), and end to end through a guarded app."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.sdk import KillSwitchClient, ScopeRejected, Unauthenticated
from tests.sdk.conftest import Service, _service, eventually, kafka_guard
from tests.sdk.test_asgi import BASE, GRANTS, guarded_app
from tests.support.harness import AUD

READ = ("call:tool/invoices.read",)


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _service(tmp_path_factory, KS_CREDENTIAL_TTL="3")


async def task_view(service: Service, agent: tuple[str, str], task_id: str) -> dict[str, Any]:
    basic = base64.b64encode(f"{agent[0]}:{agent[1]}".encode()).decode()
    async with service.http() as http:
        r = await http.get(f"/v1/tasks/{task_id}", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200, r.text
    view: dict[str, Any] = r.json()
    return view


async def test_task_opens_renews_and_completes(short: Service) -> None:
    agent = await short.agent()
    async with (
        KillSwitchClient(short.url, *agent) as client,
        client.task(grants=READ, audiences=[AUD], ttl=60, purpose="pytest") as cred,
    ):
        first, task_id = cred.token, cred.task_id
        assert cred.expires_in <= 3
        assert (await task_view(short, agent, task_id))["status"] == "active"
        await eventually(lambda: cred.renewals >= 2, within=6)
        assert cred.token != first
        assert cred.last_error is None
        assert cred.closed is None
    view = await task_view(short, agent, task_id)
    assert view["status"] == "completed"
    assert view["close_reason"] == "task completed"
    assert view["purpose"] == "pytest"


async def test_task_completes_on_exception_with_reason(short: Service) -> None:
    agent = await short.agent()
    opened: list[str] = []

    async def work(client: KillSwitchClient) -> None:
        async with client.task(grants=READ, audiences=[AUD]) as cred:
            opened.append(cred.task_id)
            raise RuntimeError("tool exploded")

    async with KillSwitchClient(short.url, *agent) as client:
        with pytest.raises(RuntimeError, match="tool exploded"):
            await work(client)
    view = await task_view(short, agent, opened[0])
    assert view["status"] == "completed"
    assert view["close_reason"] == "task failed: RuntimeError: tool exploded"


async def test_task_completes_when_cancelled(short: Service) -> None:
    agent = await short.agent()
    opened: asyncio.Queue[str] = asyncio.Queue()

    async def work(client: KillSwitchClient) -> None:
        async with client.task(grants=READ, audiences=[AUD]) as cred:
            opened.put_nowait(cred.task_id)
            await asyncio.sleep(60)

    async with KillSwitchClient(short.url, *agent) as client:
        runner = asyncio.create_task(work(client))
        task_id = await opened.get()
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    view = await task_view(short, agent, task_id)
    assert view["status"] == "completed"
    assert view["close_reason"].startswith("task failed: CancelledError")


async def test_problem_details_become_exceptions(short: Service) -> None:
    agent = await short.agent()
    async with KillSwitchClient(short.url, *agent) as client:
        with pytest.raises(ScopeRejected) as rejected:
            async with client.task(grants=["call:tool/payments.send"], audiences=[AUD]):
                pytest.fail("a task beyond the ceiling was opened")
        assert rejected.value.status == 403
        assert any("payments.send" in item for item in rejected.value.offending)
    async with KillSwitchClient(short.url, agent[0], "wrong-secret") as client:
        with pytest.raises(Unauthenticated) as unauthenticated:
            await client.open_task(grants=READ, audiences=[AUD])
        assert unauthenticated.value.status == 401


async def test_revoked_task_stops_renewal(short: Service) -> None:
    agent = await short.agent()
    async with (
        KillSwitchClient(short.url, *agent) as client,
        client.task(grants=READ, audiences=[AUD]) as cred,
    ):
        await short.admin_post(
            "/v1/revocations",
            {"target": {"type": "task", "task_id": cred.task_id}, "reason": "rogue"},
        )
        await eventually(lambda: cred.closed is not None, within=6)
        assert cred.renewals == 0
    assert (await task_view(short, agent, cred.task_id))["status"] == "revoked"


async def test_auth_carries_the_current_credential_through_a_guard(
    short: Service, settings: Settings
) -> None:
    agent = await short.agent(grants=GRANTS)
    async with kafka_guard(short, settings, leeway=0) as guard:
        transport = httpx.ASGITransport(app=guarded_app(guard))
        async with (
            KillSwitchClient(short.url, *agent) as client,
            client.task(grants=GRANTS, audiences=[AUD]) as cred,
            httpx.AsyncClient(transport=transport, base_url=BASE, auth=cred.auth) as tools,
        ):
            first = cred.token
            r = await tools.get("/v1/invoices/42")
            assert r.status_code == 200, r.text
            assert r.json()["task"] == cred.task_id
            # After two renewals the first credential is long expired.
            await eventually(lambda: cred.renewals >= 2, within=8)
            stale = guard.check_sync(first, "GET", f"{BASE}/v1/invoices/42")
            assert stale.reason == "token expired"
            r = await tools.get("/v1/invoices/42")
            assert r.status_code == 200, r.text
            assert r.request.headers["authorization"] == f"Bearer {cred.token}"
