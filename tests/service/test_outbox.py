"""The transactional outbox over a real broker (the embedded tansu): revocations and task
lifecycle events reach Kafka at once, and a service killed between the database write
and the publish publishes on restart."""

from __future__ import annotations

import asyncio
import base64
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from service.brokers import FAST_CONSUMER, free_port, start_tansu
from service.config import Settings
from service.kafka import consumer
from service.kernel.events import FeedCheckpoint, RevocationEvent, TaskEvent, decoder
from tests.support.harness import AUD
from tests.support.serve import Served, serve


def _settings(bootstrap: str) -> Settings:
    return Settings(kafka_bootstrap=bootstrap)


async def _read_all(bootstrap: str, topic: str, want: int, wait_s: float = 15) -> list[Any]:
    """Every event on ``topic`` from the beginning, until ``want`` arrived."""
    c = consumer(
        _settings(bootstrap),
        topic,
        client_id="test-reader",
        group_id=None,
        **{"fetch_max_wait_ms": FAST_CONSUMER["fetch_max_wait_ms"]},
    )
    await c.start()
    try:
        events: list[Any] = []
        deadline = time.monotonic() + wait_s
        while len(events) < want and time.monotonic() < deadline:
            batches = await c.getmany(timeout_ms=200)
            for records in batches.values():
                events.extend(decoder.decode(r.value) for r in records)
        return events
    finally:
        await c.stop()


def _setup(s: Served) -> tuple[dict[str, str], str]:
    agent_id = f"a-{secrets.token_hex(3)}"
    with s.client(s.admin_token) as c:
        r = c.post(
            "/v1/agents",
            json={"id": agent_id, "ceiling": {"grants": ["call:tool/*"], "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        secret = r.json()["client_secret"]
        r = c.post("/v1/operators", json={"name": f"an-{secrets.token_hex(3)}", "role": "analyst"})
        analyst = r.json()["token"]
    auth = {"Authorization": "Basic " + base64.b64encode(f"{agent_id}:{secret}".encode()).decode()}
    return auth, analyst


def _open_and_revoke(s: Served, auth: dict[str, str], analyst: str) -> tuple[str, int]:
    with httpx.Client(base_url=s.url, timeout=10) as c:
        r = c.post(
            "/v1/tasks",
            headers=auth,
            json={"scope": {"grants": ["call:tool/x"], "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        task_id = r.json()["task"]["id"]
        r = c.post(
            "/v1/revocations",
            headers={"Authorization": f"Bearer {analyst}"},
            json={"target": {"type": "task", "task_id": task_id}, "reason": "outbox"},
        )
        assert r.status_code == 201, r.text
        return task_id, r.json()["seq"]


def test_revocations_and_task_events_reach_kafka(tmp_path: Path, database_url: str) -> None:
    with (
        start_tansu() as broker,
        serve(
            tmp_path / "data",
            database_url,
            admin_token="kso_" + secrets.token_urlsafe(32),
            env={"KS_KAFKA_BOOTSTRAP": broker.bootstrap},
        ) as s,
    ):
        auth, analyst = _setup(s)
        task_id, seq = _open_and_revoke(s, auth, analyst)
        records = asyncio.run(_read_all(broker.bootstrap, "killswitch.revocations.v1", 2))
        # The service vouched for the new, empty topic before anything else reached it.
        assert isinstance(records[0], FeedCheckpoint)
        assert records[0].republished == 0
        assert [(type(e), e.seq, e.target, e.task_ids) for e in records[1:]] == [
            (RevocationEvent, seq, "task", [task_id])
        ]
        tasks = asyncio.run(_read_all(broker.bootstrap, "killswitch.tasks.v1", 2))
        assert sorted((e.kind.value, e.task_id, e.status) for e in tasks) == [
            ("closed", task_id, "revoked"),
            ("opened", task_id, "active"),
        ]
        opened = next(e for e in tasks if e.kind.value == "opened")
        assert isinstance(opened, TaskEvent)
        assert opened.scope is not None
        assert opened.scope.grants == ("call:tool/x",)


def test_a_revocation_committed_before_a_crash_is_published_on_restart(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"  # nothing listens yet: the relay cannot publish
    token = "kso_" + secrets.token_urlsafe(32)
    data = tmp_path / "data"
    with serve(data, database_url, admin_token=token, env={"KS_KAFKA_BOOTSTRAP": bootstrap}) as s:
        auth, analyst = _setup(s)
        task_id, seq = _open_and_revoke(s, auth, analyst)
        s.process.send_signal(signal.SIGKILL)  # crash: committed, never published
        s.process.wait(timeout=10)
    with (
        start_tansu(port=port) as broker,
        serve(data, database_url, admin_token=token, env={"KS_KAFKA_BOOTSTRAP": bootstrap}),
    ):
        records = asyncio.run(_read_all(broker.bootstrap, "killswitch.revocations.v1", 3))
        # Rebuilt from the database (the topic was new), then the outbox row sent again.
        revocations = [(e.seq, e.task_ids) for e in records if isinstance(e, RevocationEvent)]
        assert revocations == [(seq, [task_id])] * 2
        assert sum(isinstance(e, FeedCheckpoint) for e in records) == 1
