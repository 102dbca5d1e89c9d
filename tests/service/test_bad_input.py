"""Bad input: every malformed, ill-typed, oversized or out-of-bounds request is a 4xx
problem detail (application/problem+json, never a 500), and nothing is half-written:
row counts of every table are unchanged after each rejected request. Failures injected
in the middle of a transaction roll back everything, including the audit entry.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from service.storage import repository as repo
from tests.conftest import fresh_postgres_database
from tests.support.harness import AUD, DEFAULT_CEILING, KS, Agent, bearer, running_app
from tests.support.tokens import count_rows

PROBLEM_JSON = "application/problem+json"
TABLES = ("agents", "operators", "tasks", "credentials", "revocations", "audit_log")
MAX_BODY = 65_536  # KS_MAX_BODY_BYTES default


async def snapshot(ks: KS) -> dict[str, int]:
    return {table: await count_rows(ks, table) for table in TABLES}


def assert_problem(r: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0].strip() == PROBLEM_JSON, r.headers
    body: dict[str, Any] = r.json()
    for member in ("type", "title", "detail"):
        assert isinstance(body.get(member), str), body
        assert body[member], body
    assert body["status"] == status, body
    if slug is not None:
        assert body["type"] == f"urn:killswitch:problem:{slug}", body
    return body


@dataclass
class Env:
    ks: KS
    agent: Agent
    analyst: str
    rs: str
    task_id: str


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Env]:
    """One app per database for the table of rejected requests: none of them may change
    anything (that is what each case asserts), so they can share it."""
    data_dir = tmp_path_factory.mktemp("badinput")
    if request.param == "sqlite":
        url = f"sqlite:///{data_dir / 'killswitch.db'}"
    else:
        url = await fresh_postgres_database(request.getfixturevalue("postgres_server"))
    async with running_app(url, data_dir) as ks:
        agent = await ks.agent("existing-agent")
        issued = await ks.open_task(agent.headers)
        yield Env(
            ks=ks,
            agent=agent,
            analyst=await ks.operator("analyst"),
            rs=await ks.operator("resource_server", audience=AUD),
            task_id=issued["task"]["id"],
        )


def _scope(**over: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}
    scope.update(over)
    return scope


def _task(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"scope": _scope(), "ttl": 600}
    body.update(over)
    return body


def _agent(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "new-agent",
        "ceiling": {"grants": list(DEFAULT_CEILING), "audiences": [AUD]},
    }
    body.update(over)
    return body


def _revocation(target: dict[str, Any], reason: str = "bad input test") -> dict[str, Any]:
    return {"target": target, "reason": reason}


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    who: str  # admin | agent | analyst | rs
    status: int
    slug: str | None = None
    json: Any = None
    raw: bytes | None = None  # sent as application/json
    form: dict[str, str] | None = None
    check: Callable[[dict[str, Any]], None] | None = None


def _offending(*needles: str) -> Callable[[dict[str, Any]], None]:
    def check(body: dict[str, Any]) -> None:
        offending = body.get("offending")
        assert isinstance(offending, list), body
        assert offending, body
        for needle in needles:
            assert any(needle in item for item in offending), (needle, offending)

    return check


def _detail_has(*needles: str) -> Callable[[dict[str, Any]], None]:
    def check(body: dict[str, Any]) -> None:
        for needle in needles:
            assert needle in body["detail"], (needle, body)

    return check


BIG = "x" * (MAX_BODY + 1)

CASES: dict[str, Case] = {
    # -- malformed JSON / not an object
    "agents-malformed-json": Case("POST", "/v1/agents", "admin", 400, raw=b'{"id": "a", '),
    "tasks-malformed-json": Case("POST", "/v1/tasks", "agent", 400, raw=b"{scope: }"),
    "tasks-json-array": Case("POST", "/v1/tasks", "agent", 400, json=[1, 2]),
    "tasks-json-string": Case("POST", "/v1/tasks", "agent", 400, json="scope"),
    "tasks-empty-body": Case("POST", "/v1/tasks", "agent", 400, raw=b""),
    "revocations-malformed-json": Case("POST", "/v1/revocations", "analyst", 400, raw=b"{]"),
    "suspend-malformed-json": Case(
        "POST", "/v1/agents/existing-agent/suspend", "admin", 400, raw=b"{"
    ),
    # -- unknown fields
    "tasks-unknown-top-level": Case("POST", "/v1/tasks", "agent", 400, json=_task(bogus=1)),
    "tasks-unknown-in-scope": Case(
        "POST", "/v1/tasks", "agent", 400, json=_task(scope=_scope(grant=["call:x"]))
    ),
    "tasks-unknown-in-limits": Case(
        "POST", "/v1/tasks", "agent", 400,
        json=_task(scope=_scope(limits={"max_calls": 1, "max_callz": 2})),
    ),
    "agents-unknown-top-level": Case("POST", "/v1/agents", "admin", 400, json=_agent(role="x")),
    "agents-unknown-in-ceiling-limits": Case(
        "POST", "/v1/agents", "admin", 400,
        json=_agent(ceiling={"grants": ["call:x"], "audiences": [AUD], "limits": {"qps": 1}}),
    ),
    "complete-unknown-field": Case(
        "POST", "/v1/tasks/{task}/complete", "agent", 400, json={"reason": "x", "force": True}
    ),
    "revocation-unknown-field-in-target": Case(
        "POST", "/v1/revocations", "analyst", 400,
        json=_revocation({"type": "task", "task_id": "{task}", "cascade": False}),
    ),
    # -- wrong types
    "tasks-grants-string": Case(
        "POST", "/v1/tasks", "agent", 400, json=_task(scope=_scope(grants="call:tool/x"))
    ),
    "tasks-grants-numbers": Case(
        "POST", "/v1/tasks", "agent", 400, json=_task(scope=_scope(grants=[1, 2]))
    ),
    "tasks-audiences-number": Case(
        "POST", "/v1/tasks", "agent", 400, json=_task(scope=_scope(audiences=5))
    ),
    "tasks-ttl-string": Case("POST", "/v1/tasks", "agent", 400, json=_task(ttl="600")),
    "tasks-ttl-float": Case("POST", "/v1/tasks", "agent", 400, json=_task(ttl=1.5)),
    "tasks-ttl-bool": Case("POST", "/v1/tasks", "agent", 400, json=_task(ttl=True)),
    "tasks-max-calls-string": Case(
        "POST", "/v1/tasks", "agent", 400, json=_task(scope=_scope(limits={"max_calls": "ten"}))
    ),
    "tasks-max-calls-numeric-string": Case(
        "POST", "/v1/tasks", "agent", 400, json=_task(scope=_scope(limits={"max_calls": "10"}))
    ),
    "tasks-max-calls-zero": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope",
        json=_task(scope=_scope(limits={"max_calls": 0})),
    ),
    "tasks-max-rate-negative": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope",
        json=_task(scope=_scope(limits={"max_rate": -1})),
    ),
    "tasks-max-rate-infinite": Case(
        "POST", "/v1/tasks", "agent", 400, raw=b'{"scope": {"grants": ["call:tool/invoices.read"],'
        b' "audiences": ["https://tools.internal"], "limits": {"max_rate": 1e400}}}',
    ),
    "tasks-purpose-too-long": Case(
        "POST", "/v1/tasks", "agent", 400, json=_task(purpose="p" * 501)
    ),
    "tasks-bad-dpop-jkt": Case("POST", "/v1/tasks", "agent", 400, json=_task(dpop_jkt="short")),
    "agents-id-number": Case("POST", "/v1/agents", "admin", 400, json=_agent(id=123)),
    "agents-max-task-ttl-zero": Case(
        "POST", "/v1/agents", "admin", 400, json=_agent(max_task_ttl=0)
    ),
    "agents-issue-secret-string": Case(
        "POST", "/v1/agents", "admin", 400, json=_agent(issue_secret="yes")
    ),
    "operators-unknown-role": Case(
        "POST", "/v1/operators", "admin", 400, json={"name": "op-x", "role": "root"}
    ),
    "operators-rs-without-audience": Case(
        "POST", "/v1/operators", "admin", 400, "bad-request",
        json={"name": "rs-x", "role": "resource_server"},
    ),
    "revocation-cutoff-before-string": Case(
        "POST", "/v1/revocations", "analyst", 400,
        json=_revocation({"type": "cutoff", "before": "yesterday"}),
    ),
    "suspend-empty-reason": Case(
        "POST", "/v1/agents/existing-agent/suspend", "admin", 400, json={"reason": ""}
    ),
    "suspend-missing-reason": Case(
        "POST", "/v1/agents/existing-agent/suspend", "admin", 400, json={}
    ),
    # -- query parameters
    "list-tasks-bad-status": Case("GET", "/v1/tasks?status=zombie", "admin", 400),
    "list-tasks-limit-zero": Case("GET", "/v1/tasks?limit=0", "admin", 400),
    "list-agents-limit-huge": Case("GET", "/v1/agents?limit=100000", "admin", 400),
    "list-revocations-cursor-text": Case("GET", "/v1/revocations?cursor=abc", "admin", 400),
    "list-audit-since-text": Case("GET", "/v1/audit?since=yesterday", "admin", 400),
    # -- oversized bodies
    "tasks-oversized": Case("POST", "/v1/tasks", "agent", 413, json=_task(purpose=BIG)),
    "agents-oversized": Case("POST", "/v1/agents", "admin", 413, json=_agent(name=BIG)),
    "revocations-oversized": Case(
        "POST", "/v1/revocations", "analyst", 413,
        json=_revocation({"type": "cutoff"}, reason=BIG),
    ),
    "introspect-oversized": Case("POST", "/oauth2/introspect", "rs", 413, form={"token": BIG}),
    # -- scope grammar
    "grant-bad-action": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope",
        json=_task(scope=_scope(grants=["b@d:tool/x"])), check=_detail_has("b@d:tool/x"),
    ),
    "grant-triple-star": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope",
        json=_task(scope=_scope(grants=["call:tool/***"])), check=_detail_has("***"),
    ),
    "grant-whitespace": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope",
        json=_task(scope=_scope(grants=["call:tool/a b"])),
    ),
    "grant-newline": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope",
        json=_task(scope=_scope(grants=["call:tool/a\nb"])),
    ),
    "grant-no-colon": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope",
        json=_task(scope=_scope(grants=["calltool"])),
    ),
    "grant-empty-string": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope", json=_task(scope=_scope(grants=[""]))
    ),
    "grants-empty-list": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope", json=_task(scope=_scope(grants=[]))
    ),
    "ceiling-bad-grant": Case(
        "POST", "/v1/agents", "admin", 400, "invalid-scope",
        json=_agent(ceiling={"grants": ["call:***"], "audiences": [AUD]}),
    ),
    "audience-whitespace": Case(
        "POST", "/v1/tasks", "agent", 400, "invalid-scope",
        json=_task(scope=_scope(audiences=["https://tools. internal"])),
    ),
    # -- scope outside the ceiling
    "grant-outside-ceiling": Case(
        "POST", "/v1/tasks", "agent", 403, "scope-violation",
        json=_task(scope=_scope(grants=["call:tool/invoices.read", "call:tool/payroll.write"])),
        check=_offending("call:tool/payroll.write"),
    ),
    "wildcard-outside-ceiling": Case(
        "POST", "/v1/tasks", "agent", 403, "scope-violation",
        json=_task(scope=_scope(grants=["*:**"])), check=_offending("*:**"),
    ),
    "audience-outside-ceiling": Case(
        "POST", "/v1/tasks", "agent", 403, "scope-violation",
        json=_task(scope=_scope(audiences=[AUD, "https://evil.example"])),
        check=_offending("https://evil.example"),
    ),
    # -- semantic
    "tasks-missing-audiences": Case(
        "POST", "/v1/tasks", "agent", 400, "bad-request",
        json=_task(scope={"grants": ["call:tool/invoices.read"]}), check=_detail_has("audience"),
    ),
    "tasks-missing-scope": Case("POST", "/v1/tasks", "agent", 400, json={"ttl": 600}),
    "tasks-negative-ttl": Case("POST", "/v1/tasks", "agent", 400, json=_task(ttl=-5)),
    "tasks-zero-ttl": Case("POST", "/v1/tasks", "agent", 400, json=_task(ttl=0)),
    "agent-id-dotdot": Case("POST", "/v1/agents", "admin", 400, json=_agent(id="../x")),
    "agent-id-space": Case("POST", "/v1/agents", "admin", 400, json=_agent(id="my agent")),
    "agent-id-empty": Case("POST", "/v1/agents", "admin", 400, json=_agent(id="")),
    "agent-id-dot": Case("POST", "/v1/agents", "admin", 400, json=_agent(id=".")),
    "agent-id-too-long": Case("POST", "/v1/agents", "admin", 400, json=_agent(id="a" * 65)),
    "agent-duplicate": Case(
        "POST", "/v1/agents", "admin", 409, "conflict", json=_agent(id="existing-agent")
    ),
    "agent-jwk-with-private-d": Case(
        "POST", "/v1/agents", "admin", 400, "bad-request",
        json=_agent(public_jwk={"kty": "OKP", "crv": "Ed25519", "x": "A" * 43, "d": "B" * 43}),
        check=_detail_has("'d'"),
    ),
    "agent-jwk-garbage": Case(
        "POST", "/v1/agents", "admin", 400, "bad-request",
        json=_agent(public_jwk={"kty": "RSA", "n": "abc", "e": "AQAB"}),
    ),
    "agent-no-auth-method": Case(
        "POST", "/v1/agents", "admin", 400, "bad-request", json=_agent(issue_secret=False)
    ),
    # No task of it could ever name an audience inside its ceiling.
    "agent-ceiling-no-audience": Case(
        "POST", "/v1/agents", "admin", 400, "bad-request",
        json=_agent(ceiling={"grants": ["call:tool/x"], "audiences": []}),
        check=_detail_has("ceiling needs at least one audience"),
    ),
    "agent-ceiling-audiences-omitted": Case(
        "POST", "/v1/agents", "admin", 400, "bad-request",
        json=_agent(ceiling={"grants": ["call:tool/x"]}),
        check=_detail_has("ceiling needs at least one audience"),
    ),
    "revocation-unknown-type": Case(
        "POST", "/v1/revocations", "analyst", 400, json=_revocation({"type": "planet"})
    ),
    "revocation-missing-type": Case(
        "POST", "/v1/revocations", "analyst", 400, json=_revocation({"task_id": "{task}"})
    ),
    "revocation-missing-reason": Case(
        "POST", "/v1/revocations", "analyst", 400, json={"target": {"type": "cutoff"}}
    ),
    "revocation-cutoff-in-future": Case(
        "POST", "/v1/revocations", "analyst", 400, "bad-request",
        json=_revocation({"type": "cutoff", "before": "{future}"}), check=_detail_has("future"),
    ),
    "revocation-unknown-task": Case(
        "POST", "/v1/revocations", "analyst", 404, "not-found",
        json=_revocation({"type": "task", "task_id": "no-such-task"}),
    ),
    "revocation-unknown-credential": Case(
        "POST", "/v1/revocations", "analyst", 404, "not-found",
        json=_revocation({"type": "credential", "jti": "no-such-jti"}),
    ),
    "revocation-unknown-agent": Case(
        "POST", "/v1/revocations", "analyst", 404, "not-found",
        json=_revocation({"type": "agent", "agent_id": "no-such-agent"}),
    ),
    "revocation-cutoff-unknown-agent": Case(
        "POST", "/v1/revocations", "analyst", 404, "not-found",
        json=_revocation({"type": "cutoff", "agent_id": "no-such-agent"}),
    ),
    "suspend-unknown-agent": Case(
        "POST", "/v1/agents/no-such-agent/suspend", "admin", 404, "not-found", json={"reason": "x"}
    ),
    "reinstate-active-agent": Case(
        "POST", "/v1/agents/existing-agent/reinstate", "admin", 409, "conflict",
        json={"reason": "x"},
    ),
    "introspect-form-no-token": Case("POST", "/oauth2/introspect", "rs", 400, form={}),
    "introspect-form-empty-token": Case(
        "POST", "/oauth2/introspect", "rs", 400, form={"token": ""}
    ),
    "introspect-json-instead-of-form": Case(
        "POST", "/oauth2/introspect", "rs", 400, json={"token": "abc"}
    ),
    "revoke-form-no-token": Case("POST", "/oauth2/revoke", "agent", 400, form={}),
}  # fmt: skip

# docs/api.md: "validation-error | 400 — body or query does not match the schema (unknown
# field, wrong type)".
SCHEMA_MISMATCH = (
    "tasks-unknown-top-level", "tasks-unknown-in-scope", "tasks-unknown-in-limits",
    "agents-unknown-top-level", "agents-unknown-in-ceiling-limits", "complete-unknown-field",
    "revocation-unknown-field-in-target", "tasks-grants-string", "tasks-grants-numbers",
    "tasks-audiences-number", "tasks-ttl-string", "tasks-ttl-float", "tasks-ttl-bool",
    "tasks-max-calls-string", "tasks-max-calls-numeric-string", "agents-id-number",
    "agents-max-task-ttl-zero",
    "agents-issue-secret-string", "operators-unknown-role", "revocation-cutoff-before-string",
    "suspend-empty-reason", "suspend-missing-reason", "tasks-missing-scope", "tasks-negative-ttl",
    "tasks-zero-ttl", "tasks-purpose-too-long", "tasks-bad-dpop-jkt", "agent-id-dotdot",
    "agent-id-space", "agent-id-empty", "agent-id-too-long", "revocation-unknown-type",
    "revocation-missing-type", "revocation-missing-reason", "list-tasks-bad-status",
    "list-tasks-limit-zero", "list-agents-limit-huge", "list-revocations-cursor-text",
    "list-audit-since-text",
)  # fmt: skip
for _name in SCHEMA_MISMATCH:
    assert CASES[_name].slug is None, _name
    CASES[_name] = dataclasses.replace(CASES[_name], slug="validation-error")


def _fill(value: Any, task_id: str) -> Any:
    """Put run-time values (the shared task id, a future time) into a case's body."""
    if isinstance(value, str):
        if value == "{future}":
            return time.time() + 3600
        return value.replace("{task}", task_id)
    if isinstance(value, dict):
        return {k: _fill(v, task_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, task_id) for v in value]
    return value


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input_is_a_problem_and_writes_nothing(env: Env, name: str) -> None:
    case = CASES[name]
    ks = env.ks
    headers = {
        "admin": ks.admin,
        "agent": env.agent.headers,
        "analyst": bearer(env.analyst),
        "rs": bearer(env.rs),
    }[case.who]
    kwargs: dict[str, Any] = {}
    if case.raw is not None:
        kwargs["content"] = case.raw
        headers = {**headers, "Content-Type": "application/json"}
    elif case.form is not None:
        kwargs["data"] = case.form
        if not case.form:  # httpx sends no body for {}: say it is a form anyway
            headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    elif case.json is not None:
        kwargs["content"] = json.dumps(_fill(case.json, env.task_id)).encode()
        headers = {**headers, "Content-Type": "application/json"}
    before = await snapshot(ks)
    r = await ks.client.request(
        case.method, _fill(case.path, env.task_id), headers=headers, **kwargs
    )
    body = assert_problem(r, case.status, case.slug)
    if case.check is not None:
        case.check(body)
    assert await snapshot(ks) == before
    # The shared task is untouched by every rejected request.
    r = await ks.client.get(f"/v1/tasks/{env.task_id}", headers=ks.admin)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active", r.text


# --------------------------------------------------------------------------- problem text


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("path", "who", "body"),
    [
        ("/v1/agents", "admin", _agent(ceiling={"grants": ["nocolon"], "audiences": [AUD]})),
        ("/v1/tasks", "agent", _task(scope=_scope(grants=["nocolon", "call:a b"]))),
    ],
)
async def test_problem_detail_does_not_repeat_the_title(
    env: Env, path: str, who: str, body: dict[str, Any]
) -> None:
    headers = env.ks.admin if who == "admin" else env.agent.headers
    r = await env.ks.client.post(path, json=body, headers=headers)
    problem = assert_problem(r, 400, "invalid-scope")
    assert problem["title"] == "Invalid scope"
    assert problem["detail"].startswith("grant 'nocolon': no ':' between action and resource")
    # What clients show (the CLI: "HTTP 400 Invalid scope: grant …") says it once.
    shown = f"{problem['title']}: {problem['detail']}".lower()
    assert shown.count("invalid scope") == 1, shown
    assert problem["invalid"][0] == "grant 'nocolon': no ':' between action and resource"


# --------------------------------------------------------------------------- long tokens


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("length", [16_385, 20_000, MAX_BODY - 100])
async def test_a_token_too_long_to_be_ours_is_inactive_not_a_400(env: Env, length: int) -> None:
    """RFC 7662 §2.2: an authorised, well-formed query about an invalid token is 200
    active:false, whatever the token's length (the body limit still bounds it: 413)."""
    before = await snapshot(env.ks)
    token = "x" * length
    r = await env.ks.client.post(
        "/oauth2/introspect", data={"token": token}, headers=bearer(env.rs)
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"active": False}
    # RFC 7009 §2.2: revoking an invalid token is not an error either.
    r = await env.ks.client.post("/oauth2/revoke", data={"token": token}, headers=env.agent.headers)
    assert r.status_code == 200, r.text
    assert await snapshot(env.ks) == before


# --------------------------------------------------------------------------- big numbers


@pytest.mark.parametrize("value", [2**31, 2**63, 10**30])
async def test_huge_agent_max_task_ttl_is_not_a_500(ks: KS, value: int) -> None:
    """max_task_ttl is stored in an INTEGER column; a number no column holds must be a
    4xx (or be accepted and read back exactly), never an internal error."""
    before = await snapshot(ks)
    r = await ks.client.post(
        "/v1/agents", json=_agent(id="big-ttl", max_task_ttl=value), headers=ks.admin
    )
    assert r.status_code != 500, r.text
    if r.status_code == 201:
        got = await ks.client.get("/v1/agents/big-ttl", headers=ks.admin)
        assert got.json()["max_task_ttl"] == value
        agent = Agent("big-ttl", r.json()["client_secret"])
        await ks.open_task(agent.headers)
    else:
        assert_problem(r, 400)
        assert await snapshot(ks) == before


async def test_huge_task_ttl_is_capped_not_a_500(ks: KS) -> None:
    agent = await ks.agent()
    for ttl in (2**31, 2**63 - 1):
        issued = await ks.open_task(agent.headers, ttl=ttl)
        task = issued["task"]
        assert task["deadline"] - task["created_at"] <= ks.services.settings.max_task_ttl + 1


# --------------------------------------------------------------------------- rollback


async def test_revoking_a_missing_task_leaves_no_revocation_or_audit_row(ks: KS) -> None:
    analyst = await ks.operator("analyst")
    before = await snapshot(ks)
    r = await ks.client.post(
        "/v1/revocations",
        json=_revocation({"type": "task", "task_id": "no-such-task"}),
        headers=bearer(analyst),
    )
    assert_problem(r, 404, "not-found")
    assert await snapshot(ks) == before
    r = await ks.client.get("/v1/revocations", headers=bearer(analyst))
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [], r.text


def _boom_on_audit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the audit insert — the last write of every mutating transaction — fail."""
    calls: list[str] = []

    async def boom(db: Any, **kwargs: Any) -> None:
        calls.append(kwargs["action"])
        raise RuntimeError("injected failure after the other writes")

    monkeypatch.setattr(repo, "append_audit", boom)
    return calls


async def test_failed_agent_registration_rolls_back(
    ks: KS, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await snapshot(ks)
    calls = _boom_on_audit(monkeypatch)
    r = await ks.client.post("/v1/agents", json=_agent(id="half-written"), headers=ks.admin)
    assert_problem(r, 500, "internal-error")
    assert calls == ["agent.register"]  # the agent row was written before the failure
    assert await snapshot(ks) == before
    monkeypatch.undo()
    r = await ks.client.get("/v1/agents/half-written", headers=ks.admin)
    assert_problem(r, 404, "not-found")
    # The id is free: the same registration succeeds once the fault is gone.
    r = await ks.client.post("/v1/agents", json=_agent(id="half-written"), headers=ks.admin)
    assert r.status_code == 201, r.text


async def test_failed_task_revocation_rolls_back(ks: KS, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = await ks.agent()
    issued = await ks.open_task(agent.headers)
    sub = await ks.open_task(bearer(issued["access_token"]))
    analyst = await ks.operator("analyst")
    rs = await ks.operator("resource_server", audience=AUD)
    before = await snapshot(ks)
    calls = _boom_on_audit(monkeypatch)
    r = await ks.client.post(
        "/v1/revocations",
        json=_revocation({"type": "task", "task_id": issued["task"]["id"]}),
        headers=bearer(analyst),
    )
    assert_problem(r, 500, "internal-error")
    assert calls == ["revoke"]
    monkeypatch.undo()
    assert await snapshot(ks) == before
    revoked = await count_rows_where(ks, "credentials", "revoked_at IS NOT NULL")
    assert revoked == 0
    for t in (issued, sub):
        got = await ks.client.get(f"/v1/tasks/{t['task']['id']}", headers=ks.admin)
        assert got.json()["status"] == "active", got.text
        # Memory did not run ahead of the database either.
        assert (await ks.introspect(t["access_token"], rs))["active"] is True


async def test_failed_task_completion_rolls_back(ks: KS, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = await ks.agent()
    issued = await ks.open_task(agent.headers)
    rs = await ks.operator("resource_server", audience=AUD)
    before = await snapshot(ks)
    _boom_on_audit(monkeypatch)
    r = await ks.client.post(f"/v1/tasks/{issued['task']['id']}/complete", headers=agent.headers)
    assert_problem(r, 500, "internal-error")
    monkeypatch.undo()
    assert await snapshot(ks) == before
    assert (await ks.introspect(issued["access_token"], rs))["active"] is True
    r = await ks.client.post(f"/v1/tasks/{issued['task']['id']}/complete", headers=agent.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed", r.text


async def test_failed_credential_insert_leaves_no_task(
    ks: KS, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = await ks.agent()
    before = await snapshot(ks)

    async def boom(db: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected failure after the task insert")

    monkeypatch.setattr(repo, "insert_credential", boom)
    r = await ks.client.post("/v1/tasks", json=_task(), headers=agent.headers)
    assert_problem(r, 500, "internal-error")
    monkeypatch.undo()
    assert await snapshot(ks) == before
    r = await ks.client.get("/v1/tasks", headers=agent.headers)
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [], r.text


async def count_rows_where(ks: KS, table: str, where: str) -> int:
    from tests.support.tokens import on_app_loop

    row = await on_app_loop(
        ks, ks.services.db.fetchrow, f"SELECT COUNT(*) AS n FROM {table} WHERE {where}"
    )
    assert row is not None
    return int(row["n"])


async def test_unauthenticated_malformed_body_is_401_not_400(ks: KS) -> None:
    """Authentication comes first: an anonymous caller learns nothing about the body."""
    before = await snapshot(ks)
    r = await ks.client.post(
        "/v1/agents", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_problem(r, 401)
    assert await snapshot(ks) == before


@pytest.mark.parametrize("path", ["/v1/revocations", "/v1/audit"])
@pytest.mark.parametrize("cursor", [2**31, 2**63, 10**30, -(2**63) - 1])
async def test_out_of_range_cursor_is_not_a_500(ks: KS, path: str, cursor: int) -> None:
    """A cursor past every entry is an empty page (or a 400), never an internal error."""
    r = await ks.client.get(f"{path}?cursor={cursor}", headers=ks.admin)
    assert r.status_code != 500, r.text
    if r.status_code == 200:
        assert cursor < 0 or r.json()["items"] == [], r.text
    else:
        assert_problem(r, 400)
