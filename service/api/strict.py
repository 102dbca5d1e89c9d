"""Strict request bodies and authentication before the body is read.

litestar converts a JSON body into its Struct with ``strict=False`` (``"ttl": "600"``
would become 600). Our contract is stricter: a wrong type is a 400. :func:`strict_body`
runs before litestar binds the body, decodes it once with a strict, per-handler msgspec
decoder and turns failures into the same validation problem litestar would raise.

:func:`authenticate_guard` identifies the caller as a litestar guard, which runs before
the body is touched: an unauthenticated request is a 401 whatever its body looks like.
The principal is kept on the request, so single-use client assertions are checked once.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.enums import RequestEncodingType
from litestar.exceptions import ValidationException
from litestar.handlers import BaseRouteHandler

from service.auth import authenticate

_OPT_KEY = "killswitch.strict_decoder"


def _decoder_for(handler: Any) -> tuple[msgspec.json.Decoder[Any], bool] | None:
    # Kept on the handler itself (its ``opt``): one decoder per handler, built once.
    opt: dict[str, Any] = handler.opt
    if _OPT_KEY not in opt:
        field = handler.parsed_fn_signature.parameters.get("data")
        kwarg = getattr(field, "kwarg_definition", None)
        media = getattr(kwarg, "media_type", RequestEncodingType.JSON)
        if field is None or media != RequestEncodingType.JSON:
            opt[_OPT_KEY] = None
        else:
            opt[_OPT_KEY] = (msgspec.json.Decoder(field.annotation), field.is_optional)
    entry: tuple[msgspec.json.Decoder[Any], bool] | None = opt[_OPT_KEY]
    return entry


async def strict_body(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: refuse a JSON body that is not exactly the declared type."""
    entry = _decoder_for(request.route_handler)
    if entry is None:
        return None
    decoder, optional = entry
    body = await request.body()
    if optional and not body.strip():
        return None
    try:
        decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ValidationException(
            detail=f"Validation failed for {request.method} {request.url.path}",
            extra=[{"message": str(exc), "source": "body"}],
        ) from None
    return None


async def authenticate_guard(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
) -> None:
    services = connection.app.state.services
    # htu is the public URL (the issuer's origin): behind a proxy the socket's differs.
    connection.state.principal = await authenticate(
        services,
        connection.headers.get("authorization"),
        dpop=connection.headers.getall("dpop", []),
        htm=str(connection.scope.get("method", "GET")),
        htu=services.settings.effective_issuer.rstrip("/") + connection.url.path,
    )
