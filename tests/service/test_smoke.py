from __future__ import annotations

import jwt

from tests.support.harness import AUD, ISSUER, KS


async def test_open_task_issues_a_verifiable_credential(ks: KS) -> None:
    agent = await ks.agent()
    issued = await ks.open_task(agent.headers)
    jwks = (await ks.client.get("/.well-known/jwks.json")).json()
    key = jwt.PyJWKSet.from_dict(jwks).keys[0]
    claims = jwt.decode(
        issued["access_token"], key=key, algorithms=["EdDSA"], audience=AUD, issuer=ISSUER
    )
    assert claims["sub"] == issued["task"]["spiffe_id"]
    assert claims["client_id"] == agent.id
    rs = await ks.operator("resource_server", audience=AUD)
    assert (await ks.introspect(issued["access_token"], rs))["active"] is True
