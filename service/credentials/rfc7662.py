"""RFC 7662 token introspection and RFC 7009 token revocation, decided here.

Introspection (§2.2) answers ``{"active": false}`` and nothing else for any token that
is not live (``service.credentials.status``): malformed, unverifiable, expired, not yet
valid, issued by someone else, not addressed to the calling resource server's audience
(§4), revoked, of a completed, revoked or expired task, of a suspended agent, or issued
before a cut-off.

Revocation (RFC 7009 §2.2) always answers 200: the caller learns nothing about tokens
it does not own.
"""

from __future__ import annotations

from typing import Protocol

from service.auth import Principal
from service.contracts import CredentialTarget, Introspection, RevocationSource
from service.credentials.status import StatusDeps, live_token
from service.kernel.errors import NotFound, TokenRejected
from service.metrics import Metrics
from service.revocation import Revoker


class IntrospectionDeps(StatusDeps, Protocol):
    """What introspection and RFC 7009 revocation need from the running service."""

    @property
    def metrics(self) -> Metrics: ...
    @property
    def revoker(self) -> Revoker: ...


INACTIVE = Introspection(active=False)


async def introspect(
    services: IntrospectionDeps, token: str, *, audience: str | None
) -> Introspection:
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
        exp=int(v.exp),
        iat=int(v.iat),
        nbf=c.get("nbf"),
        jti=v.jti,
        token_type="DPoP" if "cnf" in c else "Bearer",
        cnf=c.get("cnf"),
    )


async def revoke_token(services: IntrospectionDeps, principal: Principal, token: str) -> None:
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
