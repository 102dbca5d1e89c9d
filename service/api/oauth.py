"""HTTP edge for the OAuth-standard endpoints: RFC 7662, RFC 7009, RFC 8414, JWKS."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, get, post
from litestar.di import Provide
from litestar.enums import RequestEncodingType
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body

from service.api.deps import AGENT, OPERATOR, PrincipalDep, ServicesDep, problems, provide_principal
from service.api.strict import authenticate_guard
from service.auth import INTROSPECT, REVOKE, require_operator
from service.config import SIGNING_ALGORITHMS
from service.contracts import Introspection
from service.credentials import rfc7662


class TokenForm(msgspec.Struct, frozen=True, kw_only=True):
    # No upper bound of its own (the body limit, KS_MAX_BODY_BYTES, is one): a token too
    # long to be ours is an invalid token, and RFC 7662 §2.2 / RFC 7009 §2.2 answer those
    # with 200 (active: false), not with a 400 for a well-formed request.
    token: Annotated[str, msgspec.Meta(min_length=1)]
    token_type_hint: str | None = None


Form = Annotated[TokenForm, Body(media_type=RequestEncodingType.URL_ENCODED)]

JWK_SET_JSON = "application/jwk-set+json"
"""RFC 7517 §8.5.1: the media type of a JWK Set."""


class JWKSet(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 7517 §5 JWK Set (documentation only: the handler serves the key store's dict)."""

    keys: list[dict[str, Any]]


class OAuthController(Controller):
    path = "/oauth2"
    tags = ["oauth"]
    dependencies = {"principal": Provide(provide_principal, sync_to_thread=False)}
    guards = [authenticate_guard]

    @post(
        "/introspect",
        operation_id="introspectToken",
        summary="RFC 7662 token introspection (resource_server, analyst, admin, detector)",
        description="Answers active:false for anything revoked, completed, expired, not yet "
        "valid, forged, or (for a resource_server caller) not addressed to its audience.",
        status_code=200,
        security=OPERATOR,
        responses=problems(400, 401, 403, 413),
    )
    async def introspect(
        self, data: Form, principal: PrincipalDep, services: ServicesDep
    ) -> Introspection:
        require_operator(principal, INTROSPECT)
        return await rfc7662.introspect(services, data.token, audience=principal.audience)

    @post(
        "/revoke",
        operation_id="revokeToken",
        summary="RFC 7009 token revocation (the owning agent, or analyst/admin/detector)",
        status_code=200,
        security=OPERATOR + AGENT,
        responses=problems(400, 401, 403, 413),
    )
    async def revoke(self, data: Form, principal: PrincipalDep, services: ServicesDep) -> None:
        if principal.kind == "operator":
            require_operator(principal, REVOKE)
        await rfc7662.revoke_token(services, principal, data.token)


class WellKnownController(Controller):
    path = "/.well-known"
    tags = ["discovery"]

    @get(
        "/jwks.json",
        operation_id="getJwks",
        summary="Public signing keys (RFC 7517), including retired keys with live tokens",
        cache_control=None,
        media_type=JWK_SET_JSON,
        responses={
            200: ResponseSpec(
                data_container=JWKSet,
                description="The JWK Set",
                media_type=JWK_SET_JSON,
                generate_examples=False,
            )
        },
    )
    async def jwks(self, services: ServicesDep) -> Response[dict[str, Any]]:
        services.keys.refresh_if_changed()
        return Response(
            services.keys.jwks(),
            media_type=JWK_SET_JSON,
            headers={"Cache-Control": "public, max-age=60"},
        )

    @get(
        "/oauth-authorization-server",
        operation_id="getAuthorizationServerMetadata",
        summary="RFC 8414 authorization server metadata",
    )
    async def metadata(self, services: ServicesDep) -> dict[str, Any]:
        issuer = services.settings.effective_issuer
        return {
            "issuer": issuer,
            "jwks_uri": f"{issuer}/.well-known/jwks.json",
            "introspection_endpoint": f"{issuer}/oauth2/introspect",
            "introspection_endpoint_auth_methods_supported": ["bearer"],
            "revocation_endpoint": f"{issuer}/oauth2/revoke",
            "revocation_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "private_key_jwt",
                "bearer",
            ],
            "token_endpoint_auth_signing_alg_values_supported": list(SIGNING_ALGORITHMS),
            "access_token_signing_alg_values_supported": [services.keys.active.alg],
            "response_types_supported": [],
            "grant_types_supported": [],
            "task_endpoint": f"{issuer}/v1/tasks",
            "service_documentation": f"{issuer}/schema/openapi.json",
        }
