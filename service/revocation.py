"""Revocation: what is dead, decided durably first, then applied to in-memory deny state.

Targets (see docs/api.md): one credential (jti), one task and its sub-tasks, one agent
(suspended, every active task revoked, every credential issued so far dead), or a
cut-off (every credential issued at or before a time, globally or for one agent: the
panic button). Each revocation is one database transaction that writes the revocation
record, the task/credential state changes and an audit entry; only after it commits is
the in-memory :class:`DenyState` updated, so a crash never leaves memory ahead of disk.

:class:`DenyState` answers "is this verified token dead?" in O(1) from memory. It is
rebuilt from the database on start (only entries whose credentials can still be alive).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from service.clock import Clock
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
from service.credentials.rfc9068 import VerifiedToken, jti_hash
from service.errors import ClientError, NotFound
from service.storage import repository as repo
from service.storage.database import Database


@dataclass
class DenyState:
    revoked_jtis: set[str] = field(default_factory=set)
    closed_tasks: dict[str, str] = field(default_factory=dict)
    agent_cutoffs: dict[str, float] = field(default_factory=dict)
    global_cutoff: float = 0.0

    def reason_denied(self, token: VerifiedToken) -> str | None:
        """Why this (already signature-verified) token is dead, or None if it is not."""
        if token.jti_hash in self.revoked_jtis:
            return "credential revoked"
        status = self.closed_tasks.get(token.task_id)
        if status is not None:
            return f"task {status}"
        if token.iat <= self.global_cutoff:
            return "issued before the global cut-off"
        agent_cutoff = self.agent_cutoffs.get(token.agent_id)
        if agent_cutoff is not None and token.iat <= agent_cutoff:
            return "issued before the agent's cut-off"
        return None

    def cutoff_for(self, agent_id: str) -> float:
        return max(self.global_cutoff, self.agent_cutoffs.get(agent_id, 0.0))

    def close_tasks(self, task_ids: list[str], status: str) -> None:
        for task_id in task_ids:
            self.closed_tasks.setdefault(task_id, status)

    def cut_off(self, agent_id: str | None, at: float) -> None:
        # Token iat is whole seconds: a cut-off at 100.4 must kill a token with iat 100.
        if agent_id is None:
            self.global_cutoff = max(self.global_cutoff, at)
        else:
            self.agent_cutoffs[agent_id] = max(self.agent_cutoffs.get(agent_id, 0.0), at)

    @classmethod
    async def load(cls, db: Database, now: float) -> DenyState:
        state = cls(revoked_jtis=set(await repo.live_revoked_credentials(db, now)))
        rows = await db.fetch(
            "SELECT DISTINCT t.id AS id, t.status AS status FROM tasks t"
            " JOIN credentials c ON c.task_id = t.id"
            " WHERE t.closed_at IS NOT NULL AND c.expires_at > ?",
            now,
        )
        state.closed_tasks = {r["id"]: r["status"] for r in rows}
        for agent_id, cutoff in await repo.cutoffs(db):
            state.cut_off(agent_id, cutoff)
        return state


@dataclass(frozen=True)
class Revoked:
    view: RevocationView
    closed_task_ids: list[str]


class Revoker:
    def __init__(self, db: Database, deny: DenyState, clock: Clock, leeway: int) -> None:
        self.db = db
        self.deny = deny
        self.clock = clock
        self.leeway = leeway

    async def revoke(
        self,
        target: RevocationTarget,
        *,
        reason: str,
        actor: str,
        source: RevocationSource,
        db: Database | None = None,
    ) -> RevocationView:
        """Revoke ``target``; pass ``db`` to join a transaction the caller already holds."""
        if db is not None:
            revoked = await self._revoke_in(db, target, reason, actor, source)
        else:
            async with self.db.transaction() as tx:
                revoked = await self._revoke_in(tx, target, reason, actor, source)
        self.apply(revoked.view, revoked.closed_task_ids)
        return revoked.view

    def apply(self, view: RevocationView, closed_task_ids: list[str]) -> None:
        """Apply a committed revocation to the in-memory deny state."""
        target = view.target
        status = TaskStatus.COMPLETED if view.source is RevocationSource.TASK_END else None
        match target:
            case CredentialTarget(jti=jti):
                self.deny.revoked_jtis.add(jti_hash(jti))
            case TaskTarget(task_id=task_id):
                if status is not None:
                    self.deny.close_tasks([task_id], status.value)
                self.deny.close_tasks(closed_task_ids, TaskStatus.REVOKED.value)
            case AgentTarget(agent_id=agent_id):
                self.deny.close_tasks(closed_task_ids, TaskStatus.REVOKED.value)
                self.deny.cut_off(agent_id, view.created_at)
            case CutoffTarget(agent_id=agent_id, before=before):
                self.deny.close_tasks(closed_task_ids, TaskStatus.REVOKED.value)
                self.deny.cut_off(agent_id, before if before is not None else view.created_at)

    async def _revoke_in(
        self,
        tx: Database,
        target: RevocationTarget,
        reason: str,
        actor: str,
        source: RevocationSource,
    ) -> Revoked:
        now = self.clock.now()
        agent_id: str | None = None
        task_id: str | None = None
        hashed: str | None = None
        cutoff: float | None = None
        closed: list[str] = []
        creds = 0
        match target:
            case CredentialTarget(jti=jti):
                hashed = jti_hash(jti)
                row = await repo.get_credential(tx, hashed)
                if row is None:
                    raise NotFound("no credential with that jti")
                task_id = row["task_id"]
                creds = await repo.revoke_credential(tx, hashed, at=now)
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
                else:
                    await repo.close_tasks(tx, tree, TaskStatus.REVOKED, at=now, reason=reason)
                    closed = tree
                creds = await repo.revoke_credentials_of_tasks(tx, tree, at=now)
            case AgentTarget(agent_id=aid):
                agent = await repo.get_agent(tx, aid)
                if agent is None:
                    raise NotFound(f"no agent {aid!r}")
                agent_id, cutoff = aid, now
                await repo.set_agent_status(tx, aid, AgentStatus.SUSPENDED, at=now, reason=reason)
                closed = await repo.active_tasks_of_agent(tx, aid)
                await repo.close_tasks(tx, closed, TaskStatus.REVOKED, at=now, reason=reason)
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
        return Revoked(view=view, closed_task_ids=closed)


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
