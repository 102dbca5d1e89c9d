"""Detector state without a broker: windows, bounds, rebalance, the health endpoint."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from detectors.metrics import DetectorMetrics, HealthServer
from detectors.rules import Thresholds, evaluate
from detectors.state import RateWindow, Store
from service.kernel.events import (
    Decision,
    RevocationEvent,
    Source,
    TaskEvent,
    TaskEventKind,
    UsageEvent,
)
from service.kernel.scopes import Limits, ScopeSpec

SCOPE = ScopeSpec(grants=("call:tool/a",), audiences=("aud",), limits=Limits(max_rate=2.0))


def opened(task_id: str, deadline: float = 2e9, at: float = 1.0) -> TaskEvent:
    return TaskEvent(
        event_id=f"e-{task_id}",
        at=at,
        kind=TaskEventKind.OPENED,
        task_id=task_id,
        agent_id="agent",
        status="active",
        scope=SCOPE,
        deadline=deadline,
    )


def use(task_id: str = "t1", at: float = 100.0, **kw: object) -> UsageEvent:
    values: dict[str, object] = {
        "event_id": f"u{at}",
        "at": at,
        "agent_id": "agent",
        "task_id": task_id,
        "jti_hash": "j1",
        "action": "call",
        "resource": "tool/a",
        "audience": "aud",
        "decision": Decision.ALLOW,
        "source": Source(address="10.0.0.1"),
    }
    values.update(kw)
    return UsageEvent(**values)  # type: ignore[arg-type]


def test_rate_window_slides() -> None:
    window = RateWindow()
    for i in range(10):
        window.add(100.0 + i * 0.05)
    assert window.last_second() == 10
    assert window.total == 10
    window.add(101.5)  # the first ten are now more than 1 s behind
    assert window.last_second() == 1
    assert window.total == 11
    window.add(112.0)  # everything is more than 10 s behind
    assert window.total == 1
    window.add(50.0)  # too old for the window: ignored
    assert window.total == 1


def test_rate_rule_uses_event_time() -> None:
    store = Store(denied_burst=5)
    store.apply_task_event(opened("t1"))
    t = Thresholds(rate_burst=2)
    found = []
    for i in range(5):  # 5 calls in 0.4 s > 2/s x 2
        task, agent = store.observe(use(at=100 + i * 0.1), 0, now=100)
        found += evaluate(use(at=100 + i * 0.1), task, agent, t)
    assert [f.rule.id for f in found] == ["limits.rate"]


def test_ended_tasks_are_evicted_after_the_grace_period() -> None:
    store = Store(denied_burst=5)
    store.apply_task_event(opened("alive"))
    store.apply_task_event(opened("expired", deadline=1000.0))
    store.apply_revocation(
        RevocationEvent(
            revocation_id="r",
            seq=1,
            at=1500.0,
            target="task",
            task_ids=["revoked"],
            reason="x",
            actor="a",
            source="analyst",
        )
    )
    store.observe(use("alive"), 0, now=100)
    assert store.sweep(1600.0, grace=600, max_tasks=100) == 0
    assert store.sweep(1700.0, grace=600, max_tasks=100) == 1  # expired at 1000
    assert set(store.tasks) == {"alive", "revoked"}
    assert store.sweep(2200.0, grace=600, max_tasks=100) == 1  # revoked at 1500
    assert set(store.tasks) == {"alive"}


def test_the_hard_cap_evicts_the_least_recently_seen() -> None:
    store = Store(denied_burst=5)
    for i in range(50):
        store.apply_task_event(opened(f"t{i}"))
        store.observe(use(f"t{i}"), i % 2, now=float(i))
    store.sweep(100.0, grace=600, max_tasks=40)
    assert len(store.tasks) <= 40
    assert "t49" in store.tasks
    assert "t0" not in store.tasks
    assert all(t in store.tasks for a in store.agents.values() for s in a.values() for t in s.tasks)


def test_a_rebalance_drops_only_the_moved_partitions_counters() -> None:
    store = Store(denied_burst=5)
    store.apply_task_event(opened("p0"))
    store.apply_task_event(opened("p1"))
    store.observe(use("p0"), 0, now=1)
    store.observe(use("p1", agent_id="other"), 1, now=1)
    store.drop_partitions({1})
    assert store.tasks["p0"].calls == 1
    assert store.tasks["p1"].calls == 0
    assert store.tasks["p1"].scope is not None
    assert 1 not in store.agents
    assert "agent" in store.agents[0]


def test_a_fact_never_reopens_an_ended_task() -> None:
    store = Store(denied_burst=5)
    store.apply_task_event(opened("t1"))
    store.apply_task_event(
        TaskEvent(
            event_id="c",
            at=50.0,
            kind=TaskEventKind.CLOSED,
            task_id="t1",
            agent_id="agent",
            status="completed",
        )
    )
    store.apply_task_event(opened("t1"))  # a late duplicate
    task = store.tasks["t1"]
    assert task.status == "completed"
    assert task.over_at(51.0, 0) == ("completed", 50.0)


def test_one_finding_per_rule_and_task() -> None:
    store = Store(denied_burst=5)
    store.apply_task_event(opened("t1"))
    t = Thresholds()
    rules = []
    for i in range(3):
        event = use(at=100 + i * 10, resource=f"tool/other{i}")
        task, agent = store.observe(event, 0, now=1)
        rules += [f.rule.id for f in evaluate(event, task, agent, t)]
    assert rules == ["scope.out_of_scope"]


@pytest.mark.asyncio
async def test_health_endpoint() -> None:
    metrics = DetectorMetrics()
    metrics.events.labels(outcome="decided").inc(3)
    state = {"ready": False}
    server = HealthServer(
        metrics, live=lambda: True, ready=lambda: state["ready"], host="127.0.0.1", port=0
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/livez")).status_code == 200
            assert (await client.get("/readyz")).status_code == 503
            state["ready"] = True
            assert (await client.get("/readyz")).status_code == 200
            body = (await client.get("/metrics")).text
            assert 'killswitch_detector_events_total{outcome="decided"} 3.0' in body
            assert (await client.get("/nope")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
        # A client that sends garbage and hangs up does not hurt the server.
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x00\xff garbage")
        writer.close()
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/livez")).status_code == 200
    finally:
        await server.close()
