"""Test harness: a real killswitch app (real database, real keys) driven over ASGI,
plus small helpers to register agents and open tasks. Secrets are made at run time."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from service.app import create_app
from service.config import Secret, Settings
from service.core import Services
from service.kernel.clock import Clock

AUD = "https://tools.internal"
ISSUER = "http://killswitch.test"
DEFAULT_CEILING = ("call:tool/invoices.*", "GET:https://api.internal/v1/**", "read:file:///data/**")


def basic(agent_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{agent_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Agent:
    id: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return basic(self.id, self.secret)


@dataclass
class KS:
    client: AsyncTestClient[Any]
    services: Services
    admin_token: str

    @property
    def admin(self) -> dict[str, str]:
        return bearer(self.admin_token)

    async def operator(self, role: str, audience: str | None = None) -> str:
        body: dict[str, Any] = {"name": f"{role}-{secrets.token_hex(4)}", "role": role}
        if audience is not None:
            body["audience"] = audience
        r = await self.client.post("/v1/operators", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token

    async def agent(
        self,
        agent_id: str | None = None,
        grants: Sequence[str] = DEFAULT_CEILING,
        audiences: Sequence[str] = (AUD,),
        limits: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Agent:
        agent_id = agent_id or f"agent-{secrets.token_hex(4)}"
        body = {
            "id": agent_id,
            "ceiling": {
                "grants": list(grants),
                "audiences": list(audiences),
                "limits": limits or {},
            },
            **extra,
        }
        r = await self.client.post("/v1/agents", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        return Agent(agent_id, r.json()["client_secret"])

    async def open_task(
        self,
        headers: dict[str, str],
        grants: Sequence[str] = ("call:tool/invoices.read",),
        audiences: Sequence[str] = (AUD,),
        limits: dict[str, Any] | None = None,
        ttl: int | None = 600,
        expect: int = 201,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "scope": {"grants": list(grants), "audiences": list(audiences), "limits": limits or {}},
        }
        if ttl is not None:
            body["ttl"] = ttl
        r = await self.client.post("/v1/tasks", json=body, headers=headers)
        assert r.status_code == expect, r.text
        result: dict[str, Any] = r.json()
        return result

    async def introspect(self, token: str, rs_token: str) -> dict[str, Any]:
        r = await self.client.post(
            "/oauth2/introspect", data={"token": token}, headers=bearer(rs_token)
        )
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result


@asynccontextmanager
async def running_app(
    database_url: str, data_dir: Path, *, clock: Clock | None = None, **overrides: Any
) -> AsyncIterator[KS]:
    admin_token = "kso_" + secrets.token_urlsafe(32)
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        issuer=ISSUER,
        bootstrap_admin_token=Secret(admin_token),
        **overrides,
    )
    app = create_app(settings, clock=clock)
    async with AsyncTestClient(app, base_url=ISSUER) as client:
        yield KS(client=client, services=app.state.services, admin_token=admin_token)
