"""GuardMiddleware in front of a real litestar app (litestar's AsyncTestClient), with a
real guard: tokens from ``killswitch serve``, revocations and usage over tansu."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar import Litestar, Request, get, post
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.kernel.events import Decision
from service.kernel.tokens import jti_hash
from service.sdk import Guard, GuardMiddleware
from tests.sdk.conftest import Service, eventually, kafka_guard, publish, revocation
from tests.sdk.test_usage import consume_all

BASE = "http://tools.local"
GRANTS = (f"GET:{BASE}/v1/**",)


@get("/v1/invoices/42")
async def read_invoice(request: Request[Any, Any, Any]) -> dict[str, Any]:
    claims = request.scope["state"]["killswitch"]
    return {"id": "42", "task": claims["task"]["id"], "padding": "x" * 1000}


@post("/v1/invoices")
async def create_invoice() -> dict[str, str]:
    return {"created": "yes"}


@get("/healthz")
async def healthz() -> str:
    return "ok"


def guarded_app(guard: Guard) -> Litestar:
    return Litestar(
        [read_invoice, create_invoice, healthz],
        middleware=[lambda app: GuardMiddleware(app, guard, skip_paths={"/healthz"})],
    )


@pytest.fixture
async def guard(service: Service, settings: Settings) -> AsyncIterator[Guard]:
    async with kafka_guard(service, settings, usage=True) as g:
        yield g


async def test_middleware_allows_denies_and_reports(
    service: Service, settings: Settings, guard: Guard
) -> None:
    issued = await service.open_task(grants=GRANTS)
    token = issued["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    async with AsyncTestClient(guarded_app(guard), base_url=BASE) as client:
        r = await client.get("/v1/invoices/42", headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["task"] == issued["task"]["id"]  # claims reached the handler
        ok_bytes = len(r.content)

        r = await client.get("/v1/invoices/42")
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["www-authenticate"] == 'Bearer realm="killswitch"'
        assert r.json()["detail"] == "missing token"

        r = await client.get("/v1/invoices/42", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]

        r = await client.post("/v1/invoices", headers=auth)  # POST is not granted
        assert r.status_code == 403
        problem = r.json()
        assert problem["status"] == 403
        assert problem["type"].startswith("urn:killswitch:problem:")
        assert "outside the scope" in problem["detail"]
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]

        r = await client.get("/v1/invoices/../../admin", headers=auth)
        assert r.status_code in (403, 404)  # never 200

        r = await client.get("/healthz")
        assert r.status_code == 200  # skipped

        await publish(settings, revocation("credential", jti_hash=jti_hash(issued["jti"])))

        async def refused() -> bool:
            return (await client.get("/v1/invoices/42", headers=auth)).status_code != 200

        await eventually(refused)
        r = await client.get("/v1/invoices/42", headers=auth)
        assert r.status_code == 403
        assert r.json()["detail"] == "credential revoked"
        assert 'error="invalid_token"' in r.headers["www-authenticate"]

    assert guard.usage is not None
    await guard.usage.flush()
    events = [e for _, e in await consume_all(settings, 5)]
    mine = [e for e in events if e.task_id == issued["task"]["id"]]
    allowed = [e for e in mine if e.decision is Decision.ALLOW]
    assert allowed
    assert allowed[0].bytes_out == ok_bytes  # response body bytes counted
    assert allowed[0].resource == f"{BASE}/v1/invoices/42"
    assert allowed[0].action == "GET"
    assert allowed[0].source.address is not None
    assert any(e.reason == "credential revoked" for e in mine)
    assert any(e.agent_id == "-" and e.reason == "missing token" for e in events)
    assert not any(e.resource.endswith("/healthz") for e in events)


async def test_stale_feed_answers_503(service: Service, settings: Settings, guard: Guard) -> None:
    token = (await service.open_task(grants=GRANTS))["access_token"]
    guard.max_staleness = -1.0  # any silence at all is too long
    async with AsyncTestClient(guarded_app(guard), base_url=BASE) as client:
        r = await client.get("/v1/invoices/42", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["detail"] == "revocation feed stale"
