"""Two replicas of the service over one database (and one key directory): a revocation
committed through one reaches the other's SSE listeners live and its own deny state,
without a reconnect and without Kafka."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import httpx

from service.sdk.sse import messages as sse_messages
from tests.service.test_sse import _agent_with_task, _operator, _revoke_task
from tests.support.serve import serve


def test_a_revocation_through_one_replica_is_live_on_the_other(
    tmp_path: Path, database_url: str
) -> None:
    token = "kso_" + secrets.token_urlsafe(32)
    data = tmp_path / "data"
    with (
        serve(data, database_url, admin_token=token) as a,
        serve(data, database_url, admin_token=token) as b,
    ):
        analyst = _operator(a, "analyst")
        _, task_id = _agent_with_task(a)
        headers = {"Authorization": f"Bearer {analyst}", "Accept": "text/event-stream"}
        with httpx.stream(
            "GET", f"{b.url}/v1/revocations/stream", headers=headers, timeout=10
        ) as stream:
            assert stream.status_code == 200
            received = sse_messages(stream.iter_lines())
            for message in received:  # the replay is over once the first heartbeat arrives
                if message.event == "heartbeat":
                    break
            sent_at = time.monotonic()
            seq = _revoke_task(a, analyst, task_id)  # committed through replica A
            revocation = None
            for message in received:
                if message.event == "revocation":
                    revocation = message
                    break
                if time.monotonic() - sent_at > 5:  # heartbeats keep coming; don't wait forever
                    break
            delay = time.monotonic() - sent_at
        assert revocation is not None, f"replica B announced nothing within {delay:.1f}s"
        assert revocation.id == str(seq)
        assert json.loads(revocation.data)["task_ids"] == [task_id]
        assert delay < 2.0, f"replica B announced it after {delay:.2f}s"
