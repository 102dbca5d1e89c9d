"""The revocation SSE stream over a real socket: who may listen, resume with
Last-Event-ID (exactly the missed events), and live delivery of new revocations."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.sdk.sse import messages as sse_messages
from tests.support.harness import AUD
from tests.support.serve import Served, serve

STREAM_MATRIX = {"none": 401, "viewer": 200, "analyst": 200, "admin": 200,
                 "resource_server": 200, "agent": 403}  # fmt: skip


@pytest.fixture
def server(tmp_path: Path, database_url: str) -> Iterator[Served]:
    with serve(
        tmp_path / "data", database_url, admin_token="kso_" + secrets.token_urlsafe(32)
    ) as s:
        yield s


def _operator(s: Served, role: str, audience: str | None = None) -> str:
    body: dict[str, Any] = {"name": f"{role}-{secrets.token_hex(3)}", "role": role}
    if audience:
        body["audience"] = audience
    with s.client(s.admin_token) as c:
        r = c.post("/v1/operators", json=body)
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token


def _agent_with_task(s: Served) -> tuple[dict[str, str], str]:
    agent_id = f"a-{secrets.token_hex(3)}"
    with s.client(s.admin_token) as c:
        r = c.post(
            "/v1/agents",
            json={"id": agent_id, "ceiling": {"grants": ["call:tool/*"], "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        secret = r.json()["client_secret"]
    auth = {"Authorization": "Basic " + base64.b64encode(f"{agent_id}:{secret}".encode()).decode()}
    return auth, _open(s, auth)


def _open(s: Served, auth: dict[str, str]) -> str:
    with httpx.Client(base_url=s.url, timeout=10) as c:
        r = c.post(
            "/v1/tasks",
            headers=auth,
            json={"scope": {"grants": ["call:tool/x"], "audiences": [AUD]}},
        )
        assert r.status_code == 201, r.text
        task_id: str = r.json()["task"]["id"]
        return task_id


def _revoke_task(s: Served, token: str, task_id: str) -> int:
    with s.client(token) as c:
        r = c.post(
            "/v1/revocations",
            json={"target": {"type": "task", "task_id": task_id}, "reason": "sse test"},
        )
        assert r.status_code == 201, r.text
        seq: int = r.json()["seq"]
        return seq


def _events(lines: Iterator[str], want: int) -> list[tuple[str, str | None, dict[str, Any]]]:
    """Read SSE messages until ``want`` revocation events arrived (heartbeats kept too)."""
    out: list[tuple[str, str | None, dict[str, Any]]] = []
    for message in sse_messages(lines):
        out.append((message.event, message.id, json.loads(message.data)))
        if sum(1 for e in out if e[0] == "revocation") >= want:
            return out
    raise AssertionError(f"stream ended after {out}")


def test_who_may_listen(server: Served) -> None:
    tokens = {role: _operator(server, role) for role in ("viewer", "analyst", "admin")}
    tokens["resource_server"] = _operator(server, "resource_server", AUD)
    agent_auth, _ = _agent_with_task(server)
    for who, expected in STREAM_MATRIX.items():
        headers = {"Accept": "text/event-stream"}
        if who == "agent":
            headers.update(agent_auth)
        elif who != "none":
            headers["Authorization"] = f"Bearer {tokens[who]}"
        with httpx.stream(
            "GET", f"{server.url}/v1/revocations/stream", headers=headers, timeout=10
        ) as r:
            assert r.status_code == expected, (who, r.read())
            if expected == 200:
                assert r.headers["content-type"].startswith("text/event-stream")
            else:
                body = json.loads(r.read())
                assert body["status"] == expected


def test_resume_delivers_exactly_the_missed_events_then_live_ones(server: Served) -> None:
    analyst = _operator(server, "analyst")
    auth, first_task = _agent_with_task(server)
    tasks = [first_task, _open(server, auth), _open(server, auth)]
    seqs = [_revoke_task(server, analyst, t) for t in tasks]
    headers = {"Authorization": f"Bearer {analyst}", "Last-Event-ID": str(seqs[0])}
    with httpx.stream(
        "GET", f"{server.url}/v1/revocations/stream", headers=headers, timeout=10
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        missed = [e for e in _events(lines, 2) if e[0] == "revocation"]
        assert [int(ident) for _, ident, _ in missed if ident] == seqs[1:]
        assert [data["task_ids"] for _, _, data in missed] == [[t] for t in tasks[1:]]
        assert all(
            data["target"] == "task" and data["reason"] == "sse test" for _, _, data in missed
        )
        # Now a revocation committed while we listen arrives live, once.
        live_task = _open(server, auth)
        live_seq = _revoke_task(server, analyst, live_task)
        live = [e for e in _events(lines, 1) if e[0] == "revocation"]
        assert [(int(i or 0), d["task_ids"]) for _, i, d in live] == [(live_seq, [live_task])]


def test_heartbeats_flow_on_a_quiet_stream(server: Served) -> None:
    viewer = _operator(server, "viewer")
    with httpx.stream(
        "GET",
        f"{server.url}/v1/revocations/stream",
        headers={"Authorization": f"Bearer {viewer}"},
        timeout=10,
    ) as r:
        seen: list[str] = []
        for message in sse_messages(r.iter_lines()):
            seen.append(message.event)
            if seen.count("heartbeat") >= 2:
                break
        assert seen == ["heartbeat", "heartbeat"]
