"""The repository: every SQL statement killswitch runs, and nothing else.

Methods take a :class:`~service.storage.database.Database` handle (the pool or an open
transaction), so a service function decides what is atomic and the repository decides
how it is spelled. Rows come back as contract records; JSON columns are encoded and
decoded here. Secrets and tokens arrive already hashed: this module never sees one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from service.contracts import (
    AgentRecord,
    AgentStatus,
    AlertView,
    AuditEntry,
    OperatorRecord,
    RevocationSource,
    RevocationTarget,
    RevocationView,
    Role,
    TaskRecord,
    TaskStatus,
)
from service.kernel.deny import DenyState
from service.kernel.events import AlertEvent, RevocationEvent, Severity
from service.kernel.scopes import ScopeSpec
from service.storage.database import Database, Row

_encode = msgspec.json.encode
_scope_decoder = msgspec.json.Decoder(ScopeSpec)
_jwk_decoder = msgspec.json.Decoder(dict[str, Any])
_target_decoder = msgspec.json.Decoder(RevocationTarget)
_ids_decoder = msgspec.json.Decoder(list[str])


def _in(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


# --------------------------------------------------------------------------- agents


def _agent(row: Row) -> AgentRecord:
    return AgentRecord(
        id=row["id"],
        name=row["name"],
        ceiling=_scope_decoder.decode(row["ceiling"]),
        max_task_ttl=row["max_task_ttl"],
        secret_hash=row["secret_hash"],
        public_jwk=_jwk_decoder.decode(row["public_jwk"]) if row["public_jwk"] else None,
        status=AgentStatus(row["status"]),
        created_at=row["created_at"],
        suspended_at=row["suspended_at"],
        suspend_reason=row["suspend_reason"],
    )


async def insert_agent(db: Database, agent: AgentRecord) -> bool:
    """Insert; False when the id is taken."""
    changed = await db.execute(
        "INSERT INTO agents (id, name, ceiling, max_task_ttl, secret_hash, public_jwk, status,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        agent.id,
        agent.name,
        _encode(agent.ceiling).decode(),
        agent.max_task_ttl,
        agent.secret_hash,
        _encode(agent.public_jwk).decode() if agent.public_jwk else None,
        agent.status.value,
        agent.created_at,
    )
    return changed == 1


async def get_agent(db: Database, agent_id: str) -> AgentRecord | None:
    row = await db.fetchrow("SELECT * FROM agents WHERE id = ?", agent_id)
    return None if row is None else _agent(row)


async def list_agents(db: Database, *, after: str | None, limit: int) -> list[AgentRecord]:
    rows = await db.fetch(
        "SELECT * FROM agents WHERE id > ? ORDER BY id LIMIT ?", after or "", limit
    )
    return [_agent(r) for r in rows]


async def set_agent_status(
    db: Database, agent_id: str, status: AgentStatus, *, at: float | None, reason: str | None
) -> int:
    return await db.execute(
        "UPDATE agents SET status = ?, suspended_at = ?, suspend_reason = ? WHERE id = ?",
        status.value,
        at,
        reason,
        agent_id,
    )


# --------------------------------------------------------------------------- operators


def _operator(row: Row) -> OperatorRecord:
    return OperatorRecord(
        id=row["id"],
        name=row["name"],
        role=Role(row["role"]),
        audience=row["audience"],
        created_at=row["created_at"],
        disabled_at=row["disabled_at"],
    )


async def insert_operator(db: Database, op: OperatorRecord, token_hash: str) -> bool:
    changed = await db.execute(
        "INSERT INTO operators (id, name, role, audience, token_hash, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        op.id,
        op.name,
        op.role.value,
        op.audience,
        token_hash,
        op.created_at,
    )
    return changed == 1


async def operator_by_token_hash(db: Database, token_hash: str) -> OperatorRecord | None:
    row = await db.fetchrow(
        "SELECT * FROM operators WHERE token_hash = ? AND disabled_at IS NULL", token_hash
    )
    return None if row is None else _operator(row)


async def list_operators(db: Database) -> list[OperatorRecord]:
    return [_operator(r) for r in await db.fetch("SELECT * FROM operators ORDER BY name")]


async def get_operator(db: Database, name: str) -> OperatorRecord | None:
    row = await db.fetchrow("SELECT * FROM operators WHERE name = ?", name)
    return None if row is None else _operator(row)


async def disable_operator(db: Database, name: str, *, at: float) -> int:
    return await db.execute(
        "UPDATE operators SET disabled_at = ? WHERE name = ? AND disabled_at IS NULL", at, name
    )


async def count_admins(db: Database) -> int:
    row = await db.fetchrow(
        "SELECT COUNT(*) AS n FROM operators WHERE role = ? AND disabled_at IS NULL",
        Role.ADMIN.value,
    )
    return int(row["n"]) if row else 0


# --------------------------------------------------------------------------- tasks


def _task(row: Row) -> TaskRecord:
    return TaskRecord(
        id=row["id"],
        agent_id=row["agent_id"],
        parent_id=row["parent_id"],
        spiffe_id=row["spiffe_id"],
        scope=_scope_decoder.decode(row["scope"]),
        purpose=row["purpose"],
        status=TaskStatus(row["status"]),
        created_at=row["created_at"],
        deadline=row["deadline"],
        closed_at=row["closed_at"],
        close_reason=row["close_reason"],
        dpop_jkt=row["dpop_jkt"],
    )


async def insert_task(db: Database, task: TaskRecord) -> None:
    await db.execute(
        "INSERT INTO tasks (id, agent_id, parent_id, spiffe_id, scope, purpose, status,"
        " created_at, deadline, dpop_jkt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        task.id,
        task.agent_id,
        task.parent_id,
        task.spiffe_id,
        _encode(task.scope).decode(),
        task.purpose,
        task.status.value,
        task.created_at,
        task.deadline,
        task.dpop_jkt,
    )


async def get_task(db: Database, task_id: str) -> TaskRecord | None:
    row = await db.fetchrow("SELECT * FROM tasks WHERE id = ?", task_id)
    return None if row is None else _task(row)


async def list_tasks(
    db: Database,
    *,
    agent_id: str | None,
    status: TaskStatus | None,
    before: str | None,
    limit: int,
) -> list[TaskRecord]:
    """Newest first (task ids sort by creation time), ``before`` is the cursor."""
    clauses, args = ["id < ?"], [before or "~"]
    if agent_id is not None:
        clauses.append("agent_id = ?")
        args.append(agent_id)
    if status is not None:
        clauses.append("status = ?")
        args.append(status.value)
    rows = await db.fetch(
        f"SELECT * FROM tasks WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?",
        *args,
        limit,
    )
    return [_task(r) for r in rows]


async def task_and_descendants(db: Database, task_id: str) -> list[str]:
    rows = await db.fetch(
        "WITH RECURSIVE tree(id) AS (SELECT id FROM tasks WHERE id = ?"
        " UNION SELECT t.id FROM tasks t JOIN tree ON t.parent_id = tree.id)"
        " SELECT id FROM tree",
        task_id,
    )
    return [r["id"] for r in rows]


async def task_agents(db: Database, task_ids: Sequence[str]) -> dict[str, str]:
    if not task_ids:
        return {}
    rows = await db.fetch(
        f"SELECT id, agent_id FROM tasks WHERE id IN ({_in(task_ids)})", *task_ids
    )
    return {r["id"]: r["agent_id"] for r in rows}


async def active_tasks_of_agent(db: Database, agent_id: str) -> list[str]:
    rows = await db.fetch(
        "SELECT id FROM tasks WHERE agent_id = ? AND status = ?", agent_id, TaskStatus.ACTIVE.value
    )
    return [r["id"] for r in rows]


async def active_tasks_created_before(
    db: Database, cutoff: float, agent_id: str | None
) -> list[str]:
    if agent_id is None:
        rows = await db.fetch(
            "SELECT id FROM tasks WHERE status = ? AND created_at <= ?",
            TaskStatus.ACTIVE.value,
            cutoff,
        )
    else:
        rows = await db.fetch(
            "SELECT id FROM tasks WHERE status = ? AND created_at <= ? AND agent_id = ?",
            TaskStatus.ACTIVE.value,
            cutoff,
            agent_id,
        )
    return [r["id"] for r in rows]


async def close_tasks(
    db: Database, task_ids: Sequence[str], status: TaskStatus, *, at: float, reason: str
) -> int:
    """Move still-active tasks to a final status; closed tasks keep their first ending."""
    if not task_ids:
        return 0
    return await db.execute(
        f"UPDATE tasks SET status = ?, closed_at = ?, close_reason = ?"
        f" WHERE status = ? AND id IN ({_in(task_ids)})",
        status.value,
        at,
        reason,
        TaskStatus.ACTIVE.value,
        *task_ids,
    )


# --------------------------------------------------------------------------- credentials


async def insert_credential(
    db: Database, *, jti_hash: str, task_id: str, kid: str, issued_at: float, expires_at: float
) -> None:
    await db.execute(
        "INSERT INTO credentials (jti_hash, task_id, kid, issued_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?)",
        jti_hash,
        task_id,
        kid,
        issued_at,
        expires_at,
    )


async def get_credential(db: Database, jti_hash: str) -> Row | None:
    return await db.fetchrow("SELECT * FROM credentials WHERE jti_hash = ?", jti_hash)


async def credentials_of_task(db: Database, task_id: str) -> list[Row]:
    return await db.fetch(
        "SELECT jti_hash, kid, issued_at, expires_at, revoked_at FROM credentials"
        " WHERE task_id = ? ORDER BY issued_at",
        task_id,
    )


async def revoke_credential(db: Database, jti_hash: str, *, at: float) -> int:
    return await db.execute(
        "UPDATE credentials SET revoked_at = ? WHERE jti_hash = ? AND revoked_at IS NULL",
        at,
        jti_hash,
    )


async def revoke_credentials_of_tasks(db: Database, task_ids: Sequence[str], *, at: float) -> int:
    if not task_ids:
        return 0
    return await db.execute(
        f"UPDATE credentials SET revoked_at = ?"
        f" WHERE revoked_at IS NULL AND expires_at > ? AND task_id IN ({_in(task_ids)})",
        at,
        at,
        *task_ids,
    )


async def revoke_credentials_issued_before(
    db: Database, cutoff: float, agent_id: str | None, *, at: float
) -> int:
    """Revoke what a guard's ``iat <= cutoff`` test kills: ``iat`` is whole seconds, so a
    credential issued later within the cut-off's second dies too (fail closed)."""
    cutoff = float(math.floor(cutoff) + 1) - 1e-6
    if agent_id is None:
        return await db.execute(
            "UPDATE credentials SET revoked_at = ?"
            " WHERE revoked_at IS NULL AND expires_at > ? AND issued_at <= ?",
            at,
            at,
            cutoff,
        )
    return await db.execute(
        "UPDATE credentials SET revoked_at = ? WHERE revoked_at IS NULL AND expires_at > ?"
        " AND issued_at <= ? AND task_id IN (SELECT id FROM tasks WHERE agent_id = ?)",
        at,
        at,
        cutoff,
        agent_id,
    )


async def live_revoked_credentials(db: Database, now: float) -> list[str]:
    rows = await db.fetch(
        "SELECT jti_hash FROM credentials WHERE revoked_at IS NOT NULL AND expires_at > ?", now
    )
    return [r["jti_hash"] for r in rows]


# --------------------------------------------------------------------------- revocations


def _revocation(row: Row) -> RevocationView:
    return RevocationView(
        id=row["id"],
        seq=row["seq"],
        target=_target_decoder.decode(row["target"]),
        reason=row["reason"],
        actor=row["actor"],
        source=RevocationSource(row["source"]),
        created_at=row["created_at"],
        affected_tasks=row["affected_tasks"],
        affected_credentials=row["affected_credentials"],
    )


async def insert_revocation(
    db: Database,
    *,
    revocation_id: str,
    target: RevocationTarget,
    target_type: str,
    agent_id: str | None,
    task_id: str | None,
    jti_hash: str | None,
    cutoff: float | None,
    reason: str,
    actor: str,
    source: RevocationSource,
    created_at: float,
    affected_tasks: int,
    affected_credentials: int,
    task_ids: Sequence[str],
    idempotency_key: str | None,
) -> RevocationView:
    row = await db.fetchrow(
        "INSERT INTO revocations (id, target_type, target, agent_id, task_id, jti_hash, cutoff,"
        " reason, actor, source, created_at, affected_tasks, affected_credentials, task_ids,"
        " idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        revocation_id,
        target_type,
        _encode(target).decode(),
        agent_id,
        task_id,
        jti_hash,
        cutoff,
        reason,
        actor,
        source.value,
        created_at,
        affected_tasks,
        affected_credentials,
        _encode(list(task_ids)).decode(),
        idempotency_key,
    )
    assert row is not None  # RETURNING always yields the inserted row
    return _revocation(row)


async def revocation_by_idempotency_key(db: Database, key: str) -> RevocationView | None:
    row = await db.fetchrow("SELECT * FROM revocations WHERE idempotency_key = ?", key)
    return None if row is None else _revocation(row)


async def revocation_that_ended(
    db: Database, *, task_id: str, jti_hash: str | None = None
) -> RevocationView | None:
    """The first revocation that killed a credential (``jti_hash``) or closed the task
    ``task_id`` (its ``task_ids`` name it: a task, agent or cut-off revocation, or the
    task's completion), or None."""
    if jti_hash is not None:
        row = await db.fetchrow(
            "SELECT * FROM revocations WHERE jti_hash = ? AND target_type = 'credential'"
            " ORDER BY seq LIMIT 1",
            jti_hash,
        )
        if row is not None:
            return _revocation(row)
    # task_ids is a JSON list: LIKE narrows it down (``_`` in an id only widens the match),
    # the decoded list decides.
    rows = await db.fetch(
        "SELECT * FROM revocations WHERE task_ids LIKE ? ORDER BY seq", f'%"{task_id}"%'
    )
    for row in rows:
        if task_id in _ids_decoder.decode(row["task_ids"]):
            return _revocation(row)
    return None


def _revocation_event(row: Row) -> RevocationEvent:
    return RevocationEvent(
        revocation_id=row["id"],
        seq=row["seq"],
        at=row["created_at"],
        target=row["target_type"],
        jti_hash=row["jti_hash"],
        task_ids=_ids_decoder.decode(row["task_ids"]),
        agent_id=row["agent_id"],
        cutoff=row["cutoff"],
        reason=row["reason"],
        actor=row["actor"],
        source=row["source"],
    )


async def revocation_events(db: Database, *, after_seq: int, limit: int) -> list[RevocationEvent]:
    """Revocations as the events guards apply, in commit order of their ``seq``."""
    rows = await db.fetch(
        "SELECT * FROM revocations WHERE seq > ? ORDER BY seq LIMIT ?", after_seq, limit
    )
    return [_revocation_event(r) for r in rows]


async def revocation_events_since(db: Database, *, since: float) -> list[RevocationEvent]:
    rows = await db.fetch("SELECT * FROM revocations WHERE created_at >= ? ORDER BY seq", since)
    return [_revocation_event(r) for r in rows]


async def revocation_event(db: Database, revocation_id: str) -> RevocationEvent:
    row = await db.fetchrow("SELECT * FROM revocations WHERE id = ?", revocation_id)
    assert row is not None
    return _revocation_event(row)


async def revocations_that_matter(db: Database, now: float, leeway: float) -> list[RevocationEvent]:
    """Every revocation that can still deny a live credential, in ``seq`` order.

    A revocation committed at ``R`` only ever affects credentials issued before ``R``
    (cut-offs name an earlier time still, and a closed task or a suspended agent gets no
    new credential). So once every credential issued before ``R`` has expired, it can no
    longer matter: keep those committed at or after the oldest issue time of any
    credential still alive (with ``leeway`` on both ends, as guards allow).
    """
    row = await db.fetchrow(
        "SELECT MIN(issued_at) AS oldest FROM credentials WHERE expires_at > ?", now - leeway
    )
    oldest = row["oldest"] if row is not None else None
    if oldest is None:
        return []
    return await revocation_events_since(db, since=float(oldest) - leeway)


async def max_revocation_seq(db: Database) -> int:
    row = await db.fetchrow("SELECT MAX(seq) AS seq FROM revocations")
    return int(row["seq"]) if row is not None and row["seq"] is not None else 0


async def get_feed_checkpoint(db: Database, topic: str) -> Row | None:
    return await db.fetchrow("SELECT * FROM feed_checkpoints WHERE topic = ?", topic)


async def put_feed_checkpoint(
    db: Database,
    *,
    topic: str,
    epoch: str,
    partition: int,
    offset: int,
    through_seq: int,
    republished: int,
    at: float,
) -> None:
    await db.execute(
        "INSERT INTO feed_checkpoints (topic, epoch, partition_id, record_offset, through_seq,"
        " republished, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (topic) DO UPDATE SET epoch = excluded.epoch,"
        " partition_id = excluded.partition_id, record_offset = excluded.record_offset,"
        " through_seq = excluded.through_seq, republished = excluded.republished,"
        " created_at = excluded.created_at",
        topic,
        epoch,
        partition,
        offset,
        through_seq,
        republished,
        at,
    )


# --------------------------------------------------------------------------- outbox


async def insert_outbox(db: Database, *, topic: str, key: str, value: bytes, at: float) -> None:
    """Queue an event for Kafka in the caller's transaction (the transactional outbox)."""
    await db.execute(
        "INSERT INTO outbox (topic, key, value, created_at) VALUES (?, ?, ?, ?)",
        topic,
        key,
        value.decode(),
        at,
    )


async def pending_outbox(db: Database, limit: int) -> list[Row]:
    return await db.fetch("SELECT seq, topic, key, value FROM outbox ORDER BY seq LIMIT ?", limit)


async def delete_outbox(db: Database, seqs: Sequence[int]) -> int:
    if not seqs:
        return 0
    return await db.execute(f"DELETE FROM outbox WHERE seq IN ({_in(seqs)})", *seqs)


async def list_revocations(
    db: Database, *, since: float | None, after_seq: int | None, limit: int
) -> list[RevocationView]:
    rows = await db.fetch(
        "SELECT * FROM revocations WHERE created_at >= ? AND seq > ? ORDER BY seq LIMIT ?",
        since if since is not None else 0.0,
        after_seq or 0,
        limit,
    )
    return [_revocation(r) for r in rows]


async def revocations_touching_agent(
    db: Database, agent_id: str, *, limit: int
) -> list[RevocationView]:
    """Newest first: revocations of the agent, its tasks or credentials, and global
    cut-offs (which kill its credentials too)."""
    rows = await db.fetch(
        "SELECT * FROM revocations WHERE agent_id = ?"
        " OR (target_type = 'cutoff' AND agent_id IS NULL) ORDER BY seq DESC LIMIT ?",
        agent_id,
        limit,
    )
    return [_revocation(r) for r in rows]


async def cutoffs(db: Database) -> list[tuple[str | None, float]]:
    """(agent id or None for global, cut-off) of every cut-off and agent revocation."""
    rows = await db.fetch(
        "SELECT agent_id, MAX(cutoff) AS cutoff FROM revocations"
        " WHERE cutoff IS NOT NULL GROUP BY agent_id"
    )
    return [(r["agent_id"], float(r["cutoff"])) for r in rows]


async def load_deny_state(db: Database, now: float, state: DenyState | None = None) -> DenyState:
    """Fill the kernel's deny state from the database: what can still be alive at ``now``.

    Revoked credentials not yet expired, closed tasks that still have an unexpired
    credential, and every cut-off (agent revocations included).
    """
    state = state if state is not None else DenyState()
    for hashed in await live_revoked_credentials(db, now):
        state.revoke_credential(hashed)
    rows = await db.fetch(
        "SELECT DISTINCT t.id AS id, t.status AS status FROM tasks t"
        " JOIN credentials c ON c.task_id = t.id"
        " WHERE t.closed_at IS NOT NULL AND c.expires_at > ?",
        now,
    )
    for row in rows:
        state.close_tasks((row["id"],), row["status"])
    for agent_id, cutoff in await cutoffs(db):
        state.cut_off(agent_id, cutoff)
    return state


# --------------------------------------------------------------------------- alerts


def _alert(row: Row) -> AlertView:
    return AlertView(
        seq=row["seq"],
        alert_id=row["alert_id"],
        at=row["at"],
        rule=row["rule"],
        severity=Severity(row["severity"]),
        agent_id=row["agent_id"],
        task_id=row["task_id"],
        score=row["score"],
        evidence=_jwk_decoder.decode(row["evidence"]),
        action=row["action"],
        received_at=row["received_at"],
        acked_at=row["acked_at"],
        acked_by=row["acked_by"],
        ack_note=row["ack_note"],
    )


async def insert_alert(db: Database, alert: AlertEvent, *, received_at: float) -> AlertView | None:
    """Store an alert; None when its ``alert_id`` is stored already (a redelivery)."""
    row = await db.fetchrow(
        "INSERT INTO alerts (alert_id, at, rule, severity, agent_id, task_id, score, evidence,"
        " action, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (alert_id) DO NOTHING RETURNING *",
        alert.alert_id,
        alert.at,
        alert.rule,
        alert.severity.value,
        alert.agent_id,
        alert.task_id,
        alert.score,
        _encode(alert.evidence).decode(),
        alert.action,
        received_at,
    )
    return None if row is None else _alert(row)


async def get_alert(db: Database, alert_id: str) -> AlertView | None:
    row = await db.fetchrow("SELECT * FROM alerts WHERE alert_id = ?", alert_id)
    return None if row is None else _alert(row)


async def list_alerts(
    db: Database,
    *,
    severities: Sequence[Severity] = (),
    rule: str | None = None,
    agent_id: str | None = None,
    task_id: str | None = None,
    since: float | None = None,
    until: float | None = None,
    acked: bool | None = None,
    before_seq: int | None = None,
    limit: int,
) -> list[AlertView]:
    """Newest first (by ``seq``); ``before_seq`` is the cursor. since/until bound ``at``."""
    clauses: list[str] = []
    args: list[Any] = []
    if before_seq is not None:
        clauses.append("seq < ?")
        args.append(before_seq)
    if severities:
        clauses.append(f"severity IN ({_in(severities)})")
        args.extend(s.value for s in severities)
    for column, value in (("rule", rule), ("agent_id", agent_id), ("task_id", task_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        clauses.append("at >= ?")
        args.append(since)
    if until is not None:
        clauses.append("at < ?")
        args.append(until)
    if acked is not None:
        clauses.append("acked_at IS NOT NULL" if acked else "acked_at IS NULL")
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await db.fetch(f"SELECT * FROM alerts{where} ORDER BY seq DESC LIMIT ?", *args, limit)
    return [_alert(r) for r in rows]


async def alerts_after(db: Database, *, after_seq: int, limit: int) -> list[AlertView]:
    """Alerts in storage order after ``after_seq`` (the SSE replay)."""
    rows = await db.fetch(
        "SELECT * FROM alerts WHERE seq > ? ORDER BY seq LIMIT ?", after_seq, limit
    )
    return [_alert(r) for r in rows]


async def ack_alert(db: Database, alert_id: str, *, at: float, by: str, note: str | None) -> int:
    """Acknowledge an alert not acknowledged yet; 0 when it is (or does not exist)."""
    return await db.execute(
        "UPDATE alerts SET acked_at = ?, acked_by = ?, ack_note = ?"
        " WHERE alert_id = ? AND acked_at IS NULL",
        at,
        by,
        note,
        alert_id,
    )


async def revocation_created_at(db: Database, revocation_id: str) -> float | None:
    row = await db.fetchrow("SELECT created_at FROM revocations WHERE id = ?", revocation_id)
    return None if row is None else float(row["created_at"])


def _minute_bucket(db: Database, column: str) -> str:
    # Minutes since the window's start; the value is never negative, so truncation is
    # floor. PostgreSQL's CAST rounds a double, hence FLOOR there.
    if db.dialect == "postgresql":
        return f"CAST(FLOOR(({column} - ?) / 60) AS BIGINT)"
    return f"CAST(({column} - ?) / 60 AS INTEGER)"


async def per_minute(
    db: Database, *, start: float, end: float
) -> tuple[dict[int, int], dict[int, int]]:
    """(alerts, kills) per minute index since ``start``: alerts by ``at``; revocations by
    an analyst or the detector by ``created_at``."""
    alert_rows = await db.fetch(
        f"SELECT {_minute_bucket(db, 'at')} AS m, COUNT(*) AS n FROM alerts"
        " WHERE at >= ? AND at < ? GROUP BY 1",
        start,
        start,
        end,
    )
    kill_rows = await db.fetch(
        f"SELECT {_minute_bucket(db, 'created_at')} AS m, COUNT(*) AS n FROM revocations"
        " WHERE created_at >= ? AND created_at < ? AND source IN (?, ?) GROUP BY 1",
        start,
        start,
        end,
        RevocationSource.ANALYST.value,
        RevocationSource.DETECTOR.value,
    )
    return (
        {int(r["m"]): int(r["n"]) for r in alert_rows},
        {int(r["m"]): int(r["n"]) for r in kill_rows},
    )


# --------------------------------------------------------------------------- audit


async def append_audit(
    db: Database, *, at: float, actor: str, action: str, subject: str, detail: dict[str, Any]
) -> None:
    await db.execute(
        "INSERT INTO audit_log (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
        at,
        actor,
        action,
        subject,
        _encode(detail).decode(),
    )


def _audit(row: Row) -> AuditEntry:
    return AuditEntry(
        seq=row["seq"],
        at=row["at"],
        actor=row["actor"],
        action=row["action"],
        subject=row["subject"],
        detail=_jwk_decoder.decode(row["detail"]),
    )


async def list_audit(
    db: Database, *, since: float | None, after_seq: int | None, limit: int
) -> list[AuditEntry]:
    rows = await db.fetch(
        "SELECT * FROM audit_log WHERE at >= ? AND seq > ? ORDER BY seq LIMIT ?",
        since if since is not None else 0.0,
        after_seq or 0,
        limit,
    )
    return [_audit(r) for r in rows]


async def recent_audit(db: Database, *, before_seq: int | None, limit: int) -> list[AuditEntry]:
    """Newest first (the console's view); ``before_seq`` pages to older entries."""
    rows = await db.fetch(
        "SELECT * FROM audit_log WHERE seq < ? ORDER BY seq DESC LIMIT ?",
        before_seq if before_seq is not None else 2**63 - 1,
        limit,
    )
    return [_audit(r) for r in rows]


# --------------------------------------------------------------------------- RFC 7523 replay


async def claim_assertion(db: Database, jti_hash: str, expires_at: float, now: float) -> bool:
    """Record a client assertion's jti; False if it was seen before (a replay)."""
    await db.execute("DELETE FROM client_assertions WHERE expires_at < ?", now)
    changed = await db.execute(
        "INSERT INTO client_assertions (jti_hash, expires_at) VALUES (?, ?)"
        " ON CONFLICT (jti_hash) DO NOTHING",
        jti_hash,
        expires_at,
    )
    return changed == 1


async def audit_between(
    db: Database, *, since: float | None, until: float | None, after_seq: int, limit: int
) -> list[AuditEntry]:
    """Oldest first within ``[since, until)`` (either end open when None), after
    ``after_seq``: the console's time-range export, page by page."""
    rows = await db.fetch(
        "SELECT * FROM audit_log WHERE at >= ? AND at < ? AND seq > ? ORDER BY seq LIMIT ?",
        since if since is not None else 0.0,
        until if until is not None else 1e300,
        after_seq,
        limit,
    )
    return [_audit(r) for r in rows]


async def audit_of_subjects(
    db: Database, subjects: Sequence[str], *, limit: int
) -> list[AuditEntry]:
    """Newest first: the audit entries about any of ``subjects`` (e.g. ``task:<id>``)."""
    if not subjects:
        return []
    rows = await db.fetch(
        f"SELECT * FROM audit_log WHERE subject IN ({_in(subjects)}) ORDER BY seq DESC LIMIT ?",
        *subjects,
        limit,
    )
    return [_audit(r) for r in rows]


async def recent_audit_between(
    db: Database,
    *,
    since: float | None,
    until: float | None,
    before_seq: int | None,
    limit: int,
) -> list[AuditEntry]:
    """Newest first within ``[since, until)`` (the console's time-range search)."""
    rows = await db.fetch(
        "SELECT * FROM audit_log WHERE at >= ? AND at < ? AND seq < ? ORDER BY seq DESC LIMIT ?",
        since if since is not None else 0.0,
        until if until is not None else 1e300,
        before_seq if before_seq is not None else 2**63 - 1,
        limit,
    )
    return [_audit(r) for r in rows]
