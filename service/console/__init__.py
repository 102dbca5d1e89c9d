"""The SOC console: server-rendered pages under ``/console/`` for analysts.

What it owns: signing operators in (session cookie, never the token), CSRF on every
form, the pages (live alerts, tasks, agents, panic button, audit log, operators) and the
two cookie-authenticated feeds the alert page reads. What it must never do: hold a rule
of its own. Every change goes through the same domain functions the API calls
(``services.revoker``, ``service.agents``, ``service.alerts``, ``service.operators``), so
the console can do nothing the API could not, and everything it does is audited the
same way. JavaScript and CSS are vendored in ``static/`` (no CDN, no build step).

Modules: ``sessions`` (the session store, CSRF tokens), ``web`` (guard, errors, forms),
``signin``, ``pages`` (GET), ``exports`` (time-range CSV/JSON), ``actions`` (POST),
``render`` (Jinja, security headers).
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

from service.console.actions import ActionsController
from service.console.exports import ExportsController
from service.console.pages import PagesController
from service.console.signin import SignInController
from service.console.web import EXCEPTION_HANDLERS

STATIC_DIR = Path(__file__).parent / "static"


def console_router() -> Router:
    """Everything under ``/console``: pages, forms, feeds and the vendored assets."""
    static = create_static_files_router(
        path="/static",
        directories=[STATIC_DIR],
        name="console-static",
        cache_control=CacheControlHeader(max_age=300, private=True),
        include_in_schema=False,
    )
    return Router(
        path="/console",
        route_handlers=[
            SignInController,
            PagesController,
            ExportsController,
            ActionsController,
            static,
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        include_in_schema=False,
    )


__all__ = ["console_router"]
