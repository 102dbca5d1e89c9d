"""Dependencies shared by every route: the running :class:`Services` and the caller."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import SkipValidation

from service.auth import Principal
from service.core import Services


def provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    """The caller, as identified by ``authenticate_guard`` before the body was read."""
    principal: Principal = request.state.principal
    return principal


class ProblemDetails(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 9457 problem details (media type application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    offending: list[str] | None = None
    invalid: list[str] | None = None
    errors: list[dict[str, Any]] | None = None


def problems(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI response entries for the problem details a route can answer with."""
    text = {
        400: "Malformed body, unknown field or invalid scope grammar",
        401: "Missing or invalid credentials",
        403: "Authenticated, but not allowed (role, suspended agent, scope beyond ceiling)",
        404: "No such resource (or not visible to the caller)",
        409: "The resource's state forbids this (e.g. task already closed)",
        413: "Request body over KS_MAX_BODY_BYTES",
    }
    return {
        code: ResponseSpec(
            data_container=ProblemDetails,
            description=text[code],
            media_type="application/problem+json",
        )
        for code in codes
    }


def event_stream(event: type[msgspec.Struct], description: str) -> dict[int, ResponseSpec]:
    """The 200 of an SSE route: ``text/event-stream`` of ``event``s, not the JSON litestar
    assumes."""
    return {
        200: ResponseSpec(
            data_container=event,
            description=description,
            media_type="text/event-stream",
            generate_examples=False,
        )
    }


# litestar 2 drops a falsy bound from the document (``ge=0`` vanishes, ``le`` stays), so
# a lower bound of 0 is stated again for the schema; the validation is still ``ge``.
NON_NEGATIVE: dict[str, Any] = {"minimum": 0}


OPERATOR: list[dict[str, list[str]]] = [{"operatorToken": []}]
AGENT: list[dict[str, list[str]]] = [
    {"agentBasic": []},
    {"clientAssertion": []},
    {"taskCredential": []},
]


# Explicit dependency markers: litestar 3 stops inferring injected parameters.
ServicesDep = NamedDependency[SkipValidation[Services]]
PrincipalDep = NamedDependency[SkipValidation[Principal]]
