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
from markupsafe import Markup

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


def _time_element(value: float | None) -> Markup:
    """A time as pages show it: UTC text in a ``<time data-local>`` element, which
    ``static/console.js`` rewrites into the reader's zone (the UTC text stays as its
    tooltip). Without JavaScript the page still reads, in UTC."""
    if value is None:
        return Markup("—")
    return Markup('<time datetime="{}" data-local>{}</time>').format(_iso(value), _timestamp(value))


def _iso(value: float | None) -> str:
    if value is None:
        return ""
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC).isoformat()


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), sort_keys=True, default=str)


# Evidence keys the detector writes, in the words an analyst reads them. Keys not listed
# are spelled out from snake_case. ``static/evidence.js`` carries the same table for rows
# that arrive live: keep the two in step.
EVIDENCE_LABELS = {
    "event_at": "offending use at",
    "event_id": "usage event",
    "jti_hash": "credential (SHA-256 of jti)",
    "revocation": "revocation outcome",
    "revocation_id": "revocation id",
    "max_rate": "allowed rate (calls/s)",
    "max_calls": "allowed calls",
    "bytes_out": "bytes sent",
    "bytes_in": "bytes received",
    "user_agent": "user agent",
}
# An epoch-seconds value between 2001 and 2286: a number under a time-like key in that
# range is shown as a time, anything else as it is.
_EPOCH_RANGE = (1e9, 1e10)


def _is_time_key(key: str) -> bool:
    return key in ("at", "since", "until", "window_start", "window_end") or key.endswith("_at")


def evidence_label(key: str) -> str:
    return EVIDENCE_LABELS.get(key, key.replace("_", " ").strip())


def evidence_items(evidence: dict[str, Any]) -> list[dict[str, str]]:
    """Evidence other than its summary, as (label, value, ISO time or "") rows, in key
    order, so the page shows the detector's facts as facts rather than raw JSON."""
    items = []
    for key in sorted(evidence):
        if key == "summary":
            continue
        value = evidence[key]
        iso = ""
        if (
            _is_time_key(key)
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and _EPOCH_RANGE[0] <= value < _EPOCH_RANGE[1]
        ):
            iso = _iso(value)
            text = _timestamp(value)
        elif isinstance(value, str):
            text = value
        else:
            text = _compact_json(value)
        items.append({"key": key, "label": evidence_label(key), "value": text, "iso": iso})
    return items


def evidence_summary(evidence: dict[str, Any]) -> str:
    summary = evidence.get("summary")
    return summary if isinstance(summary, str) else ""


_env = Environment(
    loader=PackageLoader("service.console", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["ts"] = _time_element
_env.filters["utc"] = _timestamp
_env.filters["iso"] = _iso
_env.filters["compact_json"] = _compact_json
_env.filters["evidence_items"] = evidence_items
_env.filters["evidence_summary"] = evidence_summary


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
