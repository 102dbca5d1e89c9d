"""JWT attacks and dead credentials: each must be refused by introspection (exactly
``{"active": false}``) *and* by the service's own verifier / status check.

Attack tokens are forged at run time from a real issued token and the service's real
signing key (or a freshly generated one); see ``tests/support/tokens.py``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from service.credentials.status import live_token
from service.kernel.clock import ManualClock
from service.kernel.deny import DenyState
from service.kernel.errors import TokenRejected
from tests.support import tokens
from tests.support.harness import AUD, KS, Agent, bearer, running_app

OTHER_AUD = "https://other.internal"


@dataclass
class Ctx:
    agent: Agent
    issued: dict[str, Any]
    rs: str

    @property
    def token(self) -> str:
        token: str = self.issued["access_token"]
        return token

    @property
    def task_id(self) -> str:
        task_id: str = self.issued["task"]["id"]
        return task_id


async def _ctx(ks: KS) -> Ctx:
    agent = await ks.agent()
    issued = await ks.open_task(agent.headers)
    rs = await ks.operator("resource_server", audience=AUD)
    return Ctx(agent=agent, issued=issued, rs=rs)


async def _introspect_raw(ks: KS, token: str, rs: str) -> dict[str, Any]:
    r = await ks.client.post("/oauth2/introspect", data={"token": token}, headers=bearer(rs))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def _assert_active(ks: KS, ctx: Ctx, token: str) -> None:
    body = await _introspect_raw(ks, token, ctx.rs)
    assert body["active"] is True, body
    assert body["jti"] == tokens.claims_of(token)["jti"]
    ks.services.verifier.verify(token)
    ks.services.verifier.verify(token, audience=AUD)
    await tokens.on_app_loop(ks, live_token, ks.services, token, audience=AUD)


async def _assert_inactive(ks: KS, ctx: Ctx, token: str) -> None:
    assert await _introspect_raw(ks, token, ctx.rs) == {"active": False}
    with pytest.raises(TokenRejected):
        await tokens.on_app_loop(ks, live_token, ks.services, token, audience=AUD)
    # Nor may it authenticate as a task credential anywhere.
    r = await ks.client.get(f"/v1/tasks/{ctx.task_id}", headers=bearer(token))
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")


# --------------------------------------------------------------------------- control


async def test_positive_control_untouched_token_is_active(ks: KS) -> None:
    ctx = await _ctx(ks)
    await _assert_active(ks, ctx, ctx.token)
    body = await _introspect_raw(ks, ctx.token, ctx.rs)
    assert body["client_id"] == ctx.agent.id
    assert body["aud"] == [AUD]
    assert body["scope"] == "call:tool/invoices.read"
    # The task credential authenticates its own task.
    r = await ks.client.get(f"/v1/tasks/{ctx.task_id}", headers=bearer(ctx.token))
    assert r.status_code == 200, r.text
    # A sign_eddsa re-signing of the same claims with the real key is accepted too, so
    # the forgeries below are refused for what they change, not for how they are built.
    key = ks.services.keys.active
    resigned = tokens.sign_eddsa(tokens.claims_of(ctx.token), key.private_key, key.kid)
    await _assert_active(ks, ctx, resigned)


# --------------------------------------------------------------------------- forgeries


def _forge_alg_none(ks: KS, token: str) -> str:
    return tokens.alg_none(tokens.claims_of(token), ks.services.keys.active.kid)


def _forge_hs256_pem(ks: KS, token: str) -> str:
    pem = ks.services.keys.active.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return tokens.hs256(tokens.claims_of(token), pem, ks.services.keys.active.kid)


def _forge_hs256_raw(ks: KS, token: str) -> str:
    public = ks.services.keys.active.public_key
    assert isinstance(public, ed25519.Ed25519PublicKey)
    return tokens.hs256(
        tokens.claims_of(token), public.public_bytes_raw(), ks.services.keys.active.kid
    )


def _forge_hs256_jwk_x(ks: KS, token: str) -> str:
    x = ks.services.keys.active.meta.public_jwk["x"]
    return tokens.hs256(tokens.claims_of(token), x.encode(), ks.services.keys.active.kid)


def _forge_unknown_kid(ks: KS, token: str) -> str:
    key = ks.services.keys.active
    return tokens.sign_eddsa(tokens.claims_of(token), key.private_key, "no-such-kid")


def _forge_tampered_scope(ks: KS, token: str) -> str:
    claims = tokens.claims_of(token)
    claims["scope"] = "call:tool/invoices.* GET:https://api.internal/v1/**"
    return tokens.replace_payload(token, claims)


def _forge_tampered_task(ks: KS, token: str) -> str:
    claims = tokens.claims_of(token)
    claims["exp"] = claims["exp"] + 86_400
    return tokens.replace_payload(token, claims)


def _real_key_with(ks: KS, token: str, **changes: Any) -> str:
    claims = tokens.claims_of(token)
    claims.update(changes)
    key = ks.services.keys.active
    return tokens.sign_eddsa(claims, key.private_key, key.kid)


def _forge_expired(ks: KS, token: str) -> str:
    now = int(time.time())
    return _real_key_with(ks, token, iat=now - 3600, nbf=now - 3600, exp=now - 60)


def _forge_not_yet_valid(ks: KS, token: str) -> str:
    return _real_key_with(ks, token, nbf=int(time.time()) + 3600)


def _forge_issued_in_future(ks: KS, token: str) -> str:
    now = int(time.time())
    return _real_key_with(ks, token, iat=now + 3600, nbf=now - 10)


def _forge_wrong_issuer(ks: KS, token: str) -> str:
    return _real_key_with(ks, token, iss="https://evil.example")


def _forge_missing_typ(ks: KS, token: str) -> str:
    key = ks.services.keys.active
    return tokens.sign_eddsa(tokens.claims_of(token), key.private_key, key.kid, typ=None)


def _forge_typ_jwt(ks: KS, token: str) -> str:
    key = ks.services.keys.active
    return tokens.sign_eddsa(tokens.claims_of(token), key.private_key, key.kid, typ="JWT")


def _forge_other_key_same_kid(ks: KS, token: str) -> str:
    other = ed25519.Ed25519PrivateKey.generate()
    return tokens.sign_eddsa(tokens.claims_of(token), other, ks.services.keys.active.kid)


def _forge_missing_jti(ks: KS, token: str) -> str:
    claims = tokens.claims_of(token)
    del claims["jti"]
    key = ks.services.keys.active
    return tokens.sign_eddsa(claims, key.private_key, key.kid)


def _forge_unknown_jti(ks: KS, token: str) -> str:
    # Correctly signed with the real key, but never issued: the database does not know it.
    return _real_key_with(ks, token, jti="never-issued-jti")


FORGERIES: dict[str, Callable[[KS, str], str]] = {
    "alg-none": _forge_alg_none,
    "hs256-public-pem": _forge_hs256_pem,
    "hs256-public-raw": _forge_hs256_raw,
    "hs256-jwk-x": _forge_hs256_jwk_x,
    "unknown-kid": _forge_unknown_kid,
    "tampered-scope": _forge_tampered_scope,
    "tampered-exp": _forge_tampered_task,
    "expired": _forge_expired,
    "not-yet-valid": _forge_not_yet_valid,
    "issued-in-future": _forge_issued_in_future,
    "wrong-issuer": _forge_wrong_issuer,
    "missing-typ": _forge_missing_typ,
    "typ-JWT": _forge_typ_jwt,
    "other-key-same-kid": _forge_other_key_same_kid,
    "missing-jti": _forge_missing_jti,
}


@pytest.mark.parametrize("name", list(FORGERIES))
async def test_forged_token_is_rejected(ks: KS, name: str) -> None:
    ctx = await _ctx(ks)
    forged = FORGERIES[name](ks, ctx.token)
    assert forged != ctx.token
    with pytest.raises(TokenRejected):
        ks.services.verifier.verify(forged)
    with pytest.raises(TokenRejected):
        ks.services.verifier.verify(forged, audience=AUD)
    await _assert_inactive(ks, ctx, forged)
    # The genuine token is untouched by the attempt.
    await _assert_active(ks, ctx, ctx.token)


async def test_validly_signed_but_never_issued_jti_is_inactive(ks: KS) -> None:
    ctx = await _ctx(ks)
    forged = _forge_unknown_jti(ks, ctx.token)
    ks.services.verifier.verify(forged)  # the signature and claims are fine...
    await _assert_inactive(ks, ctx, forged)  # ...but the issuer never issued it


async def test_wrong_audience_is_rejected(ks: KS) -> None:
    ctx = await _ctx(ks)
    other_rs = await ks.operator("resource_server", audience=OTHER_AUD)
    assert await _introspect_raw(ks, ctx.token, other_rs) == {"active": False}
    with pytest.raises(TokenRejected):
        ks.services.verifier.verify(ctx.token, audience="https://other")
    with pytest.raises(TokenRejected):
        await tokens.on_app_loop(ks, live_token, ks.services, ctx.token, audience=OTHER_AUD)
    # Control: the same token is active for the audience it was issued to.
    await _assert_active(ks, ctx, ctx.token)


async def test_audience_swapped_in_payload_is_rejected(ks: KS) -> None:
    ctx = await _ctx(ks)
    claims = tokens.claims_of(ctx.token)
    claims["aud"] = [OTHER_AUD]
    forged = tokens.replace_payload(ctx.token, claims)
    other_rs = await ks.operator("resource_server", audience=OTHER_AUD)
    assert await _introspect_raw(ks, forged, other_rs) == {"active": False}
    with pytest.raises(TokenRejected):
        ks.services.verifier.verify(forged, audience=OTHER_AUD)


# --------------------------------------------------------------------------- dead by status


async def _revoke(ks: KS, target: dict[str, Any]) -> dict[str, Any]:
    analyst = await ks.operator("analyst")
    r = await ks.client.post(
        "/v1/revocations", json={"target": target, "reason": "attack test"}, headers=bearer(analyst)
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def _kill_revoke_task(ks: KS, ctx: Ctx) -> str:
    await _revoke(ks, {"type": "task", "task_id": ctx.task_id})
    return ctx.token


async def _kill_complete_task(ks: KS, ctx: Ctx) -> str:
    r = await ks.client.post(f"/v1/tasks/{ctx.task_id}/complete", headers=ctx.agent.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed"
    return ctx.token


async def _kill_suspend_agent(ks: KS, ctx: Ctx) -> str:
    r = await ks.client.post(
        f"/v1/agents/{ctx.agent.id}/suspend", json={"reason": "compromised"}, headers=ks.admin
    )
    assert r.status_code == 200, r.text
    return ctx.token


async def _kill_cutoff(ks: KS, ctx: Ctx) -> str:
    body = await _revoke(ks, {"type": "cutoff"})
    assert body["affected_credentials"] >= 1
    return ctx.token


async def _kill_credential(ks: KS, ctx: Ctx) -> str:
    await _revoke(ks, {"type": "credential", "jti": ctx.issued["jti"]})
    return ctx.token


async def _kill_subtask_via_parent(ks: KS, ctx: Ctx) -> str:
    sub = await ks.open_task(bearer(ctx.token))
    assert sub["task"]["parent_id"] == ctx.task_id
    sub_ctx = Ctx(agent=ctx.agent, issued=sub, rs=ctx.rs)
    await _assert_active(ks, sub_ctx, sub["access_token"])
    await _kill_complete_task(ks, ctx)
    token: str = sub["access_token"]
    return token


KILLS: dict[str, Callable[[KS, Ctx], Awaitable[str]]] = {
    "revoked-task": _kill_revoke_task,
    "completed-task": _kill_complete_task,
    "suspended-agent": _kill_suspend_agent,
    "global-cutoff": _kill_cutoff,
    "revoked-credential": _kill_credential,
    "subtask-of-completed-parent": _kill_subtask_via_parent,
}


@pytest.mark.parametrize("name", list(KILLS))
async def test_dead_credential_is_inactive(ks: KS, name: str) -> None:
    ctx = await _ctx(ks)
    await _assert_active(ks, ctx, ctx.token)
    dead = await KILLS[name](ks, ctx)
    # The signature and time claims are still fine: status alone must kill it.
    ks.services.verifier.verify(dead, audience=AUD)
    await _assert_inactive(ks, ctx, dead)
    # A replica whose in-memory deny state has not caught up must still say no: the
    # database is authoritative (service/credentials/rfc7662.py module docstring).
    real_deny = ks.services.deny
    ks.services.deny = DenyState()
    try:
        with pytest.raises(TokenRejected):
            await tokens.on_app_loop(ks, live_token, ks.services, dead, audience=AUD)
        assert await _introspect_raw(ks, dead, ctx.rs) == {"active": False}
        # Nor may it authenticate there, e.g. to mint itself a fresh credential.
        task_id = tokens.claims_of(dead)["task"]["id"]
        r = await ks.client.post(f"/v1/tasks/{task_id}/renew", headers=bearer(dead))
        assert r.status_code == 401, r.text
        r = await ks.client.post(
            "/v1/tasks",
            json={"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}},
            headers=bearer(dead),
        )
        assert r.status_code == 401, r.text
    finally:
        ks.services.deny = real_deny


async def test_revoking_one_credential_leaves_a_renewed_one_alive(ks: KS) -> None:
    ctx = await _ctx(ks)
    r = await ks.client.post(f"/v1/tasks/{ctx.task_id}/renew", headers=ctx.agent.headers)
    assert r.status_code == 200, r.text
    renewed: str = r.json()["access_token"]
    await _kill_credential(ks, ctx)
    await _assert_inactive(ks, ctx, ctx.token)
    await _assert_active(ks, ctx, renewed)


async def test_cutoff_spares_tokens_issued_after_it(database_url: str, tmp_path: Path) -> None:
    clock = ManualClock()
    async with running_app(database_url, tmp_path, clock=clock) as ks:
        ctx = await _ctx(ks)
        await _kill_cutoff(ks, ctx)
        await _assert_inactive(ks, ctx, ctx.token)
        clock.advance(2)
        fresh = await ks.open_task(ctx.agent.headers)
        fresh_ctx = Ctx(agent=ctx.agent, issued=fresh, rs=ctx.rs)
        await _assert_active(ks, fresh_ctx, fresh["access_token"])


async def test_really_expired_issued_token_is_inactive(database_url: str, tmp_path: Path) -> None:
    clock = ManualClock()
    async with running_app(database_url, tmp_path, clock=clock) as ks:
        ctx = await _ctx(ks)
        await _assert_active(ks, ctx, ctx.token)
        exp = tokens.claims_of(ctx.token)["exp"]
        clock.advance(exp - clock.now() + ks.services.settings.leeway + 1)
        with pytest.raises(TokenRejected):
            ks.services.verifier.verify(ctx.token)
        await _assert_inactive(ks, ctx, ctx.token)


# --------------------------------------------------------------------------- RFC 7009


async def test_rfc7009_owner_revokes_its_token(ks: KS) -> None:
    ctx = await _ctx(ks)
    r = await ks.client.post("/oauth2/revoke", data={"token": ctx.token}, headers=ctx.agent.headers)
    assert r.status_code == 200, r.text
    await _assert_inactive(ks, ctx, ctx.token)


async def test_rfc7009_other_agent_cannot_revoke(ks: KS) -> None:
    ctx = await _ctx(ks)
    intruder = await ks.agent()
    r = await ks.client.post("/oauth2/revoke", data={"token": ctx.token}, headers=intruder.headers)
    # RFC 7009 §2.2: 200 either way, the caller learns nothing...
    assert r.status_code == 200, r.text
    # ...but the token is still alive.
    await _assert_active(ks, ctx, ctx.token)


async def test_rfc7009_needs_authentication(ks: KS) -> None:
    ctx = await _ctx(ks)
    r = await ks.client.post("/oauth2/revoke", data={"token": ctx.token})
    assert r.status_code == 401, r.text
    assert "WWW-Authenticate" in r.headers
    await _assert_active(ks, ctx, ctx.token)
