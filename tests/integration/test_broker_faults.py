"""The kill switch across broker faults, on the embedded tansu and on Apache Kafka.

Each scenario runs the real service (``killswitch serve`` with Kafka) and real guards
(``KafkaRevocationFeed``), revokes half of a set of tasks, then breaks the broker:

* ``tansu-restart``     tansu killed and restarted on the same port: an empty log;
* ``apache-restart``    Apache Kafka stopped and started on its data directory;
* ``apache-recreated``  the revocation topic deleted under everyone (and recreated).

Then it revokes the other half, and checks what must hold whatever happened to the log:
the guard that was running before the fault denies every revoked token (never allows one
after its revocation committed), a guard started after the fault does too, no revocation
is lost, and a task opened after the fault still works. Each guard is ready again only
after the service rebuilt the topic and the guard replayed it.

``killswitch up`` is covered too: a full restart on the same data directory, and the
embedded broker dying under a running stack (its supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from service import kafka
from service.brokers import BrokerProcess, free_port, start_apache_kafka, start_tansu
from service.config import Settings
from service.sdk import Guard, KafkaRevocationFeed, Outcome
from service.stack import up
from tests.support.serve import serve

AUD = "https://tools.faults.test"
TOOL = "tool/invoices.read"
TASKS = 40
FAST = {"KS_KAFKA_SESSION_TIMEOUT_MS": "1000", "KS_KAFKA_HEARTBEAT_INTERVAL_MS": "250"}


class Broker:
    """One broker that can be broken in the scenario's way, on a fixed port."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self.work = work
        self.port = free_port()
        self.process: BrokerProcess = self._start()

    def _start(self) -> BrokerProcess:
        if self.kind == "tansu":
            return start_tansu(port=self.port)
        return start_apache_kafka(port=self.port, work_dir=self.work / "kafka")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart(self, *, kill: bool) -> None:
        if kill:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.proc.wait(10)
        self.process.stop()
        self.process = self._start()

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(
    params=[
        pytest.param("tansu-restart", marks=pytest.mark.tansu),
        pytest.param("apache-restart", marks=pytest.mark.kafka_apache),
        pytest.param("apache-recreated", marks=pytest.mark.kafka_apache),
    ]
)
def fault(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker(fault: str, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(fault.split("-")[0], tmp_path)
    try:
        yield b
    finally:
        b.stop()


def _agent(url: str, admin: str) -> dict[str, str]:
    agent_id = f"a-{secrets.token_hex(3)}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as c:
        r = c.post(
            "/v1/agents",
            json={"id": agent_id, "ceiling": {"grants": ["call:tool/*"], "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        secret = r.json()["client_secret"]
    basic = base64.b64encode(f"{agent_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {basic}"}


def _open(url: str, auth: dict[str, str], n: int) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=10) as c:
        issued = []
        for _ in range(n):
            r = c.post(
                "/v1/tasks",
                headers=auth,
                json={"scope": {"grants": [f"call:{TOOL}"], "audiences": [AUD]}, "ttl": 600},
            )
            assert r.status_code == 201, r.text
            issued.append(r.json())
        return issued


def _revoke(url: str, admin: str, tasks: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        for t in tasks:
            r = c.post(
                "/v1/revocations",
                headers={"Authorization": f"Bearer {admin}"},
                json={"target": {"type": "task", "task_id": t["task"]["id"]}, "reason": "fault"},
            )
            assert r.status_code == 201, r.text


def _guard(url: str, bootstrap: str) -> Guard:
    settings = Settings(kafka_bootstrap=bootstrap, kafka_fetch_max_wait_ms=50)
    return Guard(url, AUD, KafkaRevocationFeed(settings), max_staleness=2.0)


async def _ready(guard: Guard, within: float = 60) -> None:
    async with asyncio.timeout(within):
        await guard.wait_ready()


def _denied_as_revoked(guard: Guard, tasks: list[dict[str, Any]]) -> list[str]:
    """Tokens the guard does not deny as revoked (empty when all are)."""
    bad = []
    for t in tasks:
        v = guard.check_sync(t["access_token"], "call", TOOL)
        if v.outcome is not Outcome.REVOKED:
            bad.append(f"{t['task']['id']}: {v.outcome.value} ({v.reason})")
    return bad


async def _eventually_revoked(
    guard: Guard, tasks: list[dict[str, Any]], within: float = 20
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _denied_as_revoked(guard, tasks):
            return
        await asyncio.sleep(0.05)
    assert _denied_as_revoked(guard, tasks) == []


async def _break(fault: str, broker: Broker) -> None:
    # In a thread: the guards' event loop keeps running while the broker is away, as it
    # would in a real resource server (aiokafka then sees the connection drop).
    if fault == "tansu-restart":
        await asyncio.to_thread(broker.restart, kill=True)
    elif fault == "apache-restart":
        await asyncio.to_thread(broker.restart, kill=False)
    else:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([Settings().kafka_revocations_topic])
        finally:
            await admin.close()


async def test_no_revocation_is_lost_and_no_guard_fails_open(
    fault: str, broker: Broker, tmp_path: Path
) -> None:
    admin = "kso_" + secrets.token_urlsafe(32)
    env = {"KS_KAFKA_BOOTSTRAP": broker.bootstrap, **FAST}
    with serve(
        tmp_path / "data", f"sqlite:///{tmp_path / 'ks.db'}", admin_token=admin, env=env
    ) as s:
        auth = _agent(s.url, admin)
        tasks = await asyncio.to_thread(_open, s.url, auth, TASKS)
        before, after = tasks[: TASKS // 2], tasks[TASKS // 2 :]
        running = _guard(s.url, broker.bootstrap)
        await running.start()
        try:
            await _ready(running)
            assert all(running.check_sync(t["access_token"], "call", TOOL).allowed for t in tasks)
            await asyncio.to_thread(_revoke, s.url, admin, before)
            await _eventually_revoked(running, before)

            await _break(fault, broker)
            await asyncio.to_thread(_revoke, s.url, admin, after)
            # Every revoked token ends up denied *as revoked* (the guard ready again), and
            # once the guard has denied a token as revoked it never allows it again — not
            # while it notices the reset, not while it replays. (A token denied only as
            # "feed not ready" may be allowed once the guard is ready again until its
            # revocation, committed while the broker was away, has been relayed: that is
            # propagation delay, not a forgotten revocation.)
            denied: set[str] = set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                verdicts = {
                    t["jti"]: running.check_sync(t["access_token"], "call", TOOL) for t in tasks
                }
                flipped = [jti for jti in denied if verdicts[jti].allowed]
                assert not flipped, f"allowed again after a denial: {flipped}"
                denied |= {jti for jti, v in verdicts.items() if v.outcome is Outcome.REVOKED}
                if all(v.outcome is Outcome.REVOKED for v in verdicts.values()):
                    break
                await asyncio.sleep(0.02)
            assert _denied_as_revoked(running, tasks) == []
            if fault != "apache-restart":
                feed = running.feed
                assert isinstance(feed, KafkaRevocationFeed)
                # The log under the guard changed; it noticed and replayed before allowing.
                assert feed.resets + feed.errors >= 1

            fresh = _guard(s.url, broker.bootstrap)
            await fresh.start()
            try:
                await _ready(fresh)
                assert _denied_as_revoked(fresh, tasks) == []
                new = (await asyncio.to_thread(_open, s.url, auth, 1))[0]
                for guard in (running, fresh):
                    assert guard.check_sync(new["access_token"], "call", TOOL).allowed
            finally:
                await fresh.stop()
        finally:
            await running.stop()


def _up(data: Path) -> AbstractContextManager[Any]:
    return up(data, settings_env=FAST, progress=False)


async def _fresh_guard_denies(url: str, bootstrap: str, tasks: list[dict[str, Any]]) -> None:
    guard = _guard(url, bootstrap)
    await guard.start()
    try:
        await _ready(guard)
        assert _denied_as_revoked(guard, tasks) == []
    finally:
        await guard.stop()


@pytest.mark.tansu
def test_fresh_guard_after_a_full_up_restart_enforces_every_earlier_revocation(
    tmp_path: Path,
) -> None:
    data = tmp_path / "ks"
    with _up(data) as stack:
        auth = _agent(stack.url, stack.admin_token)
        tasks = _open(stack.url, auth, TASKS)
        _revoke(stack.url, stack.admin_token, tasks)
    with _up(data) as stack:  # a new, empty tansu; the same database
        asyncio.run(_fresh_guard_denies(stack.url, stack.kafka_bootstrap, tasks))


@pytest.mark.tansu
def test_up_restarts_its_broker_and_guards_replay_the_rebuilt_topic(tmp_path: Path) -> None:
    data = tmp_path / "ks"
    with _up(data) as stack:
        supervisor = stack.supervisor
        assert supervisor is not None
        auth = _agent(stack.url, stack.admin_token)
        tasks = _open(stack.url, auth, 10)
        _revoke(stack.url, stack.admin_token, tasks[:5])

        async def scenario() -> None:
            running = _guard(stack.url, stack.kafka_bootstrap)
            await running.start()
            try:
                await _ready(running)
                os.kill(supervisor.broker.pid, signal.SIGKILL)
                await asyncio.to_thread(_revoke, stack.url, stack.admin_token, tasks[5:])
                await _eventually_revoked(running, tasks, within=60)
                assert supervisor.restarts == 1
                await _fresh_guard_denies(stack.url, stack.kafka_bootstrap, tasks)
            finally:
                await running.stop()

        asyncio.run(scenario())


@pytest.mark.tansu
async def test_topic_checkpoint_is_written_once_for_a_whole_topic(tmp_path: Path) -> None:
    """A service restart on a topic that is still whole does not rebuild it again."""
    with start_tansu() as b:
        admin = "kso_" + secrets.token_urlsafe(32)
        env = {"KS_KAFKA_BOOTSTRAP": b.bootstrap, **FAST}
        db = f"sqlite:///{tmp_path / 'ks.db'}"
        for _ in range(2):
            with serve(tmp_path / "data", db, admin_token=admin, env=env):
                await asyncio.sleep(0.5)
        settings = Settings(kafka_bootstrap=b.bootstrap)
        consumer = kafka.consumer(settings, client_id="t", group_id=None)
        await consumer.start()
        try:
            tp = TopicPartition(settings.kafka_revocations_topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            batch = await consumer.getmany(tp, timeout_ms=2000)
            records = batch.get(tp, [])
        finally:
            await consumer.stop()
        assert [r.key for r in records] == [b"checkpoint"]
