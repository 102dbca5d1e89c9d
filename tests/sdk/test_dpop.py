"""DPoP-bound credentials (RFC 9449) at the guard and its middleware, end to end.

A real ``killswitch serve`` issues a credential bound to a key made here (``dpop_jkt``);
a real guard on tansu enforces it. A copy of the token without the key, a proof for
another method or URL, a replayed proof and a stale one are refused; the holder of the
key passes, through the function API and through ``GuardMiddleware``.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from litestar import Litestar, get
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.sdk import GuardMiddleware, KillSwitchClient, Outcome
from service.sdk.dpop import DPoPKey
from tests.sdk.conftest import AUD, Service, kafka_guard

BASE = "http://tools.local"
URL = f"{BASE}/v1/invoices/42"


async def _bound_task(service: Service, key: DPoPKey) -> dict[str, Any]:
    agent_id, secret = await service.agent(grants=(f"GET:{BASE}/v1/**",))
    basic = base64.b64encode(f"{agent_id}:{secret}".encode()).decode()
    async with service.http() as http:
        r = await http.post(
            "/v1/tasks",
            json={
                "scope": {"grants": [f"GET:{BASE}/v1/**"], "audiences": [AUD]},
                "ttl": 600,
                "dpop_jkt": key.jkt,
            },
            headers={"Authorization": f"Basic {basic}"},
        )
    assert r.status_code == 201, r.text
    issued: dict[str, Any] = r.json()
    assert issued["token_type"] == "DPoP"
    return issued


@get("/v1/invoices/42", sync_to_thread=False)
def invoice() -> dict[str, str]:
    return {"id": "42"}


async def test_guard_enforces_proof_of_possession(service: Service, settings: Settings) -> None:
    key = DPoPKey.generate()
    token = (await _bound_task(service, key))["access_token"]
    async with kafka_guard(service, settings) as guard:

        def check(proof: str | None, method: str = "GET", url: str = URL) -> Any:
            return guard.check_sync(token, method, url, dpop=proof, emit=False)

        good = key.proof("GET", URL, access_token=token)
        assert check(good).allowed
        # The same proof again: a replay (RFC 9449 §11.1).
        replay = check(good)
        assert (replay.allowed, replay.outcome) == (False, Outcome.INVALID_DPOP)
        assert "replayed" in replay.reason
        # A stolen copy of the token, without the key.
        assert check(None).outcome is Outcome.INVALID_DPOP
        thief = DPoPKey.generate()
        stolen = check(thief.proof("GET", URL, access_token=token))
        assert stolen.outcome is Outcome.INVALID_DPOP
        assert "cnf.jkt" in stolen.reason
        # The holder's key, but a proof made for another request or too long ago.
        for bad in (
            key.proof("POST", URL, access_token=token),
            key.proof("GET", f"{BASE}/v1/other", access_token=token),
            key.proof("GET", URL, access_token=token, iat=time.time() - 3600),
            key.proof("GET", URL),  # no ath
        ):
            assert check(bad).outcome is Outcome.INVALID_DPOP
        assert check(key.proof("GET", URL, access_token=token)).allowed


async def test_middleware_requires_the_dpop_scheme_and_a_proof(
    service: Service, settings: Settings
) -> None:
    key = DPoPKey.generate()
    token = (await _bound_task(service, key))["access_token"]
    async with kafka_guard(service, settings) as guard:
        app = Litestar([invoice], middleware=[lambda app: GuardMiddleware(app, guard)])
        async with AsyncTestClient(app, base_url=BASE) as client:

            def headers(scheme: str = "DPoP", proof: str | None = None) -> dict[str, str]:
                h = {"Authorization": f"{scheme} {token}"}
                if proof is not None:
                    h["DPoP"] = proof
                return h

            r = await client.get(
                "/v1/invoices/42", headers=headers(proof=key.proof("GET", URL, access_token=token))
            )
            assert r.status_code == 200, r.text

            r = await client.get("/v1/invoices/42", headers=headers())  # no proof
            assert r.status_code == 401
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"] == "urn:killswitch:problem:invalid-dpop-proof"
            challenge = r.headers["www-authenticate"]
            assert challenge.startswith("DPoP ")
            assert 'error="invalid_dpop_proof"' in challenge

            r = await client.get(
                "/v1/invoices/42",
                headers=headers("Bearer", key.proof("GET", URL, access_token=token)),
            )
            assert r.status_code == 401  # §7.2: a bound credential is not a bearer token
            assert "Bearer scheme" in r.json()["detail"]


async def test_agent_sdk_signs_proofs_transparently(service: Service, settings: Settings) -> None:
    agent_id, secret = await service.agent(grants=(f"GET:{BASE}/v1/**",))
    async with (
        kafka_guard(service, settings) as guard,
        KillSwitchClient(service.url, agent_id, secret) as ks,
        ks.task(grants=[f"GET:{BASE}/v1/**"], audiences=[AUD], ttl=600, dpop=True) as cred,
    ):
        assert cred.dpop_key is not None
        app = Litestar([invoice], middleware=[lambda app: GuardMiddleware(app, guard)])
        async with AsyncTestClient(app, base_url=BASE) as client:
            for _ in range(3):  # a fresh proof each time: no replay
                r = await client.get("/v1/invoices/42", auth=cred.auth)
                assert r.status_code == 200, r.text
            # Whoever copies the token alone gets nowhere.
            r = await client.get("/v1/invoices/42", headers={"Authorization": f"DPoP {cred.token}"})
            assert r.status_code == 401
            r = await client.get("/v1/invoices/42", headers=cred.headers_for("GET", URL))
            assert r.status_code == 200
        with pytest.raises(TypeError):
            _ = cred.headers
