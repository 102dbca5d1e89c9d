"""The console's pages (GET): alerts, tasks, agents, the panic button, the audit log,
operators, plus the two feeds the alert page's script reads with the session cookie
(an ``EventSource`` cannot send an ``Authorization`` header): the alert stream and the
per-minute timeline. The alert and audit pages take a time range (``from``/``to``, the
same parameters as their exports in ``service.console.exports``). Every page reads
through the repository or a domain module; none changes anything."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from litestar import Controller, Request, Response, get
from litestar.di import Provide
from litestar.params import HeaderParameter, Parameter, QueryParameter
from litestar.response import ServerSentEvent

from service import agents, alerts, operators, tasks
from service.api.deps import ServicesDep
from service.api.sse import alert_stream
from service.auth import ADMIN
from service.console.exports import From, To, time_range
from service.console.render import SECURITY_HEADERS
from service.console.web import UserDep, page, provide_user, session_guard
from service.contracts import (
    AgentTarget,
    AlertView,
    AuditEntry,
    CredentialTarget,
    CutoffTarget,
    RevocationSource,
    RevocationView,
    Role,
    TaskRecord,
    TaskStatus,
    TaskTarget,
    TimelinePoint,
)
from service.kernel.errors import NotFound
from service.storage import repository as repo
from service.usage import TaskUsage

ALERTS_ON_PAGE = 100
TASK_PAGE = 50
ACTIVE_CAP = 1000
SUBTASK_CAP = 200
AUDIT_PAGE = 200
TASK_ALERTS = 50
AUDIT_ON_TASK = 50
USAGE_UNAVAILABLE = "no usage reported (yet) for this task on the usage topic"

Id = Annotated[str, Parameter(max_length=128)]


def target_label(view: RevocationView) -> str:
    match view.target:
        case TaskTarget(task_id=task_id):
            return f"task {task_id}"
        case AgentTarget(agent_id=agent_id):
            return f"agent {agent_id}"
        case CredentialTarget():
            return "one credential"
        case CutoffTarget(agent_id=agent_id):
            return f"cut-off, {'agent ' + agent_id if agent_id else 'every agent'}"


def revocation_rows(views: list[RevocationView]) -> list[dict[str, Any]]:
    return [
        {
            "seq": v.seq,
            "created_at": v.created_at,
            "target_label": target_label(v),
            "reason": v.reason,
            "actor": v.actor,
            "source": v.source.value,
            "affected_tasks": v.affected_tasks,
            "affected_credentials": v.affected_credentials,
        }
        for v in views
    ]


def range_context(start: str | None, end: str | None) -> dict[str, Any]:
    """The search form's values and the query string the export links carry."""
    params = {k: v.strip() for k, v in (("from", start), ("to", end)) if v and v.strip()}
    return {
        "from": params.get("from", ""),
        "to": params.get("to", ""),
        "params": params,
        "query": urlencode(params),
        "active": bool(params),
    }


def _evidence_values(found: list[AlertView], keys: tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for a in found:
        for key in keys:
            value = a.evidence.get(key)
            if isinstance(value, str) and value:
                seen.setdefault(value, None)
    return list(seen)


def usage_summary(
    credentials: list[dict[str, Any]], found: list[AlertView], seen: TaskUsage | None
) -> dict[str, Any]:
    """What is known of a task's use: the guards' reports on the usage topic as the
    service's digest holds them (``service.usage``; none without Kafka, or before any
    guard reported), and what the service itself recorded. Nothing is estimated."""
    reported: dict[str, Any] | None = None
    if seen is not None:
        reported = {
            "calls": seen.calls,
            "denied": seen.denied,
            "bytes_out": seen.bytes_out,
            "first_at": seen.first_at,
            "last_at": seen.last_at,
            "resources": seen.resources.most_common(20),
            "other_resources": seen.other_resources + max(0, len(seen.resources) - 20),
            "sources": seen.sources.most_common(20),
            "denied_reasons": seen.denied_reasons.most_common(5),
        }
    return {
        "reported": reported,
        "unavailable": USAGE_UNAVAILABLE,
        "credentials_issued": len(credentials),
        "renewals": max(0, len(credentials) - 1),
        "credentials_revoked": sum(1 for c in credentials if c["revoked_at"] is not None),
        "alerts": len(found),
        "alerts_capped": len(found) == TASK_ALERTS,
        "resources_in_alerts": _evidence_values(found, ("resource",)),
        "sources_in_alerts": _evidence_values(found, ("address", "user_agent", "workload")),
    }


def task_history(
    record: TaskRecord,
    credentials: list[dict[str, Any]],
    found: list[AlertView],
    ended: RevocationView | None,
) -> list[dict[str, Any]]:
    """The task's life from what the service holds, oldest first: opened, each credential
    issued (the first at opening, later ones renewals) and revoked, each alert, the
    revocation that ended it, its close."""
    events: list[dict[str, Any]] = [
        {"at": record.created_at, "event": "task opened", "detail": record.purpose or ""}
    ]
    for i, c in enumerate(sorted(credentials, key=lambda c: c["issued_at"])):
        events.append(
            {
                "at": c["issued_at"],
                "event": "credential issued" if i == 0 else "credential renewed",
                "detail": f"jti {c['jti_hash'][:12]}…, signing key {c['kid']}",
            }
        )
        if c["revoked_at"] is not None:
            events.append(
                {
                    "at": c["revoked_at"],
                    "event": "credential revoked",
                    "detail": f"jti {c['jti_hash'][:12]}…",
                }
            )
    for a in found:
        summary = a.evidence.get("summary")
        events.append(
            {
                "at": a.at,
                "event": f"alert ({a.severity.value})",
                "detail": f"{a.rule}: {summary}" if isinstance(summary, str) else a.rule,
            }
        )
    if ended is not None:
        events.append(
            {
                "at": ended.created_at,
                "event": "completed" if ended.source is RevocationSource.TASK_END else "revoked",
                "detail": f"{target_label(ended)} by {ended.actor} ({ended.source.value}): "
                f"{ended.reason}",
            }
        )
    if record.closed_at is not None and ended is None:
        events.append(
            {"at": record.closed_at, "event": "closed", "detail": record.close_reason or ""}
        )
    events.sort(key=lambda e: e["at"])
    return events


async def task_audit(
    services: ServicesDep, task_id: str, ended: RevocationView | None
) -> list[AuditEntry]:
    """Audit entries naming the task, plus the entry of the agent revocation that ended
    it (its subject names the agent, not the task)."""
    subject = f"task:{task_id}"
    subjects = [subject]
    if ended is not None and isinstance(ended.target, AgentTarget):
        subjects.append(f"agent:{ended.target.agent_id}")
    found = await repo.audit_of_subjects(services.db, subjects, limit=AUDIT_ON_TASK)
    return [
        e
        for e in found
        if e.subject == subject or (ended is not None and e.detail.get("revocation_id") == ended.id)
    ]


class PagesController(Controller):
    path = "/"
    include_in_schema = False
    guards = [session_guard]
    dependencies = {"user": Provide(provide_user, sync_to_thread=False)}

    @get("/alerts", operation_id="consoleAlerts", summary="Live alert feed")
    async def alerts_page(
        self,
        request: Request[Any, Any, Any],
        user: UserDep,
        services: ServicesDep,
        start: From = None,
        end: To = None,
    ) -> Response[str]:
        since, until = time_range(start, end)
        recent = await repo.list_alerts(services.db, since=since, until=until, limit=ALERTS_ON_PAGE)
        last_seq = max((a.seq for a in recent), default=0)
        return page(
            request,
            user,
            "alerts.html",
            "alerts",
            alerts=recent,
            last_seq=last_seq,
            # A closed range is a search of the past: new alerts do not belong in it.
            live=until is None,
            search=range_context(start, end),
            cap=ALERTS_ON_PAGE,
        )

    @get("/alerts/stream", operation_id="consoleAlertStream", summary="Alert SSE for the page")
    async def alert_feed(
        self,
        user: UserDep,
        services: ServicesDep,
        after: Annotated[int | None, QueryParameter(ge=0, le=2**63 - 1)] = None,
        last_event_id: Annotated[
            int | None, HeaderParameter(name="Last-Event-ID", ge=0, le=2**63 - 1, required=False)
        ] = None,
    ) -> ServerSentEvent:
        # A reconnecting EventSource sends Last-Event-ID; the first connection resumes
        # after the newest alert the page was rendered with.
        start = last_event_id if last_event_id is not None else (after or 0)
        return ServerSentEvent(alert_stream(services, start), headers={"Cache-Control": "no-store"})

    @get("/stats/timeline", operation_id="consoleTimeline", summary="Per-minute chart data")
    async def timeline(
        self,
        user: UserDep,
        services: ServicesDep,
        minutes: Annotated[int, Parameter(ge=1, le=1440)] = 30,
    ) -> Response[list[TimelinePoint]]:
        points = await alerts.timeline(services, minutes)
        return Response(points, headers=dict(SECURITY_HEADERS))

    @get("/tasks", operation_id="consoleTasks", summary="Tasks, newest first")
    async def tasks_page(
        self,
        request: Request[Any, Any, Any],
        user: UserDep,
        services: ServicesDep,
        agent_id: Annotated[str | None, Parameter(max_length=64)] = None,
        status: Annotated[TaskStatus | None, QueryParameter()] = None,
        cursor: Annotated[str | None, Parameter(max_length=64)] = None,
    ) -> Response[str]:
        records = await repo.list_tasks(
            services.db, agent_id=agent_id or None, status=status, before=cursor, limit=TASK_PAGE
        )
        now = services.clock.now()
        next_cursor = records[-1].id if len(records) == TASK_PAGE else None
        query = {"agent_id": agent_id or "", "status": status.value if status else ""}
        return page(
            request,
            user,
            "tasks.html",
            "tasks",
            tasks=[tasks.view(t, now) for t in records],
            agent_id=agent_id,
            status_filter=status.value if status else "",
            next_cursor=next_cursor,
            next_query=urlencode({**query, "cursor": next_cursor or ""}),
        )

    @get("/tasks/{task_id:str}", operation_id="consoleTask", summary="One task")
    async def task_page(
        self, request: Request[Any, Any, Any], task_id: Id, user: UserDep, services: ServicesDep
    ) -> Response[str]:
        record = await repo.get_task(services.db, task_id)
        if record is None:
            raise NotFound(f"no task {task_id!r}")
        now = services.clock.now()
        credentials = [
            {
                "jti_hash": row["jti_hash"],
                "kid": row["kid"],
                "issued_at": row["issued_at"],
                "expires_at": row["expires_at"],
                "revoked_at": row["revoked_at"],
                "state": "revoked"
                if row["revoked_at"] is not None
                else ("expired" if row["expires_at"] <= now else "active"),
            }
            for row in await repo.credentials_of_task(services.db, task_id)
        ]
        tree = await repo.task_and_descendants(services.db, task_id)
        subtasks = []
        for sub_id in [t for t in tree if t != task_id][:SUBTASK_CAP]:
            sub = await repo.get_task(services.db, sub_id)
            if sub is not None:
                subtasks.append(tasks.view(sub, now))
        subtasks.sort(key=lambda t: t.created_at)
        recent = await repo.list_alerts(services.db, task_id=task_id, limit=TASK_ALERTS)
        ended = await repo.revocation_that_ended(services.db, task_id=task_id)
        audit = await task_audit(services, task_id, ended)
        return page(
            request,
            user,
            "task.html",
            "tasks",
            task=tasks.view(record, now),
            credentials=credentials,
            subtasks=subtasks,
            alerts=recent,
            ended=revocation_rows([ended])[0] if ended is not None else None,
            ended_by_revocation=ended is not None and ended.source is not RevocationSource.TASK_END,
            audit=audit,
            usage=usage_summary(credentials, recent, services.usage.of(task_id)),
            history=task_history(record, credentials, recent, ended),
        )

    @get("/agents", operation_id="consoleAgents", summary="Registered agents")
    async def agents_page(
        self,
        request: Request[Any, Any, Any],
        user: UserDep,
        services: ServicesDep,
        cursor: Annotated[str | None, Parameter(max_length=64)] = None,
    ) -> Response[str]:
        records = await repo.list_agents(services.db, after=cursor, limit=TASK_PAGE)
        next_cursor = records[-1].id if len(records) == TASK_PAGE else None
        return page(
            request,
            user,
            "agents.html",
            "agents",
            agents=[agents.view(a) for a in records],
            next_cursor=next_cursor,
        )

    @get("/agents/{agent_id:str}", operation_id="consoleAgent", summary="One agent")
    async def agent_page(
        self,
        request: Request[Any, Any, Any],
        agent_id: Id,
        user: UserDep,
        services: ServicesDep,
    ) -> Response[str]:
        record = await agents.get(services, agent_id)
        now = services.clock.now()
        active = await repo.list_tasks(
            services.db, agent_id=agent_id, status=TaskStatus.ACTIVE, before=None, limit=ACTIVE_CAP
        )
        revocations = await repo.revocations_touching_agent(services.db, agent_id, limit=100)
        recent = await repo.list_alerts(services.db, agent_id=agent_id, limit=50)
        return page(
            request,
            user,
            "agent.html",
            "agents",
            agent=agents.view(record),
            active_tasks=[tasks.view(t, now) for t in active],
            revocations=revocation_rows(revocations),
            alerts=recent,
        )

    @get("/panic", operation_id="consolePanic", summary="The panic button")
    async def panic_page(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep
    ) -> Response[str]:
        active = await repo.list_tasks(
            services.db, agent_id=None, status=TaskStatus.ACTIVE, before=None, limit=ACTIVE_CAP
        )
        registered = await repo.list_agents(services.db, after=None, limit=500)
        return page(
            request,
            user,
            "panic.html",
            "panic",
            active_tasks=len(active),
            active_cap=ACTIVE_CAP,
            agents=[agents.view(a) for a in registered],
        )

    @get("/audit", operation_id="consoleAudit", summary="The audit log, newest first")
    async def audit_page(
        self,
        request: Request[Any, Any, Any],
        user: UserDep,
        services: ServicesDep,
        before: Annotated[int | None, QueryParameter(ge=0, le=2**63 - 1)] = None,
        start: From = None,
        end: To = None,
    ) -> Response[str]:
        since, until = time_range(start, end)
        entries = await repo.recent_audit_between(
            services.db, since=since, until=until, before_seq=before, limit=AUDIT_PAGE
        )
        older = entries[-1].seq if len(entries) == AUDIT_PAGE else None
        ranged = range_context(start, end)
        return page(
            request,
            user,
            "audit.html",
            "audit",
            entries=entries,
            older=older,
            older_query=urlencode({**ranged["params"], "before": older or ""}),
            search=ranged,
        )

    @get("/operators", operation_id="consoleOperators", summary="Operators (admin)")
    async def operators_page(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep
    ) -> Response[str]:
        user.require(ADMIN, "manage operators")
        return await operators_view(request, user, services)


async def operators_view(
    request: Request[Any, Any, Any],
    user: UserDep,
    services: ServicesDep,
    *,
    created: Any = None,
    status_code: int = 200,
) -> Response[str]:
    listed = [operators.view(o) for o in await repo.list_operators(services.db)]
    return page(
        request,
        user,
        "operators.html",
        "operators",
        status_code=status_code,
        operators=listed,
        roles=[r.value for r in Role],
        created=created,
    )
