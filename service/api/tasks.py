"""HTTP edge for tasks: open, read, renew, complete."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import Provide
from litestar.params import JSONBody, Parameter

from service import tasks
from service.api.deps import AGENT, OPERATOR, PrincipalDep, ServicesDep, problems, provide_principal
from service.api.strict import authenticate_guard
from service.auth import READ, require_agent, require_operator
from service.contracts import (
    CompleteTask,
    CreateTask,
    IssuedCredential,
    Page,
    Role,
    TaskStatus,
    TaskView,
)
from service.kernel.errors import NotFound
from service.storage import repository as repo

TaskPath = Annotated[str, Parameter(description="Task id", max_length=64)]
TASK_READERS = READ | {Role.DETECTOR}


def _may_read(principal: PrincipalDep) -> None:
    if principal.kind == "operator":
        require_operator(principal, TASK_READERS)


class TaskController(Controller):
    path = "/v1/tasks"
    tags = ["tasks"]
    dependencies = {"principal": Provide(provide_principal, sync_to_thread=False)}
    guards = [authenticate_guard]

    @post(
        "/",
        operation_id="openTask",
        summary="Open a task and get its first credential (agent)",
        description="Authenticate as the agent (client_secret_basic or an RFC 7523 client "
        "assertion) to open a top-level task, or with a task credential to open a sub-task "
        "whose scope must lie inside the parent's. The declared scope must lie inside the "
        "agent's ceiling; otherwise 403 with the offending grants.",
        status_code=201,
        security=AGENT,
        responses=problems(400, 401, 403, 413),
    )
    async def open_task(
        self, data: JSONBody[CreateTask], principal: PrincipalDep, services: ServicesDep
    ) -> IssuedCredential:
        require_agent(principal)
        return await tasks.open_task(services, principal, data)

    @get(
        "/",
        operation_id="listTasks",
        summary="List tasks, newest first (viewer; an agent sees only its own)",
        security=OPERATOR + AGENT,
        responses=problems(400, 401, 403),
    )
    async def list_tasks(
        self,
        principal: PrincipalDep,
        services: ServicesDep,
        agent_id: Annotated[str | None, Parameter(description="Only this agent's tasks")] = None,
        status: Annotated[TaskStatus | None, Parameter(description="Stored status")] = None,
        limit: Annotated[int, Parameter(ge=1, le=500, description="Page size")] = 100,
        cursor: Annotated[str | None, Parameter(description="next_cursor of the last page")] = None,
    ) -> Page:
        _may_read(principal)
        if principal.kind != "operator":
            agent_id = principal.agent_id
        records = await repo.list_tasks(
            services.db, agent_id=agent_id, status=status, before=cursor, limit=limit
        )
        now = services.clock.now()
        next_cursor = records[-1].id if len(records) == limit else None
        return Page(items=[tasks.view(t, now) for t in records], next_cursor=next_cursor)

    @get(
        "/{task_id:str}",
        operation_id="getTask",
        summary="Show one task (viewer, detector, or the owning agent)",
        security=OPERATOR + AGENT,
        responses=problems(400, 401, 403, 404),
    )
    async def get_task(
        self, task_id: TaskPath, principal: PrincipalDep, services: ServicesDep
    ) -> TaskView:
        _may_read(principal)
        task = await repo.get_task(services.db, task_id)
        if task is None or (principal.kind != "operator" and task.agent_id != principal.agent_id):
            raise NotFound(f"no task {task_id!r}")
        return tasks.view(task, services.clock.now())

    @post(
        "/{task_id:str}/renew",
        operation_id="renewTask",
        summary="Issue a fresh credential for an active task (owning agent)",
        status_code=200,
        security=AGENT,
        responses=problems(400, 401, 403, 404, 409),
    )
    async def renew(
        self, task_id: TaskPath, principal: PrincipalDep, services: ServicesDep
    ) -> IssuedCredential:
        require_agent(principal)
        return await tasks.renew(services, principal, task_id)

    @post(
        "/{task_id:str}/complete",
        operation_id="completeTask",
        summary="End a task: revoke its credentials and its sub-tasks' (owning agent)",
        status_code=200,
        security=AGENT,
        responses=problems(400, 401, 403, 404, 409, 413),
    )
    async def complete(
        self,
        task_id: TaskPath,
        principal: PrincipalDep,
        services: ServicesDep,
        data: JSONBody[CompleteTask | None] = None,
    ) -> TaskView:
        require_agent(principal)
        return await tasks.complete(services, principal, task_id, data or CompleteTask())
