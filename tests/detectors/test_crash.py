"""Crash safety: ``python -m detectors`` is SIGKILLed after it revoked for a violating
event but before it committed the offset. The restarted detector gets the event again
and acts on it again, and thanks to the idempotency key the service still holds exactly
one revocation: the violation is acted on exactly once in effect."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.brokers import free_port
from service.kernel.events import Decision
from tests.detectors.rig import Rig, wait_for
from tests.support.serve import clean_env

pytestmark = [pytest.mark.tansu, pytest.mark.asyncio(loop_scope="module")]


@contextmanager
def detector_process(
    rig: Rig, log: Path, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    s = rig.settings
    port = free_port()
    variables = {
        "KS_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "KS_KAFKA_USAGE_TOPIC": s.kafka_usage_topic,
        "KS_KAFKA_TASKS_TOPIC": s.kafka_tasks_topic,
        "KS_KAFKA_REVOCATIONS_TOPIC": s.kafka_revocations_topic,
        "KS_KAFKA_ALERTS_TOPIC": s.kafka_alerts_topic,
        "KS_KAFKA_DLQ_TOPIC": s.kafka_dlq_topic,
        "KS_KAFKA_PARTITIONS": str(s.kafka_partitions),
        "KS_KAFKA_FETCH_MAX_WAIT_MS": str(s.kafka_fetch_max_wait_ms),
        "KS_KAFKA_SESSION_TIMEOUT_MS": str(s.kafka_session_timeout_ms),
        "KS_KAFKA_HEARTBEAT_INTERVAL_MS": str(s.kafka_heartbeat_interval_ms),
        "KS_DETECTOR_GROUP_ID": s.detector_group_id,
        "KS_DETECTOR_METRICS_PORT": str(port),
        "KS_URL": rig.service_url,
        "KS_TOKEN": rig.detector_token,
        **env,
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "detectors"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=clean_env(variables),
        )
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    async with httpx.AsyncClient(timeout=1) as client:

        async def probe() -> bool:
            assert process.poll() is None, log.read_text()  # noqa: ASYNC240
            try:
                return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        for _ in range(600):
            if await probe():
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"detector not ready\n{log.read_text()}")  # noqa: ASYNC240


async def test_sigkill_before_commit_acts_exactly_once_in_effect(rig: Rig, tmp_path: Path) -> None:
    log = tmp_path / "detector.log"
    task = await rig.open_task(grants=("call:tool/invoices.read",))
    violation = rig.usage(
        task, resource="tool/payments.send", decision=Decision.DENY, reason="out-of-scope"
    )

    with detector_process(rig, log, KS_DETECTOR_TEST_PAUSE_BEFORE_COMMIT_MS="60000") as (
        first,
        port,
    ):
        await ready(first, port, log)
        await rig.produce(violation)
        # Revoked and alerted (both durable), now sleeping before the commit: kill it.
        await wait_for(lambda: rig.alerts_of(task), what="the first alert", within=20)
        assert len(await rig.revocations_of(task.task_id)) == 1
        assert "pausing" in log.read_text()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    [alert] = rig.alerts_of(task)
    assert alert.evidence["revocation"] == "revoked"

    with detector_process(rig, log) as (second, port):
        await ready(second, port, log)
        # The uncommitted event comes back and is acted on again ...
        await wait_for(lambda: len(rig.alerts_of(task)) >= 2, what="the redelivery", within=30)
        again = rig.alerts_of(task)[1]
        assert again.alert_id == alert.alert_id  # same alert: consumers can drop it
        assert again.evidence["revocation"] == "existing"
        assert again.evidence["revocation_id"] == alert.evidence["revocation_id"]
        # ... and the service still holds exactly one revocation.
        revocations = await rig.revocations_of(task.task_id)
        assert len(revocations) == 1
        assert revocations[0]["reason"].startswith("scope.out_of_scope: ")
        assert await rig.task_status(task.task_id) == "revoked"
        # A graceful stop commits and exits 0.
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0, log.read_text()

    # Committed for good: a third detector has nothing left to redeliver. (It learns of
    # the revocation from the revocations topic, as the service's outbox publishes it.)
    revoked_at = float(revocations[0]["created_at"])
    await rig.publish_revocation(task, at=revoked_at)
    with detector_process(rig, log) as (third, port):
        await ready(third, port, log)
        marker = await rig.produce(rig.usage(task, at=revoked_at + 1))
        await wait_for(
            lambda: any(a.rule == "lifecycle.use_after_end" for a in rig.alerts_of(task)) or None,
            what="the marker to be decided",
            within=30,
        )
        assert marker is not None
        assert len([a for a in rig.alerts_of(task) if a.rule == "scope.out_of_scope"]) == 2
        third.send_signal(signal.SIGTERM)
        assert third.wait(timeout=20) == 0, log.read_text()
