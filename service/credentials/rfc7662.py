"""RFC 7662 token introspection and RFC 7009 token revocation, decided here.

Introspection (§2.2) answers ``{"active": false}`` and nothing else for any token that
is malformed, unverifiable, expired, not yet valid, issued by someone else, not
addressed to the calling resource server's audience (§4), revoked, of a completed,
revoked or expired task, of a suspended agent, or issued before a cut-off. The
database is asked last and is authoritative, so a fleet of service replicas agrees
even before their in-memory deny states have caught up.

Revocation (RFC 7009 §2.2) always answers 200: the caller learns nothing about tokens
it does not own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.contracts import (
    AgentStatus,
    CredentialTarget,
    Introspection,
    RevocationSource,
    TaskStatus,
)
from service.credentials.rfc9068 import VerifiedToken
from service.errors import NotFound, TokenRejected

if TYPE_CHECKING:
    from service.auth import Principal
    from service.core import Services

INACTIVE = Introspection(active=False)


async def live_token(services: Services, token: str, *, audience: str | None) -> VerifiedToken:
    """Verify ``token`` and its status; raises TokenRejected with the reason."""
    verified = services.verifier.verify(token, audience=audience)
    reason = services.deny.reason_denied(verified)
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


async def introspect(services: Services, token: str, *, audience: str | None) -> Introspection:
    try:
        v = await live_token(services, token, audience=audience)
    except TokenRejected:
        services.metrics.introspections.labels(active="false").inc()
        return INACTIVE
    services.metrics.introspections.labels(active="true").inc()
    c = v.claims
    return Introspection(
        active=True,
        scope=v.scope,
        client_id=v.agent_id,
        sub=c["sub"],
        aud=list(v.audiences),
        iss=c["iss"],
        exp=v.exp,
        iat=v.iat,
        nbf=c.get("nbf"),
        jti=v.jti,
        token_type="DPoP" if "cnf" in c else "Bearer",
        cnf=c.get("cnf"),
    )


async def revoke_token(services: Services, principal: Principal, token: str) -> None:
    """RFC 7009 §2.1: agents may revoke their own tokens; operators with revoke rights any."""
    try:
        verified = services.verifier.verify(token)
    except TokenRejected:
        return  # §2.2: invalid tokens do not cause an error response
    if principal.kind in ("agent", "task") and verified.agent_id != principal.agent_id:
        return
    source = RevocationSource.CLIENT if principal.kind != "operator" else RevocationSource.ANALYST
    try:
        await services.revoker.revoke(
            CredentialTarget(jti=verified.jti),
            reason="revoked through RFC 7009 endpoint",
            actor=principal.actor,
            source=source,
        )
    except NotFound:
        return
    services.metrics.revocations.labels(target="credential", source=source.value).inc()
