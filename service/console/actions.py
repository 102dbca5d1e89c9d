"""The console's forms (POST): the kill switch, acknowledging alerts, agent and operator
administration. Each handler checks, in order: the session (guard), the form's CSRF
token, the role; then it delegates to the same domain function the API uses.

Revoking is two requests on purpose: the first POST (reason, target) answers with a
confirmation page describing the impact; only a second POST carrying ``confirm=yes`` —
checked here, not in the browser — revokes. The confirmation page's random nonce becomes
the revocation's idempotency key, so a double-submitted confirmation revokes once.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import Provide
from litestar.params import Parameter

from service import agents, alerts, operators
from service.api.deps import ServicesDep
from service.auth import ACK, ADMIN, REVOKE
from service.console.pages import operators_view, target_label
from service.console.web import (
    ConsoleUser,
    UserDep,
    check_csrf,
    form_of,
    page,
    provide_user,
    see_other,
    session_guard,
)
from service.contracts import (
    AgentTarget,
    CreateOperator,
    CreateRevocation,
    CutoffTarget,
    RevocationSource,
    RevocationTarget,
    TaskTarget,
)
from service.kernel.errors import ClientError
from service.storage import repository as repo

Id = Annotated[str, Parameter(max_length=128)]
_NONCE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _target(form: dict[str, str]) -> RevocationTarget:
    """The revocation target named by the form, validated by the API's own contract."""
    kind = form.get("target", "")
    raw: dict[str, Any] = {"type": kind}
    if kind == "task":
        raw["task_id"] = form.get("task_id", "")
    elif kind == "agent":
        raw["agent_id"] = form.get("agent_id", "")
    elif kind == "cutoff":
        if form.get("agent_id"):
            raw["agent_id"] = form["agent_id"]
    else:
        raise ClientError("the console revokes a task, an agent, or a cut-off")
    try:
        request = msgspec.convert({"target": raw, "reason": "x"}, CreateRevocation)
    except msgspec.ValidationError as exc:
        raise ClientError(f"invalid revocation target: {exc}") from None
    return request.target


def _fields(target: RevocationTarget) -> dict[str, str]:
    match target:
        case TaskTarget(task_id=task_id):
            return {"target": "task", "task_id": task_id}
        case AgentTarget(agent_id=agent_id):
            return {"target": "agent", "agent_id": agent_id}
        case CutoffTarget(agent_id=agent_id):
            return {"target": "cutoff", **({"agent_id": agent_id} if agent_id else {})}
    raise ClientError("unsupported target")


def _back(target: RevocationTarget) -> str:
    match target:
        case TaskTarget(task_id=task_id):
            return f"/console/tasks/{task_id}"
        case AgentTarget(agent_id=agent_id) | CutoffTarget(agent_id=str() as agent_id):
            return f"/console/agents/{agent_id}"
    return "/console/audit"


async def _impact(services: ServicesDep, target: RevocationTarget) -> tuple[str, str, str, str]:
    """(summary, target, impact, confirmation sentence) for the confirmation page."""
    match target:
        case TaskTarget(task_id=task_id):
            task = await repo.get_task(services.db, task_id)
            if task is None:
                raise ClientError(f"no task {task_id!r}")
            tree = await repo.task_and_descendants(services.db, task_id)
            return (
                f"revoke task {task_id}",
                f"task {task_id} (agent {task.agent_id})",
                f"{len(tree)} task(s) (this one and its sub-tasks) of agent {task.agent_id}, "
                f"currently {task.effective_status(services.clock.now()).value}",
                "I confirm: revoke this task, its sub-tasks and all their credentials.",
            )
        case AgentTarget(agent_id=agent_id):
            await agents.get(services, agent_id)
            active = await repo.active_tasks_of_agent(services.db, agent_id)
            return (
                f"revoke agent {agent_id}",
                f"agent {agent_id}",
                f"the agent is suspended; {len(active)} active task(s) and every credential "
                "issued to it so far die",
                "I confirm: suspend this agent and revoke everything it holds.",
            )
        case CutoffTarget(agent_id=agent_id):
            if agent_id is not None:
                await agents.get(services, agent_id)
            active = await repo.active_tasks_created_before(
                services.db, services.clock.now(), agent_id
            )
            who = f"agent {agent_id}" if agent_id else "EVERY agent"
            return (
                f"cut off {who} before now",
                f"credentials of {who} issued before now",
                f"every credential issued to {who} up to the moment you confirm dies; "
                f"{len(active)} active task(s) are revoked",
                f"I confirm: revoke every credential issued to {who} before now.",
            )
    raise ClientError("unsupported target")


async def _reasoned_form(
    request: Request[Any, Any, Any], user: ConsoleUser, what: str, *, confirm: bool
) -> str:
    """An admin form that must carry a CSRF token, a reason and (maybe) the confirmation."""
    form = await form_of(request)
    check_csrf(user, form)
    user.require(ADMIN, what)
    reason = form.get("reason", "").strip()
    if not reason or len(reason) > 1000 or (confirm and form.get("confirm") != "yes"):
        needs = " and the confirmation" if confirm else ""
        raise ClientError(f"to {what} give a reason (1-1000 characters){needs}")
    return reason


class ActionsController(Controller):
    path = "/"
    include_in_schema = False
    guards = [session_guard]
    dependencies = {"user": Provide(provide_user, sync_to_thread=False)}

    @post(
        "/revoke",
        status_code=200,
        operation_id="consoleRevoke",
        summary="Revoke, after a confirmation page",
    )
    async def revoke(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep
    ) -> Response[Any]:
        form = await form_of(request)
        check_csrf(user, form)
        user.require(REVOKE, "revoke")
        target = _target(form)
        reason = form.get("reason", "").strip()
        nonce = form.get("nonce", "")
        confirmed = form.get("confirm") == "yes" and 16 <= len(nonce) <= 64
        error = None
        if not reason:
            error = "A reason is required."
        elif len(reason) > 1000:
            error = "The reason is longer than 1000 characters."
        if error is not None or not confirmed or not set(nonce) <= _NONCE_CHARS:
            summary, label, impact, sentence = await _impact(services, target)
            return page(
                request,
                user,
                "confirm.html",
                "panic" if isinstance(target, CutoffTarget) else "",
                status_code=400 if error else 200,
                summary=summary,
                impact=impact,
                confirm_text=sentence,
                target_label=label,
                fields=_fields(target),
                reason=reason,
                nonce=secrets.token_urlsafe(24),
                back=_back(target),
                error=error,
            )
        view, created = await services.revoker.revoke_idempotent(
            target,
            reason=reason,
            actor=user.actor,
            source=RevocationSource.ANALYST,
            idempotency_key=f"console:{nonce}",
        )
        if created:
            services.metrics.revocations.labels(
                target=view.target.__struct_config__.tag, source=RevocationSource.ANALYST.value
            ).inc()
        user.session.flash(
            "ok",
            f"Revoked {target_label(view)} (revocation #{view.seq}): "
            f"{view.affected_tasks} task(s), {view.affected_credentials} credential(s).",
        )
        return see_other(_back(target))

    @post(
        "/alerts/{alert_id:str}/ack",
        status_code=200,
        operation_id="consoleAck",
        summary="Acknowledge",
    )
    async def ack(
        self,
        request: Request[Any, Any, Any],
        alert_id: Id,
        user: UserDep,
        services: ServicesDep,
    ) -> Response[Any]:
        form = await form_of(request)
        check_csrf(user, form)
        user.require(ACK, "acknowledge alerts")
        note = form.get("note", "").strip()[:1000] or None
        view, _first = await alerts.acknowledge(services, alert_id, actor=user.actor, note=note)
        if request.headers.get("x-console-fetch") == "1":
            return Response(
                {"alert_id": view.alert_id, "acked_at": view.acked_at, "acked_by": view.acked_by}
            )
        user.session.flash("ok", f"Alert {alert_id} acknowledged.")
        return see_other("/console/alerts")

    @post(
        "/agents/{agent_id:str}/suspend",
        status_code=200,
        operation_id="consoleSuspend",
        summary="Suspend",
    )
    async def suspend(
        self,
        request: Request[Any, Any, Any],
        agent_id: Id,
        user: UserDep,
        services: ServicesDep,
    ) -> Response[Any]:
        reason = await _reasoned_form(request, user, "suspend agents", confirm=True)
        view = await agents.suspend(services, agent_id, reason=reason, actor=user.actor)
        services.metrics.revocations.labels(target="agent", source="analyst").inc()
        user.session.flash(
            "ok",
            f"Agent {agent_id} suspended: {view.affected_tasks} task(s), "
            f"{view.affected_credentials} credential(s) revoked.",
        )
        return see_other(f"/console/agents/{agent_id}")

    @post(
        "/agents/{agent_id:str}/reinstate",
        status_code=200,
        operation_id="consoleReinstate",
        summary="Reinstate",
    )
    async def reinstate(
        self,
        request: Request[Any, Any, Any],
        agent_id: Id,
        user: UserDep,
        services: ServicesDep,
    ) -> Response[Any]:
        reason = await _reasoned_form(request, user, "reinstate agents", confirm=False)
        await agents.reinstate(services, agent_id, reason=reason, actor=user.actor)
        user.session.flash("ok", f"Agent {agent_id} reinstated.")
        return see_other(f"/console/agents/{agent_id}")

    @post(
        "/operators",
        status_code=200,
        operation_id="consoleCreateOperator",
        summary="Create an operator",
    )
    async def create_operator(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep
    ) -> Response[Any]:
        form = await form_of(request)
        check_csrf(user, form)
        user.require(ADMIN, "manage operators")
        raw: dict[str, Any] = {"name": form.get("name", "").strip(), "role": form.get("role", "")}
        if form.get("audience", "").strip():
            raw["audience"] = form["audience"].strip()
        try:
            body = msgspec.convert(raw, CreateOperator)
        except msgspec.ValidationError as exc:
            raise ClientError(f"invalid operator: {exc}") from None
        created = await operators.create(services, body, actor=user.actor)
        return await operators_view(request, user, services, created=created, status_code=201)

    @post(
        "/operators/{name:str}/disable",
        status_code=200,
        operation_id="consoleDisableOperator",
        summary="Disable an operator",
    )
    async def disable_operator(
        self,
        request: Request[Any, Any, Any],
        name: Id,
        user: UserDep,
        services: ServicesDep,
    ) -> Response[Any]:
        form = await form_of(request)
        check_csrf(user, form)
        user.require(ADMIN, "manage operators")
        if form.get("confirm") != "yes":
            raise ClientError("tick the confirmation to disable an operator")
        await operators.disable(services, name, actor=user.actor)
        user.session.flash("ok", f"Operator {name} disabled; its sessions end now.")
        return see_other("/console/operators")
