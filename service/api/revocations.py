"""HTTP edge for revocations and the audit log."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, Parameter
from litestar.response import ServerSentEvent

from service.api.deps import (
    NON_NEGATIVE,
    OPERATOR,
    PrincipalDep,
    ServicesDep,
    event_stream,
    problems,
    provide_principal,
)
from service.api.sse import HEARTBEAT_SECONDS, RevocationStreamEvent, revocation_stream
from service.api.strict import authenticate_guard
from service.auth import READ, REVOKE, STREAM, require_operator
from service.contracts import CreateRevocation, Page, RevocationSource, RevocationView, Role
from service.storage import repository as repo

Since = Annotated[float | None, Parameter(description="Only entries at or after (epoch s)")]
Limit = Annotated[int, Parameter(ge=1, le=1000, description="Page size")]
# A seq is a 64-bit integer in both databases: a cursor outside that range is a 400.
Cursor = Annotated[
    int | None,
    Parameter(
        ge=0, le=2**63 - 1, schema_extra=NON_NEGATIVE, description="next_cursor of the last page"
    ),
]


class RevocationController(Controller):
    path = "/v1"
    tags = ["revocations"]
    security = OPERATOR
    dependencies = {"principal": Provide(provide_principal, sync_to_thread=False)}
    guards = [authenticate_guard]

    @post(
        "/revocations",
        operation_id="revoke",
        summary="Revoke a credential, task, agent, or everything before a cut-off (analyst)",
        description="201 with the new revocation; 200 with the first one when "
        "`idempotency_key` was used before, or with the revocation that already ended a "
        "credential or task (nothing is revoked twice, nothing new is written).",
        status_code=201,
        responses={
            200: ResponseSpec(
                data_container=RevocationView,
                description="Nothing new revoked: the revocation recorded earlier for this "
                "`idempotency_key`, or the one that already ended this credential or task",
            ),
            **problems(400, 401, 403, 404, 413),
        },
    )
    async def revoke(
        self, data: JSONBody[CreateRevocation], principal: PrincipalDep, services: ServicesDep
    ) -> Response[RevocationView]:
        require_operator(principal, REVOKE)
        source = (
            RevocationSource.DETECTOR
            if principal.role is Role.DETECTOR
            else RevocationSource.ANALYST
        )
        view, created = await services.revoker.revoke_idempotent(
            data.target,
            reason=data.reason,
            actor=principal.actor,
            source=source,
            idempotency_key=data.idempotency_key,
        )
        if created:
            services.metrics.revocations.labels(
                target=view.target.__struct_config__.tag, source=source.value
            ).inc()
        return Response(view, status_code=201 if created else 200)

    @get(
        "/revocations/stream",
        operation_id="streamRevocations",
        summary="Revocations as they commit (SSE); resume with Last-Event-ID",
        description="text/event-stream of `revocation` events (id = seq, data = "
        "RevocationEvent JSON, docs/events.md) and a `heartbeat` event every "
        f"{HEARTBEAT_SECONDS:g} s. With `Last-Event-ID: <seq>` every revocation after it is "
        "replayed first, so a reconnecting guard misses nothing.",
        responses={
            **event_stream(
                RevocationStreamEvent,
                "`revocation` and `heartbeat` events, until the client leaves",
            ),
            **problems(400, 401, 403),
        },
    )
    async def stream(
        self,
        principal: PrincipalDep,
        services: ServicesDep,
        last_event_id: Annotated[
            int | None,
            HeaderParameter(
                name="Last-Event-ID",
                ge=0,
                le=2**63 - 1,
                schema_extra=NON_NEGATIVE,
                required=False,
                description="seq of the last revocation received; replay starts after it",
            ),
        ] = None,
    ) -> ServerSentEvent:
        require_operator(principal, STREAM)
        return ServerSentEvent(revocation_stream(services, last_event_id or 0))

    @get(
        "/revocations",
        operation_id="listRevocations",
        summary="List revocations in order (viewer)",
        responses=problems(400, 401, 403),
    )
    async def list_revocations(
        self,
        principal: PrincipalDep,
        services: ServicesDep,
        since: Since = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Page:
        require_operator(principal, READ)
        items = await repo.list_revocations(services.db, since=since, after_seq=cursor, limit=limit)
        return Page(items=items, next_cursor=str(items[-1].seq) if len(items) == limit else None)

    @get(
        "/audit",
        operation_id="listAudit",
        summary="The audit log, oldest first (viewer)",
        responses=problems(400, 401, 403),
    )
    async def list_audit(
        self,
        principal: PrincipalDep,
        services: ServicesDep,
        since: Since = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Page:
        require_operator(principal, READ)
        items = await repo.list_audit(services.db, since=since, after_seq=cursor, limit=limit)
        return Page(items=items, next_cursor=str(items[-1].seq) if len(items) == limit else None)
