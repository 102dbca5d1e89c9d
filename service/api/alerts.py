"""HTTP edge for alerts (read, follow live, acknowledge) and the console's timeline."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import Provide
from litestar.params import Body, HeaderParameter, Parameter
from litestar.response import ServerSentEvent

from service import alerts
from service.api.deps import (
    NON_NEGATIVE,
    OPERATOR,
    PrincipalDep,
    ServicesDep,
    event_stream,
    problems,
    provide_principal,
)
from service.api.sse import HEARTBEAT_SECONDS, AlertStreamEvent, alert_stream
from service.api.strict import authenticate_guard
from service.auth import ACK, READ, require_operator
from service.contracts import AckAlert, AlertView, Page, TimelinePoint
from service.kernel.events import Severity
from service.storage import repository as repo

AlertPath = Annotated[str, Parameter(description="The alert's alert_id", max_length=128)]
Epoch = float | None
Cursor = Annotated[
    int | None,
    Parameter(
        ge=0,
        le=2**63 - 1,
        schema_extra=NON_NEGATIVE,
        description="next_cursor of the last page (newest first)",
    ),
]


class AlertController(Controller):
    path = "/v1"
    tags = ["alerts"]
    security = OPERATOR
    dependencies = {"principal": Provide(provide_principal, sync_to_thread=False)}
    guards = [authenticate_guard]

    @get(
        "/alerts",
        operation_id="listAlerts",
        summary="List alerts, newest first (viewer)",
        description="Filters combine with AND; `severity` may repeat (any of them). "
        "Pass `next_cursor` back as `cursor` for older alerts.",
        responses=problems(400, 401, 403),
    )
    async def list_alerts(
        self,
        principal: PrincipalDep,
        services: ServicesDep,
        severity: Annotated[
            list[Severity] | None, Parameter(description="Only these severities (repeatable)")
        ] = None,
        rule: Annotated[str | None, Parameter(description="Only this rule or model id")] = None,
        agent_id: Annotated[str | None, Parameter(description="Only this agent's alerts")] = None,
        task_id: Annotated[str | None, Parameter(description="Only this task's alerts")] = None,
        since: Annotated[Epoch, Parameter(description="Raised at or after (epoch s)")] = None,
        until: Annotated[Epoch, Parameter(description="Raised before (epoch s)")] = None,
        acked: Annotated[
            bool | None, Parameter(description="true: acknowledged only; false: open only")
        ] = None,
        limit: Annotated[int, Parameter(ge=1, le=1000, description="Page size")] = 100,
        cursor: Cursor = None,
    ) -> Page:
        require_operator(principal, READ)
        items = await repo.list_alerts(
            services.db,
            severities=severity or (),
            rule=rule,
            agent_id=agent_id,
            task_id=task_id,
            since=since,
            until=until,
            acked=acked,
            before_seq=cursor,
            limit=limit,
        )
        return Page(items=items, next_cursor=str(items[-1].seq) if len(items) == limit else None)

    @get(
        "/alerts/stream",
        operation_id="streamAlerts",
        summary="Alerts as they are stored (SSE); resume with Last-Event-ID (viewer)",
        description="text/event-stream of `alert` events (id = seq, data = AlertView JSON), "
        "`ack` events (no id, data = the acknowledged AlertView) and a `heartbeat` event "
        f"every {HEARTBEAT_SECONDS:g} s of quiet. With `Last-Event-ID: <seq>` every alert "
        "stored after it is replayed first, then live ones follow.",
        responses={
            **event_stream(
                AlertStreamEvent, "`alert`, `ack` and `heartbeat` events, until the client leaves"
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
                description="seq of the last alert received; replay starts after it",
            ),
        ] = None,
    ) -> ServerSentEvent:
        require_operator(principal, READ)
        return ServerSentEvent(alert_stream(services, last_event_id or 0))

    @get(
        "/alerts/{alert_id:str}",
        operation_id="getAlert",
        summary="One alert (viewer)",
        responses=problems(400, 401, 403, 404),
    )
    async def get_alert(
        self, alert_id: AlertPath, principal: PrincipalDep, services: ServicesDep
    ) -> AlertView:
        require_operator(principal, READ)
        return await alerts.get(services, alert_id)

    @post(
        "/alerts/{alert_id:str}/ack",
        operation_id="ackAlert",
        summary="Acknowledge an alert (analyst)",
        description="200 with the alert. Idempotent: the first acknowledgement wins; "
        "acknowledging again changes nothing and returns the alert with the first "
        "`acked_at`, `acked_by` and `ack_note`. The body may be omitted.",
        status_code=200,
        responses=problems(400, 401, 403, 404, 413),
    )
    async def ack(
        self,
        alert_id: AlertPath,
        principal: PrincipalDep,
        services: ServicesDep,
        data: Annotated[AckAlert | None, Body(description="Optional note")] = None,
    ) -> AlertView:
        require_operator(principal, ACK)
        view, _first = await alerts.acknowledge(
            services, alert_id, actor=principal.actor, note=data.note if data else None
        )
        return view

    @get(
        "/stats/timeline",
        operation_id="statsTimeline",
        summary="Alerts and kills per minute, for a live chart (viewer)",
        description="One point per minute, oldest first, the current (partial) minute "
        "last, zeros included.",
        responses=problems(400, 401, 403),
    )
    async def stats_timeline(
        self,
        principal: PrincipalDep,
        services: ServicesDep,
        minutes: Annotated[
            int, Parameter(ge=1, le=1440, description="How many minutes, up to now")
        ] = 30,
    ) -> list[TimelinePoint]:
        require_operator(principal, READ)
        return await alerts.timeline(services, minutes)
