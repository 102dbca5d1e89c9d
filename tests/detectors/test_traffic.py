"""The synthetic traffic generator: deterministic, correctly labelled, realistic enough
that benign traffic passes the rules and every out-of-scope attack does not."""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from detectors.traffic import (
    AGENT_TYPES,
    MODEL_SCENARIOS,
    RULE_SCENARIOS,
    SCENARIOS,
    AgentType,
    Traffic,
    generate,
    labels_path,
    publish,
    read_events,
    replay_rules,
    write_events,
)
from service import kafka
from service.brokers import BrokerProcess
from service.kernel.events import Decision, TaskEvent, TaskEventKind, UsageEvent, decoder, encoder
from service.kernel.scopes import covers


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    # 10 % attacked: 50 attacks, at least 6 of every scenario.
    return generate(seed=11, tasks=500, attack_rate=0.1)


def encoded(traffic: Traffic) -> list[bytes]:
    return [encoder.encode(e) for e in traffic.stream()]


def task_events(traffic: Traffic) -> dict[str, list[tuple[UsageEvent, str | None]]]:
    out: dict[str, list[tuple[UsageEvent, str | None]]] = defaultdict(list)
    for event, label in zip(traffic.events, traffic.event_labels, strict=True):
        out[event.task_id].append((event, label))
    return out


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_events() -> None:
    a = generate(seed=3, tasks=120, attack_rate=0.2)
    b = generate(seed=3, tasks=120, attack_rate=0.2)
    assert encoded(a) == encoded(b)
    assert a.labels == b.labels
    assert a.event_labels == b.event_labels


def test_different_seed_gives_different_events() -> None:
    a = generate(seed=3, tasks=120, attack_rate=0.2)
    b = generate(seed=4, tasks=120, attack_rate=0.2)
    assert encoded(a) != encoded(b)
    # Fresh ids too: a train and a test run never share a task or an event.
    assert not {t.task_id for t in a.tasks} & {t.task_id for t in b.tasks}
    assert not {e.event_id for e in a.events} & {e.event_id for e in b.events}


# --------------------------------------------------------------------------- labels


def test_every_scenario_injected_evenly(traffic: Traffic) -> None:
    counts = Counter(label.scenario for label in traffic.labels.values())
    attacked = {s: n for s, n in counts.items() if s is not None}
    assert set(attacked) == set(SCENARIOS)
    assert sum(attacked.values()) == 50
    assert max(attacked.values()) - min(attacked.values()) <= 1
    assert set(traffic.labels) == {t.task_id for t in traffic.tasks}


def test_labels_match_injected_events(traffic: Traffic) -> None:
    per_task = task_events(traffic)
    for task_id, label in traffic.labels.items():
        events = per_task[task_id]
        labelled = [i for i, (_, s) in enumerate(events) if s is not None]
        if label.scenario is None:
            assert not labelled, f"benign task {task_id} has labelled events"
            assert label.attack_start_index is None
            assert label.attack_start_at is None
            continue
        # Every labelled event of an attacked task carries that task's scenario ...
        assert {events[i][1] for i in labelled} == {label.scenario}
        # ... and the start index points at the first of them.
        assert labelled, f"attacked task {task_id} has no labelled events"
        assert label.attack_start_index == labelled[0]
        assert label.attack_start_at == events[labelled[0]][0].at


def test_event_labels_belong_to_tasks_with_that_scenario(traffic: Traffic) -> None:
    assert len(traffic.event_labels) == len(traffic.events)
    for event, scenario in zip(traffic.events, traffic.event_labels, strict=True):
        if scenario is not None:
            assert scenario in SCENARIOS
            assert traffic.labels[event.task_id].scenario == scenario


def test_scenario_subset_and_no_attacks() -> None:
    only = generate(seed=5, tasks=100, attack_rate=0.1, scenarios=("slow_drift",))
    assert {label.scenario for label in only.labels.values()} == {None, "slow_drift"}
    clean = generate(seed=5, tasks=100, attack_rate=0.0)
    assert all(label.scenario is None for label in clean.labels.values())
    assert not any(clean.event_labels)
    with pytest.raises(ValueError, match="unknown scenario"):
        generate(seed=5, tasks=10, scenarios=("teleport",))


# --------------------------------------------------------------------------- realism


def test_events_are_time_ordered_and_unique(traffic: Traffic) -> None:
    times = [e.at for e in traffic.events]
    assert times == sorted(times)
    assert len({e.event_id for e in traffic.events}) == len(traffic.events)
    opened = [t.at for t in traffic.tasks]
    assert opened == sorted(opened)
    first_use: dict[str, float] = {}
    for event in traffic.events:
        first_use.setdefault(event.task_id, event.at)
    for task in traffic.tasks:
        assert task.kind is TaskEventKind.OPENED
        assert task.scope is not None
        assert task.deadline is not None
        assert task.jti_hash
        assert task.at < first_use[task.task_id]
    assert all(c.kind is TaskEventKind.CLOSED for c in traffic.closed)


def test_benign_events_are_in_scope_and_under_limits(traffic: Traffic) -> None:
    tasks = {t.task_id: t for t in traffic.tasks}
    per_task = task_events(traffic)
    for event, scenario in zip(traffic.events, traffic.event_labels, strict=True):
        if scenario is not None:
            continue
        task = tasks[event.task_id]
        assert task.scope is not None
        assert task.deadline is not None
        assert covers(task.scope, event.action, event.resource), event
        assert event.audience in task.scope.audiences
        assert event.decision is Decision.ALLOW
        assert event.at < task.deadline
    for task_id, events in per_task.items():
        scope = tasks[task_id].scope
        assert scope is not None
        benign = [e for e, s in events if s is None]
        if traffic.labels[task_id].scenario is None:
            assert len(benign) <= (scope.limits.max_calls or 0)
            assert sum(e.bytes_out for e in benign) <= (scope.limits.max_bytes_out or 0)
            # One task, one client: a benign credential is used from one source only.
            assert len({e.source for e in benign}) == 1


def test_agent_types_have_their_own_habits(traffic: Traffic) -> None:
    by_type: dict[str, list[UsageEvent]] = defaultdict(list)
    for event, scenario in zip(traffic.events, traffic.event_labels, strict=True):
        if scenario is None:
            by_type[event.agent_id.rsplit("-", 1)[0]].append(event)
    assert set(by_type) == {t.name for t in AGENT_TYPES}
    for agent_type in AGENT_TYPES:
        events = by_type[agent_type.name]
        tools = {e.resource.rsplit("/", 1)[0] for e in events}
        assert tools <= set(agent_type.tools)
        median = statistics.median(e.bytes_out for e in events)
        assert median == pytest.approx(math.exp(agent_type.bytes_out[0]), rel=0.3)
        # Each agent calls from its own few stable sources.
        sources = {e.source.address for e in events}
        assert sources <= {s.address for s in agent_type.sources}


def test_scenarios_look_like_their_definition(traffic: Traffic) -> None:
    tasks = {t.task_id: t for t in traffic.tasks}
    closed = {c.task_id: c for c in traffic.closed}
    per_task = task_events(traffic)
    agent_types = {t.name: t for t in AGENT_TYPES}
    for task_id, label in traffic.labels.items():
        if label.scenario is None:
            continue
        events = per_task[task_id]
        attack = [e for e, s in events if s is not None]
        before = [e for e, s in events[: label.attack_start_index]]
        scope = tasks[task_id].scope
        deadline = tasks[task_id].deadline
        assert scope is not None
        assert deadline is not None
        agent_type = agent_types[attack[0].agent_id.rsplit("-", 1)[0]]
        in_scope = all(covers(scope, e.action, e.resource) for e in attack)
        match label.scenario:
            case "replay_new_source" | "concurrent_two_sources":
                assert {e.jti_hash for e, _ in events} == {tasks[task_id].jti_hash}
                assert {e.source for e in attack}.isdisjoint({e.source for e in before})
                assert in_scope
                assert all(e.at < closed[task_id].at for e in attack)
            case "use_after_end":
                assert all(e.at > max(closed[task_id].at, deadline) for e in attack)
            case "out_of_scope_burst":
                assert len(attack) >= 10
                assert all(e.decision is Decision.DENY for e in attack)
                assert not any(covers(scope, e.action, e.resource) for e in attack)
            case "enumeration_in_scope":
                assert in_scope
                assert len({e.resource for e in attack}) >= 20
                assert not {e.resource for e in attack} & {e.resource for e in before}
            case "exfiltration_volume":
                assert in_scope
                median = math.exp(agent_type.bytes_out[0])
                assert min(e.bytes_out for e in attack) >= 19 * median
            case "unusual_tool_sequence":
                assert in_scope
                assert len(attack) >= 8
            case "slow_drift":
                assert in_scope
                assert len(attack) >= 20
                third = len(attack) // 3
                early = sum(e.bytes_out for e in attack[:third])
                late = sum(e.bytes_out for e in attack[-third:])
                assert late > 3 * early
        if label.scenario != "use_after_end":
            assert all(e.at < deadline for e in attack)


def test_rules_catch_out_of_scope_scenarios_and_nothing_benign(traffic: Traffic) -> None:
    hits = replay_rules(traffic)
    for task_id, label in traffic.labels.items():
        found = hits.get(task_id, [])
        if label.scenario is None:
            assert not found, f"benign task {task_id}: {found}"
        elif label.scenario in RULE_SCENARIOS:
            assert label.attack_start_index is not None
            assert found, f"{label.scenario} in {task_id} not caught by the rules"
            # Caught on the attack's first event, never before it.
            assert min(h.position for h in found) == label.attack_start_index
        else:
            assert label.scenario in MODEL_SCENARIOS
            # In scope and under limits: the rules cannot see it (the model's job).
            assert not found, f"{label.scenario} in {task_id} tripped {found}"


def test_custom_agent_type() -> None:
    bot = AgentType(
        name="crawler",
        tools=("tool/a", "tool/b"),
        tool_weights=(1.0, 1.0),
        transitions=((0.0, 1.0), (1.0, 0.0)),
        rate_hz=2.0,
        bytes_out=(5.0, 0.5),
        task_len=(5, 10),
        sources=AGENT_TYPES[0].sources,
    )
    traffic = generate(seed=1, tasks=30, attack_rate=0.0, agent_types=[bot])
    assert {e.agent_id.rsplit("-", 1)[0] for e in traffic.events} == {"crawler"}
    with pytest.raises(ValueError, match="disagree"):
        AgentType(
            name="bad",
            tools=("tool/a",),
            tool_weights=(1.0, 2.0),
            transitions=((1.0,),),
            rate_hz=1.0,
            bytes_out=(5.0, 0.5),
            task_len=(1, 2),
            sources=bot.sources,
        )


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["events.jsonl", "events.jsonl.gz"])
def test_write_read_round_trip(traffic: Traffic, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    sidecar = write_events(traffic, path)
    assert sidecar == labels_path(path)
    assert sidecar.exists()
    back = read_events(path)
    assert encoded(back) == encoded(traffic)
    assert back.tasks == traffic.tasks
    assert back.closed == traffic.closed
    assert back.labels == traffic.labels
    assert back.event_labels == traffic.event_labels


def test_events_file_is_plain_typed_json_lines(traffic: Traffic, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write_events(traffic, path)
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(traffic.events) + len(traffic.tasks) + len(traffic.closed)
    assert [decoder.decode(line) for line in lines] == list(traffic.stream())
    # Without the sidecar the file reads as unlabelled traffic (e.g. a topic dump).
    labels_path(path).unlink()
    unlabelled = read_events(path)
    assert unlabelled.labels == {}
    assert unlabelled.event_labels == [None] * len(traffic.events)
    path.write_bytes(path.read_bytes() + b"{not json\n")
    with pytest.raises(ValueError, match=rf"{path.name}:{len(lines) + 1}"):
        read_events(path)


# --------------------------------------------------------------------------- Kafka


@pytest.mark.tansu
def test_publish_to_the_broker_keyed_like_the_service(broker: BrokerProcess) -> None:
    from tests.detectors.rig import rig_settings

    traffic = generate(seed=2, tasks=20, attack_rate=0.2)
    settings = rig_settings(broker.bootstrap)

    async def run() -> tuple[int, list[tuple[str, bytes, bytes]]]:
        sent = await publish(traffic, settings, rate=5000, progress=False)
        consumer = kafka.consumer(
            settings,
            settings.kafka_usage_topic,
            settings.kafka_tasks_topic,
            client_id="test-traffic",
            group_id=None,
        )
        await consumer.start()
        got: list[tuple[str, bytes, bytes]] = []
        try:
            async with asyncio.timeout(20):
                while len(got) < sent:
                    batch = await consumer.getmany(timeout_ms=200)
                    for records in batch.values():
                        got.extend((r.topic, r.key, r.value) for r in records)
        finally:
            await consumer.stop()
        return sent, got

    sent, got = asyncio.run(run())
    assert sent == len(traffic.events) + len(traffic.tasks) + len(traffic.closed)
    assert len(got) == sent
    for topic, key, value in got:
        event = decoder.decode(value)
        if topic == settings.kafka_usage_topic:
            assert isinstance(event, UsageEvent)
            assert key == event.agent_id.encode()
        else:
            assert isinstance(event, TaskEvent)
            assert key == event.task_id.encode()
    assert sorted(v for _, _, v in got) == sorted(encoded(traffic))
