"""Operators: the humans and machines that run killswitch (viewer, analyst, admin,
detector, resource_server). Tokens are shown once and stored as SHA-256 hashes."""

from __future__ import annotations

import uuid
from typing import Protocol

from service.config import Settings
from service.contracts import CreateOperator, OperatorCreated, OperatorRecord, OperatorView, Role
from service.kernel.clock import Clock
from service.kernel.errors import ClientError, Conflict, NotFound
from service.secrets_ import OPERATOR_TOKEN_PREFIX, hash_secret, new_secret
from service.storage import repository as repo
from service.storage.database import Database


class OperatorDeps(Protocol):
    """What operator management needs from the running service."""

    @property
    def db(self) -> Database: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def settings(self) -> Settings: ...


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
    services: OperatorDeps, request: CreateOperator, *, actor: str, token: str | None = None
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


async def ensure_detector(services: OperatorDeps) -> None:
    """Create the ``detector`` operator from KS_BOOTSTRAP_DETECTOR_TOKEN, once."""
    configured = services.settings.bootstrap_detector_token
    if configured is None or await repo.get_operator(services.db, "detector") is not None:
        return
    await create(
        services,
        CreateOperator(name="detector", role=Role.DETECTOR),
        actor="system:bootstrap",
        token=configured.reveal(),
    )


async def ensure_admin(services: OperatorDeps) -> str | None:
    """Create the first admin if there is none; returns a generated token (to print once)."""
    if await repo.count_admins(services.db) > 0:
        return None
    configured = services.settings.bootstrap_admin_token
    created = await create(
        services,
        CreateOperator(name="bootstrap-admin", role=Role.ADMIN),
        actor="system:bootstrap",
        token=configured.reveal() if configured is not None else None,
    )
    # A configured token is already known to whoever configured it: never echo it.
    return None if configured is not None else created.token


async def disable(services: OperatorDeps, name: str, *, actor: str) -> OperatorView:
    """Disable an operator token at once (a stolen or departed operator's)."""
    now = services.clock.now()
    async with services.db.transaction() as tx:
        op = await repo.get_operator(tx, name)
        if op is None:
            raise NotFound(f"no operator {name!r}")
        if op.disabled_at is not None:
            raise Conflict(f"operator {name!r} is already disabled")
        if op.role is Role.ADMIN and await repo.count_admins(tx) <= 1:
            raise Conflict("refusing to disable the last admin; create another admin first")
        await repo.disable_operator(tx, name, at=now)
        await repo.append_audit(
            tx,
            at=now,
            actor=actor,
            action="operator.disable",
            subject=f"operator:{name}",
            detail={"role": op.role.value},
        )
        disabled = await repo.get_operator(tx, name)
    assert disabled is not None
    return view(disabled)
