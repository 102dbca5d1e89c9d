"""Offset commits: a batch's offsets are committed only once its actions are durable, in
the background (the next batch does not wait for the commit), and a graceful stop commits
what is durable before the consumer leaves the group."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from detectors.consumer import Detector
from service import kafka
from tests.detectors.rig import Rig, wait_for

pytestmark = [pytest.mark.tansu, pytest.mark.asyncio(loop_scope="module")]


class HoldingProxy:
    """A TCP proxy in front of the service that holds every request until ``release``."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self.release = asyncio.Event()
        self.held = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        for pipe in self._pipes:
            pipe.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        for pipe in (self._pipe(reader, up_writer, hold=True), self._pipe(up_reader, writer)):
            task = asyncio.create_task(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, hold: bool = False
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if hold and not self.release.is_set():
                    self.held += 1
                    await self.release.wait()
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


@contextlib.asynccontextmanager
async def running(rig: Rig, service_url: str, **overrides: Any) -> AsyncIterator[Detector]:
    settings = dataclasses.replace(rig.settings, **overrides)
    det = Detector(settings, service_url=service_url, token=rig.detector_token)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(det.run(stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        yield det
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def committed(rig: Rig, metadata: RecordMetadata) -> int:
    """The detector group's committed offset for ``metadata``'s partition, read from Kafka."""
    consumer = kafka.consumer(
        rig.settings, client_id="test-committed", group_id=rig.settings.detector_group_id
    )
    await consumer.start()
    try:
        tp = TopicPartition(rig.settings.kafka_usage_topic, metadata.partition)
        offset: int | None = await consumer.committed(tp)
        return -1 if offset is None else offset
    finally:
        await consumer.stop()


async def test_offsets_wait_for_the_revocation_to_be_durable(rig: Rig) -> None:
    proxy = HoldingProxy(rig.service_url)
    url = await proxy.start()
    try:
        task = await rig.open_task()
        async with running(rig, url) as det:
            await rig.known(det, task)
            violation = await rig.produce(rig.usage(task, resource="tool/elsewhere"))
            await wait_for(lambda: proxy.held, what="the revocation to reach the proxy")
            await asyncio.sleep(0.5)  # ample time for an early commit to show
            assert await committed(rig, violation) <= violation.offset
            assert await rig.revocations_of(task.task_id) == []
            proxy.release.set()
            await rig.processed(det, violation)
            assert len(await rig.revocations_of(task.task_id)) == 1
            assert await committed(rig, violation) > violation.offset
    finally:
        await proxy.close()


async def test_commits_run_behind_the_loop_and_a_stop_flushes_them(rig: Rig) -> None:
    first, second = await rig.open_task(), await rig.open_task()
    async with running(
        rig,
        rig.service_url,
        detector_test_pause_before_commit_ms=1500,
        detector_shutdown_grace_s=10,
    ) as det:
        await rig.known(det, first)
        await rig.known(det, second)
        one = await rig.produce(rig.usage(first, resource="tool/elsewhere"))
        await rig.alert(first, "scope.out_of_scope")
        # The first batch's commit is paused; the next batch is decided meanwhile.
        two = await rig.produce(rig.usage(second, resource="tool/elsewhere"))
        await rig.alert(second, "scope.out_of_scope")
        assert det.processed == {}
    # The stop waited for the paused commit and committed both batches.
    assert await committed(rig, one) > one.offset
    assert await committed(rig, two) > two.offset
