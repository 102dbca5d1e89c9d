"""Restart safety: what the service decided survives a stop and a start over the same data
directory and database — tasks, agents, revocations, the bootstrap admin, signing keys
(rotated online or offline). On SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import jwt

from service.kernel.clock import ManualClock
from tests.support.harness import AUD, KS, basic, bearer, running_app
from tests.support.serve import run_cli, serve

TASK = {"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}, "ttl": 3600}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _kid(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def _jwks_kids(client: httpx.Client) -> list[str]:
    r = client.get("/.well-known/jwks.json")
    assert r.status_code == 200, r.text
    return [k["kid"] for k in r.json()["keys"]]


def _agent(client: httpx.Client, admin: str, agent_id: str) -> str:
    r = client.post(
        "/v1/agents",
        json={"id": agent_id, "ceiling": {"grants": ["call:tool/invoices.*"], "audiences": [AUD]}},
        headers=bearer(admin),
    )
    assert r.status_code == 201, r.text
    secret: str = r.json()["client_secret"]
    return secret


def _open(client: httpx.Client, agent_id: str, secret: str) -> dict[str, Any]:
    r = client.post("/v1/tasks", json=TASK, headers=basic(agent_id, secret))
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


def _active(client: httpx.Client, rs: str, token: str) -> bool:
    r = client.post("/oauth2/introspect", data={"token": token}, headers=bearer(rs))
    assert r.status_code == 200, r.text
    body = r.json()
    if not body["active"]:
        assert body == {"active": False}
    active: bool = body["active"]
    return active


def _status(client: httpx.Client, admin: str, task_id: str) -> str:
    r = client.get(f"/v1/tasks/{task_id}", headers=bearer(admin))
    assert r.status_code == 200, r.text
    status: str = r.json()["status"]
    return status


# --------------------------------------------------------------------------- subprocess


def test_state_and_bootstrap_admin_survive_a_restart(database_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serve(data, database_url) as first, httpx.Client(base_url=first.url) as c:
        admin = first.printed_admin_token
        assert admin is not None, first.output()
        kids_before = _jwks_kids(c)
        a_secret = _agent(c, admin, "alpha")
        b_secret = _agent(c, admin, "bravo")
        r = c.post(
            "/v1/operators",
            json={"name": "rs", "role": "resource_server", "audience": AUD},
            headers=bearer(admin),
        )
        assert r.status_code == 201, r.text
        rs = r.json()["token"]

        live = _open(c, "alpha", a_secret)
        revoked = _open(c, "alpha", a_secret)
        revoked_jti = _open(c, "alpha", a_secret)
        completed = _open(c, "alpha", a_secret)
        of_suspended = _open(c, "bravo", b_secret)

        r = c.post(
            "/v1/revocations",
            json={"target": {"type": "task", "task_id": revoked["task"]["id"]}, "reason": "r1"},
            headers=bearer(admin),
        )
        assert r.status_code == 201, r.text
        r = c.post(
            "/v1/revocations",
            json={"target": {"type": "credential", "jti": revoked_jti["jti"]}, "reason": "r2"},
            headers=bearer(admin),
        )
        assert r.status_code == 201, r.text
        r = c.post(
            f"/v1/tasks/{completed['task']['id']}/complete", headers=basic("alpha", a_secret)
        )
        assert r.status_code == 200, r.text
        r = c.post("/v1/agents/bravo/suspend", json={"reason": "r3"}, headers=bearer(admin))
        assert r.status_code == 200, r.text
        assert _active(c, rs, live["access_token"])
        dead = [revoked, revoked_jti, completed, of_suspended]
        assert not any(_active(c, rs, t["access_token"]) for t in dead)

    with (
        serve(data, database_url, admin_token_hint=admin, port=first.port) as second,
        httpx.Client(base_url=second.url) as c,
    ):
        # No second bootstrap admin, and the first one still works.
        assert second.printed_admin_token is None, second.output()
        assert "KS_TOKEN" not in second.stdout, second.output()
        r = c.get("/v1/operators", headers=bearer(admin))
        assert r.status_code == 200, r.text
        admins = [o for o in r.json() if o["role"] == "admin"]
        assert [o["name"] for o in admins] == ["bootstrap-admin"]
        assert _jwks_kids(c) == kids_before  # the same signing key, not a new one

        agents = {
            a["id"]: a["status"] for a in c.get("/v1/agents", headers=bearer(admin)).json()["items"]
        }
        assert agents == {"alpha": "active", "bravo": "suspended"}

        # Revocations and task states survived; the live credential is still live.
        assert _active(c, rs, live["access_token"])
        for issued in dead:
            assert not _active(c, rs, issued["access_token"]), issued["task"]["id"]
        assert _status(c, admin, live["task"]["id"]) == "active"
        assert _status(c, admin, revoked["task"]["id"]) == "revoked"
        assert _status(c, admin, completed["task"]["id"]) == "completed"
        assert _status(c, admin, of_suspended["task"]["id"]) == "revoked"
        assert _status(c, admin, revoked_jti["task"]["id"]) == "active"  # only its jti died
        revocations = c.get("/v1/revocations", headers=bearer(admin)).json()["items"]
        assert [r["target"]["type"] for r in revocations] == ["task", "credential", "task", "agent"]

        # The secret (hashed) and the suspension both persisted.
        r = c.post(f"/v1/tasks/{live['task']['id']}/renew", headers=basic("alpha", a_secret))
        assert r.status_code == 200, r.text
        assert _active(c, rs, r.json()["access_token"])
        r = c.post("/v1/tasks", json=TASK, headers=basic("bravo", b_secret))
        assert r.status_code == 403, r.text
        # The revoked task's token cannot authenticate (deny state rebuilt on start).
        r = c.post("/v1/tasks", json=TASK, headers=bearer(revoked["access_token"]))
        assert r.status_code == 401, r.text
        r = c.post("/v1/tasks", json=TASK, headers=bearer(live["access_token"]))
        assert r.status_code == 201, r.text


def test_key_rotation_online_and_offline_keeps_old_tokens_verifiable(
    database_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    key_dir = data / "keys"
    with serve(data, database_url) as first, httpx.Client(base_url=first.url) as c:
        admin = first.printed_admin_token
        assert admin is not None, first.output()
        secret = _agent(c, admin, "alpha")
        r = c.post(
            "/v1/operators",
            json={"name": "rs", "role": "resource_server", "audience": AUD},
            headers=bearer(admin),
        )
        rs = r.json()["token"]
        [k1] = _jwks_kids(c)
        t1 = _open(c, "alpha", secret)
        assert _kid(t1["access_token"]) == k1
        assert _mode(key_dir) == 0o700
        assert _mode(key_dir / f"{k1}.pem") == 0o600

        r = c.post("/v1/keys/rotate", headers=bearer(admin))
        assert r.status_code == 200, r.text
        keys = r.json()
        [k2] = [k["kid"] for k in keys if k["active"]]
        assert k2 != k1
        [old] = [k for k in keys if k["kid"] == k1]
        assert old["retired_at"] is not None
        assert old["published_until"] > old["retired_at"]
        assert set(_jwks_kids(c)) == {k1, k2}
        assert not (key_dir / f"{k1}.pem").exists()
        assert (key_dir / f"{k1}.json").exists()
        assert _mode(key_dir / f"{k2}.pem") == 0o600
        assert _active(c, rs, t1["access_token"])
        t2 = _open(c, "alpha", secret)
        assert _kid(t2["access_token"]) == k2

    # Offline rotation while the service is stopped.
    result = run_cli(["keys", "rotate", "--offline"], env={"KS_DATA_DIR": str(data)})
    assert result.returncode == 0, result.stderr
    assert "rotated: new signing key" in result.stdout
    k3 = result.stdout.split("new signing key ", 1)[1].split()[0]
    assert k3 not in (k1, k2)
    assert not (key_dir / f"{k2}.pem").exists()
    assert _mode(key_dir / f"{k3}.pem") == 0o600
    assert _mode(key_dir) == 0o700
    assert sorted(p.name for p in key_dir.glob("*.pem")) == [f"{k3}.pem"]
    meta2 = json.loads((key_dir / f"{k2}.json").read_text())
    assert meta2["retired_at"] is not None

    with (
        serve(data, database_url, admin_token_hint=admin, port=first.port) as second,
        httpx.Client(base_url=second.url) as c,
    ):
        assert second.printed_admin_token is None, second.output()
        assert set(_jwks_kids(c)) == {k1, k2, k3}
        # Every token signed before either rotation still verifies, independently too.
        jwks = jwt.PyJWKSet.from_dict(c.get("/.well-known/jwks.json").json())
        for issued in (t1, t2):
            assert _active(c, rs, issued["access_token"])
            [key] = [k for k in jwks.keys if k.key_id == _kid(issued["access_token"])]
            jwt.decode(issued["access_token"], key=key, algorithms=["EdDSA"], audience=AUD)
        t3 = _open(c, "alpha", secret)
        assert _kid(t3["access_token"]) == k3
        assert _active(c, rs, t3["access_token"])
        listed = c.get("/v1/keys", headers=bearer(admin)).json()
        assert [k["kid"] for k in listed if k["active"]] == [k3]


# --------------------------------------------------------------------------- in-process


async def _introspect_active(ks: KS, rs: str, token: str) -> bool:
    active: bool = (await ks.introspect(token, rs))["active"]
    return active


async def test_retired_key_leaves_the_jwks_after_the_publish_window(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(start=float(int(time.time())))
    async with running_app(database_url, tmp_path, clock=clock, credential_ttl=2, leeway=0) as ks:
        rs = await ks.operator("resource_server", audience=AUD)
        agent = await ks.agent()
        old = await ks.open_task(agent.headers)
        k1 = _kid(old["access_token"])
        assert old["expires_in"] == 2

        r = await ks.client.post("/v1/keys/rotate", headers=ks.admin)
        assert r.status_code == 200, r.text
        [k2] = [k["kid"] for k in r.json() if k["active"]]
        [retired] = [k for k in r.json() if k["kid"] == k1]
        assert retired["published_until"] == retired["retired_at"] + 2  # ttl 2 + leeway 0

        jwks = (await ks.client.get("/.well-known/jwks.json")).json()
        assert {k["kid"] for k in jwks["keys"]} == {k1, k2}
        assert await _introspect_active(ks, rs, old["access_token"])
        new = await ks.open_task(agent.headers)
        assert _kid(new["access_token"]) == k2

        clock.advance(1)  # inside the window
        jwks = (await ks.client.get("/.well-known/jwks.json")).json()
        assert {k["kid"] for k in jwks["keys"]} == {k1, k2}
        assert await _introspect_active(ks, rs, old["access_token"])

        clock.advance(1.5)  # past retired_at + credential_ttl + leeway
        jwks = (await ks.client.get("/.well-known/jwks.json")).json()
        assert [k["kid"] for k in jwks["keys"]] == [k2]
        keys = (await ks.client.get("/v1/keys", headers=ks.admin)).json()
        assert [k["kid"] for k in keys] == [k2]
        assert not await _introspect_active(ks, rs, old["access_token"])
        # The new key keeps signing live credentials on the manual clock.
        fresh = await ks.open_task(agent.headers)
        assert _kid(fresh["access_token"]) == k2
        assert await _introspect_active(ks, rs, fresh["access_token"])

    # After a restart the retired key stays unpublished, and the active one signs.
    async with running_app(database_url, tmp_path, clock=clock, credential_ttl=2, leeway=0) as ks2:
        assert ks2.services.bootstrap_admin_token is None
        jwks = (await ks2.client.get("/.well-known/jwks.json")).json()
        assert [k["kid"] for k in jwks["keys"]] == [k2]
        assert not (tmp_path / "keys" / f"{k1}.pem").exists()


async def test_restart_in_process_keeps_keys_revocations_and_the_admin(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(start=float(int(time.time())) + 0.5)
    async with running_app(database_url, tmp_path, clock=clock) as ks:
        rs = await ks.operator("resource_server", audience=AUD)
        agent = await ks.agent()
        before_cutoff = await ks.open_task(agent.headers)
        r = await ks.client.post(
            "/v1/revocations",
            json={"target": {"type": "cutoff"}, "reason": "key leak"},
            headers=ks.admin,
        )
        assert r.status_code == 201, r.text
        clock.advance(1)
        after_cutoff = await ks.open_task(agent.headers)
        r = await ks.client.post("/v1/keys/rotate", headers=ks.admin)
        assert r.status_code == 200, r.text
        kids = {k["kid"] for k in r.json()}
        key_dir = tmp_path / "keys"
        assert _mode(key_dir) == 0o700
        assert [_mode(p) for p in key_dir.glob("*.pem")] == [0o600]
        admin_token = ks.admin_token

    clock.advance(1)
    async with running_app(database_url, tmp_path, clock=clock) as restarted:
        assert restarted.services.bootstrap_admin_token is None
        ks2 = dataclasses.replace(restarted, admin_token=admin_token)
        r = await ks2.client.get("/v1/agents", headers=ks2.admin)
        assert r.status_code == 200, r.text
        assert {a["id"] for a in r.json()["items"]} == {agent.id}
        jwks = (await ks2.client.get("/.well-known/jwks.json")).json()
        assert {k["kid"] for k in jwks["keys"]} == kids
        assert not await _introspect_active(ks2, rs, before_cutoff["access_token"])
        assert await _introspect_active(ks2, rs, after_cutoff["access_token"])
        r = await ks2.client.get(f"/v1/tasks/{before_cutoff['task']['id']}", headers=ks2.admin)
        assert r.json()["status"] == "revoked"
        # A credential issued after the restart, by the rotated key, is alive.
        fresh = await ks2.open_task(agent.headers)
        assert await _introspect_active(ks2, rs, fresh["access_token"])
