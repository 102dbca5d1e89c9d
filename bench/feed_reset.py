"""A broker reset under a running guard: how long until it fails closed, and until it is
whole again — and whether any revocation is lost.

The whole system runs as ``killswitch up`` runs it (``service.stack.up``: broker, service,
detector). This process holds a running ``Guard`` on a ``KafkaRevocationFeed``. Each round:

1. a set of tasks is opened and half of them revoked, and the guard is seen to deny them;
2. the fault: ``tansu`` — the embedded broker is SIGKILLed (``killswitch up`` restarts it,
   empty, on the same port); ``apache-restart`` — Apache Kafka is stopped and started on
   its data directory; ``apache-delete`` — the revocation topic is deleted;
3. the other half is revoked at once, while the broker is away or the log is new;
4. measured: **to not-ready** (fault → the running guard's ``ready`` turns false),
   **to ready** (fault → ready again: broker back, topic rebuilt by the service, replay
   done), and **lost** — revoked tokens that the running guard, or a fresh guard started
   after the round, still allows or does not deny *as revoked* once ready (goal 0).

Printed next to the peer measured in the same run: the broker's own restart time (spawn
to a metadata answer) for the restart faults.

Usage:
    python bench/feed_reset.py                         # tansu, 5 rounds (~30 s)
    python bench/feed_reset.py --fault apache-restart  # needs Java 17+ and Maven
    python bench/feed_reset.py --fault apache-delete --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.brokers import start_apache_kafka  # noqa: E402
from service.config import Settings  # noqa: E402
from service.sdk import Guard, KafkaRevocationFeed, Outcome  # noqa: E402
from service.stack import up  # noqa: E402

AUD = "https://tools.bench"
TOOL = "tool/invoices.read"
FAST = {"KS_KAFKA_SESSION_TIMEOUT_MS": "1000", "KS_KAFKA_HEARTBEAT_INTERVAL_MS": "250"}


def _agent(url: str, admin: str) -> dict[str, str]:
    agent_id = f"bench-{secrets.token_hex(3)}"
    r = httpx.post(
        f"{url}/v1/agents",
        headers={"Authorization": f"Bearer {admin}"},
        json={"id": agent_id, "ceiling": {"grants": ["call:tool/*"], "audiences": [AUD]}},
        timeout=10,
    )
    r.raise_for_status()
    basic = base64.b64encode(f"{agent_id}:{r.json()['client_secret']}".encode()).decode()
    return {"Authorization": f"Basic {basic}"}


def _open(url: str, auth: dict[str, str], n: int) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=10) as c:
        out = []
        for _ in range(n):
            r = c.post(
                "/v1/tasks",
                headers=auth,
                json={"scope": {"grants": [f"call:{TOOL}"], "audiences": [AUD]}, "ttl": 900},
            )
            r.raise_for_status()
            out.append(r.json())
        return out


def _revoke(url: str, admin: str, tasks: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        for t in tasks:
            r = c.post(
                "/v1/revocations",
                headers={"Authorization": f"Bearer {admin}"},
                json={"target": {"type": "task", "task_id": t["task"]["id"]}, "reason": "bench"},
            )
            r.raise_for_status()


def _not_revoked(guard: Guard, tasks: list[dict[str, Any]]) -> int:
    return sum(
        guard.check_sync(t["access_token"], "call", TOOL, emit=False).outcome is not Outcome.REVOKED
        for t in tasks
    )


def _guard(url: str, bootstrap: str) -> Guard:
    settings = Settings(kafka_bootstrap=bootstrap, kafka_fetch_max_wait_ms=50)
    return Guard(url, AUD, KafkaRevocationFeed(settings), max_staleness=2.0)


async def _until(predicate: Any, within: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise TimeoutError(f"not within {within}s")
        await asyncio.sleep(0.001)
    return time.monotonic() - start


class Fault:
    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self.work = work
        self.apache: Any = None
        self.restart_s: list[float] = []

    def kafka(self) -> str | None:
        if self.kind == "tansu":
            return None
        self.apache = start_apache_kafka(work_dir=self.work / "kafka")
        return str(self.apache.bootstrap)

    async def inject(self, stack: Any) -> None:
        if self.kind == "tansu":
            os.kill(stack.supervisor.broker.pid, signal.SIGKILL)
        elif self.kind == "apache-restart":
            port = self.apache.port
            self.apache.stop()
            t0 = time.monotonic()
            self.apache = await asyncio.to_thread(
                start_apache_kafka, work_dir=self.work / "kafka", port=port
            )
            self.restart_s.append(time.monotonic() - t0)
        else:
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
            await admin.start()
            try:
                await admin.delete_topics([Settings().kafka_revocations_topic])
            finally:
                await admin.close()

    def close(self) -> None:
        if self.apache is not None:
            self.apache.stop()


async def run(stack: Any, fault: Fault, rounds: int, per_round: int) -> dict[str, Any]:
    auth = _agent(stack.url, stack.admin_token)
    guard = _guard(stack.url, stack.kafka_bootstrap)
    await guard.start()
    to_not_ready: list[float] = []
    to_ready: list[float] = []
    lost_running = lost_fresh = revoked_total = 0
    all_revoked: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(60):
            await guard.wait_ready()
        for _ in range(rounds):
            tasks = await asyncio.to_thread(_open, stack.url, auth, per_round)
            before, after = tasks[: per_round // 2], tasks[per_round // 2 :]
            await asyncio.to_thread(_revoke, stack.url, stack.admin_token, before)
            await _until(lambda b=before: _not_revoked(guard, b) == 0, 20)
            t0 = time.monotonic()
            inject = asyncio.create_task(fault.inject(stack))
            went = await _until(lambda: not guard.ready, 60)
            to_not_ready.append(went)
            await inject
            await asyncio.to_thread(_revoke, stack.url, stack.admin_token, after)
            try:
                await _until(lambda: guard.ready, 120)
            except TimeoutError:
                feed: Any = guard.feed
                raise SystemExit(
                    f"the guard did not become ready again: errors={feed.errors} "
                    f"resets={feed.resets} ({feed.last_reset_reason}) epoch={feed.epoch} "
                    f"skipped={dict(feed.skipped)}"
                ) from None
            to_ready.append(time.monotonic() - t0)
            all_revoked += tasks
            revoked_total += len(tasks)
            # Lost = still not denied as revoked 10 s after the guard is ready again.
            with contextlib.suppress(TimeoutError):
                await _until(lambda t=tasks: _not_revoked(guard, t) == 0, 10)
            lost_running += _not_revoked(guard, tasks)
        fresh = _guard(stack.url, stack.kafka_bootstrap)
        await fresh.start()
        try:
            async with asyncio.timeout(60):
                await fresh.wait_ready()
            lost_fresh = _not_revoked(fresh, all_revoked)
        finally:
            await fresh.stop()
    finally:
        await guard.stop()
    return {
        "to_not_ready": to_not_ready,
        "to_ready": to_ready,
        "revoked": revoked_total,
        "lost_running": lost_running,
        "lost_fresh": lost_fresh,
    }


def _row(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:<44} -"
    return (
        f"{name:<44} min {min(values) * 1000:8.1f} ms   median "
        f"{statistics.median(values) * 1000:8.1f} ms   max {max(values) * 1000:8.1f} ms"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fault", choices=["tansu", "apache-restart", "apache-delete"], default="tansu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=20, help="tasks opened per round")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ks-bench-reset-") as tmp:
        fault = Fault(args.fault, Path(tmp))
        try:
            kafka = fault.kafka()
            with up(Path(tmp) / "ks", kafka=kafka, settings_env=FAST, progress=False) as stack:
                result = asyncio.run(run(stack, fault, args.rounds, args.tokens))
        finally:
            fault.close()
    print(f"fault: {args.fault}, {args.rounds} rounds, {args.tokens} tasks per round")
    print(_row("running guard: fault -> not ready", result["to_not_ready"]))
    print(_row("running guard: fault -> ready again", result["to_ready"]))
    if fault.restart_s:
        print(_row("peer: Apache Kafka restart (spawn -> ready)", fault.restart_s))
    print(
        f"revocations lost: running guard {result['lost_running']} of {result['revoked']}, "
        f"fresh guard {result['lost_fresh']} of {result['revoked']} (goal 0)"
    )
    return 0 if result["lost_running"] == result["lost_fresh"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
