"""HTTP edge for operators and signing keys (admin)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import Provide
from litestar.params import JSONBody, Parameter

from service import operators
from service.api.deps import OPERATOR, PrincipalDep, ServicesDep, problems, provide_principal
from service.api.strict import authenticate_guard
from service.auth import ADMIN, READ, require_operator
from service.contracts import CreateOperator, KeyView, OperatorCreated, OperatorView
from service.storage import repository as repo


class AdminController(Controller):
    path = "/v1"
    tags = ["admin"]
    security = OPERATOR
    dependencies = {"principal": Provide(provide_principal, sync_to_thread=False)}
    guards = [authenticate_guard]

    @post(
        "/operators",
        operation_id="createOperator",
        summary="Create an operator token (admin); the token is shown once",
        status_code=201,
        responses=problems(400, 401, 403, 409, 413),
    )
    async def create_operator(
        self, data: JSONBody[CreateOperator], principal: PrincipalDep, services: ServicesDep
    ) -> OperatorCreated:
        require_operator(principal, ADMIN)
        return await operators.create(services, data, actor=principal.actor)

    @get(
        "/operators",
        operation_id="listOperators",
        summary="List operators (admin)",
        responses=problems(401, 403),
    )
    async def list_operators(
        self, principal: PrincipalDep, services: ServicesDep
    ) -> list[OperatorView]:
        require_operator(principal, ADMIN)
        return [operators.view(o) for o in await repo.list_operators(services.db)]

    @post(
        "/operators/{name:str}/disable",
        operation_id="disableOperator",
        summary="Disable an operator token at once (admin)",
        status_code=200,
        responses=problems(400, 401, 403, 404, 409),
    )
    async def disable_operator(
        self,
        name: Annotated[str, Parameter(description="Operator name", max_length=128)],
        principal: PrincipalDep,
        services: ServicesDep,
    ) -> OperatorView:
        require_operator(principal, ADMIN)
        return await operators.disable(services, name, actor=principal.actor)

    @get(
        "/keys",
        operation_id="listKeys",
        summary="Signing keys currently published (viewer)",
        responses=problems(401, 403),
    )
    async def list_keys(self, principal: PrincipalDep, services: ServicesDep) -> list[KeyView]:
        require_operator(principal, READ)
        services.keys.refresh_if_changed()
        return services.keys.describe()

    @post(
        "/keys/rotate",
        operation_id="rotateKeys",
        summary="Rotate the signing key (admin); the old public key stays published",
        status_code=200,
        responses=problems(401, 403),
    )
    async def rotate(self, principal: PrincipalDep, services: ServicesDep) -> list[KeyView]:
        require_operator(principal, ADMIN)
        new = services.keys.rotate()
        await repo.append_audit(
            services.db,
            at=services.clock.now(),
            actor=principal.actor,
            action="keys.rotate",
            subject=f"key:{new.kid}",
            detail={"alg": new.alg},
        )
        return services.keys.describe()
