"""The litestar application: routes, problem-details mapping, OpenAPI, lifespan.

The app owns no logic: on start it builds :class:`~service.core.Services` (database,
keys, deny state) and every handler delegates to a domain module.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.admin import AdminController
from service.api.agents import AgentController
from service.api.alerts import AlertController
from service.api.deps import ServicesDep, provide_services
from service.api.oauth import OAuthController, WellKnownController
from service.api.openapi import StrictStructSchemaPlugin, options_response
from service.api.problems import EXCEPTION_HANDLERS, problem
from service.api.revocations import RevocationController
from service.api.strict import strict_body
from service.api.tasks import TaskController
from service.config import Settings
from service.console import console_router
from service.core import Services, start
from service.kernel.clock import Clock

log = logging.getLogger("killswitch")


@get("/healthz", operation_id="healthz", tags=["health"], summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/readyz",
    operation_id="readyz",
    tags=["health"],
    summary="Readiness: database reachable and signing key loaded",
    responses={
        503: ResponseSpec(
            data_container=dict[str, Any],
            description="Not ready: `checks` names what failed",
            generate_examples=False,
        )
    },
)
async def readyz(services: ServicesDep) -> Response[dict[str, Any]]:
    checks: dict[str, str] = {}
    try:
        await services.db.fetchrow("SELECT 1 AS ok")
        checks["database"] = "ok"
    except Exception as exc:  # readiness reports any failure rather than raising
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        checks["signing_key"] = services.keys.active.kid
    except RuntimeError:
        checks["signing_key"] = "missing"
    ready = checks["database"] == "ok" and checks["signing_key"] != "missing"
    return Response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@get(
    "/metrics",
    operation_id="metrics",
    tags=["health"],
    summary="Prometheus metrics",
    media_type=MediaType.TEXT,
)
async def metrics(services: ServicesDep) -> Response[bytes]:
    services.metrics.signing_keys.set(len(services.keys.jwks()["keys"]))
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _before_request(request: Request[Any, Any, Any]) -> Response[None] | None:
    # One app-wide hook (litestar takes one): OPTIONS is answered here with the path's real
    # methods; every other request has its JSON body checked strictly before binding.
    if (options := options_response(request)) is not None:
        return options
    await strict_body(request)
    return None


def _openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="killswitch",
        version="1",
        description="Identity and task-scoped credentials for AI agents, with a kill switch. "
        "Errors are RFC 9457 problem details (application/problem+json).",
        path="/schema",
        render_plugins=[JsonRenderPlugin()],
        components=Components(
            security_schemes={
                "operatorToken": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="kso_…",
                    description="Operator token (viewer, analyst, admin, detector, "
                    "resource_server), created by an admin or the CLI.",
                ),
                "agentBasic": SecurityScheme(
                    type="http",
                    scheme="basic",
                    description="Agent client_secret_basic: agent id and client secret "
                    "(RFC 6749 §2.3.1).",
                ),
                "clientAssertion": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="JWT",
                    description="RFC 7523 client assertion signed with the agent's key "
                    "(iss = sub = agent id, aud = issuer, exp ≤ 5 min, single-use jti).",
                ),
                "taskCredential": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="JWT (at+jwt)",
                    description="A task credential issued by killswitch: opens sub-tasks, "
                    "renews or completes its own task.",
                ),
            }
        ),
    )


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    on_ready: Callable[[Services], None] | None = None,
) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services = await start(settings, clock)
        app.state.services = services
        if on_ready is not None:
            on_ready(services)
        try:
            yield
        finally:
            await services.close()

    return Litestar(
        route_handlers=[
            AgentController,
            TaskController,
            RevocationController,
            AlertController,
            AdminController,
            OAuthController,
            WellKnownController,
            console_router(),
            healthz,
            readyz,
            metrics,
        ],
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=_before_request,
        plugins=[StrictStructSchemaPlugin()],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=_openapi(),
        lifespan=[lifespan],
        state=State({}),
        logging_config=None,
    )


__all__ = ["create_app", "problem"]
