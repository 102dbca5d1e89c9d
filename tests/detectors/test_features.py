"""Model features on hand-made sequences: exact values, determinism, warm-up, bounds."""

from __future__ import annotations

import math

import pytest

from detectors.features import (
    EXCESS_Z,
    FEATURE_INDEX,
    FEATURE_VERSION,
    FEATURES,
    WARMUP,
    AgentTyper,
    FeatureExtractor,
    SequenceModel,
    resource_prefix,
    tool_of,
)
from detectors.state import Store
from service.kernel.events import Decision, Source, TaskEvent, TaskEventKind, UsageEvent
from service.kernel.scopes import ScopeSpec

SCOPE = ScopeSpec(grants=("call:tool/a/*", "call:tool/b/*"), audiences=("aud",))
F = FEATURE_INDEX


def opened(task_id: str, at: float = 1000.0, deadline: float = 2000.0) -> TaskEvent:
    return TaskEvent(
        event_id=f"o-{task_id}",
        at=at,
        kind=TaskEventKind.OPENED,
        task_id=task_id,
        agent_id="coder-01",
        status="active",
        scope=SCOPE,
        deadline=deadline,
    )


def use(task_id: str, at: float, resource: str = "tool/a/1", **kw: object) -> UsageEvent:
    values: dict[str, object] = {
        "event_id": f"u-{task_id}-{at}",
        "at": at,
        "agent_id": "coder-01",
        "task_id": task_id,
        "jti_hash": f"j-{task_id}",
        "action": "call",
        "resource": resource,
        "audience": "aud",
        "decision": Decision.ALLOW,
        "bytes_out": 100,
        "source": Source(address="10.0.0.1"),
    }
    values.update(kw)
    return UsageEvent(**values)  # type: ignore[arg-type]


class Run:
    def __init__(self, sequences: SequenceModel | None = None) -> None:
        self.store = Store(denied_burst=10)
        self.fx = FeatureExtractor(sequences)

    def open(self, task_id: str, at: float = 1000.0, deadline: float = 2000.0) -> None:
        self.store.apply_task_event(opened(task_id, at, deadline))

    def feed(self, event: UsageEvent) -> dict[str, float]:
        task, agent = self.store.observe(event, 0, event.at)
        row = self.fx.update(event, task, agent)
        assert len(row) == len(FEATURES)
        return dict(zip(FEATURES, row, strict=True))


def test_feature_list_is_fixed() -> None:
    assert FEATURE_VERSION == 2
    assert len(FEATURES) == len(set(FEATURES)) == 21
    assert FEATURES[0] == "gap_z"
    assert F["seq_surprise"] == FEATURES.index("seq_surprise")


@pytest.mark.parametrize(
    ("action", "resource", "tool", "prefix"),
    [
        ("call", "tool/crm.lookup/item-0052", "call:tool/crm.lookup", "tool/crm.lookup"),
        (
            "GET",
            "https://api.x/v1/repos/a/b",
            "GET:https://api.x/v1/repos",
            "https://api.x/v1/repos/a",
        ),
        ("read", "file:///data/r/q1.csv", "read:file:///data/r", "file:///data/r"),
        ("call", "tool/a", "call:tool/a", "tool"),
        ("call", "x", "call:x", "x"),
    ],
)
def test_tool_and_prefix(action: str, resource: str, tool: str, prefix: str) -> None:
    assert tool_of(action, resource) == tool
    assert resource_prefix(resource) == prefix


def test_agent_typer() -> None:
    typer = AgentTyper()
    assert typer("support-bot-07") == "support-bot"
    assert typer("coder-00") == "coder"
    assert typer("agent-1a2b3c4d") == "agent"
    assert typer("coder") == "coder"
    assert AgentTyper(r"^(?P<type>[a-z]+)")("abc-9") == "abc"
    with pytest.raises(ValueError, match="no group"):
        AgentTyper(r"^abc")


def test_first_event_of_a_task() -> None:
    run = Run()
    run.open("t1", at=1000.0, deadline=2000.0)
    f = run.feed(use("t1", 1100.0, bytes_out=99))
    assert f["gap_z"] == f["rate_z"] == f["bytes_out_z"] == 0.0  # agent not warm
    assert f["bytes_out_log"] == pytest.approx(math.log1p(99))
    assert f["task_bytes_log"] == pytest.approx(math.log1p(99))
    assert f["distinct_1m"] == pytest.approx(math.log1p(1))
    assert f["new_tool"] == f["new_prefix"] == f["new_source"] == 0.0  # warm-up
    assert f["scope_used"] == 0.5  # one of two grants
    assert f["denied_rate"] == 0.0
    assert f["since_issue"] == pytest.approx(math.log1p(100.0))
    assert f["life_left"] == pytest.approx(0.9)
    assert f["seq_surprise"] == f["seq_surprise_avg"] == 0.0  # no sequence model
    assert f["task_events_log"] == pytest.approx(math.log1p(1))
    assert f["task_sources"] == 1.0
    assert f["bytes_excess"] == 0.0
    assert f["fresh_share"] == 1.0  # the task's first call reaches a resource first
    assert f["new_resource"] == 0.0  # warm-up
    # Cold agent: every resource is new to it, and so is its own norm (share - norm = 0).
    assert f["new_resource_share"] == pytest.approx(0.0)


def test_task_window_counts() -> None:
    run = Run()
    run.open("t1")
    run.feed(use("t1", 1000.0, "tool/a/1", bytes_out=10))
    run.feed(use("t1", 1010.0, "tool/a/2", bytes_out=20))
    f = run.feed(use("t1", 1020.0, "tool/a/1", bytes_out=30, decision=Decision.DENY))
    assert f["distinct_1m"] == pytest.approx(math.log1p(2))
    assert f["task_bytes_log"] == pytest.approx(math.log1p(60))
    assert f["denied_rate"] == pytest.approx(1 / 3)
    assert f["scope_used"] == 0.5
    f = run.feed(use("t1", 1030.0, "tool/b/9", source=Source(address="10.9.9.9")))
    assert f["scope_used"] == 1.0
    assert f["task_sources"] == 2.0
    # 61 s later, only the new resource is within the minute.
    f = run.feed(use("t1", 1091.5, "tool/b/7"))
    assert f["distinct_1m"] == pytest.approx(math.log1p(1))
    # Past the deadline, the remaining lifetime goes negative (bounded at -1).
    f = run.feed(use("t1", 2500.0, "tool/b/7"))
    assert f["life_left"] == pytest.approx(-0.5)


def test_agent_history_warms_up_then_flags() -> None:
    run = Run()
    run.open("t1")
    for i in range(WARMUP + 10):
        f = run.feed(use("t1", 1000.0 + i, "tool/a/1"))
    assert f["new_tool"] == f["new_source"] == 0.0
    assert abs(f["gap_z"]) < 1.0  # regular 1 s gaps: nothing unusual
    last = 1000.0 + WARMUP + 9
    f = run.feed(use("t1", last + 0.01, "tool/b/1", source=Source(address="10.7.7.7")))
    assert f["new_tool"] == f["new_prefix"] == f["new_source"] == 1.0
    assert f["gap_z"] > 3.0  # 10 ms after the last call: much faster than its history
    f = run.feed(use("t1", last + 1, "tool/b/2", bytes_out=10**7))
    assert f["new_tool"] == 0.0  # seen now
    assert f["bytes_out_z"] > 10.0


def test_sequence_surprise_from_bigrams() -> None:
    sequences = SequenceModel.learn(
        [("coder", ["call:tool/a", "call:tool/a", "call:tool/b"])] * 3, smoothing=0.5
    )
    run = Run(sequences)
    run.open("t1")
    # vocabulary {a, b} + unseen = 3; row "^": a=3 -> (3+.5)/(3+1.5)
    f = run.feed(use("t1", 1000.0, "tool/a/1"))
    assert f["seq_surprise"] == pytest.approx(-math.log(3.5 / 4.5))
    # row a: a=3, b=3 -> total 6 + 1.5; a -> b
    f2 = run.feed(use("t1", 1001.0, "tool/b/1"))
    assert f2["seq_surprise"] == pytest.approx(-math.log(3.5 / 7.5))
    assert f2["seq_surprise_avg"] == pytest.approx(
        f["seq_surprise"] + 0.3 * (f2["seq_surprise"] - f["seq_surprise"])
    )
    # b was never followed by anything: unseen transition from a known row.
    f3 = run.feed(use("t1", 1002.0, "tool/a/2"))
    assert f3["seq_surprise"] == pytest.approx(-math.log(0.5 / 1.5))
    # Unknown agent types fall back to the pooled table.
    assert sequences.surprise("other", "^", "call:tool/a") == pytest.approx(-math.log(3.5 / 4.5))


def test_deterministic() -> None:
    def rows() -> list[tuple[float, ...]]:
        store = Store(denied_burst=10)
        fx = FeatureExtractor()
        store.apply_task_event(opened("t1"))
        out = []
        for i in range(80):
            ev = use("t1", 1000.0 + i * 0.7, f"tool/{'ab'[i % 2]}/{i % 5}", bytes_out=i * 13)
            task, agent = store.observe(ev, 0, ev.at)
            out.append(fx.update(ev, task, agent))
        return out

    assert rows() == rows()


def test_state_is_dropped_with_the_partition() -> None:
    run = Run()
    run.open("t1")
    run.feed(use("t1", 1000.0))
    task = run.store.tasks["t1"]
    assert task.features is not None
    run.store.drop_partitions({0})
    assert task.features is None
    assert run.store.agents.get(0) is None


def test_resource_shares_against_the_agents_norm() -> None:
    run = Run()
    run.open("t1")
    # Warm the agent on 4 resources it keeps reusing.
    for i in range(WARMUP + 170):
        f = run.feed(use("t1", 1000.0 + i, f"tool/a/{i % 4}"))
    assert f["new_resource"] == 0.0
    assert f["fresh_share"] < 0.01  # only repeats lately
    norm_share = f["new_resource_share"]
    assert -0.05 < norm_share <= 0.0  # the agent's norm: almost never a new resource
    run.open("t2")
    # A sweep over resources nobody used: first use by the task and by the agent.
    shares = []
    for k in range(10):
        f = run.feed(use("t2", 1300.0 + k, f"tool/a/sweep-{k}"))
        assert f["new_resource"] == 1.0
        assert f["new_tool"] == f["new_prefix"] == 0.0  # known tool and parent
        shares.append(f["new_resource_share"])
    assert f["fresh_share"] == pytest.approx(1.0)
    # Nearly all of the task's calls are new to the agent, far above its norm (which the
    # sweep itself barely moves).
    assert min(shares) > 0.9 > norm_share + 0.9
    assert f["distinct_1m"] == pytest.approx(math.log1p(10))


def test_bytes_excess_accumulates_over_the_task() -> None:
    run = Run()
    run.open("t1")
    for i in range(WARMUP + 20):
        f = run.feed(use("t1", 1000.0 + i, bytes_out=1000 + 50 * (i % 5)))
    assert f["bytes_excess"] == 0.0  # steady bytes: nothing beyond EXCESS_Z
    run.open("t2")
    f1 = run.feed(use("t2", 1100.0, bytes_out=10**6))
    assert f1["bytes_out_z"] > EXCESS_Z
    assert f1["bytes_excess"] == pytest.approx(math.log1p(f1["bytes_out_z"] - EXCESS_Z))
    f2 = run.feed(use("t2", 1101.0, bytes_out=10**6))
    assert f2["bytes_excess"] > f1["bytes_excess"]  # the task's running sum
    f3 = run.feed(use("t2", 1102.0, bytes_out=1000))
    assert f3["bytes_excess"] == f2["bytes_excess"]  # a usual call adds nothing
