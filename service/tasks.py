"""Tasks and their credentials: open (with scope attenuation), renew, complete.

Issuing a credential follows the pipeline of RFC 9068 and SPIRE's CA: build claims →
sign → verify our own output → record the jti hash in the same transaction as the task
→ count. A credential's ``exp`` is capped by the credential TTL, the task deadline and,
for a sub-task, the parent credential's own ``exp``.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import msgspec

from service.auth import Principal, ensure_agent_active
from service.contracts import (
    CompleteTask,
    CreateTask,
    IssuedCredential,
    RevocationSource,
    TaskRecord,
    TaskStatus,
    TaskTarget,
    TaskView,
)
from service.credentials import rfc9068
from service.kernel.errors import ClientError, Conflict, NotFound, ScopeViolation
from service.kernel.events import TaskEvent, TaskEventKind
from service.kernel.ids import new_task_id, task_spiffe_id
from service.kernel.scopes import ScopeSpec, excess, validate
from service.propagation import enqueue_task_event
from service.storage import repository as repo
from service.storage.database import Database

if TYPE_CHECKING:
    from service.core import Services


def view(task: TaskRecord, now: float) -> TaskView:
    return TaskView(
        id=task.id,
        agent_id=task.agent_id,
        parent_id=task.parent_id,
        spiffe_id=task.spiffe_id,
        status=task.effective_status(now),
        scope=task.scope,
        purpose=task.purpose,
        created_at=task.created_at,
        deadline=task.deadline,
        closed_at=task.closed_at,
        close_reason=task.close_reason,
    )


def inherit_limits(scope: ScopeSpec, bound: ScopeSpec) -> ScopeSpec:
    """Limits a task leaves unset are inherited from its bound (ceiling or parent), so a
    declared scope only has to name the limits it tightens."""
    own, theirs = scope.limits, bound.limits
    limits = msgspec.structs.replace(
        own,
        **{
            name: getattr(theirs, name)
            for name in own.__struct_fields__
            if getattr(own, name) is None and getattr(theirs, name) is not None
        },
    )
    return msgspec.structs.replace(scope, limits=limits)


def _check_within(scope: ScopeSpec, bound: ScopeSpec, what: str) -> None:
    offending = excess(scope, bound)
    if offending:
        raise ScopeViolation(
            f"declared scope exceeds the {what}: " + "; ".join(offending),
            extra={"offending": offending},
        )


async def open_task(
    services: Services, principal: Principal, request: CreateTask
) -> IssuedCredential:
    started = time.perf_counter()
    settings, now = services.settings, services.clock.now()
    assert principal.agent_id is not None
    scope = validate(request.scope)
    if not scope.audiences:
        raise ClientError("a task scope needs at least one audience (it becomes the token's aud)")
    agent = principal.agent or await repo.get_agent(services.db, principal.agent_id)
    if agent is None:  # deleted between authentication and now
        raise NotFound("agent not found")
    ensure_agent_active(agent.status)
    parent: TaskRecord | None = None
    if principal.kind == "task":
        parent = await repo.get_task(services.db, principal.name)
        if parent is None:
            raise NotFound("parent task not found")
        # A sub-task's unset limits come from its tightest bound, the parent (which is
        # itself within the ceiling); inheriting the ceiling's first would exceed it.
        scope = inherit_limits(scope, parent.scope)
    scope = inherit_limits(scope, agent.ceiling)
    _check_within(scope, agent.ceiling, "agent's ceiling")

    caps = [now + settings.max_task_ttl]
    if agent.max_task_ttl is not None:
        caps.append(now + agent.max_task_ttl)
    if scope.limits.deadline is not None:
        caps.append(scope.limits.deadline)
    actor_chain: dict[str, Any] | None = None
    exp_cap: int | None = None
    if parent is not None:
        assert principal.token is not None
        _check_within(scope, parent.scope, "parent task's scope")
        caps.append(parent.deadline)
        exp_cap = math.floor(principal.token.exp)
        actor_chain = await _actor_chain(services.db, parent.id)
    dpop_jkt = request.dpop_jkt
    if parent is not None and parent.dpop_jkt is not None:
        # A bound parent must not be able to mint an unbound (or differently bound) child.
        if dpop_jkt not in (None, parent.dpop_jkt):
            raise ClientError("a sub-task of a DPoP-bound task must keep the parent's key")
        dpop_jkt = parent.dpop_jkt
    deadline = min([now + (request.ttl or settings.default_task_ttl), *caps])
    if deadline <= now + 1:
        raise ClientError("the task would expire immediately (its parent or limits end now)")

    task_id = new_task_id(now)
    task = TaskRecord(
        id=task_id,
        agent_id=agent.id,
        parent_id=parent.id if parent else None,
        spiffe_id=task_spiffe_id(settings.trust_domain, agent.id, task_id),
        scope=scope,
        purpose=request.purpose,
        status=TaskStatus.ACTIVE,
        created_at=now,
        deadline=deadline,
        dpop_jkt=dpop_jkt,
    )
    async with services.db.transaction() as tx:
        await repo.insert_task(tx, task)
        issued = await _issue(services, tx, task, now, exp_cap=exp_cap, actor_chain=actor_chain)
        await _announce(services, tx, task, issued, TaskEventKind.OPENED)
    services.propagator.committed([], tasks_changed=services.propagator.outbox_enabled)
    services.metrics.issued.inc()
    services.metrics.issue_latency.observe(time.perf_counter() - started)
    return issued


async def _actor_chain(db: Database, parent_id: str) -> dict[str, Any]:
    """RFC 8693 §4.1 ``act``: the parent acts for the sub-task, its parent for it, and so
    on, the most recent actor outermost. Built from the stored ancestry, so an opened and
    a renewed credential carry the same chain."""
    ancestors: list[str] = []
    next_id: str | None = parent_id
    while next_id is not None and len(ancestors) < 32:
        ancestor = await repo.get_task(db, next_id)
        if ancestor is None:
            break
        ancestors.append(ancestor.spiffe_id)
        next_id = ancestor.parent_id
    chain: dict[str, Any] = {"sub": ancestors[-1]}
    for spiffe in reversed(ancestors[:-1]):
        chain = {"sub": spiffe, "act": chain}
    return chain


async def _announce(
    services: Services,
    tx: Database,
    task: TaskRecord,
    issued: IssuedCredential,
    kind: TaskEventKind,
) -> None:
    """Queue the task's lifecycle event (with its declared scope) for the tasks topic."""
    if not services.propagator.outbox_enabled:
        return
    await enqueue_task_event(
        tx,
        TaskEvent(
            event_id=f"{task.id}:{rfc9068.jti_hash(issued.jti)[:16]}",
            at=services.clock.now(),
            kind=kind,
            task_id=task.id,
            agent_id=task.agent_id,
            parent_id=task.parent_id,
            status=TaskStatus.ACTIVE.value,
            spiffe_id=task.spiffe_id,
            scope=task.scope,
            deadline=task.deadline,
            jti_hash=rfc9068.jti_hash(issued.jti),
        ),
    )


async def _issue(
    services: Services,
    tx: Database,
    task: TaskRecord,
    now: float,
    *,
    exp_cap: int | None,
    actor_chain: dict[str, Any] | None,
) -> IssuedCredential:
    settings = services.settings
    services.keys.refresh_if_changed(max_age=1.0)
    key = services.keys.active
    # ``iat`` is whole seconds and guards kill ``iat <= cutoff``: a credential issued in
    # the same second as a cut-off would be born dead, so it starts at the next second.
    iat = max(int(now), math.floor(services.deny.cutoff_for(task.agent_id)) + 1)
    exp = min(iat + settings.credential_ttl, int(task.deadline))
    if exp_cap is not None:
        exp = min(exp, exp_cap)
    jti = rfc9068.new_jti()
    claims = rfc9068.build_claims(
        issuer=settings.effective_issuer,
        task=task,
        jti=jti,
        issued_at=iat,
        expires_at=exp,
        actor_chain=actor_chain,
    )
    token = rfc9068.sign(claims, key)
    await repo.insert_credential(
        tx,
        jti_hash=rfc9068.jti_hash(jti),
        task_id=task.id,
        kid=key.kid,
        issued_at=now,
        expires_at=float(exp),
    )
    return IssuedCredential(
        access_token=token,
        token_type="DPoP" if task.dpop_jkt else "Bearer",
        expires_in=max(0, exp - iat),
        expires_at=float(exp),
        jti=jti,
        task=view(task, now),
    )


async def _owned_task(services: Services, principal: Principal, task_id: str) -> TaskRecord:
    """The task, if ``principal`` (its agent, or its own credential) may act on it."""
    task = await repo.get_task(services.db, task_id)
    # Someone else's task and a missing task look the same: existence is not leaked.
    if task is None or task.agent_id != principal.agent_id:
        raise NotFound(f"no task {task_id!r}")
    if principal.kind == "task" and principal.name != task.id:
        raise NotFound(f"no task {task_id!r}")
    return task


async def renew(services: Services, principal: Principal, task_id: str) -> IssuedCredential:
    task = await _owned_task(services, principal, task_id)
    now = services.clock.now()
    status = task.effective_status(now)
    if status is not TaskStatus.ACTIVE:
        raise Conflict(f"task is {status.value}; only active tasks can be renewed")
    agent = await repo.get_agent(services.db, task.agent_id)
    assert agent is not None
    ensure_agent_active(agent.status)
    actor_chain: dict[str, Any] | None = None
    if task.parent_id is not None:
        parent = await repo.get_task(services.db, task.parent_id)
        if parent is None or parent.effective_status(now) is not TaskStatus.ACTIVE:
            raise Conflict("the parent task has ended")
        actor_chain = await _actor_chain(services.db, task.parent_id)
    async with services.db.transaction() as tx:
        current = await repo.get_task(tx, task_id)
        if current is None or current.status is not TaskStatus.ACTIVE:
            raise Conflict("task ended while renewing")
        issued = await _issue(services, tx, task, now, exp_cap=None, actor_chain=actor_chain)
        await _announce(services, tx, task, issued, TaskEventKind.RENEWED)
    services.propagator.committed([], tasks_changed=services.propagator.outbox_enabled)
    services.metrics.renewed.inc()
    return issued


async def complete(
    services: Services, principal: Principal, task_id: str, request: CompleteTask
) -> TaskView:
    task = await _owned_task(services, principal, task_id)
    now = services.clock.now()
    status = task.effective_status(now)
    if status is not TaskStatus.ACTIVE:
        raise Conflict(f"task is already {status.value}")
    await services.revoker.revoke(
        TaskTarget(task_id=task.id),
        reason=request.reason,
        actor=principal.actor,
        source=RevocationSource.TASK_END,
    )
    services.metrics.tasks_completed.inc()
    services.metrics.revocations.labels(target="task", source="task_end").inc()
    updated = await repo.get_task(services.db, task_id)
    assert updated is not None
    return view(updated, services.clock.now())
