"""Time-range search and export: the alerts and the audit log between ``from`` and ``to``,
streamed as CSV or JSON with the session cookie.

Exports read exactly what the pages read, behind the same guard and role (every signed-in
operator may read both), and page through the database so an export of a long range is
streamed rather than held in memory. What this module must never do: change anything, or
export what the pages would not show (tokens, secrets: the store holds only hashes).

``from``/``to`` are ISO 8601 times (``2026-12-02T14:00``, with or without seconds and
offset; no offset means UTC, as the pages label their times) or epoch seconds. The range
is half-open, ``[from, to)``; either end may be left out.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any

import msgspec
from litestar import Controller, get
from litestar.di import Provide
from litestar.params import QueryParameter
from litestar.response import Stream

from service.api.deps import ServicesDep
from service.console.render import SECURITY_HEADERS
from service.console.web import UserDep, provide_user, session_guard
from service.contracts import AlertView, AuditEntry
from service.kernel.errors import ClientError
from service.storage import repository as repo
from service.storage.database import Database

PAGE = 500
EXPORT_CAP = 100_000
"""The most rows one export carries; narrow the range for more."""

From = Annotated[str | None, QueryParameter(name="from", max_length=40, required=False)]
To = Annotated[str | None, QueryParameter(name="to", max_length=40, required=False)]

ALERT_COLUMNS = (
    "seq",
    "alert_id",
    "at",
    "severity",
    "rule",
    "score",
    "agent_id",
    "task_id",
    "action",
    "summary",
    "evidence",
    "received_at",
    "acked_at",
    "acked_by",
    "ack_note",
)
AUDIT_COLUMNS = ("seq", "at", "actor", "action", "subject", "detail")


def parse_time(value: str | None, name: str) -> float | None:
    """An ISO 8601 time (UTC unless it says otherwise) or epoch seconds; None if blank."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ClientError(
            f"{name!r} is not a time: use ISO 8601 (2026-12-02T14:00) or epoch seconds"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def time_range(start: str | None, end: str | None) -> tuple[float | None, float | None]:
    since, until = parse_time(start, "from"), parse_time(end, "to")
    if since is not None and until is not None and until <= since:
        raise ClientError("'to' must be after 'from'")
    return since, until


def _iso(value: float | None) -> str:
    return "" if value is None else dt.datetime.fromtimestamp(value, tz=dt.UTC).isoformat()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def alert_row(a: AlertView) -> dict[str, Any]:
    summary = a.evidence.get("summary")
    return {
        "seq": a.seq,
        "alert_id": a.alert_id,
        "at": _iso(a.at),
        "severity": a.severity.value,
        "rule": a.rule,
        "score": a.score,
        "agent_id": a.agent_id,
        "task_id": a.task_id,
        "action": a.action,
        "summary": summary if isinstance(summary, str) else "",
        "evidence": a.evidence,
        "received_at": _iso(a.received_at),
        "acked_at": _iso(a.acked_at),
        "acked_by": a.acked_by,
        "ack_note": a.ack_note,
    }


def audit_row(e: AuditEntry) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "at": _iso(e.at),
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "detail": e.detail,
    }


async def _alerts(db: Database, since: float | None, until: float | None) -> AsyncIterator[Any]:
    """Newest first, as the alert page lists them."""
    before: int | None = None
    sent = 0
    while sent < EXPORT_CAP:
        batch = await repo.list_alerts(
            db, since=since, until=until, before_seq=before, limit=min(PAGE, EXPORT_CAP - sent)
        )
        for item in batch:
            yield alert_row(item)
        sent += len(batch)
        if len(batch) < PAGE:
            return
        before = batch[-1].seq


async def _audit(db: Database, since: float | None, until: float | None) -> AsyncIterator[Any]:
    """Oldest first, the order the log was written in."""
    after = 0
    sent = 0
    while sent < EXPORT_CAP:
        batch = await repo.audit_between(
            db, since=since, until=until, after_seq=after, limit=min(PAGE, EXPORT_CAP - sent)
        )
        for item in batch:
            yield audit_row(item)
        sent += len(batch)
        if len(batch) < PAGE:
            return
        after = batch[-1].seq


def _csv_line(values: Iterable[Any]) -> str:
    out = io.StringIO()
    cells = [_json(v) if isinstance(v, dict | list) else ("" if v is None else v) for v in values]
    csv.writer(out, lineterminator="\r\n").writerow(cells)
    return out.getvalue()


async def _as_csv(
    rows: AsyncIterator[dict[str, Any]], columns: tuple[str, ...]
) -> AsyncIterator[str]:
    yield _csv_line(columns)
    async for row in rows:
        yield _csv_line(row[c] for c in columns)


async def _as_json(rows: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    # One JSON array, written element by element.
    yield b"["
    first = True
    async for row in rows:
        yield (b"" if first else b",\n") + msgspec.json.encode(row)
        first = False
    yield b"]\n"


def _stream(content: Any, media_type: str, filename: str) -> Stream:
    return Stream(
        content,
        media_type=media_type,
        headers={
            **SECURITY_HEADERS,
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )


def _name(kind: str, since: float | None, until: float | None, ext: str) -> str:
    def part(v: float | None) -> str:
        if v is None:
            return "open"
        return dt.datetime.fromtimestamp(v, tz=dt.UTC).strftime("%Y%m%dT%H%M%SZ")

    return f"killswitch-{kind}-{part(since)}-{part(until)}.{ext}"


class ExportsController(Controller):
    path = "/"
    include_in_schema = False
    guards = [session_guard]
    dependencies = {"user": Provide(provide_user, sync_to_thread=False)}

    @get("/alerts/export.csv", operation_id="consoleAlertsCsv", summary="Alerts in a range, CSV")
    async def alerts_csv(
        self,
        user: UserDep,
        services: ServicesDep,
        start: From = None,
        end: To = None,
    ) -> Stream:
        since, until = time_range(start, end)
        rows = _as_csv(_alerts(services.db, since, until), ALERT_COLUMNS)
        return _stream(rows, "text/csv; charset=utf-8", _name("alerts", since, until, "csv"))

    @get("/alerts/export.json", operation_id="consoleAlertsJson", summary="Alerts, JSON")
    async def alerts_json(
        self,
        user: UserDep,
        services: ServicesDep,
        start: From = None,
        end: To = None,
    ) -> Stream:
        since, until = time_range(start, end)
        rows = _as_json(_alerts(services.db, since, until))
        return _stream(rows, "application/json", _name("alerts", since, until, "json"))

    @get("/audit/export.csv", operation_id="consoleAuditCsv", summary="Audit log in a range, CSV")
    async def audit_csv(
        self,
        user: UserDep,
        services: ServicesDep,
        start: From = None,
        end: To = None,
    ) -> Stream:
        since, until = time_range(start, end)
        rows = _as_csv(_audit(services.db, since, until), AUDIT_COLUMNS)
        return _stream(rows, "text/csv; charset=utf-8", _name("audit", since, until, "csv"))

    @get("/audit/export.json", operation_id="consoleAuditJson", summary="Audit log, JSON")
    async def audit_json(
        self,
        user: UserDep,
        services: ServicesDep,
        start: From = None,
        end: To = None,
    ) -> Stream:
        since, until = time_range(start, end)
        rows = _as_json(_audit(services.db, since, until))
        return _stream(rows, "application/json", _name("audit", since, until, "json"))
