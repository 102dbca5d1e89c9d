"""Signing in and out of the console.

``GET /console/login`` sets a pre-session nonce cookie and renders a form carrying an HMAC
of it (login CSRF: another site cannot sign a browser in as someone else). ``POST
/console/login`` checks that pair, then the operator token — once; only its SHA-256 is
kept in the new session, whose random id goes to the browser in an HttpOnly,
SameSite=Strict cookie (Secure over https). ``POST /console/logout`` needs the session's
CSRF token like every other form.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.params import QueryParameter

from service.api.deps import ServicesDep
from service.auth import READ
from service.console.render import render
from service.console.sessions import COOKIE_PATH, LOGIN_COOKIE, SESSION_COOKIE
from service.console.web import (
    CsrfRejected,
    clear_session_cookie,
    form_of,
    is_https,
    safe_next,
    see_other,
    session_store,
)
from service.kernel.errors import PermissionDenied
from service.secrets_ import OPERATOR_TOKEN_PREFIX, hash_secret
from service.storage import repository as repo

LOGIN_NONCE_SECONDS = 3600


def _login_page(
    request: Request[Any, Any, Any],
    *,
    next_path: str,
    error: str | None = None,
    notice: str | None = None,
    status_code: int = 200,
) -> Response[str]:
    store = session_store(request.app.state)
    nonce = request.cookies.get(LOGIN_COOKIE) or store.new_login_nonce()
    response = render(
        "login.html",
        {
            "login_csrf": store.login_token(nonce),
            "next": next_path,
            "error": error,
            "notice": notice,
        },
        status_code=status_code,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        path=COOKIE_PATH,
        max_age=LOGIN_NONCE_SECONDS,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )
    return response


class SignInController(Controller):
    path = "/"
    include_in_schema = False

    @get("/", operation_id="consoleHome", summary="The console's front door")
    async def home(self) -> Response[Any]:
        return see_other("/console/alerts")

    @get("/login", operation_id="consoleLoginPage", summary="Sign-in form")
    async def login_page(
        self,
        request: Request[Any, Any, Any],
        services: ServicesDep,
        next_path: Annotated[str | None, QueryParameter(name="next", max_length=2000)] = None,
        signed_out: Annotated[bool, QueryParameter()] = False,
    ) -> Response[Any]:
        store = session_store(request.app.state)
        if store.get(request.cookies.get(SESSION_COOKIE), services.clock.now()) is not None:
            return see_other(safe_next(next_path))
        notice = "You are signed out." if signed_out else None
        return _login_page(request, next_path=safe_next(next_path), notice=notice)

    @post(
        "/login",
        status_code=200,
        operation_id="consoleLogin",
        summary="Sign in with an operator token",
    )
    async def login(self, request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
        form = await form_of(request)
        store = session_store(request.app.state)
        if not store.login_token_ok(request.cookies.get(LOGIN_COOKIE), form.get("csrf_token")):
            raise CsrfRejected("the sign-in form expired or did not come from this console")
        next_path = safe_next(form.get("next"))
        token = form.get("token", "").strip()
        operator = None
        if token.startswith(OPERATOR_TOKEN_PREFIX) and len(token) <= 256:
            operator = await repo.operator_by_token_hash(services.db, hash_secret(token))
        if operator is None:
            services.metrics.auth_failures.labels(kind="console").inc()
            return _login_page(
                request,
                next_path=next_path,
                error="That token is not a valid operator token.",
                status_code=401,
            )
        if operator.role not in READ:
            raise PermissionDenied(
                f"operators with role {operator.role.value} cannot use the console; "
                "sign in as a viewer, analyst or admin"
            )
        now = services.clock.now()
        old = request.cookies.get(SESSION_COOKIE)
        store.close(old)
        sid, session = store.open(
            operator=operator.name, role=operator.role, token_hash=hash_secret(token), now=now
        )
        await repo.append_audit(
            services.db,
            at=now,
            actor=f"operator:{operator.name}",
            action="console.sign_in",
            subject=f"operator:{operator.name}",
            detail={"role": operator.role.value},
        )
        session.flash("ok", f"Signed in as {operator.name} ({operator.role.value}).")
        response = see_other(next_path)
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=is_https(request),
        )
        response.set_cookie(LOGIN_COOKIE, "", path=COOKIE_PATH, max_age=0, httponly=True)
        return response

    @post(
        "/logout",
        status_code=200,
        operation_id="consoleLogout",
        summary="Sign out (CSRF-protected)",
    )
    async def logout(self, request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
        form = await form_of(request)
        store = session_store(request.app.state)
        sid = request.cookies.get(SESSION_COOKIE)
        session = store.get(sid, services.clock.now())
        if session is not None:
            if not session.csrf_ok(form.get("csrf_token")):
                raise CsrfRejected("the sign-out form's CSRF token is missing or wrong")
            store.close(sid)
        response = see_other("/console/login?signed_out=true")
        clear_session_cookie(response, request)
        return response
