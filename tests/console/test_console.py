"""The console in process (litestar's AsyncTestClient, real SQLite and PostgreSQL):
sign-in and sessions, CSRF refusal, the role matrix (a viewer sees no buttons and its
POSTs are 403), and an analyst revoking a task with a reason and a confirmation."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import re
from pathlib import Path
from typing import Any

import pytest

from service import alerts, kafka
from service.brokers import start_tansu
from service.config import Settings
from service.console.pages import USAGE_UNAVAILABLE
from service.kernel.events import (
    AlertEvent,
    Decision,
    Severity,
    Source,
    UsageEvent,
    encoder,
)
from service.secrets_ import hash_secret
from tests.console.support import csrf_of, nonce_of, open_task_for, post_form, sign_in
from tests.support.harness import KS, running_app
from tests.support.tokens import on_app_loop

# --------------------------------------------------------------------------- sign-in


async def test_sign_in_gives_an_opaque_httponly_strict_session_cookie(ks: KS) -> None:
    token = await ks.operator("analyst")
    page = await ks.client.get("/console/login")
    r = await ks.client.post(
        "/console/login",
        data={"token": token, "csrf_token": csrf_of(page.text), "next": "/console/audit"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console/audit"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("ks_console="))
    value = cookie.split(";", 1)[0].removeprefix("ks_console=")
    attributes = cookie.lower()
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/console" in attributes
    assert "secure" not in attributes  # plain http here; see the https test
    # The cookie is a random id: neither the token nor its hash.
    assert len(value) >= 40
    assert token not in value
    assert hash_secret(token) not in value
    landing = await ks.client.get("/console/audit")
    assert landing.status_code == 200
    assert "console.sign_in" in landing.text


async def test_the_session_cookie_is_secure_over_https(ks: KS) -> None:
    token = await ks.operator("viewer")
    page = await ks.client.get("https://killswitch.test/console/login")
    assert "secure" in page.headers["set-cookie"].lower()  # the login nonce cookie
    r = await ks.client.post(
        "https://killswitch.test/console/login",
        data={"token": token, "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("ks_console="))
    assert "; secure" in cookie.lower()


async def test_a_wrong_token_is_refused_without_a_session(ks: KS) -> None:
    page = await ks.client.get("/console/login")
    r = await ks.client.post(
        "/console/login",
        data={"token": "kso_not-a-real-token", "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 401
    assert "not a valid operator token" in r.text
    assert "ks_console=" not in ";".join(r.headers.get_list("set-cookie"))
    again = await ks.client.get("/console/alerts", follow_redirects=False)
    assert again.status_code == 303
    assert again.headers["location"].startswith("/console/login?next=")


async def test_machine_roles_cannot_sign_in(ks: KS) -> None:
    token = await ks.operator("resource_server", audience="https://tools.internal")
    page = await ks.client.get("/console/login")
    r = await ks.client.post(
        "/console/login",
        data={"token": token, "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 403


@pytest.mark.parametrize("csrf", [None, "forged"])
async def test_sign_in_without_the_login_csrf_token_is_403(ks: KS, csrf: str | None) -> None:
    await ks.client.get("/console/login")  # sets the pre-session nonce cookie
    data = {"token": ks.admin_token} | ({"csrf_token": csrf} if csrf else {})
    r = await ks.client.post("/console/login", data=data, follow_redirects=False)
    assert r.status_code == 403
    assert "ks_console=" not in ";".join(r.headers.get_list("set-cookie"))


async def test_pages_and_feeds_need_a_session(ks: KS) -> None:
    r = await ks.client.get("/console/tasks", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login?next=/console/tasks"
    # The Authorization header is not a console credential.
    r = await ks.client.get("/console/alerts/stream", headers=ks.admin, follow_redirects=False)
    assert r.status_code == 401
    r = await ks.client.get("/console/stats/timeline", follow_redirects=False)
    assert r.status_code == 401


async def test_sign_out_ends_the_session(ks: KS) -> None:
    csrf = await sign_in(ks, ks.admin_token)
    cookie = ks.client.cookies.get("ks_console")
    r = await post_form(ks, "/console/logout", {"csrf_token": csrf})
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login?signed_out=true"
    ks.client.cookies.set("ks_console", cookie or "", path="/console")
    r = await ks.client.get("/console/alerts", follow_redirects=False)
    assert r.status_code == 303  # the old cookie opens nothing


async def test_disabling_an_operator_ends_its_console_session(ks: KS) -> None:
    name_token = await ks.operator("analyst")
    await sign_in(ks, name_token)
    ops = (await ks.client.get("/v1/operators", headers=ks.admin)).json()
    name = next(o["name"] for o in ops if o["name"].startswith("analyst-"))
    r = await ks.client.post(f"/v1/operators/{name}/disable", headers=ks.admin)
    assert r.status_code == 200, r.text
    r = await ks.client.get("/console/alerts", follow_redirects=False)
    assert r.status_code == 303


# --------------------------------------------------------------------------- CSRF


@pytest.mark.parametrize("csrf", [None, "wrong-token"])
async def test_forms_without_a_valid_csrf_token_are_refused(ks: KS, csrf: str | None) -> None:
    _agent, task_id, _token = await open_task_for(ks)
    analyst = await ks.operator("analyst")
    await sign_in(ks, analyst)
    form: dict[str, Any] = {
        "target": "task",
        "task_id": task_id,
        "reason": "csrf probe",
        "confirm": "yes",
        "nonce": "n" * 32,
    }
    if csrf is not None:
        form["csrf_token"] = csrf
    for path, data in [
        ("/console/revoke", form),
        ("/console/logout", {} if csrf is None else {"csrf_token": csrf}),
        ("/console/alerts/any/ack", {} if csrf is None else {"csrf_token": csrf}),
    ]:
        r = await post_form(ks, path, data)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "CSRF" in r.text
    task = (await ks.client.get(f"/v1/tasks/{task_id}", headers=ks.admin)).json()
    assert task["status"] == "active"
    # Still signed in: the refused sign-out did nothing.
    assert (await ks.client.get("/console/alerts", follow_redirects=False)).status_code == 200


async def test_a_csrf_token_from_another_session_is_refused(ks: KS) -> None:
    _agent, task_id, _token = await open_task_for(ks)
    other_csrf = await sign_in(ks, await ks.operator("analyst"))
    await sign_in(ks, await ks.operator("analyst"))
    r = await post_form(
        ks,
        "/console/revoke",
        {"csrf_token": other_csrf, "target": "task", "task_id": task_id, "reason": "x"},
    )
    assert r.status_code == 403


# --------------------------------------------------------------------------- roles


async def test_a_viewer_sees_no_buttons_and_cannot_act(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    stored = await _store_alert(ks, agent_id, task_id)
    csrf = await sign_in(ks, await ks.operator("viewer"))

    task_page = await ks.client.get(f"/console/tasks/{task_id}")
    agent_page = await ks.client.get(f"/console/agents/{agent_id}")
    alerts_page = await ks.client.get("/console/alerts")
    for r in (task_page, agent_page, alerts_page):
        assert r.status_code == 200
        assert 'action="/console/revoke"' not in r.text
        assert "/suspend" not in r.text
        assert "/ack" not in r.text
        assert 'href="/console/panic"' not in r.text
    assert stored.alert_id in alerts_page.text

    refused = [
        ("/console/revoke", {"target": "task", "task_id": task_id, "reason": "viewer"}),
        (
            "/console/revoke",
            {"target": "cutoff", "reason": "viewer", "confirm": "yes", "nonce": "v" * 32},
        ),
        (f"/console/alerts/{stored.alert_id}/ack", {}),
        (f"/console/agents/{agent_id}/suspend", {"reason": "viewer", "confirm": "yes"}),
        ("/console/operators", {"name": "mallory", "role": "admin"}),
    ]
    for path, data in refused:
        r = await post_form(ks, path, {"csrf_token": csrf, **data})
        assert r.status_code == 403, (path, r.text)
    assert (await ks.client.get("/console/operators")).status_code == 403
    task = (await ks.client.get(f"/v1/tasks/{task_id}", headers=ks.admin)).json()
    assert task["status"] == "active"
    revocations = (await ks.client.get("/v1/revocations", headers=ks.admin)).json()["items"]
    assert revocations == []


async def test_an_analyst_may_revoke_but_not_administer(ks: KS) -> None:
    agent_id, _task_id, _token = await open_task_for(ks)
    csrf = await sign_in(ks, await ks.operator("analyst"))
    page = await ks.client.get(f"/console/agents/{agent_id}")
    assert 'action="/console/revoke"' in page.text
    assert "/suspend" not in page.text
    r = await post_form(
        ks,
        f"/console/agents/{agent_id}/suspend",
        {"csrf_token": csrf, "reason": "x", "confirm": "yes"},
    )
    assert r.status_code == 403


# --------------------------------------------------------------------------- the kill switch


async def test_an_analyst_revokes_a_task_with_a_reason(ks: KS) -> None:
    _agent, task_id, token = await open_task_for(ks)
    analyst = await ks.operator("analyst")
    csrf = await sign_in(ks, analyst)
    task_page = await ks.client.get(f"/console/tasks/{task_id}")
    assert 'action="/console/revoke"' in task_page.text

    # Step 1: the button answers with a confirmation page; nothing is revoked yet.
    r = await post_form(
        ks,
        "/console/revoke",
        {"csrf_token": csrf, "target": "task", "task_id": task_id, "reason": "exfiltration"},
    )
    assert r.status_code == 200, r.text
    assert "Confirm: revoke task" in r.text
    assert (await ks.client.get(f"/v1/tasks/{task_id}", headers=ks.admin)).json()[
        "status"
    ] == "active"

    # Step 2: confirmed with the page's nonce.
    confirm = {
        "csrf_token": csrf,
        "target": "task",
        "task_id": task_id,
        "reason": "exfiltration",
        "nonce": nonce_of(r.text),
        "confirm": "yes",
    }
    done = await post_form(ks, "/console/revoke", confirm)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == f"/console/tasks/{task_id}"
    # A double-submitted confirmation revokes once (the nonce is the idempotency key).
    again = await post_form(ks, "/console/revoke", confirm)
    assert again.status_code == 303

    task = (await ks.client.get(f"/v1/tasks/{task_id}", headers=ks.admin)).json()
    assert task["status"] == "revoked"
    assert task["close_reason"] == "exfiltration"
    revocations = (await ks.client.get("/v1/revocations", headers=ks.admin)).json()["items"]
    mine = [v for v in revocations if v["target"].get("task_id") == task_id]
    assert len(mine) == 1
    assert mine[0]["reason"] == "exfiltration"
    assert mine[0]["source"] == "analyst"
    assert mine[0]["actor"].startswith("operator:analyst-")
    audit = (await ks.client.get("/v1/audit", headers=ks.admin)).json()["items"]
    entry = next(e for e in audit if e["action"] == "revoke")
    assert entry["subject"] == f"task:{task_id}"
    assert entry["detail"]["reason"] == "exfiltration"
    assert entry["actor"] == mine[0]["actor"]

    shown = await ks.client.get(f"/console/tasks/{task_id}")
    assert "Revoked task" in shown.text  # the flash
    assert re.search(r'data-testid="close-reason">exfiltration<', shown.text)
    audit_page = await ks.client.get("/console/audit")
    assert f"task:{task_id}" in audit_page.text

    rs = await ks.operator("resource_server", audience="https://tools.internal")
    assert (await ks.introspect(token, rs))["active"] is False


async def test_a_revocation_needs_a_reason_and_a_server_side_confirmation(ks: KS) -> None:
    _agent, task_id, _token = await open_task_for(ks)
    csrf = await sign_in(ks, await ks.operator("analyst"))
    base = {"csrf_token": csrf, "target": "task", "task_id": task_id}
    blank = await post_form(
        ks, "/console/revoke", base | {"reason": "  ", "confirm": "yes", "nonce": "n" * 32}
    )
    assert blank.status_code == 400
    assert "A reason is required" in blank.text
    unconfirmed = await post_form(ks, "/console/revoke", base | {"reason": "r", "nonce": "n" * 32})
    assert unconfirmed.status_code == 200
    assert "Confirm:" in unconfirmed.text
    task = (await ks.client.get(f"/v1/tasks/{task_id}", headers=ks.admin)).json()
    assert task["status"] == "active"


async def test_the_panic_button_cuts_off_one_agent(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    _other_agent, other_task, _other_token = await open_task_for(ks)
    csrf = await sign_in(ks, await ks.operator("analyst"))
    form = {"csrf_token": csrf, "target": "cutoff", "agent_id": agent_id, "reason": "key leak"}
    r = await post_form(ks, "/console/revoke", form)
    assert r.status_code == 200
    assert "1 active task(s)" in r.text
    done = await post_form(
        ks, "/console/revoke", form | {"nonce": nonce_of(r.text), "confirm": "yes"}
    )
    assert done.status_code == 303
    mine = (await ks.client.get(f"/v1/tasks/{task_id}", headers=ks.admin)).json()
    theirs = (await ks.client.get(f"/v1/tasks/{other_task}", headers=ks.admin)).json()
    assert (mine["status"], theirs["status"]) == ("revoked", "active")


async def test_an_admin_suspends_and_reinstates_an_agent(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    csrf = await sign_in(ks, ks.admin_token)
    unconfirmed = await post_form(
        ks, f"/console/agents/{agent_id}/suspend", {"csrf_token": csrf, "reason": "rogue"}
    )
    assert unconfirmed.status_code == 400
    r = await post_form(
        ks,
        f"/console/agents/{agent_id}/suspend",
        {"csrf_token": csrf, "reason": "rogue", "confirm": "yes"},
    )
    assert r.status_code == 303
    agent = (await ks.client.get(f"/v1/agents/{agent_id}", headers=ks.admin)).json()
    assert agent["status"] == "suspended"
    assert (await ks.client.get(f"/v1/tasks/{task_id}", headers=ks.admin)).json()[
        "status"
    ] == "revoked"
    r = await post_form(
        ks, f"/console/agents/{agent_id}/reinstate", {"csrf_token": csrf, "reason": "cleared"}
    )
    assert r.status_code == 303
    agent = (await ks.client.get(f"/v1/agents/{agent_id}", headers=ks.admin)).json()
    assert agent["status"] == "active"


async def test_an_admin_creates_and_disables_an_operator(ks: KS) -> None:
    csrf = await sign_in(ks, ks.admin_token)
    r = await post_form(
        ks, "/console/operators", {"csrf_token": csrf, "name": "carol", "role": "viewer"}
    )
    assert r.status_code == 201, r.text
    token = re.search(r'data-testid="new-token">(kso_[^<]+)<', r.text)
    assert token is not None
    assert r.headers["cache-control"] == "no-store"
    viewer = await ks.client.get("/v1/alerts", headers={"Authorization": f"Bearer {token[1]}"})
    assert viewer.status_code == 200
    r = await post_form(
        ks, "/console/operators/carol/disable", {"csrf_token": csrf, "confirm": "yes"}
    )
    assert r.status_code == 303
    viewer = await ks.client.get("/v1/alerts", headers={"Authorization": f"Bearer {token[1]}"})
    assert viewer.status_code == 401


# --------------------------------------------------------------------------- alerts


async def test_alerts_are_listed_and_acknowledged(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    stored = await _store_alert(ks, agent_id, task_id)
    csrf = await sign_in(ks, await ks.operator("analyst"))
    page = await ks.client.get("/console/alerts")
    assert stored.alert_id in page.text
    assert f'data-after="{stored.seq}"' in page.text
    task_page = await ks.client.get(f"/console/tasks/{task_id}")
    assert stored.alert_id in task_page.text
    r = await ks.client.post(
        f"/console/alerts/{stored.alert_id}/ack",
        data={"csrf_token": csrf},
        headers={"X-Console-Fetch": "1"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["acked_by"].startswith("operator:analyst-")
    listed = (await ks.client.get("/v1/alerts", headers=ks.admin)).json()["items"]
    assert listed[0]["acked_at"] is not None


async def test_timeline_feed_reads_with_the_session(ks: KS) -> None:
    await sign_in(ks, await ks.operator("viewer"))
    r = await ks.client.get("/console/stats/timeline?minutes=5")
    assert r.status_code == 200
    points = r.json()
    assert len(points) == 5
    assert set(points[0]) >= {"minute", "alerts", "revocations"}


async def test_pages_carry_security_headers(ks: KS) -> None:
    await sign_in(ks, ks.admin_token)
    for path in ("/console/login", "/console/alerts", "/console/audit"):
        r = await ks.client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-store"
    css = await ks.client.get("/console/static/console.css")
    assert css.status_code == 200


async def test_text_from_alerts_is_escaped(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    await _store_alert(ks, agent_id, task_id, evidence={"path": "<script>alert(1)</script>"})
    await sign_in(ks, ks.admin_token)
    page = await ks.client.get("/console/alerts")
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;" in page.text


async def test_alert_evidence_reads_as_facts_with_the_summary_apart(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    event_at = 1_764_684_000.25
    await _store_alert(
        ks,
        agent_id,
        task_id,
        evidence={"summary": "call outside scope", "event_at": event_at, "jti_hash": "ab" * 32},
    )
    await sign_in(ks, await ks.operator("viewer"))
    page = (await ks.client.get("/console/alerts")).text
    assert '<td class="summary">call outside scope</td>' in page
    assert '<details class="evidence">' in page
    assert "offending use at" in page
    assert "credential (SHA-256 of jti)" in page
    iso = dt.datetime.fromtimestamp(event_at, tz=dt.UTC).isoformat()
    assert f'<time datetime="{iso}" data-local>2025-12-02 14:00:00Z</time>' in page
    assert str(event_at) not in page  # no raw epoch float


# --------------------------------------------------------------------------- range + exports


def _iso_minute(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


async def test_alert_exports_stream_the_time_range_as_csv_and_json(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    recent = await _store_alert(ks, agent_id, task_id, {"summary": 'recent, with "quotes"'})
    old = await _store_alert(ks, agent_id, task_id, {"summary": "old"}, ago=7200)
    await sign_in(ks, await ks.operator("viewer"))
    window = {"from": _iso_minute(ks.services.clock.now() - 3600)}

    r = await ks.client.get("/console/alerts/export.csv", params=window)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["alert_id"] for row in rows] == [recent.alert_id]
    assert rows[0]["summary"] == 'recent, with "quotes"'
    assert rows[0]["at"].endswith("+00:00")

    r = await ks.client.get("/console/alerts/export.json", params=window)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert [a["alert_id"] for a in r.json()] == [recent.alert_id]

    # ``to`` is exclusive, epoch seconds work too; no range exports everything.
    before = {"to": str(ks.services.clock.now() - 3600)}
    r = await ks.client.get("/console/alerts/export.json", params=before)
    assert [a["alert_id"] for a in r.json()] == [old.alert_id]
    everything = (await ks.client.get("/console/alerts/export.json")).json()
    assert {a["alert_id"] for a in everything} == {recent.alert_id, old.alert_id}

    # The page searches the same range and its export links carry it.
    page = (await ks.client.get("/console/alerts", params=window)).text
    assert recent.alert_id in page
    assert old.alert_id not in page
    assert 'data-testid="range-note"' in page
    assert f"/console/alerts/export.csv?from={window['from'].replace(':', '%3A')}" in page
    closed = (await ks.client.get("/console/alerts", params=before)).text
    assert 'data-live="no"' in closed
    assert old.alert_id in closed
    assert recent.alert_id not in closed


async def test_audit_exports_stream_the_time_range(ks: KS) -> None:
    await open_task_for(ks)
    analyst = await ks.operator("analyst")
    await sign_in(ks, analyst)
    r = await ks.client.get("/console/audit/export.csv")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == ["seq", "at", "actor", "action", "subject", "detail"]
    assert "console.sign_in" in {row["action"] for row in rows}
    seqs = [int(row["seq"]) for row in rows]
    assert seqs == sorted(seqs)  # oldest first, as written

    r = await ks.client.get("/console/audit/export.json")
    assert r.headers["content-type"].startswith("application/json")
    entries = r.json()
    assert len(entries) == len(rows)
    assert all(isinstance(e["detail"], dict) for e in entries)

    past = {"to": _iso_minute(ks.services.clock.now() - 86_400)}
    assert (await ks.client.get("/console/audit/export.json", params=past)).json() == []
    page = await ks.client.get("/console/audit", params=past)
    assert "The audit log is empty." in page.text
    future = {"from": _iso_minute(ks.services.clock.now() + 3600)}
    csv_rows = (await ks.client.get("/console/audit/export.csv", params=future)).text
    assert csv_rows.strip() == "seq,at,actor,action,subject,detail"


async def test_exports_need_a_console_session_and_a_valid_range(ks: KS) -> None:
    for path in (
        "/console/alerts/export.csv",
        "/console/alerts/export.json",
        "/console/audit/export.csv",
        "/console/audit/export.json",
    ):
        ks.client.cookies.clear()
        r = await ks.client.get(path, headers={"accept": "text/csv"}, follow_redirects=False)
        assert r.status_code == 401, path
        assert "seq" not in r.text
        # The API's bearer token is not a console session.
        r = await ks.client.get(path, headers=ks.admin, follow_redirects=False)
        assert r.status_code in (303, 401), path
    await sign_in(ks, await ks.operator("viewer"))
    bad = await ks.client.get("/console/audit/export.csv", params={"from": "yesterday"})
    assert bad.status_code == 400
    backwards = await ks.client.get(
        "/console/alerts/export.json", params={"from": "2026-01-02", "to": "2026-01-01"}
    )
    assert backwards.status_code == 400


# --------------------------------------------------------------------------- task page


async def test_a_revoked_task_shows_who_revoked_it_and_its_history(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    await _store_alert(
        ks, agent_id, task_id, {"summary": "odd call", "resource": "tool/payments.send"}
    )
    analyst = await ks.operator("analyst")
    csrf = await sign_in(ks, analyst)
    before = (await ks.client.get(f"/console/tasks/{task_id}")).text
    assert 'data-testid="ended"' not in before
    assert USAGE_UNAVAILABLE in before
    base = {"csrf_token": csrf, "target": "task", "task_id": task_id, "reason": "stolen token"}
    confirm = await post_form(ks, "/console/revoke", base)
    done = await post_form(
        ks, "/console/revoke", base | {"nonce": nonce_of(confirm.text), "confirm": "yes"}
    )
    assert done.status_code == 303, done.text

    page = (await ks.client.get(f"/console/tasks/{task_id}")).text
    assert "Revoked by" in page
    actor = re.search(r'data-testid="ended-actor">([^<]+)<', page)
    assert actor is not None
    assert actor.group(1).startswith("operator:analyst-")
    assert re.search(r'data-testid="ended-reason">stolen token<', page)
    assert re.search(r'data-testid="ended-source">analyst<', page)
    # Usage: no guard reported (this app has no Kafka), said so — never invented.
    usage = page[page.index('data-testid="usage"') : page.index('id="history-h"')]
    assert usage.count(USAGE_UNAVAILABLE) == 3
    assert "1 issued (0 renewals), 1 revoked" in usage
    assert "tool/payments.send" in usage
    history = page[page.index('id="history"') : page.index('id="creds-h"')]
    for event in ("task opened", "credential issued", "alert (high)", "credential revoked"):
        assert event in history, event
    assert "stolen token" in history
    # The audit entry of the revocation, on the task page itself.
    audit = page[page.index('id="task-audit"') :]
    assert "<code>revoke</code>" in audit
    assert actor.group(1) in audit


async def test_a_task_ended_by_its_agents_revocation_names_it(ks: KS) -> None:
    agent_id, task_id, _token = await open_task_for(ks)
    csrf = await sign_in(ks, await ks.operator("analyst"))
    base = {"csrf_token": csrf, "target": "agent", "agent_id": agent_id, "reason": "rogue"}
    confirm = await post_form(ks, "/console/revoke", base)
    assert confirm.status_code == 200, confirm.text
    extra = {"nonce": nonce_of(confirm.text), "confirm": "yes"}
    done = await post_form(ks, "/console/revoke", base | extra)
    assert done.status_code == 303, done.text
    page = (await ks.client.get(f"/console/tasks/{task_id}")).text
    ended = page[page.index('data-testid="ended"') : page.index('data-testid="usage"')]
    assert f"of agent {agent_id}" in ended
    assert re.search(r'data-testid="ended-reason">rogue<', ended)
    audit = page[page.index('id="task-audit"') :]
    assert "<code>revoke</code>" in audit  # the agent's revocation entry, shown here too


async def _store_alert(
    ks: KS,
    agent_id: str,
    task_id: str,
    evidence: dict[str, Any] | None = None,
    *,
    ago: float = 0.0,
) -> Any:
    event = AlertEvent(
        alert_id=f"test-{task_id}-{len(evidence or {})}-{int(ago)}",
        at=ks.services.clock.now() - ago,
        rule="scope.out_of_scope",
        severity=Severity.HIGH,
        agent_id=agent_id,
        task_id=task_id,
        score=0.93,
        evidence=evidence or {"resource": "tool/payments.send"},
        action="alert",
    )
    stored = await on_app_loop(
        ks, alerts.store, ks.services.db, [event], received_at=ks.services.clock.now()
    )
    return stored[0]


# --------------------------------------------------------------------------- reported usage


async def test_the_task_page_shows_what_the_guards_reported(
    database_url: str, tmp_path: Path
) -> None:
    """UsageEvents on the real usage topic (tansu) reach the task page: calls, denials,
    resources and sources, as the guards reported them."""
    with start_tansu() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        async with running_app(database_url, tmp_path, kafka_bootstrap=broker.bootstrap) as ks:
            agent_id, task_id, _token = await open_task_for(ks)
            events = [
                UsageEvent(
                    event_id=f"e{i}",
                    at=1_800_000_000.0 + i,
                    agent_id=agent_id,
                    task_id=task_id,
                    jti_hash="j" * 64,
                    action="call",
                    resource=resource,
                    audience="https://tools.internal",
                    decision=decision,
                    reason=None if decision is Decision.ALLOW else "out of scope: call",
                    bytes_out=100,
                    source=Source(address="10.0.0.7", user_agent="agent/1.0"),
                )
                for i, (resource, decision) in enumerate(
                    [
                        ("tool/invoices.read", Decision.ALLOW),
                        ("tool/invoices.read", Decision.ALLOW),
                        ("tool/payments.send", Decision.DENY),
                    ]
                )
            ]
            producer = kafka.producer(settings, "test-usage")
            await producer.start()
            try:
                for e in events:
                    await producer.send_and_wait(
                        settings.kafka_usage_topic, encoder.encode(e), key=agent_id.encode()
                    )
            finally:
                await producer.stop()
            await sign_in(ks, await ks.operator("viewer"))
            for _ in range(200):
                page = (await ks.client.get(f"/console/tasks/{task_id}")).text
                if 'data-testid="usage-calls">3<' in page:
                    break
                await asyncio.sleep(0.05)
            usage = page[page.index('data-testid="usage"') : page.index('id="history-h"')]
            assert 'data-testid="usage-calls">3<' in usage, usage
            assert 'data-testid="usage-denied">1 (out of scope: call: 1)' in usage, usage
            assert "call tool/invoices.read × 2" in usage
            assert "call tool/payments.send × 1" in usage
            assert "address 10.0.0.7 × 3" in usage
            assert "user agent agent/1.0 × 3" in usage
            assert USAGE_UNAVAILABLE not in usage
