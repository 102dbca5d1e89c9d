"""The revocation SSE stream: replay from the database, then follow the hub, with
heartbeats so a guard can tell a quiet stream from a dead one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from litestar.response import ServerSentEventMessage

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
