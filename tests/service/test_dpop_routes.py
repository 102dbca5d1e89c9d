"""A DPoP-bound task credential on the service's own /v1 routes (RFC 9449 §7.1-7.2).

The same kernel check as the guard (``service.kernel.dpop``): the DPoP scheme, exactly
one proof naming this method and the public URL (issuer origin + path), signed by the
bound key, with ``ath`` of this token, never replayed. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from service.sdk.dpop import DPoPKey
from tests.support.harness import AUD, ISSUER, KS

BODY = {"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}, "ttl": 600}


async def _bound(ks: KS, key: DPoPKey) -> dict[str, Any]:
    agent = await ks.agent()
    r = await ks.client.post("/v1/tasks", json={**BODY, "dpop_jkt": key.jkt}, headers=agent.headers)
    assert r.status_code == 201, r.text
    issued: dict[str, Any] = r.json()
    return issued


async def test_a_bound_task_credential_needs_its_proof(ks: KS) -> None:
    key = DPoPKey.generate()
    issued = await _bound(ks, key)
    token, task_id = issued["access_token"], issued["task"]["id"]
    path = f"/v1/tasks/{task_id}"

    def dpop(proof: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"DPoP {token}"}
        if proof is not None:
            headers["DPoP"] = proof
        return headers

    good = key.proof("GET", ISSUER + path, access_token=token)
    r = await ks.client.get(path, headers=dpop(good))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == task_id

    refusals = {
        "replayed proof": dpop(good),
        "no proof": dpop(),
        "Bearer scheme": {
            "Authorization": f"Bearer {token}",
            "DPoP": key.proof("GET", ISSUER + path, access_token=token),
        },
        "another method": dpop(key.proof("POST", ISSUER + path, access_token=token)),
        "another URL": dpop(key.proof("GET", ISSUER + "/v1/tasks", access_token=token)),
        "another key": dpop(DPoPKey.generate().proof("GET", ISSUER + path, access_token=token)),
    }
    for why, headers in refusals.items():
        r = await ks.client.get(path, headers=headers)
        assert r.status_code == 401, (why, r.text)
        assert r.json()["type"] == "urn:killswitch:problem:invalid-dpop-proof", why
        assert r.headers["www-authenticate"].startswith("DPoP "), why

    # A sub-task opened with the bound credential and a proof inherits the binding.
    r = await ks.client.post(
        "/v1/tasks",
        json=BODY,
        headers=dpop(key.proof("POST", ISSUER + "/v1/tasks", access_token=token)),
    )
    assert r.status_code == 201, r.text
    assert r.json()["token_type"] == "DPoP"


async def test_an_unbound_credential_cannot_claim_the_dpop_scheme(ks: KS) -> None:
    agent = await ks.agent()
    issued = await ks.open_task(agent.headers)
    r = await ks.client.get(
        f"/v1/tasks/{issued['task']['id']}",
        headers={"Authorization": f"DPoP {issued['access_token']}"},
    )
    assert r.status_code == 401
