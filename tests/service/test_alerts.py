"""Alerts end to end over a real broker (the embedded tansu) and a real ``killswitch
serve`` subprocess: AlertEvents produced the way the detector produces them land in the
database once each, survive a restart, can be filtered, paged and acknowledged, stream
over SSE with Last-Event-ID resume, and poison records never stop ingestion."""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.alerts import store
from service.brokers import FAST_CONSUMER, start_tansu
from service.config import Settings
from service.kafka import ensure_topics, producer
from service.kernel.events import AlertEvent, RevocationEvent, Severity, encoder
from service.sdk.sse import messages as sse_messages
from tests.support.harness import AUD, KS, bearer
from tests.support.serve import Served, clean_env, killswitch_executable, serve
from tests.support.tokens import on_app_loop

TOPIC = "killswitch.alerts.v1"
WAIT_S = 20.0
STREAM_MATRIX = {"none": 401, "viewer": 200, "analyst": 200, "admin": 200,
                 "resource_server": 403, "agent": 403}  # fmt: skip
# The fast group timings of tests: a restarted service rejoins its group in about a second.
FAST_ENV = {
    "KS_KAFKA_SESSION_TIMEOUT_MS": str(FAST_CONSUMER["session_timeout_ms"]),
    "KS_KAFKA_HEARTBEAT_INTERVAL_MS": str(FAST_CONSUMER["heartbeat_interval_ms"]),
}


# --------------------------------------------------------------------------- helpers


def _alert(n: int, **overrides: Any) -> AlertEvent:
    fields: dict[str, Any] = {
        "alert_id": f"alert-{n:03d}-{secrets.token_hex(3)}",
        "at": 1_800_000_000.0 + n,
        "rule": "scope.out_of_scope",
        "severity": Severity.HIGH,
        "agent_id": "billing",
        "task_id": f"task-{n}",
        "evidence": {"summary": f"finding {n}", "event_id": f"ev-{n}"},
        "action": "alert",
    }
    fields.update(overrides)
    return AlertEvent(**fields)


def _produce(bootstrap: str, records: list[AlertEvent | bytes | None]) -> None:
    """Publish like the detector: value = encoded AlertEvent, key = agent id."""

    async def run() -> None:
        settings = Settings(kafka_bootstrap=bootstrap)
        await ensure_topics(settings)
        p = producer(settings, "test-detector")
        await p.start()
        try:
            for record in records:
                if isinstance(record, AlertEvent):
                    await p.send_and_wait(
                        TOPIC, value=encoder.encode(record), key=record.agent_id.encode()
                    )
                else:
                    await p.send_and_wait(TOPIC, value=record, key=b"poison")
        finally:
            await p.stop()

    asyncio.run(run())


def _operator(s: Served, role: str, audience: str | None = None) -> str:
    body: dict[str, Any] = {"name": f"{role}-{secrets.token_hex(3)}", "role": role}
    if audience:
        body["audience"] = audience
    with s.client(s.admin_token) as c:
        r = c.post("/v1/operators", json=body)
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token


def _agent_with_task(s: Served) -> tuple[str, str]:
    """(Basic Authorization value of a fresh agent, the id of a task it opened)."""
    agent_id = f"a-{secrets.token_hex(3)}"
    with s.client(s.admin_token) as c:
        r = c.post(
            "/v1/agents",
            json={"id": agent_id, "ceiling": {"grants": ["call:tool/*"], "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        secret = r.json()["client_secret"]
    auth = "Basic " + base64.b64encode(f"{agent_id}:{secret}".encode()).decode()
    with httpx.Client(base_url=s.url, timeout=10) as c:
        r = c.post(
            "/v1/tasks",
            headers={"Authorization": auth},
            json={"scope": {"grants": ["call:tool/x"], "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        task_id: str = r.json()["task"]["id"]
    return auth, task_id


def _all_alerts(s: Served, token: str, **params: Any) -> list[dict[str, Any]]:
    """Every page of GET /v1/alerts, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    with s.client(token) as c:
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            r = c.get("/v1/alerts", params=query)
            assert r.status_code == 200, r.text
            page = r.json()
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return items


def _wait_for(s: Served, token: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        items = _all_alerts(s, token, limit=1000)
        if len(items) >= count:
            return items
        time.sleep(0.05)
    raise AssertionError(f"{len(items)} alerts stored, wanted {count}\n{s.output()}")


def _metric(s: Served, name: str, **labels: str) -> float:
    text = httpx.get(f"{s.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        mname, _, rest = metric.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if mname == name and got == want:
            return float(value)
    return 0.0


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [a["alert_id"] for a in items]


def _events(lines: Iterator[str], until: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    """SSE messages up to and including the first ``until`` event."""
    out: list[tuple[str, str | None, dict[str, Any]]] = []
    for message in sse_messages(lines):
        out.append((message.event, message.id, json.loads(message.data)))
        if message.event == until:
            return out
    raise AssertionError(f"stream ended after {out}")


def _kafka_env(bootstrap: str) -> dict[str, str]:
    return {"KS_KAFKA_BOOTSTRAP": bootstrap, **FAST_ENV}


@pytest.fixture
def broker() -> Iterator[str]:
    with start_tansu() as b:
        yield b.bootstrap


# --------------------------------------------------------------------------- ingestion


def test_alerts_are_stored_once_survive_a_restart_and_can_be_queried_and_acked(
    tmp_path: Path, database_url: str, broker: str
) -> None:
    token = "kso_" + secrets.token_urlsafe(32)
    data = tmp_path / "data"
    severities = [Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL]
    alerts = [
        _alert(
            n,
            severity=severities[n % 4],
            rule="scope.out_of_scope" if n % 2 else "limits.max_calls",
            agent_id="billing" if n < 6 else "crawler",
            task_id=f"task-{n % 3}",
        )
        for n in range(12)
    ]
    poison: list[AlertEvent | bytes | None] = [
        b"\x00not json at all",
        b'{"type":"alert","version":1}',  # required fields missing
        encoder.encode(_alert(99)).replace(b'"type":"alert"', b'"type":"alert","extra":1'),
        encoder.encode(
            RevocationEvent(
                revocation_id="r", seq=1, at=1.0, target="task", reason="x", actor="a", source="s"
            )
        ),  # a valid event of the wrong kind
        None,  # a tombstone
    ]
    # Redeliveries: the same alert ids again (the content of the first one wins).
    duplicates: list[AlertEvent | bytes | None] = [
        _alert(0, alert_id=alerts[0].alert_id, rule="changed"),
        alerts[5],
        alerts[11],
    ]
    _produce(broker, [*alerts[:6], *poison, *alerts[6:], *duplicates])

    with serve(data, database_url, admin_token=token, env=_kafka_env(broker)) as s:
        viewer, analyst = _operator(s, "viewer"), _operator(s, "analyst")
        stored = _wait_for(s, viewer, 12)
        time.sleep(0.5)  # anything still arriving would be a duplicate
        stored = _all_alerts(s, viewer, limit=1000)
        assert sorted(_ids(stored)) == sorted(a.alert_id for a in alerts)
        first = next(a for a in stored if a["alert_id"] == alerts[0].alert_id)
        assert first["rule"] == alerts[0].rule
        assert first["evidence"] == {"summary": "finding 0", "event_id": "ev-0"}
        assert first["received_at"] > 0
        assert first["acked_at"] is None
        # Newest first, seq strictly descending.
        seqs = [a["seq"] for a in stored]
        assert seqs == sorted(seqs, reverse=True)
        assert len(set(seqs)) == 12

        # Every record was read and accounted for; poison was skipped, not fatal.
        assert _metric(s, "killswitch_alert_records_total", outcome="stored") == 12
        assert _metric(s, "killswitch_alert_records_total", outcome="duplicate") == 3
        assert _metric(s, "killswitch_alert_records_total", outcome="rejected") == len(poison)
        assert (
            _metric(s, "killswitch_alerts_total", severity="critical", rule="scope.out_of_scope")
            == 3
        )

        # Filters combine with AND; severity repeats.
        # Storage order across partitions is the consumer's, not the producer's: expect
        # the stored (newest-first) order, filtered.
        by_id = {a.alert_id: a for a in alerts}

        def expect(params: dict[str, Any], pred: Any) -> None:
            got = _ids(_all_alerts(s, viewer, **params))
            want = [i for i in _ids(stored) if pred(by_id[i])]
            assert want, params
            assert got == want, params

        expect({"severity": "critical"}, lambda a: a.severity is Severity.CRITICAL)
        expect(
            {"severity": ["low", "critical"], "agent_id": "crawler"},
            lambda a: a.severity in (Severity.LOW, Severity.CRITICAL) and a.agent_id == "crawler",
        )
        expect({"rule": "limits.max_calls"}, lambda a: a.rule == "limits.max_calls")
        expect({"task_id": "task-1"}, lambda a: a.task_id == "task-1")
        expect(
            {"since": alerts[3].at, "until": alerts[8].at},
            lambda a: alerts[3].at <= a.at < alerts[8].at,
        )
        # Cursor pagination: 5 + 5 + 2, no overlap, nothing missed.
        with s.client(viewer) as c:
            pages = []
            cursor = None
            while True:
                r = c.get(
                    "/v1/alerts", params={"limit": 5, **({"cursor": cursor} if cursor else {})}
                )
                assert r.status_code == 200, r.text
                pages.append(_ids(r.json()["items"]))
                cursor = r.json()["next_cursor"]
                if cursor is None:
                    break
            assert [len(p) for p in pages] == [5, 5, 2]
            assert [i for p in pages for i in p] == _ids(stored)
            assert c.get("/v1/alerts", params={"severity": "urgent"}).status_code == 400
            r = c.get(f"/v1/alerts/{alerts[4].alert_id}")
            assert r.status_code == 200, r.text
            assert r.json()["severity"] == "low"
            r = c.get("/v1/alerts/no-such-alert")
            assert r.status_code == 404
            assert r.json()["type"].endswith(":not-found")

        # Acknowledging: a viewer may not; an analyst may, once; a repeat changes nothing.
        target = alerts[7].alert_id
        with s.client(viewer) as c:
            assert c.post(f"/v1/alerts/{target}/ack", json={"note": "x"}).status_code == 403
        with s.client(analyst) as c:
            r = c.post(f"/v1/alerts/{target}/ack", json={"note": "looked into it"})
            assert r.status_code == 200, r.text
            acked = r.json()
            assert acked["acked_by"].startswith("operator:analyst-")
            assert acked["ack_note"] == "looked into it"
            assert acked["acked_at"] is not None
            assert c.post("/v1/alerts/no-such-alert/ack").status_code == 404
        with s.client(s.admin_token) as c:
            again = c.post(f"/v1/alerts/{target}/ack", json={"note": "me too"})
            assert again.status_code == 200
            assert again.json() == acked
            audit = c.get("/v1/audit", params={"limit": 1000}).json()["items"]
            assert [e["subject"] for e in audit if e["action"] == "alert.ack"] == [
                f"alert:{target}"
            ]
        assert _ids(_all_alerts(s, viewer, acked="true")) == [target]
        assert len(_all_alerts(s, viewer, acked="false")) == 11

        # The console's chart: alerts per minute of their `at`.
        with s.client(viewer) as c:
            r = c.get("/v1/stats/timeline", params={"minutes": 5})
            assert r.status_code == 200, r.text
            points = r.json()
            assert len(points) == 5
            assert all(p["minute"] % 60 == 0 for p in points)
            assert points[-1]["minute"] <= time.time() < points[-1]["minute"] + 60
            assert c.get("/v1/stats/timeline", params={"minutes": 0}).status_code == 400

    # A restart: everything is still there (acks too); redelivered ids are still ignored.
    late = _alert(12, severity=Severity.CRITICAL)
    _produce(broker, [alerts[1], late])
    with serve(data, database_url, admin_token=token, env=_kafka_env(broker)) as s:
        stored = _wait_for(s, viewer, 13)
        time.sleep(0.5)
        stored = _all_alerts(s, viewer, limit=1000)
        assert sorted(_ids(stored)) == sorted([a.alert_id for a in alerts] + [late.alert_id])
        assert stored[0]["alert_id"] == late.alert_id
        again = next(a for a in stored if a["alert_id"] == target)
        assert again["acked_by"] == acked["acked_by"]
        # Produced while the service ran before: the committed offsets were not re-read.
        assert _metric(s, "killswitch_alert_records_total", outcome="rejected") == 0
        assert _metric(s, "killswitch_alert_records_total", outcome="duplicate") == 1


def test_kill_latency_is_measured_from_the_offending_use_to_the_revocation(
    tmp_path: Path, database_url: str, broker: str
) -> None:
    token = "kso_" + secrets.token_urlsafe(32)
    with serve(tmp_path / "data", database_url, admin_token=token, env=_kafka_env(broker)) as s:
        analyst = _operator(s, "analyst")
        _, task_id = _agent_with_task(s)
        used_at = time.time()
        with s.client(analyst) as c:  # standing in for the detector's revocation
            r = c.post(
                "/v1/revocations",
                json={"target": {"type": "task", "task_id": task_id}, "reason": "test"},
            )
            assert r.status_code == 201, r.text
            revocation = r.json()
        evidence = {
            "summary": "out of scope",
            "event_at": used_at,
            "revocation": "revoked",
            "revocation_id": revocation["id"],
        }
        _produce(
            broker,
            [
                _alert(1, action="revoke", task_id=task_id, evidence=evidence),
                # Not measured: an existing revocation, and an alert without event_at.
                _alert(2, action="revoke", evidence={**evidence, "revocation": "existing"}),
                _alert(3, action="revoke", evidence={"revocation": "revoked"}),
            ],
        )
        _wait_for(s, analyst, 3)
        assert _metric(s, "killswitch_kill_latency_seconds_count") == 1
        measured = _metric(s, "killswitch_kill_latency_seconds_sum")
        assert measured == pytest.approx(revocation["created_at"] - used_at, abs=1e-3)


# --------------------------------------------------------------------------- SSE and CLI


def test_stream_resumes_with_last_event_id_then_follows_live_alerts_and_acks(
    tmp_path: Path, database_url: str, broker: str
) -> None:
    token = "kso_" + secrets.token_urlsafe(32)
    with serve(tmp_path / "data", database_url, admin_token=token, env=_kafka_env(broker)) as s:
        tokens = {role: _operator(s, role) for role in ("viewer", "analyst", "admin")}
        tokens["resource_server"] = _operator(s, "resource_server", AUD)
        agent_auth, _ = _agent_with_task(s)
        for who, expected in STREAM_MATRIX.items():
            headers = {"Accept": "text/event-stream"}
            if who == "agent":
                headers["Authorization"] = agent_auth
            elif who != "none":
                headers["Authorization"] = f"Bearer {tokens[who]}"
            with httpx.stream("GET", f"{s.url}/v1/alerts/stream", headers=headers, timeout=10) as r:
                assert r.status_code == expected, (who, r.read())

        first = [_alert(n) for n in range(3)]
        _produce(broker, list(first))
        stored = sorted(_wait_for(s, tokens["viewer"], 3), key=lambda a: a["seq"])
        seqs = [a["seq"] for a in stored]
        headers = {
            "Authorization": f"Bearer {tokens['viewer']}",
            "Last-Event-ID": str(seqs[0]),
        }
        with httpx.stream("GET", f"{s.url}/v1/alerts/stream", headers=headers, timeout=10) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            # Exactly the two missed alerts, in order, then the first heartbeat.
            replay = _events(lines, until="heartbeat")
            assert [(e, i) for e, i, _ in replay[:-1]] == [("alert", str(q)) for q in seqs[1:]]
            assert [d["alert_id"] for _, _, d in replay[:-1]] == [a.alert_id for a in first[1:]]
            assert replay[-1][0] == "heartbeat"
            # A new alert arrives live, once.
            live = _alert(3, severity=Severity.CRITICAL)
            _produce(broker, [live])
            got = [e for e in _events(lines, until="alert") if e[0] == "alert"]
            assert [d["alert_id"] for _, _, d in got] == [live.alert_id]
            live_seq = int(got[0][1] or 0)
            assert live_seq > seqs[-1]
            assert got[0][2]["seq"] == live_seq
            # An acknowledgement is pushed too, without an id (it is not a position).
            with s.client(tokens["analyst"]) as c:
                assert c.post(f"/v1/alerts/{first[0].alert_id}/ack").status_code == 200
            acks = [e for e in _events(lines, until="ack") if e[0] == "ack"]
            assert [(i, d["alert_id"]) for _, i, d in acks] == [(None, first[0].alert_id)]
            assert acks[0][2]["acked_by"].startswith("operator:analyst-")


def _reader(stream: Any) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in iter(stream.readline, ""):
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str], pattern: str, wait_s: float = WAIT_S) -> str:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} within {wait_s}s")


def test_cli_lists_and_watches_alerts_across_a_service_restart(
    tmp_path: Path, database_url: str, broker: str
) -> None:
    token = "kso_" + secrets.token_urlsafe(32)
    data = tmp_path / "data"
    old = [_alert(0, severity=Severity.LOW), _alert(1, rule="limits.max_calls")]
    _produce(broker, list(old))
    with serve(data, database_url, admin_token=token, env=_kafka_env(broker)) as s:
        port = s.port
        _wait_for(s, token, 2)
        env = clean_env({"KS_URL": s.url, "KS_TOKEN": token})
        listed = subprocess.run(
            [killswitch_executable(), "alerts", "list", "--rule", "limits.max_calls"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        rows = listed.stdout.splitlines()
        assert rows[0].startswith("time (UTC)")
        assert len(rows) == 2
        assert "HIGH" in rows[1]
        assert "limits.max_calls" in rows[1]
        assert "finding 1" in rows[1]

        watch = subprocess.Popen(
            [killswitch_executable(), "alerts", "watch"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = _reader(watch.stdout), _reader(watch.stderr)
            _next_line(err, "watching")
            time.sleep(0.3)
            new = _alert(2, severity=Severity.CRITICAL)
            _produce(broker, [new])
            line = _next_line(out, new.task_id or "")
            assert "CRITICAL" in line
            assert "finding 2" in line
            s.process.send_signal(signal.SIGTERM)
            s.process.wait(timeout=15)
            # Raised while the service is down: delivered after the reconnect.
            during = _alert(3, severity=Severity.MEDIUM)
            _produce(broker, [during])
            _next_line(err, "reconnecting")
            with serve(data, database_url, admin_token=token, env=_kafka_env(broker), port=port):
                line = _next_line(out, during.task_id or "")
                assert "MEDIUM" in line
                watch.send_signal(signal.SIGINT)
                assert watch.wait(timeout=10) == 0
            # Nothing printed twice, nothing old printed at all.
            rest: list[str] = []
            while not out.empty():
                rest.append(out.get())
            assert not any(a.task_id in line for a in (*old, new, during) for line in rest)
        finally:
            if watch.poll() is None:
                watch.kill()
            watch.wait(timeout=10)


# --------------------------------------------------------------------------- in-process


async def test_timeline_counts_alerts_and_kills_per_minute(ks: KS) -> None:
    agent = await ks.agent()
    killed = (await ks.open_task(agent.headers))["task"]["id"]
    completed = (await ks.open_task(agent.headers))["task"]["id"]
    analyst = bearer(await ks.operator("analyst"))
    r = await ks.client.post(
        "/v1/revocations",
        json={"target": {"type": "task", "task_id": killed}, "reason": "timeline"},
        headers=analyst,
    )
    assert r.status_code == 201, r.text
    r = await ks.client.post(f"/v1/tasks/{completed}/complete", headers=agent.headers)
    assert r.status_code == 200, r.text  # a completion is a revocation, not a kill
    now = time.time()
    at = [now, now, now - 125, now - 3600]  # the last one is outside a 5-minute window
    await on_app_loop(
        ks,
        store,
        ks.services.db,
        [_alert(i, at=t) for i, t in enumerate(at)],
        received_at=now,
    )
    r = await ks.client.get("/v1/stats/timeline", params={"minutes": 5}, headers=analyst)
    assert r.status_code == 200, r.text
    points = r.json()
    minutes = [p["minute"] for p in points]
    assert minutes == [minutes[0] + 60 * i for i in range(5)]
    expected = {m: sum(1 for t in at if m <= t < m + 60) for m in minutes}
    assert {p["minute"]: p["alerts"] for p in points} == expected
    assert sum(p["revocations"] for p in points) == 1
    assert (await ks.client.get("/v1/stats/timeline", headers=analyst)).json()[-1] == points[-1]
    for bad in ("0", "1441", "x"):
        r = await ks.client.get("/v1/stats/timeline", params={"minutes": bad}, headers=analyst)
        assert r.status_code == 400, bad


async def test_stream_refuses_a_bad_last_event_id(ks: KS) -> None:
    for bad in ("-1", "abc", str(2**63)):
        r = await ks.client.get("/v1/alerts/stream", headers={**ks.admin, "Last-Event-ID": bad})
        assert r.status_code == 400, bad
        assert r.headers["content-type"].startswith("application/problem+json")


async def test_ack_body_is_strict_and_optional(ks: KS) -> None:
    stored = await on_app_loop(ks, store, ks.services.db, [_alert(1)], received_at=time.time())
    alert_id = stored[0].alert_id
    for body in ({"note": 5}, {"note": "x", "extra": 1}, {"note": "x" * 1001}):
        r = await ks.client.post(f"/v1/alerts/{alert_id}/ack", json=body, headers=ks.admin)
        assert r.status_code == 400, body
    r = await ks.client.post(f"/v1/alerts/{alert_id}/ack", headers=ks.admin)
    assert r.status_code == 200, r.text
    assert r.json()["acked_by"] == "operator:bootstrap-admin"
    assert r.json()["ack_note"] is None
