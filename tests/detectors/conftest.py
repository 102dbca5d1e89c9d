"""Fixtures for the detector tests: one embedded tansu broker and one real
``killswitch serve`` per module (both subprocesses), a rig over fresh topics, and an
in-process detector running against them."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from detectors.consumer import Detector
from service import kafka
from service.brokers import BrokerProcess, start_tansu
from tests.detectors.rig import Rig, collect, create_operator, rig_settings
from tests.support.serve import Served, serve


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tansu: runs against the embedded tansu broker")


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with start_tansu() as b:
        yield b


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root: Path = tmp_path_factory.mktemp("detector-service")
    token = "kso_" + secrets.token_urlsafe(32)
    with serve(root / "data", f"sqlite:///{root / 'killswitch.db'}", admin_token=token) as served:
        yield served


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(broker: BrokerProcess, service: Served) -> AsyncIterator[Rig]:
    settings = rig_settings(broker.bootstrap)
    await kafka.ensure_topics(settings)
    assert service.admin_token is not None
    async with httpx.AsyncClient(
        base_url=service.url,
        headers={"Authorization": f"Bearer {service.admin_token}"},
        timeout=10,
    ) as http:
        detector_token = await create_operator(http, "detector")
        producer = kafka.producer(settings, "test-producer")
        await producer.start()
        rig = Rig(
            settings=settings,
            service_url=service.url,
            admin_token=service.admin_token,
            detector_token=detector_token,
            http=http,
            producer=producer,
        )
        stop = asyncio.Event()
        collector = asyncio.create_task(collect(settings, rig, stop))
        try:
            yield rig
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await collector
            await producer.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def detector(rig: Rig) -> AsyncIterator[Detector]:
    det = Detector(rig.settings, service_url=rig.service_url, token=rig.detector_token)
    stop, ready = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(det.run(stop, ready))
    waiting = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({running, waiting}, timeout=30, return_when="FIRST_COMPLETED")
    if running in done:
        running.result()  # raises the detector's error
    assert waiting in done, "detector not ready within 30 s"
    yield det
    stop.set()
    await asyncio.wait_for(running, timeout=20)
