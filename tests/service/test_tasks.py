"""Tasks over the in-process app (SQLite and PostgreSQL): sub-tasks and attenuation,
renewal, limit inheritance, RFC 7523 client assertions, ES256, expiry, DPoP binding,
agent suspension and reinstatement, and revoking what is already revoked."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from service.kernel.clock import ManualClock
from tests.support.harness import AUD, ISSUER, KS, basic, bearer, running_app
from tests.support.tokens import count_rows


def claims_of(token: str) -> dict[str, Any]:
    result: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return result


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def verify_with_jwks(ks: KS, token: str, alg: str) -> dict[str, Any]:
    """Verify a credential the way a resource server would: pyjwt and the served JWKS."""
    jwks = jwt.PyJWKSet.from_dict((await ks.client.get("/.well-known/jwks.json")).json())
    kid = jwt.get_unverified_header(token)["kid"]
    [key] = [k for k in jwks.keys if k.key_id == kid]
    claims: dict[str, Any] = jwt.decode(
        token, key=key, algorithms=[alg], audience=AUD, issuer=ISSUER
    )
    return claims


async def get_task(ks: KS, task_id: str) -> dict[str, Any]:
    r = await ks.client.get(f"/v1/tasks/{task_id}", headers=ks.admin)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


# --------------------------------------------------------------------------- sub-tasks


PARENT_GRANTS = ("call:tool/invoices.*", "read:file:///data/reports/**")


async def test_subtask_scope_must_lie_within_the_parent(ks: KS) -> None:
    agent = await ks.agent()
    parent = await ks.open_task(agent.headers, grants=PARENT_GRANTS, ttl=600)
    parent_auth = bearer(parent["access_token"])

    # Inside the agent's ceiling but outside the parent's scope: refused, named.
    r = await ks.client.post(
        "/v1/tasks",
        json={
            "scope": {
                "grants": ["call:tool/invoices.read", "GET:https://api.internal/v1/users"],
                "audiences": [AUD],
            }
        },
        headers=parent_auth,
    )
    assert r.status_code == 403, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["offending"] == ["grant 'GET:https://api.internal/v1/users'"]

    # A wider pattern than the parent's is refused too.
    r = await ks.client.post(
        "/v1/tasks",
        json={"scope": {"grants": ["read:file:///data/**"], "audiences": [AUD]}},
        headers=parent_auth,
    )
    assert r.status_code == 403, r.text
    assert r.json()["offending"] == ["grant 'read:file:///data/**'"]

    # An audience the parent does not have is refused (with no grant listed).
    r = await ks.client.post(
        "/v1/tasks",
        json={"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD, "https://x.y"]}},
        headers=parent_auth,
    )
    assert r.status_code == 403, r.text
    assert r.json()["offending"] == ["audience 'https://x.y'"]

    # Narrower: accepted.
    child = await ks.open_task(parent_auth, grants=("read:file:///data/reports/q3.csv",))
    assert child["task"]["parent_id"] == parent["task"]["id"]
    assert child["task"]["scope"]["grants"] == ["read:file:///data/reports/q3.csv"]


async def test_subtask_credential_is_bounded_by_and_chained_to_the_parent(ks: KS) -> None:
    agent = await ks.agent()
    parent = await ks.open_task(agent.headers, grants=PARENT_GRANTS, ttl=120)
    parent_claims = claims_of(parent["access_token"])

    # Asks for far longer than the parent lives: capped at the parent's deadline.
    child = await ks.open_task(bearer(parent["access_token"]), ttl=3600)
    assert child["task"]["deadline"] <= parent["task"]["deadline"]
    claims = await verify_with_jwks(ks, child["access_token"], "EdDSA")
    assert claims["act"] == {"sub": parent["task"]["spiffe_id"]}
    assert claims["task"]["parent_id"] == parent["task"]["id"]
    assert claims["exp"] <= parent_claims["exp"]
    assert claims["exp"] <= child["task"]["deadline"]
    assert claims["sub"] == child["task"]["spiffe_id"] != parent["task"]["spiffe_id"]
    assert claims["client_id"] == agent.id

    # A grandchild nests the chain (RFC 8693 §4.1): the closest actor first.
    grandchild = await ks.open_task(bearer(child["access_token"]))
    g = claims_of(grandchild["access_token"])
    assert g["act"] == {
        "sub": child["task"]["spiffe_id"],
        "act": {"sub": parent["task"]["spiffe_id"]},
    }
    assert g["task"]["parent_id"] == child["task"]["id"]
    assert g["exp"] <= claims["exp"]


async def test_completing_the_parent_revokes_its_subtasks(ks: KS) -> None:
    rs = await ks.operator("resource_server", audience=AUD)
    agent = await ks.agent()
    parent = await ks.open_task(agent.headers, grants=PARENT_GRANTS)
    child = await ks.open_task(bearer(parent["access_token"]))
    grandchild = await ks.open_task(bearer(child["access_token"]))
    sibling = await ks.open_task(agent.headers)  # another top-level task: untouched
    for issued in (child, grandchild, sibling):
        assert (await ks.introspect(issued["access_token"], rs))["active"] is True

    r = await ks.client.post(f"/v1/tasks/{parent['task']['id']}/complete", headers=agent.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed"

    for issued in (parent, child, grandchild):
        assert await ks.introspect(issued["access_token"], rs) == {"active": False}
    assert (await get_task(ks, child["task"]["id"]))["status"] == "revoked"
    assert (await get_task(ks, grandchild["task"]["id"]))["status"] == "revoked"
    assert (await get_task(ks, parent["task"]["id"]))["status"] == "completed"
    assert (await ks.introspect(sibling["access_token"], rs))["active"] is True
    assert (await get_task(ks, sibling["task"]["id"]))["status"] == "active"

    # The sub-task's credential no longer authenticates anything.
    r = await ks.client.post(
        "/v1/tasks",
        json={"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}},
        headers=bearer(child["access_token"]),
    )
    assert r.status_code == 401, r.text


# --------------------------------------------------------------------------- renew


async def test_renew_gives_a_fresh_credential_until_the_task_ends(ks: KS) -> None:
    rs = await ks.operator("resource_server", audience=AUD)
    agent = await ks.agent()
    opened = await ks.open_task(agent.headers)
    task_id = opened["task"]["id"]

    r = await ks.client.post(f"/v1/tasks/{task_id}/renew", headers=agent.headers)
    assert r.status_code == 200, r.text
    renewed = r.json()
    assert renewed["jti"] != opened["jti"]
    assert claims_of(renewed["access_token"])["jti"] == renewed["jti"]
    assert claims_of(renewed["access_token"])["sub"] == opened["task"]["spiffe_id"]
    assert (await ks.introspect(renewed["access_token"], rs))["active"] is True

    # The task's own credential may renew it as well.
    r = await ks.client.post(f"/v1/tasks/{task_id}/renew", headers=bearer(renewed["access_token"]))
    assert r.status_code == 200, r.text
    assert r.json()["jti"] not in (opened["jti"], renewed["jti"])

    r = await ks.client.post(f"/v1/tasks/{task_id}/complete", headers=agent.headers)
    assert r.status_code == 200, r.text
    r = await ks.client.post(f"/v1/tasks/{task_id}/renew", headers=agent.headers)
    assert r.status_code == 409, r.text
    assert r.json()["status"] == 409
    r = await ks.client.post(f"/v1/tasks/{task_id}/complete", headers=agent.headers)
    assert r.status_code == 409, r.text
    assert await ks.introspect(renewed["access_token"], rs) == {"active": False}


# --------------------------------------------------------------------------- limits


async def test_limits_left_unset_are_inherited_from_the_ceiling(ks: KS) -> None:
    agent = await ks.agent(limits={"max_calls": 100, "max_rate": 5, "max_bytes_out": 4096})
    opened = await ks.open_task(agent.headers, limits={"max_calls": 10})
    limits = opened["task"]["scope"]["limits"]
    assert limits["max_calls"] == 10
    assert limits["max_rate"] == 5.0
    assert limits["max_bytes_out"] == 4096
    token_limits = claims_of(opened["access_token"])["task"]["limits"]
    assert token_limits == {"max_calls": 10, "max_bytes_out": 4096, "max_rate": 5.0}

    # Nothing declared: everything comes from the ceiling.
    plain = await ks.open_task(agent.headers)
    assert plain["task"]["scope"]["limits"]["max_calls"] == 100

    # A limit looser than the ceiling is refused and named.
    r = await ks.client.post(
        "/v1/tasks",
        json={
            "scope": {
                "grants": ["call:tool/invoices.read"],
                "audiences": [AUD],
                "limits": {"max_calls": 1000},
            }
        },
        headers=agent.headers,
    )
    assert r.status_code == 403, r.text
    assert any("max_calls" in item for item in r.json()["offending"])

    # A sub-task inherits the parent's tightened limits.
    child = await ks.open_task(bearer(opened["access_token"]))
    assert child["task"]["scope"]["limits"]["max_calls"] == 10
    assert child["task"]["scope"]["limits"]["max_rate"] == 5.0


# --------------------------------------------------------------------------- RFC 7523


def _public_jwk(key: ed25519.Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes_raw()
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def _assertion(
    key: ed25519.Ed25519PrivateKey, agent_id: str, *, lifetime: int = 60, jti: str | None = None
) -> str:
    now = int(time.time())
    return jwt.encode(
        {
            "iss": agent_id,
            "sub": agent_id,
            "aud": ISSUER,
            "iat": now,
            "exp": now + lifetime,
            "jti": jti or secrets.token_urlsafe(16),
        },
        key,
        algorithm="EdDSA",
    )


TASK_BODY = {"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}, "ttl": 300}


async def test_private_key_jwt_agent_opens_tasks_with_client_assertions(ks: KS) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    agent_id = f"keyed-{secrets.token_hex(3)}"
    r = await ks.client.post(
        "/v1/agents",
        json={
            "id": agent_id,
            "ceiling": {"grants": ["call:tool/invoices.*"], "audiences": [AUD]},
            "public_jwk": _public_jwk(key),
            "issue_secret": False,
        },
        headers=ks.admin,
    )
    assert r.status_code == 201, r.text
    assert r.json()["client_secret"] is None
    assert r.json()["agent"]["auth_methods"] == ["private_key_jwt"]

    assertion = _assertion(key, agent_id)
    r = await ks.client.post("/v1/tasks", json=TASK_BODY, headers=bearer(assertion))
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["task"]["agent_id"] == agent_id
    claims = await verify_with_jwks(ks, issued["access_token"], "EdDSA")
    assert claims["client_id"] == agent_id

    # The same assertion again (same jti): a replay.
    r = await ks.client.post("/v1/tasks", json=TASK_BODY, headers=bearer(assertion))
    assert r.status_code == 401, r.text
    assert r.json()["type"] == "urn:killswitch:problem:unauthenticated"
    # A different assertion reusing the jti is a replay too.
    jti = claims_of(assertion)["jti"]
    r = await ks.client.post(
        "/v1/tasks", json=TASK_BODY, headers=bearer(_assertion(key, agent_id, jti=jti))
    )
    assert r.status_code == 401, r.text

    # Signed by a key the agent did not register.
    other = ed25519.Ed25519PrivateKey.generate()
    r = await ks.client.post(
        "/v1/tasks", json=TASK_BODY, headers=bearer(_assertion(other, agent_id))
    )
    assert r.status_code == 401, r.text
    assert r.headers.get("www-authenticate")

    # Lives too long (> 300 s).
    r = await ks.client.post(
        "/v1/tasks", json=TASK_BODY, headers=bearer(_assertion(key, agent_id, lifetime=400))
    )
    assert r.status_code == 401, r.text

    # Already expired.
    r = await ks.client.post(
        "/v1/tasks", json=TASK_BODY, headers=bearer(_assertion(key, agent_id, lifetime=-60))
    )
    assert r.status_code == 401, r.text

    # iss and sub must both be the agent.
    now = int(time.time())
    mixed = jwt.encode(
        {"iss": agent_id, "sub": "someone-else", "aud": ISSUER, "exp": now + 60, "jti": "x1"},
        key,
        algorithm="EdDSA",
    )
    r = await ks.client.post("/v1/tasks", json=TASK_BODY, headers=bearer(mixed))
    assert r.status_code == 401, r.text

    # Addressed to another issuer.
    wrong_aud = jwt.encode(
        {"iss": agent_id, "sub": agent_id, "aud": "http://elsewhere", "exp": now + 60, "jti": "x2"},
        key,
        algorithm="EdDSA",
    )
    r = await ks.client.post("/v1/tasks", json=TASK_BODY, headers=bearer(wrong_aud))
    assert r.status_code == 401, r.text

    # A fresh assertion still works after all those failures.
    r = await ks.client.post("/v1/tasks", json=TASK_BODY, headers=bearer(_assertion(key, agent_id)))
    assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- ES256


async def test_es256_signing_is_selectable(database_url: str, tmp_path: Path) -> None:
    async with running_app(database_url, tmp_path, signing_alg="ES256") as ks:
        agent = await ks.agent()
        issued = await ks.open_task(agent.headers)
        header = jwt.get_unverified_header(issued["access_token"])
        assert header["alg"] == "ES256"
        assert header["typ"] == "at+jwt"
        jwks = (await ks.client.get("/.well-known/jwks.json")).json()
        [jwk] = jwks["keys"]
        assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ES256")
        assert "d" not in jwk
        claims = await verify_with_jwks(ks, issued["access_token"], "ES256")
        assert claims["sub"] == issued["task"]["spiffe_id"]
        # Not verifiable as EdDSA: the algorithm is pinned by the key.
        key = jwt.PyJWKSet.from_dict(jwks).keys[0]
        try:
            jwt.decode(issued["access_token"], key=key, algorithms=["EdDSA"], audience=AUD)
        except jwt.PyJWTError:
            pass
        else:
            raise AssertionError("an ES256 token verified as EdDSA")
        rs = await ks.operator("resource_server", audience=AUD)
        assert (await ks.introspect(issued["access_token"], rs))["active"] is True
        meta = (await ks.client.get("/.well-known/oauth-authorization-server")).json()
        assert meta["access_token_signing_alg_values_supported"] == ["ES256"]


# --------------------------------------------------------------------------- expiry


async def test_task_expires_at_its_deadline(database_url: str, tmp_path: Path) -> None:
    clock = ManualClock()
    async with running_app(database_url, tmp_path, clock=clock) as ks:
        rs = await ks.operator("resource_server", audience=AUD)
        agent = await ks.agent()
        issued = await ks.open_task(agent.headers, ttl=30)
        task_id = issued["task"]["id"]
        assert issued["expires_at"] <= issued["task"]["deadline"]
        assert (await ks.introspect(issued["access_token"], rs))["active"] is True
        assert (await get_task(ks, task_id))["status"] == "active"

        clock.advance(29)
        assert (await get_task(ks, task_id))["status"] == "active"
        clock.advance(1.5)
        assert (await get_task(ks, task_id))["status"] == "expired"
        assert await ks.introspect(issued["access_token"], rs) == {"active": False}
        r = await ks.client.post(f"/v1/tasks/{task_id}/renew", headers=agent.headers)
        assert r.status_code == 409, r.text
        r = await ks.client.post(f"/v1/tasks/{task_id}/complete", headers=agent.headers)
        assert r.status_code == 409, r.text


# --------------------------------------------------------------------------- DPoP


async def test_dpop_jkt_binds_the_credential(ks: KS) -> None:
    pop = ed25519.Ed25519PrivateKey.generate()
    jwk = _public_jwk(pop)
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":")
    )
    jkt = b64url(hashlib.sha256(canonical.encode()).digest())
    agent = await ks.agent()
    r = await ks.client.post(
        "/v1/tasks", json={**TASK_BODY, "dpop_jkt": jkt}, headers=agent.headers
    )
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["token_type"] == "DPoP"
    assert claims_of(issued["access_token"])["cnf"] == {"jkt": jkt}
    rs = await ks.operator("resource_server", audience=AUD)
    assert (await ks.introspect(issued["access_token"], rs))["token_type"] == "DPoP"

    plain = await ks.open_task(agent.headers)
    assert plain["token_type"] == "Bearer"
    assert "cnf" not in claims_of(plain["access_token"])

    r = await ks.client.post(
        "/v1/tasks", json={**TASK_BODY, "dpop_jkt": "not-a-thumbprint"}, headers=agent.headers
    )
    assert r.status_code == 400, r.text


# --------------------------------------------------------------------------- suspension


async def _suspend_reinstate_cycle(ks: KS, clock: ManualClock | None, gap: float) -> dict[str, Any]:
    """Suspend an agent, check it is blocked, reinstate it ``gap`` seconds later (on the
    manual clock, if any) and return a credential issued after reinstatement."""
    rs = await ks.operator("resource_server", audience=AUD)
    agent = await ks.agent()
    before = await ks.open_task(agent.headers)
    child = await ks.open_task(bearer(before["access_token"]))

    r = await ks.client.post(
        f"/v1/agents/{agent.id}/suspend", json={"reason": "compromised host"}, headers=ks.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["affected_tasks"] == 2
    shown = (await ks.client.get(f"/v1/agents/{agent.id}", headers=ks.admin)).json()
    assert shown["status"] == "suspended"
    assert shown["suspend_reason"] == "compromised host"
    for issued in (before, child):
        assert await ks.introspect(issued["access_token"], rs) == {"active": False}
        assert (await get_task(ks, issued["task"]["id"]))["status"] == "revoked"
    problem = await ks.open_task(agent.headers, expect=403)
    assert "suspended" in problem["detail"]
    r = await ks.client.post(f"/v1/tasks/{before['task']['id']}/renew", headers=agent.headers)
    assert r.status_code == 409, r.text

    if clock is not None:
        clock.advance(gap)
    r = await ks.client.post(
        f"/v1/agents/{agent.id}/reinstate", json={"reason": "host rebuilt"}, headers=ks.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active"
    r = await ks.client.post(
        f"/v1/agents/{agent.id}/reinstate", json={"reason": "again"}, headers=ks.admin
    )
    assert r.status_code == 409, r.text

    after = await ks.open_task(agent.headers)
    # Reinstating revives nothing that was revoked.
    for issued in (before, child):
        assert await ks.introspect(issued["access_token"], rs) == {"active": False}
        assert (await get_task(ks, issued["task"]["id"]))["status"] == "revoked"
    r = await ks.client.post(f"/v1/tasks/{before['task']['id']}/renew", headers=agent.headers)
    assert r.status_code == 409, r.text
    after["rs"] = rs
    return after


async def _assert_alive(ks: KS, issued: dict[str, Any]) -> None:
    assert (await ks.introspect(issued["access_token"], issued["rs"]))["active"] is True
    await ks.open_task(bearer(issued["access_token"]))  # and it authenticates a sub-task


async def test_suspension_blocks_new_tasks_until_reinstated(ks: KS) -> None:
    await _suspend_reinstate_cycle(ks, clock=None, gap=0)


async def test_credentials_issued_after_reinstatement_are_alive(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(start=float(int(time.time())) + 0.5)
    async with running_app(database_url, tmp_path, clock=clock) as ks:
        after = await _suspend_reinstate_cycle(ks, clock=clock, gap=1.5)
        await _assert_alive(ks, after)


async def test_reinstated_agent_gets_live_credentials_within_the_suspension_second(
    database_url: str, tmp_path: Path
) -> None:
    """Suspend at t = N.5 s, reinstate and open a task at N.75 s: the service answers 201
    with a credential, and that credential must be alive. (Its iat, truncated to N, is
    <= the agent's cut-off N.5, so the deny state counts it as issued before the cut-off.)"""
    clock = ManualClock(start=float(int(time.time())) + 0.5)
    async with running_app(database_url, tmp_path, clock=clock) as ks:
        after = await _suspend_reinstate_cycle(ks, clock=clock, gap=0.25)
        await _assert_alive(ks, after)


async def test_unknown_or_foreign_tasks_are_not_found(ks: KS) -> None:
    a, b = await ks.agent(), await ks.agent()
    issued = await ks.open_task(a.headers)
    for path in ("renew", "complete"):
        r = await ks.client.post(f"/v1/tasks/{issued['task']['id']}/{path}", headers=b.headers)
        assert r.status_code == 404, r.text
    r = await ks.client.post("/v1/tasks/nope/renew", headers=a.headers)
    assert r.status_code == 404, r.text
    r = await ks.client.post("/v1/tasks", json=TASK_BODY, headers=basic(a.id, "wrong"))
    assert r.status_code == 401, r.text


# --------------------------------------------------------------------------- revoking twice


async def _revoke(ks: KS, target: dict[str, str], reason: str) -> Any:
    return await ks.client.post(
        "/v1/revocations", json={"target": target, "reason": reason}, headers=ks.admin
    )


async def test_revoking_a_revoked_task_answers_with_its_revocation_writes_nothing(
    ks: KS,
) -> None:
    agent = await ks.agent()
    parent = await ks.open_task(agent.headers)
    child = await ks.open_task(bearer(parent["access_token"]))
    target = {"type": "task", "task_id": parent["task"]["id"]}
    first = await _revoke(ks, target, "left its scope")
    assert first.status_code == 201, first.text
    assert first.json()["affected_tasks"] == 2
    before = {t: await count_rows(ks, t) for t in ("revocations", "audit_log", "outbox")}

    again = await _revoke(ks, target, "once more")
    assert again.status_code == 200, again.text
    assert again.json() == first.json()  # the first record, its reason and counts
    # A sub-task the parent's revocation took along answers with that revocation too.
    child_target = {"type": "task", "task_id": child["task"]["id"]}
    r = await _revoke(ks, child_target, "the child")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == first.json()["id"]
    # So does one of their credentials.
    r = await _revoke(ks, {"type": "credential", "jti": child["jti"]}, "its credential")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == first.json()["id"]
    assert {t: await count_rows(ks, t) for t in before} == before
    assert (await get_task(ks, child["task"]["id"]))["close_reason"] == "left its scope"


async def test_revoking_a_revoked_credential_or_a_completed_task_writes_nothing(ks: KS) -> None:
    agent = await ks.agent()
    issued = await ks.open_task(agent.headers)
    credential = {"type": "credential", "jti": issued["jti"]}
    first = await _revoke(ks, credential, "leaked")
    assert first.status_code == 201, first.text
    again = await _revoke(ks, credential, "leaked again")
    assert (again.status_code, again.json()) == (200, first.json())
    # Its task is still active (a credential target leaves it): revoking it is new.
    task = {"type": "task", "task_id": issued["task"]["id"]}
    r = await _revoke(ks, task, "now the task")
    assert r.status_code == 201, r.text

    done = await ks.open_task(agent.headers)
    r = await ks.client.post(f"/v1/tasks/{done['task']['id']}/complete", headers=agent.headers)
    assert r.status_code == 200, r.text
    count = await count_rows(ks, "revocations")
    r = await _revoke(ks, {"type": "task", "task_id": done["task"]["id"]}, "too late")
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "task_end"
    assert r.json()["target"] == {"type": "task", "task_id": done["task"]["id"]}
    assert await count_rows(ks, "revocations") == count
    assert (await get_task(ks, done["task"]["id"]))["status"] == "completed"


async def test_two_racing_revocations_of_one_task_write_one_record(ks: KS) -> None:
    agent = await ks.agent()
    issued = await ks.open_task(agent.headers)
    target = {"type": "task", "task_id": issued["task"]["id"]}
    answers = await asyncio.gather(*(_revoke(ks, target, f"racer {i}") for i in range(4)))
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 201], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert await count_rows(ks, "revocations") == 1
