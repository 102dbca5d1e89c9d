"""The one place domain errors become HTTP: RFC 9457 problem details.

Every error response is ``application/problem+json`` with ``type``, ``title``,
``status``, ``detail`` and ``instance``; domain errors add their ``extra`` members
(e.g. ``offending`` grants on a scope violation, ``errors`` on validation failures).
Unexpected exceptions become a 500 whose body says nothing about the internals; the
traceback goes to the log (never a request body or Authorization header).
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from service.kernel.errors import (
    PROBLEM_TYPE_PREFIX,
    AuthenticationError,
    DPoPProofRejected,
    KillSwitchError,
    TokenRejected,
)

log = logging.getLogger("killswitch.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = PROBLEM_TYPE_PREFIX

_HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthenticated", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    429: ("too-many-requests", "Too many requests"),
}


def problem(
    request: Request[Any, Any, Any],
    *,
    status: int,
    slug: str,
    title: str,
    detail: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if extra:
        body.update(extra)
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _challenge(exc: KillSwitchError) -> dict[str, str] | None:
    if isinstance(exc, DPoPProofRejected):
        # RFC 9449 §7.1: the DPoP scheme's challenge, with the algorithms we accept.
        return {
            "WWW-Authenticate": 'DPoP realm="killswitch", algs="EdDSA ES256", '
            'error="invalid_dpop_proof"'
        }
    if isinstance(exc, AuthenticationError | TokenRejected):
        return {"WWW-Authenticate": 'Bearer realm="killswitch", Basic realm="killswitch"'}
    return None


def handle_domain_error(
    request: Request[Any, Any, Any], exc: KillSwitchError
) -> Response[dict[str, Any]]:
    if exc.status >= 500:
        log.exception("internal error on %s %s", request.method, request.url.path)
    return problem(
        request,
        status=exc.status,
        slug=exc.type_slug,
        title=exc.title,
        detail=exc.detail,
        extra=exc.extra,
        headers=_challenge(exc),
    )


def handle_http_error(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[dict[str, Any]]:
    status = exc.status_code
    slug, title = _HTTP_SLUGS.get(status, ("http-error", "HTTP error"))
    extra: dict[str, Any] = {}
    if isinstance(exc, ValidationException):
        slug, title = "validation-error", "Request validation failed"
        extra["errors"] = exc.extra if isinstance(exc.extra, list) else [exc.extra]
    if status >= 500:
        log.error("HTTP %s on %s %s: %s", status, request.method, request.url.path, exc.detail)
    return problem(
        request,
        status=status,
        slug=slug,
        title=title,
        detail=str(exc.detail),
        extra=extra,
        headers=exc.headers,
    )


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(
        request,
        status=HTTP_500_INTERNAL_SERVER_ERROR,
        slug="internal-error",
        title="Internal error",
        detail="the server failed to handle this request; it has been logged",
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    KillSwitchError: handle_domain_error,
    HTTPException: handle_http_error,
    Exception: handle_unexpected,
}

__all__ = ["EXCEPTION_HANDLERS", "PROBLEM_JSON", "MediaType", "problem"]
