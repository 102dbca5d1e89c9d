"""The console in a real headless Chromium against a real ``killswitch serve`` with Kafka.

An alert produced to the alerts topic (as the detector produces it) is ingested by the
service and appears in the open alert page without a reload; the analyst opens its task,
revokes it with a reason through the confirmation page, and finds the revocation in the
audit log (and exports it as CSV). The improved pages are checked as an analyst reads
them: the alert's summary in its own column and its evidence as an expandable panel in
local time, the chart moving with the table on the same SSE event, the task page naming
who revoked it with its history, and every page fitting a 390 px wide phone. Then a
guard (the SDK, fed from the Kafka revocation topic) and introspection both say the
task's credential is dead.

With ``KS_WRITE_SCREENSHOTS=1`` the main views are written to docs/screenshots/.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import kafka
from service.brokers import BrokerProcess, start_tansu
from service.config import Settings
from service.console.pages import USAGE_UNAVAILABLE
from service.kernel.events import AlertEvent, Severity, Source, encoder
from service.sdk import Guard, KafkaRevocationFeed, UsageEmitter
from tests.support.serve import Served, serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]

AUD = "https://tools.console.test"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
FAST = {
    "KS_KAFKA_SESSION_TIMEOUT_MS": "1000",
    "KS_KAFKA_HEARTBEAT_INTERVAL_MS": "250",
}
WAIT_MS = 20_000


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    with start_tansu() as running:
        yield running


@pytest.fixture
def server(broker: BrokerProcess, tmp_path: Path) -> Iterator[Served]:
    settings = Settings(kafka_bootstrap=broker.bootstrap)
    asyncio.run(kafka.ensure_topics(settings))
    with serve(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'data' / 'killswitch.db'}",
        admin_token="kso_" + secrets.token_urlsafe(32),
        env={"KS_KAFKA_BOOTSTRAP": broker.bootstrap, **FAST},
    ) as served:
        yield served


def _setup(s: Served) -> dict[str, Any]:
    """An analyst, two agents and their tasks, as an operator would make them."""
    with s.client(s.admin_token) as api:
        r = api.post("/v1/operators", json={"name": "ana", "role": "analyst"})
        assert r.status_code == 201, r.text
        analyst = r.json()["token"]
        tasks: dict[str, tuple[str, str]] = {}
        for agent_id, grants in [
            ("billing-agent", ["call:tool/invoices.*", "GET:https://api.internal/v1/**"]),
            ("research-agent", ["call:tool/search.*"]),
        ]:
            r = api.post(
                "/v1/agents",
                json={"id": agent_id, "ceiling": {"grants": grants, "audiences": [AUD]}},
            )
            assert r.status_code == 201, r.text
            basic = base64.b64encode(f"{agent_id}:{r.json()['client_secret']}".encode()).decode()
            with httpx.Client(base_url=s.url, timeout=10) as agent:
                r = agent.post(
                    "/v1/tasks",
                    headers={"Authorization": f"Basic {basic}"},
                    json={
                        "scope": {
                            "grants": grants[:1],
                            "audiences": [AUD],
                            "limits": {"max_calls": 500},
                        },
                        "ttl": 600,
                        "purpose": f"nightly {agent_id.split('-')[0]} run",
                    },
                )
                assert r.status_code == 201, r.text
                tasks[agent_id] = (r.json()["task"]["id"], r.json()["access_token"])
    return {"analyst": analyst, "tasks": tasks}


def _alert(agent_id: str, task_id: str, rule: str, severity: Severity, **evidence: Any) -> bytes:
    event = AlertEvent(
        alert_id=f"{rule}:{task_id}:{secrets.token_hex(4)}",
        at=time.time(),
        rule=rule,
        severity=severity,
        agent_id=agent_id,
        task_id=task_id,
        score=evidence.pop("score", None),
        evidence=evidence,
        action="alert",
    )
    return encoder.encode(event)


async def _produce(bootstrap: str, records: list[tuple[str, bytes]]) -> None:
    settings = Settings(kafka_bootstrap=bootstrap)
    producer = kafka.producer(settings, "console-browser-test")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.kafka_alerts_topic, value, key=key.encode())
    finally:
        await producer.stop()


async def _shot(page: Any, name: str) -> None:
    if os.environ.get("KS_WRITE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def test_an_analyst_sees_an_alert_live_and_revokes_its_task(
    server: Served, broker: BrokerProcess, browser: Any
) -> None:
    world = _setup(server)
    billing_task, billing_token = world["tasks"]["billing-agent"]
    research_task, _ = world["tasks"]["research-agent"]
    # Some history, so the feed and chart are not empty when the page opens.
    await _produce(
        broker.bootstrap,
        [
            (
                "research-agent",
                _alert(
                    "research-agent",
                    research_task,
                    "limits.rate_exceeded",
                    Severity.MEDIUM,
                    summary="14.2 calls/s over max_rate 10",
                    calls=142,
                ),
            ),
            (
                "research-agent",
                _alert(
                    "research-agent",
                    research_task,
                    "model.isolation_forest",
                    Severity.LOW,
                    summary="unusual call mix",
                    score=0.61,
                ),
            ),
        ],
    )

    # The billing agent works through a real guard, which reports each check on the usage
    # topic: three calls in scope, one outside it. The task page shows what it reported.
    usage_settings = Settings(kafka_bootstrap=broker.bootstrap, **_fast())
    async with Guard(
        issuer=server.url,
        audience=AUD,
        feed=KafkaRevocationFeed(usage_settings),
        usage=UsageEmitter(usage_settings),
    ) as worker:
        await asyncio.wait_for(worker.wait_ready(), timeout=30)
        for tool in ("invoices.read", "invoices.read", "invoices.list", "payments.send"):
            await worker.check(
                billing_token,
                "call",
                f"tool/{tool}",
                source=Source(address="10.1.2.3", user_agent="billing-agent/2.4"),
            )
        assert worker.usage is not None
        await worker.usage.flush()

    # A zone away from UTC, so local times are visibly local.
    context = await browser.new_context(
        viewport={"width": 1360, "height": 900}, timezone_id="Europe/Berlin"
    )
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)

    # Sign in.
    await page.goto(f"{server.url}/console/alerts")
    assert "/console/login" in page.url
    await page.fill("#token", world["analyst"])
    await page.click("button[type=submit]")
    await page.wait_for_url("**/console/alerts")
    await page.wait_for_selector("#live.on", timeout=WAIT_MS)
    await page.wait_for_selector("tr[data-severity=medium]", timeout=WAIT_MS)
    await page.evaluate("window.__notReloaded = true")
    await page.wait_for_function(
        "document.getElementById('chart-totals').textContent.startsWith('2 alert(s)')",
        timeout=WAIT_MS,
    )

    # An alert is produced to Kafka and appears without a reload.
    await _produce(
        broker.bootstrap,
        [
            (
                "billing-agent",
                _alert(
                    "billing-agent",
                    billing_task,
                    "scope.out_of_scope",
                    Severity.CRITICAL,
                    summary="call:tool/payments.send is outside the declared scope",
                    action="call",
                    resource="tool/payments.send",
                    event_at=time.time() - 1.5,
                ),
            )
        ],
    )
    row = page.locator(f"#alerts tbody tr:has(a[href='/console/tasks/{billing_task}'])")
    await row.wait_for(timeout=WAIT_MS)
    assert await page.evaluate("window.__notReloaded === true")
    assert await row.get_attribute("data-severity") == "critical"
    # The chart moved with the table, on the same event (no timer in between).
    totals = await page.inner_text("#chart-totals")
    assert totals.startswith("3 alert(s)"), totals
    summary = await row.locator("td.summary").inner_text()
    assert summary == "call:tool/payments.send is outside the declared scope"
    # Evidence is a closed panel of facts; opened, it reads in words and local time.
    facts = row.locator("details.evidence")
    assert await facts.locator("dl").is_hidden()
    await facts.locator("summary").click()
    assert await facts.locator("dt", has_text="offending use at").is_visible()
    assert await facts.locator("dt", has_text="resource").is_visible()
    when = await facts.locator("time").inner_text()
    assert when.endswith("\u00a0UTC+1"), when  # Europe/Berlin in December
    # The client-side filter hides what is below the chosen severity.
    await page.select_option("#f-severity", "high")
    assert await page.locator("tr[data-severity=medium]").is_hidden()
    assert await row.is_visible()
    await page.select_option("#f-severity", "low")
    await page.wait_for_function(
        "document.querySelectorAll('#chart rect.bar-alerts').length > 0", timeout=WAIT_MS
    )
    await _shot(page, "alerts")

    # Open its task, revoke it with a reason, confirm on the second page.
    await row.locator(f"a[href='/console/tasks/{billing_task}']").click()
    await page.wait_for_url(f"**/console/tasks/{billing_task}")
    for _ in range(100):  # the service folds the usage topic in the background
        if await page.locator("[data-testid=usage-calls]").count():
            break
        await asyncio.sleep(0.1)
        await page.reload()
    usage = await page.inner_text("[data-testid=usage]")
    assert USAGE_UNAVAILABLE not in usage
    assert await page.inner_text("[data-testid=usage-calls]") == "4"
    assert (await page.inner_text("[data-testid=usage-denied]")).startswith("1 (out of scope")
    assert "call tool/invoices.read × 2" in usage
    assert "address 10.1.2.3 × 4" in usage
    await page.fill("#reason-task", "exfiltration attempt: payments.send outside scope")
    await page.click("form.revoke-form button[type=submit]")
    await page.wait_for_url("**/console/revoke")
    assert "Confirm: revoke task" in await page.inner_text("h1")
    await page.check("#confirm")
    await page.click("#confirm-revoke")
    await page.wait_for_url(f"**/console/tasks/{billing_task}")
    assert "Revoked task" in await page.inner_text(".flash.ok")
    assert "revoked" in await page.inner_text("h1")
    ended = await page.inner_text("[data-testid=ended]")
    assert "Revoked by" in ended
    assert "operator:ana" in ended
    assert "exfiltration attempt" in ended
    history = await page.inner_text("#history")
    for event in ("task opened", "credential issued", "alert (critical)", "revoked"):
        assert event in history, event
    await _shot(page, "task")

    # The revocation is in the audit log.
    await page.click("nav >> text=Audit log")
    await page.wait_for_url("**/console/audit")
    entry = page.locator(f"#audit tr[data-subject='task:{billing_task}']")
    assert await entry.count() == 1
    text = await entry.inner_text()
    assert "operator:ana" in text
    assert "exfiltration attempt" in text
    await _shot(page, "audit")
    # The export link streams the same log as CSV with the session cookie.
    href = await page.get_attribute("[data-testid=export-csv]", "href")
    assert href == "/console/audit/export.csv"
    exported = await page.request.get(f"{server.url}{href}")
    assert exported.status == 200
    assert exported.headers["content-type"].startswith("text/csv")
    assert f"task:{billing_task}" in await exported.text()

    await page.goto(f"{server.url}/console/agents/billing-agent")
    assert "Revocations" in await page.inner_text("main")
    await _shot(page, "agent")

    # A phone: nothing scrolls sideways but a wide table inside its own box.
    await page.set_viewport_size({"width": 390, "height": 844})
    for path in (
        "/console/alerts",
        f"/console/tasks/{billing_task}",
        "/console/agents/billing-agent",
        "/console/audit",
        "/console/tasks",
    ):
        await page.goto(f"{server.url}{path}")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)
        if path == "/console/alerts":
            await page.wait_for_selector("#live.on", timeout=WAIT_MS)
            await _shot(page, "alerts-mobile")
    assert not errors, errors
    await context.close()

    # The kill is enforced: a guard fed from Kafka denies the token; introspection agrees.
    settings = Settings(kafka_bootstrap=broker.bootstrap, **_fast())
    guard = Guard(issuer=server.url, audience=AUD, feed=KafkaRevocationFeed(settings))
    await guard.start()
    try:
        await asyncio.wait_for(guard.wait_ready(), timeout=30)
        verdict = await guard.check(billing_token, "call", "tool/invoices.read", emit=False)
    finally:
        await guard.stop()
    assert not verdict.allowed
    assert verdict.outcome == "revoked", verdict
    with server.client(server.admin_token) as api:
        r = api.post("/oauth2/introspect", data={"token": billing_token})
        assert r.status_code == 200, r.text
        assert r.json() == {"active": False}


def _fast() -> dict[str, Any]:
    return {"kafka_session_timeout_ms": 1000, "kafka_heartbeat_interval_ms": 250}
