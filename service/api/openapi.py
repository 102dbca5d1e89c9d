"""Where the OpenAPI document is made to tell the truth that litestar 2 gets wrong.

Two corrections, both checked against the live service by
``tests/service/test_openapi_conformance.py`` (schemathesis):

* A msgspec Struct declared ``forbid_unknown_fields`` refuses unknown members with a 400,
  so its schema says ``additionalProperties: false`` (litestar's own Struct plugin leaves
  it open, and a client generated from the document would send fields we refuse).
* ``OPTIONS`` answers ``Allow`` with every method of the path. litestar 2 builds the
  automatic OPTIONS handler for the first handler registered on a path and never updates
  it (litestar#4169, fixed in 3), so ``OPTIONS /v1/agents`` omitted ``POST``.

This module never changes what a request may contain or what a handler answers.
``StructSchemaPlugin`` is litestar-private (``litestar._openapi``): pyproject pins
litestar below 3, and tests/service/test_openapi.py fails if the closed schemas go.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar, Request, Response
from litestar._openapi.schema_generation import SchemaCreator
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.enums import HttpMethod
from litestar.openapi.spec import Schema
from litestar.routes import HTTPRoute
from litestar.status_codes import HTTP_204_NO_CONTENT
from litestar.typing import FieldDefinition


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """litestar's Struct schema, closed (``additionalProperties: false``) where msgspec
    refuses unknown fields."""

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        config = msgspec.inspect.type_info(field_definition.type_)
        if isinstance(config, msgspec.inspect.StructType) and config.forbid_unknown_fields:
            schema.additional_properties = False
        return schema


_ALLOW_KEY = "killswitch.allow"


def _allow_by_path(app: Litestar) -> dict[str, str]:
    # Built once per app from its final routes (after every merge of handlers on a path).
    cached: dict[str, str] | None = app.state.get(_ALLOW_KEY)
    if cached is None:
        cached = {
            route.path_format: ", ".join(sorted(route.methods))
            for route in app.routes
            if isinstance(route, HTTPRoute)
        }
        app.state[_ALLOW_KEY] = cached
    return cached


def options_response(request: Request[Any, Any, Any]) -> Response[None] | None:
    """The automatic OPTIONS answer, with the path's real methods in ``Allow``."""
    # Only litestar's automatic handler: an OPTIONS handler of our own answers for itself.
    if request.method != HttpMethod.OPTIONS or request.route_handler.handler_name != (
        "options_handler"
    ):
        return None
    allow = _allow_by_path(request.app).get(request.scope.get("path_template", ""))
    if allow is None:
        return None
    return Response(None, status_code=HTTP_204_NO_CONTENT, headers={"Allow": allow})


__all__ = ["StrictStructSchemaPlugin", "options_response"]
