"""Server-side rendering for the console: one Jinja environment, strict and autoescaped.

Every page goes out with headers that keep it to itself: a Content-Security-Policy with
no inline script or style and no third-party origin (the JavaScript and CSS are vendored
under ``static/``), no framing, no referrer, no caching of pages that show operators'
data.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from litestar import MediaType, Response

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _timestamp(value: float | None) -> str:
    if value is None:
        return "—"
    moment = dt.datetime.fromtimestamp(float(value), tz=dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _iso(value: float | None) -> str:
    if value is None:
        return ""
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC).isoformat()


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), sort_keys=True, default=str)


_env = Environment(
    loader=PackageLoader("service.console", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["ts"] = _timestamp
_env.filters["iso"] = _iso
_env.filters["compact_json"] = _compact_json


def render(
    template: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response[str]:
    html = _env.get_template(template).render(**context)
    return Response(
        html,
        status_code=status_code,
        media_type=MediaType.HTML,
        headers={**SECURITY_HEADERS, **(headers or {})},
    )
