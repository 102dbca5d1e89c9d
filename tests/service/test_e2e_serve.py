"""End to end over a real socket: ``killswitch serve`` as a subprocess, driven with httpx,
its credentials checked by an independent verifier (pyjwt against the served JWKS).
Runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import jwt

from service.app import create_app
from service.config import Settings
from tests.support.harness import AUD, basic
from tests.support.serve import Served, serve

TRUST_DOMAIN = "killswitch.local"
SECURITY_SCHEMES = {"operatorToken", "agentBasic", "clientAssertion", "taskCredential"}


def assert_spiffe_id(value: str) -> None:
    """SPIFFE-ID §2, checked independently of service.kernel.ids."""
    assert len(value.encode()) <= 2048
    assert value.startswith("spiffe://"), value
    rest = value[len("spiffe://") :]
    for forbidden in ("?", "#", "%"):
        assert forbidden not in rest, value
    trust_domain, _, path = rest.partition("/")
    assert re.fullmatch(r"[a-z0-9._-]+", trust_domain), trust_domain
    assert path, value
    assert not path.endswith("/"), value
    for segment in path.split("/"):
        assert segment not in ("", ".", ".."), value
        assert re.fullmatch(r"[A-Za-z0-9._-]+", segment), segment


def register_agent(client: httpx.Client, admin: str, agent_id: str) -> str:
    r = client.post(
        "/v1/agents",
        json={
            "id": agent_id,
            "ceiling": {"grants": ["call:tool/invoices.*"], "audiences": [AUD], "limits": {}},
        },
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert r.status_code == 201, r.text
    secret: str = r.json()["client_secret"]
    assert secret
    return secret


def _introspect(client: httpx.Client, rs_token: str, token: str) -> dict[str, Any]:
    r = client.post(
        "/oauth2/introspect",
        data={"token": token},
        headers={"Authorization": f"Bearer {rs_token}"},
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_task_lifecycle_over_a_real_socket(database_url: str, tmp_path: Path) -> None:
    with (
        serve(tmp_path / "data", database_url) as srv,
        httpx.Client(base_url=srv.url, timeout=10) as client,
    ):
        assert srv.printed_admin_token is not None, srv.output()
        admin = srv.printed_admin_token
        agent_id = f"billing-{secrets.token_hex(3)}"
        secret = register_agent(client, admin, agent_id)

        r = client.post(
            "/v1/tasks",
            json={
                "scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]},
                "ttl": 600,
            },
            headers=basic(agent_id, secret),
        )
        assert r.status_code == 201, r.text
        issued = r.json()
        token, task = issued["access_token"], issued["task"]
        assert issued["token_type"] == "Bearer"

        # Independent verification: pyjwt and the JWKS the service serves.
        jwks_response = client.get("/.well-known/jwks.json")
        assert jwks_response.status_code == 200
        assert jwks_response.headers["content-type"].startswith("application/jwk-set+json")
        jwks = jwt.PyJWKSet.from_dict(jwks_response.json())
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "at+jwt"
        assert header["alg"] == "EdDSA"
        [key] = [k for k in jwks.keys if k.key_id == header["kid"]]
        issuer = f"http://127.0.0.1:{srv.port}"
        claims = jwt.decode(
            token,
            key=key,
            algorithms=["EdDSA"],
            audience=AUD,
            issuer=issuer,
            options={"require": ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"]},
        )
        assert claims["aud"] == [AUD]
        assert claims["client_id"] == agent_id
        assert claims["exp"] <= task["deadline"]
        assert claims["exp"] > claims["iat"]
        assert claims["sub"] == f"spiffe://{TRUST_DOMAIN}/agent/{agent_id}/task/{task['id']}"
        assert claims["sub"] == task["spiffe_id"]
        assert_spiffe_id(claims["sub"])
        assert claims["scope"] == "call:tool/invoices.read"
        # A tampered token does not verify under the served key.
        head, body, sig = token.split(".")
        forged = f"{head}.{body}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
        try:
            jwt.decode(forged, key=key, algorithms=["EdDSA"], audience=AUD, issuer=issuer)
        except jwt.InvalidSignatureError:
            pass
        else:
            raise AssertionError("a forged signature verified")

        # A resource server created over the API introspects the token.
        r = client.post(
            "/v1/operators",
            json={"name": "tools-rs", "role": "resource_server", "audience": AUD},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert r.status_code == 201, r.text
        rs = r.json()["token"]
        live = _introspect(client, rs, token)
        assert live["active"] is True
        assert live["sub"] == claims["sub"]
        assert live["jti"] == claims["jti"]

        r = client.post(f"/v1/tasks/{task['id']}/complete", headers=basic(agent_id, secret))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "completed"
        assert _introspect(client, rs, token) == {"active": False}

        # Metrics: exactly one credential issued, and the issuance histogram observed it.
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        text = metrics.text
        assert re.search(r"^killswitch_credentials_issued_total 1\.0$", text, re.M), text
        assert "# TYPE killswitch_issuance_seconds histogram" in text
        assert re.search(r"^killswitch_issuance_seconds_count 1\.0$", text, re.M), text
        assert re.search(r'^killswitch_issuance_seconds_bucket\{le="\+Inf"\} 1\.0$', text, re.M)
        assert re.search(r"^killswitch_tasks_completed_total 1\.0$", text, re.M), text


def _routes() -> set[tuple[str, str]]:
    """(METHOD, openapi path) of every route the app registers, outside /schema and the
    HTML console (pages for people, deliberately not part of the API document)."""
    app = create_app(Settings())
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        if route.path.startswith(("/schema", "/console")):
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        methods = getattr(route, "methods", set())
        for method in methods:
            if method in ("HEAD", "OPTIONS"):
                continue
            found.add((method, path))
    return found


def test_discovery_health_and_openapi(database_url: str, tmp_path: Path) -> None:
    with (
        serve(tmp_path / "data", database_url) as srv,
        httpx.Client(base_url=srv.url, timeout=10) as client,
    ):
        _check_discovery(srv, client)


def _check_discovery(srv: Served, client: httpx.Client) -> None:
    issuer = f"http://127.0.0.1:{srv.port}"

    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    ready = r.json()
    assert ready["status"] == "ready"
    assert ready["checks"]["database"] == "ok"
    jwks = client.get("/.well-known/jwks.json").json()
    assert ready["checks"]["signing_key"] == jwks["keys"][0]["kid"]

    # RFC 8414 metadata: issuer is exactly the URL it is served from; endpoints under it.
    r = client.get("/.well-known/oauth-authorization-server")
    assert r.status_code == 200
    meta = r.json()
    assert meta["issuer"] == issuer
    assert meta["jwks_uri"] == f"{issuer}/.well-known/jwks.json"
    assert meta["introspection_endpoint"] == f"{issuer}/oauth2/introspect"
    assert meta["revocation_endpoint"] == f"{issuer}/oauth2/revoke"
    assert "EdDSA" in meta["access_token_signing_alg_values_supported"]
    assert "private_key_jwt" in meta["revocation_endpoint_auth_methods_supported"]
    for name in ("jwks_uri", "introspection_endpoint", "revocation_endpoint"):
        assert meta[name].startswith(issuer + "/")
    assert client.get(meta["jwks_uri"][len(issuer) :]).status_code == 200

    # OpenAPI lists every route, each with an operationId, and the four security schemes.
    r = client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    spec = r.json()
    schemes = spec["components"]["securitySchemes"]
    assert set(schemes) == SECURITY_SCHEMES
    assert schemes["agentBasic"]["scheme"] == "basic"
    assert all(schemes[n]["scheme"] == "bearer" for n in SECURITY_SCHEMES - {"agentBasic"})
    documented: set[tuple[str, str]] = set()
    operation_ids: list[str] = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method.upper() not in {"GET", "POST", "PUT", "PATCH", "DELETE"}:
                continue
            documented.add((method.upper(), path))
            assert operation.get("operationId"), f"{method.upper()} {path} has no operationId"
            operation_ids.append(operation["operationId"])
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"
    routes = _routes()
    assert routes, "no routes found on the app"
    assert routes <= documented, f"routes missing from OpenAPI: {sorted(routes - documented)}"
    assert ("POST", "/v1/tasks") in documented
    assert ("POST", "/oauth2/introspect") in documented
    assert ("GET", "/.well-known/jwks.json") in documented
