"""The OpenAPI document, read without a server: the promises the conformance run
(test_openapi_conformance.py) checks against the live service, pinned where they are
made, so a new route cannot quietly fall back to litestar's defaults."""

from __future__ import annotations

from typing import Any

import pytest

from service.app import create_app
from service.config import Settings

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PROBLEM = {"$ref": "#/components/schemas/ProblemDetails"}
# Not problem details on purpose: /readyz answers its checks either way.
PLAIN_ERRORS = {("get", "/readyz", "503")}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    schema: dict[str, Any] = create_app(Settings()).openapi_schema.to_schema()
    return schema


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def test_every_error_is_documented_as_problem_details(document: dict[str, Any]) -> None:
    wrong = [
        f"{method.upper()} {path} {status}: {sorted(response.get('content') or {})}"
        for method, path, operation in _operations(document)
        for status, response in operation["responses"].items()
        if status[0] in "45" and (method, path, status) not in PLAIN_ERRORS
        if (response.get("content") or {}) != {"application/problem+json": {"schema": PROBLEM}}
    ]
    assert not wrong, "error responses that are not application/problem+json:\n" + "\n".join(wrong)


def test_problem_details_names_the_rfc_9457_members(document: dict[str, Any]) -> None:
    schema = document["components"]["schemas"]["ProblemDetails"]
    assert set(schema["required"]) == {"type", "title", "status", "detail", "instance"}
    assert schema.get("additionalProperties", True) is not False, "extension members are allowed"


def test_every_operation_with_input_documents_its_400(document: dict[str, Any]) -> None:
    missing = [
        f"{method.upper()} {path}"
        for method, path, operation in _operations(document)
        if operation.get("parameters") or operation.get("requestBody")
        if "400" not in operation["responses"]
    ]
    assert not missing, f"operations that validate input but document no 400: {missing}"


def test_strict_request_bodies_are_closed(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in (
        "CreateAgent",
        "CreateTask",
        "CreateRevocation",
        "CreateOperator",
        "AckAlert",
        "SuspendAgent",
        "ReinstateAgent",
        "CompleteTask",
        "ScopeSpec",
        "Limits",
        "CredentialTarget",
        "TaskTarget",
        "AgentTarget",
        "CutoffTarget",
    ):
        assert schemas[name].get("additionalProperties") is False, name
    # A response shape is not closed by accident.
    assert "additionalProperties" not in schemas["AgentView"]


def test_revocation_documents_the_replay_200(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v1/revocations"]["post"]["responses"]
    assert {"200", "201"} <= set(responses)
    for status in ("200", "201"):
        content = responses[status]["content"]["application/json"]["schema"]
        assert content == {"$ref": "#/components/schemas/RevocationView"}


def test_jwks_is_documented_as_a_jwk_set(document: dict[str, Any]) -> None:
    content = document["paths"]["/.well-known/jwks.json"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"application/jwk-set+json"}


@pytest.mark.parametrize("path", ["/v1/revocations/stream", "/v1/alerts/stream"])
def test_streams_are_documented_as_event_streams(document: dict[str, Any], path: str) -> None:
    content = document["paths"][path]["get"]["responses"]["200"]["content"]
    assert set(content) == {"text/event-stream"}


@pytest.mark.parametrize(
    ("path", "name"),
    [("/v1/alerts", "cursor"), ("/v1/revocations", "cursor"), ("/v1/audit", "cursor")],
)
def test_a_zero_lower_bound_survives(document: dict[str, Any], path: str, name: str) -> None:
    (parameter,) = [p for p in document["paths"][path]["get"]["parameters"] if p["name"] == name]
    assert parameter["schema"]["minimum"] == 0
