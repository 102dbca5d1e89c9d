"""Schema migrations: an ordered list, applied once each, recorded in ``schema_migrations``.

DDL is written once; the few words the two dialects spell differently are placeholders.
Migrations only ever add: a released migration is never edited.
"""

from __future__ import annotations

import time

from service.storage.database import Database

_DIALECT_WORDS = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "double": "REAL"},
    "postgresql": {
        "serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "double": "DOUBLE PRECISION",
    },
}

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "identities, tasks, credentials, revocations, audit",
        [
            """CREATE TABLE agents (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                ceiling TEXT NOT NULL,
                max_task_ttl INTEGER,
                secret_hash TEXT,
                public_jwk TEXT,
                status TEXT NOT NULL,
                created_at {double} NOT NULL,
                suspended_at {double},
                suspend_reason TEXT
            )""",
            """CREATE TABLE operators (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                role TEXT NOT NULL,
                audience TEXT,
                token_hash TEXT NOT NULL UNIQUE,
                created_at {double} NOT NULL,
                disabled_at {double}
            )""",
            """CREATE TABLE tasks (
                id TEXT PRIMARY KEY,
                agent_id TEXT NOT NULL REFERENCES agents(id),
                parent_id TEXT REFERENCES tasks(id),
                spiffe_id TEXT NOT NULL,
                scope TEXT NOT NULL,
                purpose TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at {double} NOT NULL,
                deadline {double} NOT NULL,
                closed_at {double},
                close_reason TEXT,
                dpop_jkt TEXT
            )""",
            "CREATE INDEX tasks_agent_status ON tasks (agent_id, status)",
            "CREATE INDEX tasks_parent ON tasks (parent_id)",
            "CREATE INDEX tasks_status_created ON tasks (status, created_at)",
            """CREATE TABLE credentials (
                jti_hash TEXT PRIMARY KEY,
                task_id TEXT NOT NULL REFERENCES tasks(id),
                kid TEXT NOT NULL,
                issued_at {double} NOT NULL,
                expires_at {double} NOT NULL,
                revoked_at {double}
            )""",
            "CREATE INDEX credentials_task ON credentials (task_id)",
            """CREATE TABLE revocations (
                seq {serial},
                id TEXT NOT NULL UNIQUE,
                target_type TEXT NOT NULL,
                target TEXT NOT NULL,
                agent_id TEXT,
                task_id TEXT,
                jti_hash TEXT,
                cutoff {double},
                reason TEXT NOT NULL,
                actor TEXT NOT NULL,
                source TEXT NOT NULL,
                created_at {double} NOT NULL,
                affected_tasks INTEGER NOT NULL,
                affected_credentials INTEGER NOT NULL
            )""",
            "CREATE INDEX revocations_created ON revocations (created_at)",
            """CREATE TABLE audit_log (
                seq {serial},
                at {double} NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                subject TEXT NOT NULL,
                detail TEXT NOT NULL
            )""",
            """CREATE TABLE client_assertions (
                jti_hash TEXT PRIMARY KEY,
                expires_at {double} NOT NULL
            )""",
        ],
    ),
    (
        2,
        "transactional outbox, idempotent revocations, revoked task ids",
        [
            """CREATE TABLE outbox (
                seq {serial},
                topic TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                created_at {double} NOT NULL
            )""",
            "ALTER TABLE revocations ADD COLUMN idempotency_key TEXT",
            "ALTER TABLE revocations ADD COLUMN task_ids TEXT NOT NULL DEFAULT '[]'",
            "CREATE UNIQUE INDEX revocations_idempotency ON revocations (idempotency_key)",
        ],
    ),
    (
        3,
        "alerts consumed from the alerts topic",
        [
            # seq orders the alerts as they were stored (list cursor, SSE id); alert_id is
            # the detector's deterministic id, UNIQUE so a redelivered record is a no-op.
            """CREATE TABLE alerts (
                seq {serial},
                alert_id TEXT NOT NULL UNIQUE,
                at {double} NOT NULL,
                rule TEXT NOT NULL,
                severity TEXT NOT NULL,
                agent_id TEXT NOT NULL,
                task_id TEXT,
                score {double},
                evidence TEXT NOT NULL,
                action TEXT NOT NULL,
                received_at {double} NOT NULL,
                acked_at {double},
                acked_by TEXT,
                ack_note TEXT
            )""",
            "CREATE INDEX alerts_at ON alerts (at)",
            "CREATE INDEX alerts_agent ON alerts (agent_id, seq)",
            "CREATE INDEX alerts_task ON alerts (task_id, seq)",
            "CREATE INDEX alerts_severity ON alerts (severity, seq)",
            "CREATE INDEX alerts_rule ON alerts (rule, seq)",
        ],
    ),
    (
        4,
        "the revocation topic's checkpoint: where the service last made it whole",
        [
            """CREATE TABLE feed_checkpoints (
                topic TEXT PRIMARY KEY,
                epoch TEXT NOT NULL,
                partition_id INTEGER NOT NULL,
                record_offset BIGINT NOT NULL,
                through_seq BIGINT NOT NULL,
                republished INTEGER NOT NULL,
                created_at {double} NOT NULL
            )""",
        ],
    ),
]


async def migrate(db: Database) -> list[int]:
    """Apply every pending migration; returns the versions applied now."""
    words = _DIALECT_WORDS[db.dialect]
    applied_now: list[int] = []
    async with db.transaction() as tx:
        if db.dialect == "postgresql":
            # Two replicas starting at once must not both run migration 1.
            await tx.execute("SELECT pg_advisory_xact_lock(727274)")
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            f"version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
            f"applied_at {words['double']} NOT NULL)"
        )
        done = {r["version"] for r in await tx.fetch("SELECT version FROM schema_migrations")}
        for version, description, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                await tx.execute(statement.format(**words))
            await tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                version,
                description,
                time.time(),
            )
            applied_now.append(version)
    return applied_now
