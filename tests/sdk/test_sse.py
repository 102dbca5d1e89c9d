"""The SSE revocation feed over real sockets: a stand-in server speaking the documented
format (to control replay, drops and silence), and the real ``/v1/revocations/stream``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from service.kernel.events import RevocationEvent, encoder
from service.kernel.tokens import jti_hash
from service.sdk import Guard, Outcome, SseRevocationFeed
from tests.sdk.conftest import Service, eventually, revocation
from tests.support.harness import AUD

TOOL = "tool/invoices.read"


class StandInStream:
    """A raw asyncio HTTP/1.1 server emitting the SSE format of the service."""

    def __init__(self, heartbeat: float = 0.1, pace: float = 0.0) -> None:
        self.events: list[RevocationEvent] = []
        self.heartbeat = heartbeat
        self.pace = pace
        self.silent = False
        self.requests: list[dict[str, str]] = []
        self._queues: list[asyncio.Queue[RevocationEvent]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> StandInStream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.drop()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def publish(self, event: RevocationEvent) -> None:
        self.events.append(event)
        for queue in self._queues:
            queue.put_nowait(event)

    def drop(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        headers: dict[str, str] = {"_line": request_line.decode().strip()}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        self.requests.append(headers)
        if headers.get("authorization") != "Bearer rs-token":
            writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        self._writers.append(writer)
        queue: asyncio.Queue[RevocationEvent] = asyncio.Queue()
        self._queues.append(queue)
        after = int(headers.get("last-event-id", "0"))
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\nconnection: close\r\n\r\n: hello\r\n\r\n"
            )
            for event in [e for e in self.events if e.seq > after]:
                writer.write(self._frame(event))
                if self.pace:
                    await writer.drain()
                    await asyncio.sleep(self.pace)
                while not queue.empty():
                    queue.get_nowait()  # already in the replay
            self._beat(writer)
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), self.heartbeat)
                    writer.write(self._frame(event))
                except TimeoutError:
                    if not self.silent:
                        self._beat(writer)
                await writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self._queues.remove(queue)
            writer.close()

    @staticmethod
    def _frame(event: RevocationEvent) -> bytes:
        return (
            f"id: {event.seq}\r\nevent: revocation\r\ndata: ".encode()
            + encoder.encode(event)
            + b"\r\n\r\n"
        )

    def _beat(self, writer: asyncio.StreamWriter) -> None:
        writer.write(f'event: heartbeat\ndata: {{"at": {time.time():.3f}}}\n\n'.encode())


@contextlib.asynccontextmanager
async def sse_guard(
    service: Service, stream_url: str, token: str = "rs-token", **kwargs: object
) -> AsyncIterator[Guard]:
    feed = SseRevocationFeed(stream_url, token, max_backoff=0.2)
    guard = Guard(service.url, AUD, feed, **kwargs)  # type: ignore[arg-type]
    async with guard:
        yield guard


async def test_replay_completes_before_ready_then_live(service: Service) -> None:
    issued = await service.open_task()
    token = issued["access_token"]
    async with StandInStream(pace=0.002) as stream:
        for i in range(150):
            stream.publish(revocation("credential", jti_hash=jti_hash(f"x{i}")))
        stream.publish(revocation("task", task_ids=[issued["task"]["id"]]))
        async with sse_guard(service, stream.url) as guard:
            feed = guard.feed
            async with asyncio.timeout(10):
                await feed.ready.wait()
            assert feed.state.applied == 151  # the instant ready is set
            assert feed.state.last_seq == stream.events[-1].seq
            assert guard.check_sync(token, "call", TOOL).reason == "task revoked"
            other = await service.open_task()
            assert guard.check_sync(other["access_token"], "call", TOOL).allowed
            stream.publish(revocation("credential", jti_hash=jti_hash(other["jti"])))
            await eventually(
                lambda: not guard.check_sync(other["access_token"], "call", TOOL).allowed, within=5
            )
            assert guard.check_sync(other["access_token"], "call", TOOL).reason == (
                "credential revoked"
            )


async def test_reconnects_with_last_event_id_and_misses_nothing(service: Service) -> None:
    async with StandInStream() as stream:
        stream.publish(revocation("credential", jti_hash=jti_hash("a")))
        async with sse_guard(service, stream.url) as guard:
            feed = guard.feed
            assert isinstance(feed, SseRevocationFeed)
            async with asyncio.timeout(10):
                await feed.ready.wait()
            seen = stream.events[-1].seq
            stream.drop()
            missed = revocation("task", task_ids=["t-missed"])
            stream.events.append(missed)  # committed while the guard was away
            await eventually(lambda: "t-missed" in feed.state.closed_tasks, within=5)
            assert stream.requests[-1]["last-event-id"] == str(seen)
            assert "last-event-id" not in stream.requests[0]
            assert stream.requests[-1]["accept"] == "text/event-stream"
            assert feed.connects == 2


async def test_silent_stream_goes_stale_and_fails_closed(service: Service) -> None:
    token = (await service.open_task())["access_token"]
    async with (
        StandInStream(heartbeat=0.05) as stream,
        sse_guard(service, stream.url, max_staleness=0.4) as guard,
    ):
        async with asyncio.timeout(10):
            await guard.wait_ready()
        await asyncio.sleep(0.5)  # heartbeats keep a quiet stream fresh
        assert guard.check_sync(token, "call", TOOL).allowed
        stream.silent = True
        start = time.monotonic()
        await eventually(lambda: not guard.check_sync(token, "call", TOOL).allowed, within=5)
        assert time.monotonic() - start >= 0.25
        verdict = guard.check_sync(token, "call", TOOL)
        assert (verdict.reason, verdict.outcome) == ("revocation feed stale", Outcome.UNAVAILABLE)
        stream.silent = False  # heartbeats again: fresh again
        await eventually(lambda: guard.check_sync(token, "call", TOOL).allowed, within=5)


async def test_refused_stream_never_becomes_ready(service: Service) -> None:
    token = (await service.open_task())["access_token"]
    async with (
        StandInStream() as stream,
        sse_guard(service, stream.url, token="wrong") as guard,
    ):
        await asyncio.sleep(0.5)
        feed = guard.feed
        assert isinstance(feed, SseRevocationFeed)
        assert feed.errors >= 2  # retried with backoff
        verdict = guard.check_sync(token, "call", TOOL)
        assert verdict.reason == "revocation feed not ready"


async def test_real_service_stream(service: Service) -> None:
    rs_token = await service.operator("resource_server", AUD)
    issued = await service.open_task()
    earlier = await service.open_task()
    await service.admin_post(
        "/v1/revocations",
        {"target": {"type": "task", "task_id": earlier["task"]["id"]}, "reason": "before start"},
    )
    feed = SseRevocationFeed(service.url, rs_token)
    async with Guard(service.url, AUD, feed) as guard:
        async with asyncio.timeout(10):
            await guard.wait_ready()
        assert guard.check_sync(earlier["access_token"], "call", TOOL).reason == "task revoked"
        assert guard.check_sync(issued["access_token"], "call", TOOL).allowed
        start = time.monotonic()
        await service.admin_post(
            "/v1/revocations",
            {"target": {"type": "credential", "jti": issued["jti"]}, "reason": "pytest"},
        )
        await eventually(
            lambda: not guard.check_sync(issued["access_token"], "call", TOOL).allowed, within=5
        )
        took = time.monotonic() - start
        verdict = guard.check_sync(issued["access_token"], "call", TOOL)
        assert verdict.reason == "credential revoked"
        assert took < 2, took


@pytest.mark.parametrize("role", ["viewer", "resource_server"])
async def test_real_service_accepts_stream_roles(service: Service, role: str) -> None:
    token = await service.operator(role, AUD if role == "resource_server" else None)
    feed = SseRevocationFeed(service.url, token)
    await feed.start()
    try:
        async with asyncio.timeout(10):
            await feed.ready.wait()
    finally:
        await feed.stop()
