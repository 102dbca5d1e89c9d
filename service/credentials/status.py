"""Is this credential live? The service's one answer, for introspection and every route
that accepts a task credential.

In order: the kernel's ``at+jwt`` rules (``TokenVerifier``, ``service.kernel.tokens``),
the kernel's deny state (``service.kernel.deny``, the rules every guard applies), then
the database, which is asked last and is authoritative, so a fleet of service replicas
agrees even before their in-memory deny states have caught up.
"""

from __future__ import annotations

from typing import Protocol

from service.contracts import AgentStatus, TaskStatus
from service.credentials.rfc9068 import TokenVerifier
from service.kernel.clock import Clock
from service.kernel.deny import DenyState
from service.kernel.errors import TokenRejected
from service.kernel.tokens import TokenClaims
from service.storage.database import Database

__all__ = ["StatusDeps", "live_token"]


class StatusDeps(Protocol):
    """What deciding a credential's status needs from the running service."""

    @property
    def verifier(self) -> TokenVerifier: ...
    @property
    def deny(self) -> DenyState: ...
    @property
    def db(self) -> Database: ...
    @property
    def clock(self) -> Clock: ...


async def live_token(services: StatusDeps, token: str, *, audience: str | None) -> TokenClaims:
    """Verify ``token`` and its status; raises TokenRejected with the reason."""
    verified = services.verifier.verify(token, audience=audience)
    reason = services.deny.reason_denied(
        verified.jti_hash, verified.task_id, verified.agent_id, verified.iat
    )
    if reason is not None:
        raise TokenRejected(reason)
    row = await services.db.fetchrow(
        "SELECT c.revoked_at AS revoked_at, t.status AS task_status, t.deadline AS deadline,"
        " t.agent_id AS agent_id, a.status AS agent_status FROM credentials c"
        " JOIN tasks t ON t.id = c.task_id JOIN agents a ON a.id = t.agent_id"
        " WHERE c.jti_hash = ?",
        verified.jti_hash,
    )
    if row is None or row["agent_id"] != verified.agent_id:
        raise TokenRejected("credential unknown to this issuer")
    if row["revoked_at"] is not None:
        raise TokenRejected("credential revoked")
    if row["task_status"] != TaskStatus.ACTIVE.value:
        raise TokenRejected(f"task {row['task_status']}")
    if row["deadline"] <= services.clock.now():
        raise TokenRejected("task expired")
    if row["agent_status"] != AgentStatus.ACTIVE.value:
        raise TokenRejected("agent suspended")
    return verified
