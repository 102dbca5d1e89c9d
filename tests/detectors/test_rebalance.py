"""Two detectors in one group: partitions are split, a rebalance waits for the batch in
flight, and a detector that leaves hands its partitions over without losing an event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from detectors.consumer import Detector
from tests.detectors.rig import Rig

pytestmark = [pytest.mark.tansu, pytest.mark.asyncio(loop_scope="module")]


@contextlib.asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[tuple[Detector, asyncio.Event, asyncio.Task[None]]]:
    det = Detector(rig.settings, service_url=rig.service_url, token=rig.detector_token)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(det.run(stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        yield det, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_partitions_move_between_detectors_without_loss(rig: Rig) -> None:
    async with (
        running(rig) as (_first, first_stop, first_task),
        running(rig) as (second, _stop, _task),
    ):
        # Both joined (each reported ready); now one leaves.
        tasks = [await rig.open_task() for _ in range(6)]
        for task in tasks:
            await rig.known(second, task)
        first_stop.set()
        await asyncio.wait_for(first_task, 20)
        # Violations of many agents, so on both partitions: the survivor owns them all.
        for task in tasks:
            await rig.produce(rig.usage(task, resource="tool/elsewhere"))
        for task in tasks:
            await rig.alert(task, "scope.out_of_scope")
        for task in tasks:
            assert len(await rig.revocations_of(task.task_id)) == 1
