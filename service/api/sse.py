"""The SSE streams (revocations, alerts): replay from the database after
``Last-Event-ID``, then follow the process's hub, with heartbeats so a listener can tell a
quiet stream from a dead one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from litestar.response import ServerSentEventMessage

from service.alerts import AlertMessage
from service.contracts import AlertView
from service.core import Services
from service.events import RevocationEvent, encoder
from service.storage import repository as repo

HEARTBEAT_SECONDS = 2.0
_REPLAY_PAGE = 1000


def _message(event: RevocationEvent) -> ServerSentEventMessage:
    return ServerSentEventMessage(
        data=encoder.encode(event).decode(), event="revocation", id=str(event.seq)
    )


async def revocation_stream(
    services: Services, after_seq: int
) -> AsyncIterator[ServerSentEventMessage]:
    # Subscribe before replaying, so nothing committed during the replay slips between.
    sub = services.hub.subscribe()
    try:
        last = after_seq
        replayed: set[int] = set()
        while True:
            page = await repo.revocation_events(services.db, after_seq=last, limit=_REPLAY_PAGE)
            for event in page:
                last = event.seq
                replayed.add(event.seq)
                yield _message(event)
            if len(page) < _REPLAY_PAGE:
                break
        yield _heartbeat(services)
        while not sub.overflowed:
            try:
                event = await asyncio.wait_for(sub.queue.get(), timeout=HEARTBEAT_SECONDS)
            except TimeoutError:
                yield _heartbeat(services)
                continue
            # Live events are sent in commit order; only the replay overlap is skipped.
            if event.seq not in replayed and event.seq > after_seq:
                yield _message(event)
    finally:
        with contextlib.suppress(Exception):
            services.hub.unsubscribe(sub)


def _heartbeat(services: Services) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=f'{{"at": {services.clock.now():.3f}}}', event="heartbeat")


def _alert_message(message: AlertMessage) -> ServerSentEventMessage:
    data = encoder.encode(message.alert).decode()
    if message.kind == "ack":
        # No id: an ack is not a position in the alert sequence, resuming never skips one.
        return ServerSentEventMessage(data=data, event="ack")
    return ServerSentEventMessage(data=data, event="alert", id=str(message.alert.seq))


async def alert_stream(services: Services, after_seq: int) -> AsyncIterator[ServerSentEventMessage]:
    """Alerts stored after ``after_seq`` (replayed), then live alerts and acks."""
    sub = services.alert_hub.subscribe()
    try:
        last = after_seq
        replayed: set[int] = set()
        while True:
            page: list[AlertView] = await repo.alerts_after(
                services.db, after_seq=last, limit=_REPLAY_PAGE
            )
            for alert in page:
                last = alert.seq
                replayed.add(alert.seq)
                yield _alert_message(AlertMessage("alert", alert))
            if len(page) < _REPLAY_PAGE:
                break
        yield _heartbeat(services)
        while not sub.overflowed:
            try:
                message = await asyncio.wait_for(sub.queue.get(), timeout=HEARTBEAT_SECONDS)
            except TimeoutError:
                yield _heartbeat(services)
                continue
            seq = message.alert.seq
            if message.kind == "ack" or (seq not in replayed and seq > after_seq):
                yield _alert_message(message)
    finally:
        with contextlib.suppress(Exception):
            services.alert_hub.unsubscribe(sub)
