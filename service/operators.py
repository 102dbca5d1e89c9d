"""Operators: the humans and machines that run killswitch (viewer, analyst, admin,
detector, resource_server). Tokens are shown once and stored as SHA-256 hashes."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from service.contracts import CreateOperator, OperatorCreated, OperatorRecord, OperatorView, Role
from service.errors import ClientError, Conflict
from service.secrets_ import OPERATOR_TOKEN_PREFIX, hash_secret, new_secret
from service.storage import repository as repo

if TYPE_CHECKING:
    from service.core import Services


def view(op: OperatorRecord) -> OperatorView:
    return OperatorView(
        id=op.id,
        name=op.name,
        role=op.role,
        audience=op.audience,
        created_at=op.created_at,
        disabled_at=op.disabled_at,
    )


async def create(
    services: Services, request: CreateOperator, *, actor: str, token: str | None = None
) -> OperatorCreated:
    if request.role is Role.RESOURCE_SERVER and request.audience is None:
        raise ClientError("a resource_server operator needs the audience it serves")
    if token is not None and not token.startswith(OPERATOR_TOKEN_PREFIX):
        raise ClientError(f"operator tokens start with {OPERATOR_TOKEN_PREFIX!r}")
    token = token or new_secret(OPERATOR_TOKEN_PREFIX)
    now = services.clock.now()
    record = OperatorRecord(
        id=str(uuid.uuid4()),
        name=request.name,
        role=request.role,
        audience=request.audience,
        created_at=now,
    )
    async with services.db.transaction() as tx:
        if not await repo.insert_operator(tx, record, hash_secret(token)):
            raise Conflict(f"an operator named {request.name!r} already exists")
        await repo.append_audit(
            tx,
            at=now,
            actor=actor,
            action="operator.create",
            subject=f"operator:{record.name}",
            detail={"role": record.role.value, "audience": record.audience},
        )
    return OperatorCreated(operator=view(record), token=token)


async def ensure_admin(services: Services) -> str | None:
    """Create the first admin if there is none; returns its token (to print once)."""
    if await repo.count_admins(services.db) > 0:
        return None
    configured = services.settings.bootstrap_admin_token
    created = await create(
        services,
        CreateOperator(name="bootstrap-admin", role=Role.ADMIN),
        actor="system:bootstrap",
        token=configured.reveal() if configured is not None else None,
    )
    return created.token
