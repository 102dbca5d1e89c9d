"""The OpenAPI document tells the truth about the live service (schemathesis).

``killswitch serve`` runs as a subprocess on SQLite; an admin token, a registered agent
and an open task (made through the API) give every operation a caller it accepts. For
each operation schemathesis generates valid and invalid requests from the document, and
every answer must be: not a 5xx, a documented status code, a documented content type, a
body that matches the documented schema, and (OPTIONS) an ``Allow`` naming the path's
documented methods. Before the fuzzing, a short journey of valid writes that random data
rarely makes (register, suspend, reinstate, open, renew, complete; revoke an ended task,
revoke with a key, repeat the key) is held to the same checks. Failures are collected
over all operations and reported together.

Bounded: a fixed number of examples per operation and generation mode, no shrinking, a
one-second read budget for the event streams (they never end on their own).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.harness import AUD, basic
from tests.support.serve import Served, serve

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "kso_conformance_" + secrets.token_hex(16)
EXAMPLES = {schemathesis.GenerationMode.POSITIVE: 12, schemathesis.GenerationMode.NEGATIVE: 8}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
STREAM_SECONDS = 1.0
STREAM_EXAMPLES = 3
"""A valid request to a stream costs STREAM_SECONDS of reading: fewer of those."""
BUDGET_SECONDS = 100.0
SHOWN = 15
# Operations that need an agent's own credentials; every other one is called as admin.
AS_AGENT_BASIC = {"openTask"}
AS_TASK_CREDENTIAL = {"renewTask", "completeTask"}
# Run first, in this order: completing the task (or a fuzzed cut-off) ends its credential.
FIRST = ("openTask", "renewTask", "completeTask")


@dataclass(frozen=True)
class World:
    """What the fixture made through the API: callers, and ids that exist."""

    admin: str
    agent_basic: str
    task_credential: str
    known: dict[str, str]
    """Path parameter name → an id that exists, tried besides the generated one."""

    def authorization(self, operation_id: str | None) -> str:
        if operation_id in AS_AGENT_BASIC:
            return self.agent_basic
        if operation_id in AS_TASK_CREDENTIAL:
            return f"Bearer {self.task_credential}"
        return f"Bearer {self.admin}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("conformance")
    with serve(root / "data", f"sqlite:///{root / 'ks.db'}", admin_token=ADMIN_TOKEN) as srv:
        yield srv


def _world(srv: Served) -> World:
    """An agent, an open task of it and a second operator, created through the API."""
    agent_id = f"conformance-{secrets.token_hex(3)}"
    with srv.client(ADMIN_TOKEN) as admin:
        r = admin.post(
            "/v1/agents",
            json={
                "id": agent_id,
                "ceiling": {"grants": ["call:tool/invoices.*"], "audiences": [AUD], "limits": {}},
            },
        )
        assert r.status_code == 201, r.text
        agent = basic(agent_id, r.json()["client_secret"])
        # Its own operator: a fuzzed disable must never hit the admin the run is using.
        r = admin.post("/v1/operators", json={"name": "conformance-viewer", "role": "viewer"})
        assert r.status_code == 201, r.text
    with srv.client() as client:
        r = client.post(
            "/v1/tasks",
            json={"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}, "ttl": 600},
            headers=agent,
        )
        assert r.status_code == 201, r.text
    issued = r.json()
    return World(
        admin=ADMIN_TOKEN,
        agent_basic=agent["Authorization"],
        task_credential=issued["access_token"],
        known={"agent_id": agent_id, "task_id": issued["task"]["id"], "name": "conformance-viewer"},
    )


def _operation_id(operation: Any) -> str | None:
    operation_id: str | None = operation.definition.raw.get("operationId")
    return operation_id


def _operations(schema: Any) -> list[Any]:
    operations = [result.ok() for result in schema.get_all_operations()]
    rank = {operation_id: i for i, operation_id in enumerate(FIRST)}
    return sorted(operations, key=lambda op: rank.get(_operation_id(op) or "", len(FIRST)))


def _is_stream(operation: Any) -> bool:
    return "text/event-stream" in str(operation.definition.raw.get("responses", {}))


def _run(operation: Any, mode: Any, examples: int, world: World, base_url: str) -> list[str]:
    """Up to ``examples`` generated requests (and, for a valid one with path parameters,
    the same request on ids that exist); every violation found."""
    failures: list[str] = []
    headers = {"Authorization": world.authorization(_operation_id(operation))}
    timeout = 10.0
    if _is_stream(operation):
        timeout = STREAM_SECONDS
        if mode is schemathesis.GenerationMode.POSITIVE:
            examples = min(examples, STREAM_EXAMPLES)

    def call(case: Any) -> None:
        try:
            case.call_and_validate(
                base_url=base_url, headers=headers, checks=CHECKS, timeout=timeout
            )
        except FailureGroup as exc:
            failures.append(f"{operation.label} [{mode.value}]: {exc}")

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        call(case)
        existing = {k: world.known[k] for k in case.path_parameters or {} if k in world.known}
        if existing and mode is schemathesis.GenerationMode.POSITIVE:
            case.path_parameters = {**case.path_parameters, **existing}
            call(case)

    try:
        check()
    except Unsatisfiable:
        # Negative mode on an operation that takes no input: no invalid request exists.
        if mode is not schemathesis.GenerationMode.NEGATIVE:
            raise
    return failures


def _journey(schema: Any, world: World, base_url: str) -> list[str]:
    """Valid requests random data rarely makes, each checked like a generated one: the
    success of every write, and the 200 of a revocation that revokes nothing new. On a
    task of its own, so the fuzzing that follows still has the world's task open."""
    by_id = {_operation_id(op): op for op in _operations(schema)}
    failures: list[str] = []

    def step(operation_id: str, authorization: str, **kwargs: Any) -> dict[str, Any]:
        operation = by_id[operation_id]
        case = operation.Case(media_type="application/json", **kwargs)
        try:
            response = case.call_and_validate(
                base_url=base_url,
                headers={"Authorization": authorization},
                checks=CHECKS,
                timeout=10,
            )
        except FailureGroup as exc:
            failures.append(f"{operation.label} [journey]: {exc}")
            return {}
        if response.status_code >= 300:
            failures.append(f"{operation.label} [journey]: {response.status_code} {response.text}")
            return {}
        body: dict[str, Any] = response.json()
        return body

    admin = f"Bearer {world.admin}"
    agent_id = f"journey-{secrets.token_hex(3)}"
    ceiling = {"grants": ["call:tool/invoices.*"], "audiences": [AUD], "limits": {}}
    reason = {"reason": "conformance journey"}
    step("registerAgent", admin, body={"id": agent_id, "ceiling": ceiling})
    step("suspendAgent", admin, path_parameters={"agent_id": agent_id}, body=reason)
    step("reinstateAgent", admin, path_parameters={"agent_id": agent_id}, body=reason)
    scope = {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}
    issued = step("openTask", world.agent_basic, body={"scope": scope, "ttl": 600})
    task = {"task_id": issued.get("task", {}).get("id", "missing")}
    credential = f"Bearer {issued.get('access_token', 'missing')}"
    renewed = step("renewTask", credential, path_parameters=task)
    credential = f"Bearer {renewed.get('access_token', 'missing')}"
    step("completeTask", credential, path_parameters=task, body={})
    # The task already ended: 200 with the revocation that ended it, nothing new.
    step("revoke", admin, body={"target": {"type": "task", **task}, **reason})
    keyed = {"target": {"type": "agent", "agent_id": agent_id}, **reason, "idempotency_key": "j"}
    step("revoke", admin, body=keyed)  # 201
    step("revoke", admin, body=keyed)  # the same key again: 200 with the first
    return failures


def _allow(operation: Any, world: World, base_url: str) -> list[str]:
    """``OPTIONS`` on the operation's path names exactly its documented methods."""
    params = {p.name: world.known.get(p.name, "conformance") for p in operation.path_parameters}
    case = operation.Case(method="OPTIONS", path_parameters=params)
    try:
        response = case.call_and_validate(
            base_url=base_url,
            headers={"Authorization": f"Bearer {world.admin}"},
            checks=[allow_header_conformance],
            timeout=10,
        )
    except FailureGroup as exc:
        return [f"OPTIONS {operation.path}: {exc}"]
    if response.status_code != 204 or "allow" not in response.headers:
        return [f"OPTIONS {operation.path}: {response.status_code} without Allow"]
    return []


def test_the_live_service_conforms_to_its_openapi_document(served: Served) -> None:
    started = time.monotonic()
    world = _world(served)
    schema = schemathesis.openapi.from_url(f"{served.url}/schema/openapi.json", timeout=10)
    failures = _journey(schema, world, served.url)
    for operation in _operations(schema):
        for mode, examples in EXAMPLES.items():
            failures += _run(operation, mode, examples, world, served.url)
        failures += _allow(operation, world, served.url)
    elapsed = time.monotonic() - started
    shown = "\n\n".join(failures[:SHOWN])
    assert not failures, f"{len(failures)} violations (first {SHOWN}):\n\n{shown}"
    assert elapsed < BUDGET_SECONDS, f"the conformance run took {elapsed:.0f}s"
