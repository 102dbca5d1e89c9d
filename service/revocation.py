"""Revocation: what is dead, decided durably first, then applied to in-memory deny state.

Targets (see docs/api.md): one credential (jti), one task and its sub-tasks, one agent
(suspended, every active task revoked, every credential issued so far dead), or a
cut-off (every credential issued at or before a time, globally or for one agent: the
panic button). Each revocation is one database transaction that writes the revocation
record, the task/credential state changes, an audit entry and (with Kafka configured)
the outbox rows; only after it commits does ``service.propagation`` apply it to the
in-memory deny state, the SSE stream and Kafka, so nothing is announced that a
crash could take back.

:class:`~service.kernel.deny.DenyState` (the kernel's) answers "is this verified token
dead?" in O(1) from memory; ``repository.load_deny_state`` rebuilds it from the database
on start (only entries whose credentials can still be alive).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from service.contracts import (
    AgentStatus,
    AgentTarget,
    CredentialTarget,
    CutoffTarget,
    RevocationSource,
    RevocationTarget,
    RevocationView,
    TaskStatus,
    TaskTarget,
)
from service.kernel.clock import Clock
from service.kernel.errors import ClientError, NotFound
from service.kernel.events import RevocationEvent, TaskEvent, TaskEventKind
from service.kernel.tokens import jti_hash
from service.propagation import Propagator, enqueue_revocation, enqueue_task_event
from service.storage import repository as repo
from service.storage.database import Database, is_unique_violation


@dataclass(frozen=True)
class Revoked:
    view: RevocationView
    event: RevocationEvent


class Revoker:
    def __init__(self, db: Database, propagator: Propagator, clock: Clock, leeway: int) -> None:
        self.db = db
        self.propagator = propagator
        self.clock = clock
        self.leeway = leeway

    async def revoke(
        self,
        target: RevocationTarget,
        *,
        reason: str,
        actor: str,
        source: RevocationSource,
        idempotency_key: str | None = None,
    ) -> RevocationView:
        """Revoke ``target`` durably, then propagate. With an ``idempotency_key`` seen
        before, nothing happens again and the first revocation is returned."""
        view = await self.revoke_idempotent(
            target, reason=reason, actor=actor, source=source, idempotency_key=idempotency_key
        )
        return view[0]

    async def revoke_idempotent(
        self,
        target: RevocationTarget,
        *,
        reason: str,
        actor: str,
        source: RevocationSource,
        idempotency_key: str | None = None,
    ) -> tuple[RevocationView, bool]:
        """Like :meth:`revoke`; also says whether this call created the revocation.

        A credential or task that is already dead is not revoked again: the answer is
        the revocation that ended it, and nothing is written (not created).
        """
        if idempotency_key is not None:
            existing = await repo.revocation_by_idempotency_key(self.db, idempotency_key)
            if existing is not None:
                return existing, False
        try:
            async with self.db.transaction() as tx:
                revoked = await self._revoke_in(tx, target, reason, actor, source, idempotency_key)
                if isinstance(revoked, RevocationView):
                    return revoked, False
        except Exception as exc:
            # Two callers racing with one key: the loser returns the winner's revocation.
            if idempotency_key is None or not is_unique_violation(exc):
                raise
            existing = await repo.revocation_by_idempotency_key(self.db, idempotency_key)
            if existing is None:
                raise
            return existing, False
        self.propagator.committed([revoked.event], tasks_changed=True)
        return revoked.view, True

    async def _revoke_in(
        self,
        tx: Database,
        target: RevocationTarget,
        reason: str,
        actor: str,
        source: RevocationSource,
        idempotency_key: str | None,
    ) -> Revoked | RevocationView:
        """Revoke in ``tx``; a :class:`RevocationView` instead means the target was
        already dead (this changed nothing) and that revocation ended it."""
        now = self.clock.now()
        agent_id: str | None = None
        task_id: str | None = None
        hashed: str | None = None
        cutoff: float | None = None
        closed: list[str] = []
        task_ids: list[str] = []
        creds = 0
        match target:
            case CredentialTarget(jti=jti):
                hashed = jti_hash(jti)
                row = await repo.get_credential(tx, hashed)
                if row is None:
                    raise NotFound("no credential with that jti")
                task_id = row["task_id"]
                creds = await repo.revoke_credential(tx, hashed, at=now)
                if creds == 0:  # revoked before: by its jti, its task, agent or a cut-off
                    ended = await repo.revocation_that_ended(
                        tx, task_id=row["task_id"], jti_hash=hashed
                    )
                    if ended is not None:
                        return ended
            case TaskTarget(task_id=tid):
                task = await repo.get_task(tx, tid)
                if task is None:
                    raise NotFound(f"no task {tid!r}")
                task_id, agent_id = task.id, task.agent_id
                tree = await repo.task_and_descendants(tx, tid)
                if source is RevocationSource.TASK_END:
                    await repo.close_tasks(tx, [tid], TaskStatus.COMPLETED, at=now, reason=reason)
                    children = [t for t in tree if t != tid]
                    await repo.close_tasks(
                        tx, children, TaskStatus.REVOKED, at=now, reason="parent task completed"
                    )
                    closed = children
                    task_ids = [tid, *children]
                    creds = await repo.revoke_credentials_of_tasks(tx, tree, at=now)
                else:
                    changed = await repo.close_tasks(
                        tx, tree, TaskStatus.REVOKED, at=now, reason=reason
                    )
                    closed = tree
                    task_ids = tree
                    creds = await repo.revoke_credentials_of_tasks(tx, tree, at=now)
                    # The counts come from the UPDATEs themselves, so two racing revocations
                    # of one task cannot both see it alive: the second finds nothing to do.
                    if changed == 0 and creds == 0:
                        ended = await repo.revocation_that_ended(tx, task_id=tid)
                        if ended is not None:
                            return ended
            case AgentTarget(agent_id=aid):
                agent = await repo.get_agent(tx, aid)
                if agent is None:
                    raise NotFound(f"no agent {aid!r}")
                agent_id, cutoff = aid, now
                await repo.set_agent_status(tx, aid, AgentStatus.SUSPENDED, at=now, reason=reason)
                closed = await repo.active_tasks_of_agent(tx, aid)
                await repo.close_tasks(tx, closed, TaskStatus.REVOKED, at=now, reason=reason)
                task_ids = closed
                creds = await repo.revoke_credentials_issued_before(tx, now, aid, at=now)
            case CutoffTarget(before=before, agent_id=aid):
                cutoff = now if before is None else before
                if cutoff > now + self.leeway:
                    raise ClientError("a cut-off must not be in the future")
                if aid is not None and await repo.get_agent(tx, aid) is None:
                    raise NotFound(f"no agent {aid!r}")
                agent_id = aid
                closed = await repo.active_tasks_created_before(tx, cutoff, aid)
                await repo.close_tasks(tx, closed, TaskStatus.REVOKED, at=now, reason=reason)
                task_ids = closed
                creds = await repo.revoke_credentials_issued_before(tx, cutoff, aid, at=now)
        view = await repo.insert_revocation(
            tx,
            revocation_id=str(uuid.uuid4()),
            target=target,
            target_type=_target_type(target),
            agent_id=agent_id,
            task_id=task_id,
            jti_hash=hashed,
            cutoff=cutoff,
            reason=reason,
            actor=actor,
            source=source,
            created_at=now,
            affected_tasks=len(closed) + (1 if source is RevocationSource.TASK_END else 0),
            affected_credentials=creds,
            task_ids=task_ids,
            idempotency_key=idempotency_key,
        )
        event = await repo.revocation_event(tx, view.id)
        if self.propagator.outbox_enabled:
            await enqueue_revocation(tx, event)
            owners = await repo.task_agents(tx, task_ids)
            for closed_id in task_ids:
                await enqueue_task_event(
                    tx,
                    TaskEvent(
                        event_id=f"{view.id}:{closed_id}",
                        at=now,
                        kind=TaskEventKind.CLOSED,
                        task_id=closed_id,
                        agent_id=owners.get(closed_id, agent_id or ""),
                        status=(
                            TaskStatus.COMPLETED.value
                            if source is RevocationSource.TASK_END and closed_id == task_id
                            else TaskStatus.REVOKED.value
                        ),
                    ),
                )
        await repo.append_audit(
            tx,
            at=now,
            actor=actor,
            action="revoke",
            subject=f"{view.target.__struct_config__.tag}:{_subject(target)}",
            detail={
                "revocation_id": view.id,
                "reason": reason,
                "source": source.value,
                "affected_tasks": view.affected_tasks,
                "affected_credentials": creds,
            },
        )
        return Revoked(view=view, event=event)


def _target_type(target: RevocationTarget) -> str:
    tag = target.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def _subject(target: RevocationTarget) -> str:
    match target:
        case CredentialTarget():
            return "(jti hash) " + jti_hash(target.jti)[:16]
        case TaskTarget(task_id=task_id):
            return task_id
        case AgentTarget(agent_id=agent_id):
            return agent_id
        case CutoffTarget(agent_id=agent_id, before=before):
            return f"{agent_id or '*'}@{before if before is not None else 'now'}"
