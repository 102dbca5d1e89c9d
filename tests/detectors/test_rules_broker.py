"""Every rule, positive and negative, over the real broker and the real service.

One detector, one broker and one service for the module; every test opens its own
agent and task, so tests never see each other's state. A negative case produces its
events, waits until the detector has committed past them (its actions are durable by
then), and asserts nothing was revoked or raised for the task.
"""

from __future__ import annotations

import time

import pytest
from aiokafka.structs import RecordMetadata

from detectors.consumer import Detector
from service.kernel.events import Decision, Severity, Source, TaskEventKind
from tests.detectors.rig import Rig, Task, wait_for

pytestmark = [pytest.mark.tansu, pytest.mark.asyncio(loop_scope="module")]


async def assert_revoked(rig: Rig, task: Task, rule: str) -> None:
    alert = await rig.alert(task, rule)
    assert alert.action == "revoke"
    assert alert.evidence["revocation"] in ("revoked", "existing"), alert.evidence
    revocations = await rig.revocations_of(task.task_id)
    assert len(revocations) == 1, revocations
    assert revocations[0]["reason"].startswith(f"{rule}: "), revocations[0]
    assert revocations[0]["source"] == "detector"
    assert await rig.task_status(task.task_id) == "revoked"


async def assert_untouched(rig: Rig, detector: Detector, task: Task, last: RecordMetadata) -> None:
    await rig.processed(detector, last)
    assert rig.alerts_of(task) == []
    assert await rig.revocations_of(task.task_id) == []
    assert await rig.task_status(task.task_id) == "active"


# --------------------------------------------------------------------------- scope


async def test_in_scope_use_is_left_alone(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task(grants=("call:tool/invoices.*",))
    await rig.known(detector, task)
    last = await rig.produce(
        rig.usage(task, resource="tool/invoices.read"),
        rig.usage(task, resource="tool/invoices.list"),
    )
    await assert_untouched(rig, detector, task, last)


async def test_out_of_scope_use_revokes_the_task(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task(grants=("call:tool/invoices.read",))
    await rig.known(detector, task)
    # The guard already denied it; the attempt is still the violation.
    await rig.produce(
        rig.usage(task),
        rig.usage(
            task, resource="tool/payments.send", decision=Decision.DENY, reason="out-of-scope"
        ),
        rig.usage(task, resource="tool/payments.refund"),
    )
    await assert_revoked(rig, task, "scope.out_of_scope")
    alert = await rig.alert(task, "scope.out_of_scope")
    assert alert.severity is Severity.HIGH
    assert alert.evidence["resource"] == "tool/payments.send"
    assert alert.evidence["grants"] == ["call:tool/invoices.read"]
    # One action per rule and task: the second violation raised nothing new.
    assert len([a for a in rig.alerts_of(task) if a.rule == "scope.out_of_scope"]) == 1


async def test_matching_audience_is_left_alone(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task()
    await rig.known(detector, task)
    last = await rig.produce(rig.usage(task), rig.usage(task))
    await assert_untouched(rig, detector, task, last)


async def test_audience_mismatch_revokes(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task()
    await rig.known(detector, task)
    await rig.produce(rig.usage(task, audience="https://payments.internal"))
    await assert_revoked(rig, task, "scope.audience_mismatch")


async def test_unknown_task_is_looked_up_on_the_service(rig: Rig, detector: Detector) -> None:
    """No TaskEvent at all: the detector asks GET /v1/tasks/{id} and still decides."""
    task = await rig.open_task(publish=False)
    await rig.produce(rig.usage(task, action="call", resource="tool/secrets.dump"))
    await assert_revoked(rig, task, "scope.out_of_scope")


# --------------------------------------------------------------------------- limits


async def test_calls_within_max_calls(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task(limits={"max_calls": 3})
    await rig.known(detector, task)
    # Denied calls are not uses of the budget.
    last = await rig.produce(
        *(rig.usage(task) for _ in range(3)),
        rig.usage(task, decision=Decision.DENY, reason="stale revocation feed"),
    )
    await assert_untouched(rig, detector, task, last)


async def test_calls_beyond_max_calls_revoke(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task(limits={"max_calls": 3})
    await rig.known(detector, task)
    await rig.produce(*(rig.usage(task) for _ in range(4)))
    await assert_revoked(rig, task, "limits.calls")
    alert = await rig.alert(task, "limits.calls")
    assert alert.evidence["calls"] == 4
    assert alert.evidence["max_calls"] == 3


async def test_bytes_within_max_bytes_out(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task(limits={"max_bytes_out": 1000})
    await rig.known(detector, task)
    last = await rig.produce(rig.usage(task, bytes_out=500), rig.usage(task, bytes_out=500))
    await assert_untouched(rig, detector, task, last)


async def test_bytes_beyond_max_bytes_out_revoke(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task(limits={"max_bytes_out": 1000})
    await rig.known(detector, task)
    await rig.produce(rig.usage(task, bytes_out=600), rig.usage(task, bytes_out=600))
    await assert_revoked(rig, task, "limits.bytes_out")
    alert = await rig.alert(task, "limits.bytes_out")
    assert alert.evidence["bytes_out"] == 1200


async def test_rate_within_max_rate(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task(limits={"max_rate": 5})
    await rig.known(detector, task)
    t0 = time.time()
    # 4 calls/s for 10 s (event time): under 5/s in every window.
    last = await rig.produce(*(rig.usage(task, at=t0 + i * 0.25) for i in range(40)))
    await assert_untouched(rig, detector, task, last)


async def test_rate_beyond_max_rate_revokes(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task(limits={"max_rate": 5})
    await rig.known(detector, task)
    t0 = time.time()
    await rig.produce(*(rig.usage(task, at=t0 + i * 0.02) for i in range(20)))
    await assert_revoked(rig, task, "limits.rate")
    alert = await rig.alert(task, "limits.rate")
    assert alert.evidence["window"] == "1s"


# --------------------------------------------------------------------------- lifecycle


async def test_use_before_the_end_is_fine(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task()
    await rig.known(detector, task)
    now = time.time()
    last = await rig.produce(rig.usage(task, at=now))
    await rig.publish_task(task, TaskEventKind.CLOSED, "completed", at=now + 60)
    await assert_untouched(rig, detector, task, last)


async def test_use_after_completion_alerts(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task()
    await rig.known(detector, task)
    closed_at = time.time()
    await rig.publish_task(task, TaskEventKind.CLOSED, "completed", at=closed_at)
    state = detector.store.tasks[task.task_id]
    await wait_for(lambda: state.ended_at is not None, what="the closed TaskEvent")
    # A replayed token, even one the guard denied: evidence of theft or a stale guard.
    await rig.produce(
        rig.usage(task, at=closed_at + 1, decision=Decision.DENY, reason="task completed")
    )
    alert = await rig.alert(task, "lifecycle.use_after_end")
    assert alert.action == "alert"
    assert alert.evidence["status"] == "completed"
    assert await rig.revocations_of(task.task_id) == []


async def test_use_after_revocation_event_and_after_deadline_alert(
    rig: Rig, detector: Detector
) -> None:
    revoked = await rig.open_task()
    expired = await rig.open_task(ttl=60)
    await rig.known(detector, revoked)
    await rig.known(detector, expired)
    at = time.time()
    await rig.publish_revocation(revoked, at=at)
    await wait_for(
        lambda: detector.store.tasks[revoked.task_id].ended_at is not None,
        what="the RevocationEvent",
    )
    await rig.produce(
        rig.usage(revoked, at=at + 0.5),
        rig.usage(expired, at=expired.deadline + 30),
    )
    assert (await rig.alert(revoked, "lifecycle.use_after_end")).evidence["status"] == "revoked"
    assert (await rig.alert(expired, "lifecycle.use_after_end")).evidence["status"] == "expired"


# --------------------------------------------------------------------------- identity


async def test_same_client_throughout_is_fine(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task()
    await rig.known(detector, task)
    same = Source(address="10.0.0.7", user_agent="agent-sdk/1.0", jkt="thumb-1")
    last = await rig.produce(
        rig.usage(task, source=same),
        rig.usage(task, source=same),
        # A guard that does not know the address is not a different client.
        rig.usage(task, source=Source(user_agent="agent-sdk/1.0", jkt="thumb-1")),
    )
    await assert_untouched(rig, detector, task, last)


async def test_second_client_revokes(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task()
    await rig.known(detector, task)
    await rig.produce(
        rig.usage(task, source=Source(address="10.0.0.7", user_agent="agent-sdk/1.0")),
        rig.usage(task, source=Source(address="203.0.113.9", user_agent="curl/8.5")),
    )
    await assert_revoked(rig, task, "identity.second_client")
    alert = await rig.alert(task, "identity.second_client")
    assert alert.severity is Severity.CRITICAL
    assert alert.evidence["differs"] == ["address", "user_agent"]
    assert alert.evidence["now"]["address"] == "203.0.113.9"


# --------------------------------------------------------------------------- probing


async def test_denied_requests_spread_out_are_fine(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task()
    await rig.known(detector, task)
    t0 = time.time()
    # 5 denials (the rig's burst) but over 20 s, wider than the 10 s window.
    last = await rig.produce(
        *(
            rig.usage(task, at=t0 + i * 5, decision=Decision.DENY, reason="token expired")
            for i in range(5)
        )
    )
    await assert_untouched(rig, detector, task, last)


async def test_denied_burst_alerts(rig: Rig, detector: Detector) -> None:
    task = await rig.open_task()
    await rig.known(detector, task)
    t0 = time.time()
    await rig.produce(
        *(
            rig.usage(task, at=t0 + i * 0.1, decision=Decision.DENY, reason="token expired")
            for i in range(5)
        )
    )
    alert = await rig.alert(task, "probing.denied_burst")
    assert alert.action == "alert"
    assert alert.evidence["denied"] == 5
    assert await rig.revocations_of(task.task_id) == []
