"""Poison input on the usage topic: every bad record becomes a dead letter with its
reason, the detector keeps going, and the good records around them are all decided."""

from __future__ import annotations

import os

import msgspec
import pytest

from detectors.consumer import Detector
from service.kernel.events import TaskEvent, TaskEventKind, decoder, encoder
from tests.detectors.rig import Rig, wait_for

pytestmark = [pytest.mark.tansu, pytest.mark.asyncio(loop_scope="module")]


async def test_poison_goes_to_the_dlq_and_nothing_else_is_lost(
    rig: Rig, detector: Detector
) -> None:
    task = await rig.open_task(limits={"max_calls": 10})
    await rig.known(detector, task)
    key = task.agent_id.encode()
    good = rig.usage(task)
    valid = encoder.encode(good)
    as_dict = msgspec.json.decode(valid)
    poison: list[tuple[bytes, str]] = [
        (os.urandom(64), "undecodable"),
        (valid[: len(valid) // 2], "truncated"),
        (encoder.encode({**as_dict, "at": "yesterday"}), "Expected `float`"),
        (encoder.encode({**as_dict, "bytes_out": -5}), "Expected `int` >= 0"),
        (encoder.encode({**as_dict, "resource": "x" * 100_000}), "length <= 2048"),
        (encoder.encode({**as_dict, "surprise": 1}), "unknown field"),
        (encoder.encode({**as_dict, "type": "nope"}), "Invalid value 'nope'"),
        (b"", "undecodable"),
        (b"null", "undecodable"),
    ]
    # A decodable event of the wrong kind is poison on this topic too.
    wrong_kind = TaskEvent(
        event_id="e1",
        at=1.0,
        kind=TaskEventKind.RENEWED,
        task_id=task.task_id,
        agent_id=task.agent_id,
        status="active",
    )
    poison.append((encoder.encode(wrong_kind), "a task event on the usage topic"))
    assert len(poison) == 10
    before = len(rig.dead_letters)
    first = await rig.produce_raw(poison[0][0], key)
    # Interleave good events (5 in-scope calls, all must be counted) with the poison.
    for value, _ in poison[1:]:
        await rig.produce(rig.usage(task))
        await rig.produce_raw(value, key)
    # The 10th good call fits the budget, the 11th breaks it: none dropped, none
    # counted twice.
    last = await rig.produce(rig.usage(task))
    await rig.processed(detector, last)
    assert detector.store.tasks[task.task_id].calls == len(poison)
    assert rig.alerts_of(task) == []
    await rig.produce(rig.usage(task))
    await rig.alert(task, "limits.calls")

    letters = await wait_for(
        lambda: (
            rig.dead_letters[before:] if len(rig.dead_letters) - before >= len(poison) else None
        ),
        what="all dead letters",
    )
    assert len(letters) == len(poison)
    assert [d.offset for d in letters] == sorted(d.offset for d in letters)
    assert letters[0].offset == first.offset
    for letter, (value, expected) in zip(letters, poison, strict=True):
        assert letter.topic == rig.settings.kafka_usage_topic
        assert letter.key == key
        assert expected in letter.reason, (expected, letter.reason)
        if len(value) <= 64 * 1024:
            assert letter.value == value
        else:
            assert letter.value == value[: 64 * 1024]
            assert "truncated from" in letter.reason
        # The DLQ itself decodes with the one typed decoder.
        assert decoder.decode(encoder.encode(letter)) == letter
    assert decoder.decode(valid) == good
    metrics = detector.metrics.render().decode()
    assert "killswitch_detector_dead_letters_total" in metrics
