"""The console's edge plumbing: who is signed in, CSRF checks, form fields, error pages.

Errors the console adds to the tree (service/kernel/errors.py), both mapped here to HTML pages
rather than problem+json, because a browser shows them::

    AuthenticationError
    └── SignInRequired       no (live) console session: GET pages redirect to sign-in
    PermissionDenied
    └── CsrfRejected         a form without the session's CSRF token (403)

A console request is authenticated by :func:`session_guard` alone: the session cookie
maps to a server-side :class:`~service.console.sessions.Session`, and the operator is
re-read from the database by the token hash on every request, so a disabled operator is
signed out at once. The ``Authorization`` header is never consulted here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.params import SkipValidation
from litestar.response import Redirect

from service.auth import ACK, ADMIN, READ, REVOKE
from service.console.render import SECURITY_HEADERS, render
from service.console.sessions import COOKIE_PATH, SESSION_COOKIE, Session, SessionStore
from service.contracts import Role
from service.core import Services
from service.kernel.errors import AuthenticationError, KillSwitchError, PermissionDenied
from service.storage import repository as repo

log = logging.getLogger("killswitch.console")

_STATE_KEY = "console_sessions"


class SignInRequired(AuthenticationError):
    # Same problem type as its parent: the console renders it as a page, never as JSON.
    title = "Sign in required"


class CsrfRejected(PermissionDenied):
    title = "Form refused"


def session_store(state: State) -> SessionStore:
    """The process's console sessions, created with the first console request."""
    store = state.get(_STATE_KEY)
    if store is None:
        store = SessionStore()
        state[_STATE_KEY] = store
    assert isinstance(store, SessionStore)
    return store


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """The signed-in operator, as every console page and form sees it."""

    sid: str
    session: Session
    operator: str
    role: Role

    @property
    def actor(self) -> str:
        # The same spelling the API uses (Principal.actor), so audit entries line up.
        return f"operator:{self.operator}"

    @property
    def can_revoke(self) -> bool:
        return self.role in REVOKE

    @property
    def can_ack(self) -> bool:
        return self.role in ACK

    @property
    def is_admin(self) -> bool:
        return self.role in ADMIN

    def require(self, roles: frozenset[Role], what: str) -> None:
        if self.role not in roles:
            raise PermissionDenied(f"your role ({self.role.value}) may not {what}")


async def session_guard(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
) -> None:
    services: Services = connection.app.state.services
    store = session_store(connection.app.state)
    sid = connection.cookies.get(SESSION_COOKIE)
    session = store.get(sid, services.clock.now())
    if sid is None or session is None:
        raise SignInRequired("sign in to use the console")
    operator = await repo.operator_by_token_hash(services.db, session.token_hash)
    if operator is None or operator.role not in READ:
        store.close(sid)
        raise SignInRequired("your operator token was disabled; sign in again")
    connection.state.console_user = ConsoleUser(
        sid=sid, session=session, operator=operator.name, role=operator.role
    )


def provide_user(request: Request[Any, Any, Any]) -> ConsoleUser:
    user: ConsoleUser = request.state.console_user
    return user


UserDep = NamedDependency[SkipValidation[ConsoleUser]]


# --------------------------------------------------------------------------- forms


async def form_of(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The urlencoded (or multipart) form as plain strings; file parts are ignored."""
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def check_csrf(user: ConsoleUser, form: dict[str, str]) -> None:
    if not user.session.csrf_ok(form.get("csrf_token")):
        raise CsrfRejected("the form's CSRF token is missing or wrong; reload the page and retry")


def page(
    request: Request[Any, Any, Any],
    user: ConsoleUser,
    template: str,
    nav: str,
    *,
    status_code: int = 200,
    **context: Any,
) -> Response[str]:
    return render(
        template,
        {
            "user": user,
            "csrf": user.session.csrf,
            "flashes": user.session.take_flashes(),
            "nav": nav,
            "request_path": request.url.path,
            **context,
        },
        status_code=status_code,
    )


def see_other(path: str) -> Redirect:
    return Redirect(path, status_code=303, headers=dict(SECURITY_HEADERS))


def safe_next(value: str | None) -> str:
    """Only a console path may follow sign-in (no open redirect)."""
    if value and value.startswith("/console/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/alerts"


def is_https(request: Request[Any, Any, Any]) -> bool:
    return request.url.scheme == "https"


def clear_session_cookie(response: Response[Any], request: Request[Any, Any, Any]) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        "",
        path=COOKIE_PATH,
        max_age=0,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


# --------------------------------------------------------------------------- errors


def _error_page(
    request: Request[Any, Any, Any], status: int, title: str, detail: str
) -> Response[str]:
    user: ConsoleUser | None = getattr(request.state, "console_user", None)
    return render(
        "error.html",
        {
            "user": user,
            "csrf": user.session.csrf if user else "",
            "flashes": [],
            "nav": "",
            "status": status,
            "title": title,
            "detail": detail,
        },
        status_code=status,
    )


def _wants_html(request: Request[Any, Any, Any]) -> bool:
    accept = request.headers.get("accept", "")
    return (
        request.method == "GET"
        and "text/event-stream" not in accept
        and ("text/html" in accept or "*/*" in accept or not accept)
    )


def handle_sign_in_required(request: Request[Any, Any, Any], exc: SignInRequired) -> Response[Any]:
    if _wants_html(request) and not request.url.path.endswith(("/stream", "/timeline")):
        target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        response: Response[Any] = see_other(f"/console/login?next={target}")
    else:
        response = _error_page(request, 401, exc.title, exc.detail)
    clear_session_cookie(response, request)
    return response


def handle_domain_error(request: Request[Any, Any, Any], exc: KillSwitchError) -> Response[str]:
    if exc.status >= 500:
        log.exception("console: internal error on %s %s", request.method, request.url.path)
        return _error_page(request, 500, "Internal error", "the server failed; it has been logged")
    return _error_page(request, exc.status, exc.title, exc.detail)


def handle_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[str]:
    if isinstance(exc, NotFoundException):
        return _error_page(request, 404, "Not found", "no such page")
    if isinstance(exc, ValidationException):
        return _error_page(request, 400, "Bad request", "a parameter of this page is invalid")
    if exc.status_code >= 500:
        log.error("console: HTTP %s on %s", exc.status_code, request.url.path)
    return _error_page(request, exc.status_code, "Request refused", str(exc.detail))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    log.exception("console: unhandled error on %s %s", request.method, request.url.path)
    return _error_page(request, 500, "Internal error", "the server failed; it has been logged")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    SignInRequired: handle_sign_in_required,
    KillSwitchError: handle_domain_error,
    HTTPException: handle_http_error,
    Exception: handle_unexpected,
}
