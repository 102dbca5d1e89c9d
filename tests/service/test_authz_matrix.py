"""Who may call what: every /v1 route × {no token, viewer, analyst, admin, agent}.

``MATRIX`` is the documented table (derived from the role sets in ``service/auth.py`` —
READ = viewer/analyst/admin, REVOKE = analyst/admin/detector, ADMIN = admin — and from
each handler's ``require_operator`` / ``require_agent`` call). Request bodies are valid,
and every target exists in the state the route needs, so a 2xx is actually reachable
and every 4xx below is the authorisation decision, not a side effect.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from service import alerts
from service.kernel.events import AlertEvent, Severity
from tests.conftest import fresh_postgres_database
from tests.support.harness import AUD, KS, Agent, basic, bearer, running_app
from tests.support.tokens import on_app_loop

PROBLEM_JSON = "application/problem+json"
PRINCIPALS = ("none", "viewer", "analyst", "admin", "agent")

# route -> status for each of PRINCIPALS, in that order. 401 = no/invalid credentials,
# 403 = wrong kind of principal or role.
MATRIX_ROWS: dict[str, tuple[int, int, int, int, int]] = {
    # route                               none viewer analyst admin agent
    "POST /v1/agents":                   (401,  403,    403,     201,  403),
    "GET /v1/agents":                    (401,  200,    200,     200,  403),
    "GET /v1/agents/{id}":               (401,  200,    200,     200,  403),
    "POST /v1/agents/{id}/suspend":      (401,  403,    403,     200,  403),
    "POST /v1/agents/{id}/reinstate":    (401,  403,    403,     200,  403),
    "POST /v1/tasks":                    (401,  403,    403,     403,  201),
    "GET /v1/tasks":                     (401,  200,    200,     200,  200),
    "GET /v1/tasks/{id}":                (401,  200,    200,     200,  200),
    "POST /v1/tasks/{id}/renew":         (401,  403,    403,     403,  200),
    "POST /v1/tasks/{id}/complete":      (401,  403,    403,     403,  200),
    "POST /v1/revocations":              (401,  403,    201,     201,  403),
    "GET /v1/revocations":               (401,  200,    200,     200,  403),
    "GET /v1/audit":                     (401,  200,    200,     200,  403),
    "GET /v1/alerts":                    (401,  200,    200,     200,  403),
    "GET /v1/alerts/{alert_id}":         (401,  200,    200,     200,  403),
    "POST /v1/alerts/{alert_id}/ack":    (401,  403,    200,     200,  403),
    "GET /v1/stats/timeline":            (401,  200,    200,     200,  403),
    "POST /v1/operators":                (401,  403,    403,     201,  403),
    "GET /v1/operators":                 (401,  403,    403,     200,  403),
    "POST /v1/operators/{name}/disable": (401,  403,    403,     200,  403),
    "GET /v1/keys":                      (401,  200,    200,     200,  403),
    "POST /v1/keys/rotate":              (401,  403,    403,     200,  403),
}  # fmt: skip
MATRIX: dict[str, dict[str, int]] = {
    route: dict(zip(PRINCIPALS, statuses, strict=True)) for route, statuses in MATRIX_ROWS.items()
}

TASK_BODY = {"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}, "ttl": 600}


def _fresh(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@dataclass
class Ctx:
    """What one case needs, built lazily so each case pays only for its own fixtures."""

    ks: KS
    principal: str
    headers: dict[str, str] = field(default_factory=dict)
    agent: Agent | None = None  # the calling agent (principal "agent") or a fresh owner

    async def owner(self) -> Agent:
        if self.agent is None:
            self.agent = await self.ks.agent()
        return self.agent

    async def task_id(self) -> str:
        # For the agent principal this is its own task: the 2xx case is reachable.
        issued = await self.ks.open_task((await self.owner()).headers)
        task_id: str = issued["task"]["id"]
        return task_id

    async def alert_id(self) -> str:
        """A stored alert. Alerts arrive only from Kafka, which the in-process app does
        not read: store one through the ingester's own function, on the app's loop."""
        alert = AlertEvent(
            alert_id=_fresh("alert"),
            at=time.time(),
            rule="scope.out_of_scope",
            severity=Severity.HIGH,
            agent_id=(await self.owner()).id,
            task_id=await self.task_id(),
        )
        stored = await on_app_loop(
            self.ks, alerts.store, self.ks.services.db, [alert], received_at=time.time()
        )
        assert [a.alert_id for a in stored] == [alert.alert_id]
        return alert.alert_id

    async def other_agent_id(self) -> str:
        """An agent that is not the caller (so an agent never targets itself)."""
        if self.principal == "agent":
            return (await self.ks.agent()).id
        return (await self.owner()).id


async def _principal(ks: KS, who: str) -> Ctx:
    ctx = Ctx(ks=ks, principal=who)
    if who == "admin":
        ctx.headers = ks.admin
    elif who in ("viewer", "analyst"):
        ctx.headers = bearer(await ks.operator(who))
    elif who == "agent":
        ctx.agent = await ks.agent()
        ctx.headers = ctx.agent.headers
    return ctx


async def _request(ctx: Ctx, route: str) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, json body) for ``route`` with real, valid targets."""
    method, template = route.split(" ")
    body: dict[str, Any] | None = None
    path = template
    match route:
        case "POST /v1/agents":
            body = {"id": _fresh("new"), "ceiling": {"grants": ["call:tool/x"], "audiences": [AUD]}}
        case "GET /v1/agents/{id}":
            path = template.format(id=await ctx.other_agent_id())
        case "POST /v1/agents/{id}/suspend":
            path = template.format(id=await ctx.other_agent_id())
            body = {"reason": "authz matrix"}
        case "POST /v1/agents/{id}/reinstate":
            target = await ctx.other_agent_id()
            r = await ctx.ks.client.post(
                f"/v1/agents/{target}/suspend", json={"reason": "setup"}, headers=ctx.ks.admin
            )
            assert r.status_code == 200, r.text
            path = template.format(id=target)
            body = {"reason": "authz matrix"}
        case "POST /v1/tasks":
            await ctx.owner()  # the agent principal's ceiling covers TASK_BODY
            body = TASK_BODY
        case "GET /v1/tasks/{id}" | "POST /v1/tasks/{id}/renew" | "POST /v1/tasks/{id}/complete":
            path = template.format(id=await ctx.task_id())
        case "POST /v1/revocations":
            body = {"target": {"type": "task", "task_id": await ctx.task_id()}, "reason": "authz"}
        case "GET /v1/alerts/{alert_id}" | "POST /v1/alerts/{alert_id}/ack":
            path = template.format(alert_id=await ctx.alert_id())
        case "POST /v1/operators":
            body = {"name": _fresh("op"), "role": "viewer"}
        case "POST /v1/operators/{name}/disable":
            name = _fresh("victim")
            r = await ctx.ks.client.post(
                "/v1/operators", json={"name": name, "role": "viewer"}, headers=ctx.ks.admin
            )
            assert r.status_code == 201, r.text
            path = template.format(name=name)
    return method, path, body


def assert_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0].strip() == PROBLEM_JSON, r.headers
    body: dict[str, Any] = r.json()
    for member in ("type", "title", "detail"):
        assert isinstance(body.get(member), str), body
        assert body[member], body
    assert body["status"] == status, body
    assert body["type"].startswith("urn:killswitch:problem:"), body
    return body


CASES = [(route, who) for route in MATRIX for who in PRINCIPALS]


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def shared_ks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[KS]:
    """One app per database for the whole matrix (~170 cases): starting an app per case
    costs far more than the case. Cases never share principals or targets: each builds
    its own, and no case makes a global change except rotating the signing key."""
    data_dir = tmp_path_factory.mktemp("authz")
    if request.param == "sqlite":
        url = f"sqlite:///{data_dir / 'killswitch.db'}"
    else:
        url = await fresh_postgres_database(request.getfixturevalue("postgres_server"))
    async with running_app(url, data_dir) as harness:
        yield harness


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("route", "who"), CASES, ids=[f"{r}|{w}" for r, w in CASES])
async def test_authz_matrix(shared_ks: KS, route: str, who: str) -> None:
    ks = shared_ks
    expected = MATRIX[route][who]
    ctx = await _principal(ks, who)
    method, path, body = await _request(ctx, route)
    r = await ks.client.request(method, path, json=body, headers=ctx.headers)
    if expected < 400:
        assert r.status_code == expected, r.text
        assert r.headers["content-type"].startswith("application/json"), r.headers
        return
    problem = assert_problem(r, expected)
    if expected == 401:
        assert "WWW-Authenticate" in r.headers
        assert problem["detail"] == "missing Authorization header"
    if expected == 403:
        assert problem["type"] == "urn:killswitch:problem:forbidden", problem


def test_matrix_covers_every_v1_route() -> None:
    """A new /v1 route must get a row here before it ships."""
    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings())

    def normal(path: str) -> str:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)
        return path.replace("{agent_id}", "{id}").replace("{task_id}", "{id}")

    routes = {
        f"{method} {normal(route.path)}"
        for route in app.routes
        if route.path.startswith("/v1")
        for method in route.methods
        if method not in ("HEAD", "OPTIONS")
    }
    # The SSE streams never end, so their rows are checked over a real socket instead:
    # tests/service/test_sse.py::STREAM_MATRIX, tests/service/test_alerts.py::STREAM_MATRIX.
    assert routes == set(MATRIX) | {"GET /v1/revocations/stream", "GET /v1/alerts/stream"}


# --------------------------------------------------------------------------- no leaks


async def test_other_agents_task_looks_missing(ks: KS) -> None:
    owner, intruder = await ks.agent(), await ks.agent()
    task_id = (await ks.open_task(owner.headers))["task"]["id"]
    missing_id = "0" * len(task_id)
    for method, suffix in (("GET", ""), ("POST", "/renew"), ("POST", "/complete")):
        theirs = await ks.client.request(
            method, f"/v1/tasks/{task_id}{suffix}", headers=intruder.headers
        )
        absent = await ks.client.request(
            method, f"/v1/tasks/{missing_id}{suffix}", headers=intruder.headers
        )
        a, b = assert_problem(theirs, 404), assert_problem(absent, 404)
        assert set(a) == set(b)
        assert a["type"] == b["type"] == "urn:killswitch:problem:not-found"
        assert a["title"] == b["title"]
        assert a["detail"].replace(task_id, "<id>") == b["detail"].replace(missing_id, "<id>")
        assert a["instance"].replace(task_id, "<id>") == b["instance"].replace(missing_id, "<id>")
    # The owner's task was neither renewed nor completed by the intruder.
    r = await ks.client.get(f"/v1/tasks/{task_id}", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active", r.text


async def test_bad_credentials_do_not_reveal_which_agents_exist(ks: KS) -> None:
    agent = await ks.agent()
    wrong_secret = await ks.client.get("/v1/tasks", headers=basic(agent.id, "ksa_wrong"))
    no_such_agent = await ks.client.get("/v1/tasks", headers=basic("no-such-agent", "ksa_wrong"))
    a, b = assert_problem(wrong_secret, 401), assert_problem(no_such_agent, 401)
    assert a == b
    assert a["detail"] == "invalid client credentials"
    assert wrong_secret.headers["WWW-Authenticate"] == no_such_agent.headers["WWW-Authenticate"]
    # Right agent id, secret of another real agent: same answer again.
    other = await ks.agent()
    swapped = await ks.client.get("/v1/tasks", headers=basic(agent.id, other.secret))
    assert assert_problem(swapped, 401) == a


async def test_bad_operator_token_is_401(ks: KS) -> None:
    bodies = []
    for token in ("kso_" + secrets.token_urlsafe(32), "kso_", "kso_" + ks.admin_token[4:-1] + "x"):
        r = await ks.client.get("/v1/agents", headers=bearer(token))
        bodies.append(assert_problem(r, 401))
        assert "WWW-Authenticate" in r.headers
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["detail"] == "invalid operator token"
    # Control: the real token works on the same route.
    assert (await ks.client.get("/v1/agents", headers=ks.admin)).status_code == 200
