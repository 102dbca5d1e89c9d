"""Agents: registration (with a scope ceiling and client credentials), suspension and
reinstatement. An agent's ceiling bounds every task it will ever open."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.contracts import (
    AgentCreated,
    AgentRecord,
    AgentStatus,
    AgentTarget,
    AgentView,
    CreateAgent,
    RevocationSource,
    RevocationView,
)
from service.kernel.errors import ClientError, Conflict, NotFound
from service.kernel.ids import task_spiffe_id
from service.kernel.jwk import load_public_jwk
from service.kernel.scopes import validate
from service.secrets_ import AGENT_SECRET_PREFIX, hash_secret, new_secret
from service.storage import repository as repo

if TYPE_CHECKING:
    from service.core import Services


def view(agent: AgentRecord) -> AgentView:
    methods = []
    if agent.secret_hash is not None:
        methods.append("client_secret_basic")
    if agent.public_jwk is not None:
        methods.append("private_key_jwt")
    return AgentView(
        id=agent.id,
        name=agent.name,
        status=agent.status,
        ceiling=agent.ceiling,
        max_task_ttl=agent.max_task_ttl,
        auth_methods=methods,
        created_at=agent.created_at,
        suspended_at=agent.suspended_at,
        suspend_reason=agent.suspend_reason,
    )


async def register(services: Services, request: CreateAgent, *, actor: str) -> AgentCreated:
    ceiling = validate(request.ceiling)
    if not ceiling.audiences:
        # Every task must name an audience inside the ceiling: without one, the agent
        # could be registered but never open a task.
        raise ClientError(
            "an agent's ceiling needs at least one audience: every task names one "
            "(it becomes the token's aud) and it must lie inside the ceiling"
        )
    # The id must make a valid SPIFFE path segment; check it the way tasks will use it.
    task_spiffe_id(services.settings.trust_domain, request.id, "x")
    if request.public_jwk is not None:
        load_public_jwk(request.public_jwk)
    if not request.issue_secret and request.public_jwk is None:
        raise ClientError("an agent needs a client secret, a public key, or both")
    secret = new_secret(AGENT_SECRET_PREFIX) if request.issue_secret else None
    now = services.clock.now()
    record = AgentRecord(
        id=request.id,
        name=request.name or request.id,
        ceiling=ceiling,
        max_task_ttl=request.max_task_ttl,
        secret_hash=hash_secret(secret) if secret else None,
        public_jwk=request.public_jwk,
        status=AgentStatus.ACTIVE,
        created_at=now,
    )
    async with services.db.transaction() as tx:
        if not await repo.insert_agent(tx, record):
            raise Conflict(f"agent {request.id!r} already exists")
        await repo.append_audit(
            tx,
            at=now,
            actor=actor,
            action="agent.register",
            subject=f"agent:{record.id}",
            detail={"grants": list(ceiling.grants), "audiences": list(ceiling.audiences)},
        )
    return AgentCreated(agent=view(record), client_secret=secret)


async def get(services: Services, agent_id: str) -> AgentRecord:
    agent = await repo.get_agent(services.db, agent_id)
    if agent is None:
        raise NotFound(f"no agent {agent_id!r}")
    return agent


async def suspend(services: Services, agent_id: str, *, reason: str, actor: str) -> RevocationView:
    """Suspending is revoking the agent: its tasks die and it may open no new ones."""
    return await services.revoker.revoke(
        AgentTarget(agent_id=agent_id),
        reason=reason,
        actor=actor,
        source=RevocationSource.ANALYST,
    )


async def reinstate(services: Services, agent_id: str, *, reason: str, actor: str) -> AgentView:
    """Let a suspended agent open tasks again; what was revoked stays revoked."""
    now = services.clock.now()
    async with services.db.transaction() as tx:
        agent = await repo.get_agent(tx, agent_id)
        if agent is None:
            raise NotFound(f"no agent {agent_id!r}")
        if agent.status is AgentStatus.ACTIVE:
            raise Conflict(f"agent {agent_id!r} is not suspended")
        await repo.set_agent_status(tx, agent_id, AgentStatus.ACTIVE, at=None, reason=None)
        await repo.append_audit(
            tx,
            at=now,
            actor=actor,
            action="agent.reinstate",
            subject=f"agent:{agent_id}",
            detail={"reason": reason},
        )
        updated = await repo.get_agent(tx, agent_id)
    assert updated is not None
    return view(updated)
