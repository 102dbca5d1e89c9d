"""HTTP edge for agents: parse, authorise, delegate to ``service.agents``."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import Provide
from litestar.params import JSONBody, Parameter

from service import agents
from service.api.deps import OPERATOR, PrincipalDep, ServicesDep, problems, provide_principal
from service.api.strict import authenticate_guard
from service.auth import ADMIN, READ, require_operator
from service.contracts import (
    AgentCreated,
    AgentView,
    CreateAgent,
    Page,
    ReinstateAgent,
    RevocationView,
    SuspendAgent,
)
from service.storage import repository as repo

AgentPath = Annotated[str, Parameter(description="Agent id", max_length=64)]


class AgentController(Controller):
    path = "/v1/agents"
    tags = ["agents"]
    security = OPERATOR
    dependencies = {"principal": Provide(provide_principal, sync_to_thread=False)}
    guards = [authenticate_guard]

    @post(
        "/",
        operation_id="registerAgent",
        summary="Register an agent (admin)",
        description="Registers an agent with its scope ceiling. The client secret, if "
        "issued, is in the response once and stored only as a hash.",
        status_code=201,
        responses=problems(400, 401, 403, 409, 413),
    )
    async def register(
        self, data: JSONBody[CreateAgent], principal: PrincipalDep, services: ServicesDep
    ) -> AgentCreated:
        require_operator(principal, ADMIN)
        return await agents.register(services, data, actor=principal.actor)

    @get(
        "/",
        operation_id="listAgents",
        summary="List agents (viewer)",
        responses=problems(400, 401, 403),
    )
    async def list_agents(
        self,
        principal: PrincipalDep,
        services: ServicesDep,
        limit: Annotated[int, Parameter(ge=1, le=500, description="Page size")] = 100,
        cursor: Annotated[str | None, Parameter(description="next_cursor of the last page")] = None,
    ) -> Page:
        require_operator(principal, READ)
        records = await repo.list_agents(services.db, after=cursor, limit=limit)
        next_cursor = records[-1].id if len(records) == limit else None
        return Page(items=[agents.view(a) for a in records], next_cursor=next_cursor)

    @get(
        "/{agent_id:str}",
        operation_id="getAgent",
        summary="Show one agent (viewer)",
        responses=problems(400, 401, 403, 404),
    )
    async def get_agent(
        self, agent_id: AgentPath, principal: PrincipalDep, services: ServicesDep
    ) -> AgentView:
        require_operator(principal, READ)
        return agents.view(await agents.get(services, agent_id))

    @post(
        "/{agent_id:str}/suspend",
        operation_id="suspendAgent",
        summary="Suspend an agent (admin): revoke all its tasks, refuse new ones",
        status_code=200,
        responses=problems(400, 401, 403, 404, 413),
    )
    async def suspend(
        self,
        agent_id: AgentPath,
        data: JSONBody[SuspendAgent],
        principal: PrincipalDep,
        services: ServicesDep,
    ) -> RevocationView:
        require_operator(principal, ADMIN)
        view = await agents.suspend(services, agent_id, reason=data.reason, actor=principal.actor)
        services.metrics.revocations.labels(target="agent", source="analyst").inc()
        return view

    @post(
        "/{agent_id:str}/reinstate",
        operation_id="reinstateAgent",
        summary="Reinstate a suspended agent (admin)",
        status_code=200,
        responses=problems(400, 401, 403, 404, 409, 413),
    )
    async def reinstate(
        self,
        agent_id: AgentPath,
        data: JSONBody[ReinstateAgent],
        principal: PrincipalDep,
        services: ServicesDep,
    ) -> AgentView:
        require_operator(principal, ADMIN)
        return await agents.reinstate(services, agent_id, reason=data.reason, actor=principal.actor)
