"""The SSE streams (revocations, alerts): replay from the database after
``Last-Event-ID``, then follow the process's hub, with heartbeats so a listener can tell a
quiet stream from a dead one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Literal, TypeVar

import msgspec
from litestar.response import ServerSentEventMessage

from service.alerts import AlertMessage
from service.core import Services
from service.kernel.events import RevocationEvent, encoder
from service.propagation import Hub
from service.storage import repository as repo

T = TypeVar("T")

HEARTBEAT_SECONDS = 2.0
_REPLAY_PAGE = 1000


class RevocationStreamEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event of ``GET /v1/revocations/stream`` as a client parses it (WHATWG HTML
    §9.2): ``data`` is RevocationEvent JSON, or ``{"at": …}`` for a heartbeat. A
    heartbeat has no id of its own (a parser keeps the last one)."""

    event: Literal["revocation", "heartbeat"]
    data: str
    id: str | None = None


class AlertStreamEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event of ``GET /v1/alerts/stream`` as a client parses it: ``data`` is AlertView
    JSON (``alert``, ``ack``) or ``{"at": …}`` (``heartbeat``); ``ack`` and ``heartbeat``
    have no id of their own."""

    event: Literal["alert", "ack", "heartbeat"]
    data: str
    id: str | None = None


async def _replay_then_follow(
    services: Services,
    hub: Hub[T],
    after_seq: int,
    page: Callable[[int], Awaitable[Sequence[T]]],
    seq_of: Callable[[T], int | None],
    message: Callable[[T], ServerSentEventMessage],
) -> AsyncIterator[ServerSentEventMessage]:
    """Items after ``after_seq`` read a page at a time with ``page(after)``, a heartbeat,
    then the hub's live items (``seq_of`` None: not a position, always sent)."""
    # Subscribe before replaying, so nothing committed during the replay slips between.
    sub = hub.subscribe()
    try:
        last = after_seq
        replayed: set[int] = set()
        while True:
            items = await page(last)
            for item in items:
                seq = seq_of(item)
                if seq is not None:
                    last = seq
                    replayed.add(seq)
                yield message(item)
            if len(items) < _REPLAY_PAGE:
                break
        yield _heartbeat(services)
        while not sub.overflowed:
            try:
                item = await asyncio.wait_for(sub.queue.get(), timeout=HEARTBEAT_SECONDS)
            except TimeoutError:
                yield _heartbeat(services)
                continue
            # Live items are sent in commit order; only the replay overlap is skipped.
            seq = seq_of(item)
            if seq is None or (seq not in replayed and seq > after_seq):
                yield message(item)
    finally:
        with contextlib.suppress(Exception):
            hub.unsubscribe(sub)


def _heartbeat(services: Services) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=f'{{"at": {services.clock.now():.3f}}}', event="heartbeat")


def _revocation_message(event: RevocationEvent) -> ServerSentEventMessage:
    return ServerSentEventMessage(
        data=encoder.encode(event).decode(), event="revocation", id=str(event.seq)
    )


def revocation_stream(services: Services, after_seq: int) -> AsyncIterator[ServerSentEventMessage]:
    """Revocations committed after ``after_seq`` (replayed), then live ones."""

    async def page(after: int) -> list[RevocationEvent]:
        return await repo.revocation_events(services.db, after_seq=after, limit=_REPLAY_PAGE)

    return _replay_then_follow(
        services, services.hub, after_seq, page, lambda e: e.seq, _revocation_message
    )


def _alert_seq(message: AlertMessage) -> int | None:
    # An ack is not a position in the alert sequence: it is always sent live.
    return None if message.kind == "ack" else message.alert.seq


def _alert_message(message: AlertMessage) -> ServerSentEventMessage:
    data = encoder.encode(message.alert).decode()
    if message.kind == "ack":
        # No id: an ack is not a position in the alert sequence, resuming never skips one.
        return ServerSentEventMessage(data=data, event="ack")
    return ServerSentEventMessage(data=data, event="alert", id=str(message.alert.seq))


def alert_stream(services: Services, after_seq: int) -> AsyncIterator[ServerSentEventMessage]:
    """Alerts stored after ``after_seq`` (replayed), then live alerts and acks."""

    async def page(after: int) -> list[AlertMessage]:
        alerts = await repo.alerts_after(services.db, after_seq=after, limit=_REPLAY_PAGE)
        return [AlertMessage("alert", alert) for alert in alerts]

    return _replay_then_follow(
        services, services.alert_hub, after_seq, page, _alert_seq, _alert_message
    )
