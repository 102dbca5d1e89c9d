"""Synthetic agent traffic with labelled attacks: a deterministic, seedable generator.

:func:`generate` builds a workload of agent tasks — several :class:`AgentType`\\ s, each
with its own tool mix, tool order (a Markov chain), call rate, task length, bytes-out
distribution and a small set of stable sources — and injects attacks into a fraction
of the tasks. Everything it emits is the real contract: :class:`~service.kernel.events.TaskEvent`
(opened, with the declared scope and limits; closed) and
:class:`~service.kernel.events.UsageEvent`, exactly as the service and a guard would. The same
seed always gives byte-identical events.

Benign traffic never leaves its declared scope and stays under every declared limit, so
the deterministic rules (``detectors/rules.py``) raise nothing on it. Attack scenarios
(:data:`SCENARIOS`)::

    scenario                 rules catch it?   what is injected (every injected event
                                               is labelled with the scenario)
    replay_new_source        yes (second       earlier requests of the task replayed
                              client)          verbatim, same credential, from a new
                                               address and user agent
    concurrent_two_sources   yes (second       a second client uses the same credential
                              client)          alongside the agent, interleaved in time
    use_after_end            yes (use after    the credential is used after the task was
                              end)             closed and after its deadline (the guard
                                               denies: token expired)
    out_of_scope_burst       yes (out of       a burst of 10-25 attempts on tools outside
                              scope, denied    the declared scope, denied by the guard
                              burst)
    enumeration_in_scope     no: the model     30-80 distinct resources of one or two
                                               in-scope tools, sequentially, ~3-6x the
                                               usual rate, under the rate limit
    exfiltration_volume      no: the model     4-12 in-scope calls with bytes_out 50-400x
                                               the type's median, under max_bytes_out
    unusual_tool_sequence    no: the model     8-16 in-scope calls in the least likely
                                               tool order for the type
    slow_drift               no: the model     30-70 calls at the usual rate whose bytes
                                               out rise gradually (to ~20x) and which
                                               reach ever more new resources

Labels: :attr:`Traffic.labels` has one :class:`Label` per task (scenario ``None`` for a
benign task); :attr:`Traffic.event_labels` names the scenario of every injected event.
Events of an attacked task before the attack (and, for the two second-client scenarios,
the agent's own events during it) are unlabelled: they are benign behaviour.

Files (:func:`write_events`, :func:`read_events`): JSON lines, one event per line encoded
with :data:`service.kernel.events.encoder` (task and usage events merged in time order, so the
file replays through the typed decoder as-is), plus a sidecar ``<path>.labels.json``
holding the labels. ``.gz`` paths are gzip-compressed. :func:`publish` sends a traffic
to Kafka, keyed like the service (task id) and the guard (agent id), at a given rate.

Command line::

    python -m detectors.traffic generate --seed 7 --tasks 1000 -o events.jsonl
    python -m detectors.traffic publish events.jsonl --rate 2000
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gzip
import hashlib
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, cast

import msgspec

from detectors.rules import Thresholds, evaluate
from detectors.state import Store
from service.config import Settings
from service.kernel.events import (
    Decision,
    Source,
    TaskEvent,
    TaskEventKind,
    UsageEvent,
    decoder,
    encoder,
)
from service.kernel.scopes import Limits, ScopeSpec, compile_scope, validate

__all__ = [
    "AGENT_TYPES",
    "MODEL_SCENARIOS",
    "RULE_SCENARIOS",
    "SCENARIOS",
    "AgentType",
    "Label",
    "RuleHit",
    "Traffic",
    "declared_scope",
    "generate",
    "labels_path",
    "main",
    "publish",
    "read_events",
    "replay_rules",
    "write_events",
]

SCENARIOS: Final = (
    "replay_new_source",
    "concurrent_two_sources",
    "use_after_end",
    "out_of_scope_burst",
    "enumeration_in_scope",
    "exfiltration_volume",
    "unusual_tool_sequence",
    "slow_drift",
)
#: Scenarios that leave the declared scope or the credential's lifetime or client: the
#: deterministic rules must catch every one.
RULE_SCENARIOS: Final = SCENARIOS[:4]
#: Scenarios that stay inside the declared scope and limits: only a model can see them.
MODEL_SCENARIOS: Final = SCENARIOS[4:]

TRUST_DOMAIN: Final = "killswitch.local"
#: Tools no generated agent type may use: out-of-scope bursts reach for them.
SENSITIVE_TOOLS: Final = (
    "tool/admin.users",
    "tool/secrets.read",
    "tool/payments.transfer",
    "tool/shell.exec",
    "tool/iam.grant",
    "tool/db.dump",
)
ATTACKER_USER_AGENTS: Final = (
    "python-requests/2.31.0",
    "curl/8.5.0",
    "Go-http-client/1.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:124.0) Gecko/20100101 Firefox/124.0",
)
_LABELS_VERSION: Final = 1
_MIN_GAP: Final = 0.05
_CROCKFORD: Final = "0123456789abcdefghjkmnpqrstvwxyz"


# --------------------------------------------------------------------------- contract


@dataclass(frozen=True)
class AgentType:
    """One kind of agent and how it behaves when benign.

    ``transitions[i][j]`` is P(next tool = ``tools[j]`` | current tool = ``tools[i]``)
    (rows are normalised on use); a task's first tool is drawn from ``tool_weights``.
    Each call reaches ``<tool>/<item>``, the item drawn from a Zipf law over
    ``resources_per_tool`` items per tool (the same items for every agent of the type).
    ``bytes_out`` and ``bytes_in`` are lognormal ``(mu, sigma)`` of bytes per call.
    ``agents`` instances exist (ids ``<name>-00``, ...); instance ``i`` always calls from
    ``sources[i % len(sources)]``.
    """

    name: str
    tools: Sequence[str]
    tool_weights: Sequence[float]
    transitions: Sequence[Sequence[float]]
    rate_hz: float
    bytes_out: tuple[float, float]
    task_len: tuple[int, int]
    sources: Sequence[Source]
    action: str = "call"
    audience: str = "https://tools.killswitch.internal"
    resources_per_tool: int = 64
    bytes_in: tuple[float, float] = (8.0, 1.0)
    agents: int = 6
    share: float = 1.0
    """Relative share of all tasks that are of this type."""

    def __post_init__(self) -> None:
        n = len(self.tools)
        if n == 0 or len(self.tool_weights) != n or len(self.transitions) != n:
            raise ValueError(f"agent type {self.name}: tools, weights, transitions disagree")
        if any(len(row) != n or sum(row) <= 0 for row in self.transitions):
            raise ValueError(f"agent type {self.name}: transitions must be {n}x{n}, rows > 0")
        if not self.sources or self.rate_hz <= 0 or not 1 <= self.task_len[0] <= self.task_len[1]:
            raise ValueError(f"agent type {self.name}: sources, rate_hz or task_len invalid")

    def agent_ids(self) -> list[str]:
        return [f"{self.name}-{i:02d}" for i in range(self.agents)]

    def resource(self, tool: int, item: int) -> str:
        return f"{self.tools[tool]}/item-{item:04d}"


@dataclass(frozen=True)
class Label:
    """The truth about one task."""

    task_id: str
    scenario: str | None
    """``None`` for a benign task."""
    attack_start_index: int | None
    """Index, in the task's own time-ordered usage events, of the first attack event."""
    attack_start_at: float | None
    """Event time of that first attack event."""


@dataclass(frozen=True)
class Traffic:
    """A generated (or read) workload and its labels.

    ``tasks`` are the opened :class:`TaskEvent`\\ s (declared scope, limits, deadline,
    credential hash), in time order; ``closed`` the closed ones. ``events`` are the usage
    events in time order and ``event_labels[i]`` names the scenario of ``events[i]`` if it
    was injected by an attack, else ``None``.
    """

    tasks: list[TaskEvent]
    events: list[UsageEvent]
    labels: dict[str, Label]
    event_labels: list[str | None]
    closed: list[TaskEvent] = field(default_factory=list)

    def lifecycle(self) -> list[TaskEvent]:
        """Opened and closed task events together, in time order."""
        return sorted([*self.tasks, *self.closed], key=lambda e: e.at)

    def by_task(self) -> dict[str, list[int]]:
        """Indices into ``events`` of each task's usage events, in time order."""
        out: dict[str, list[int]] = {t.task_id: [] for t in self.tasks}
        for i, event in enumerate(self.events):
            out.setdefault(event.task_id, []).append(i)
        return out

    def stream(self) -> Iterator[TaskEvent | UsageEvent]:
        """Every event, task and usage merged in time order (a task event first on ties)."""
        lifecycle = self.lifecycle()
        i = 0
        for event in self.events:
            while i < len(lifecycle) and lifecycle[i].at <= event.at:
                yield lifecycle[i]
                i += 1
            yield event
        yield from lifecycle[i:]


# --------------------------------------------------------------------------- agent types


def _sources(name: str, octet: int, n: int) -> tuple[Source, ...]:
    return tuple(
        Source(address=f"10.{octet}.{i // 250}.{10 + i % 250}", user_agent=f"{name}-agent/2.{i}")
        for i in range(n)
    )


AGENT_TYPES: Final = (
    AgentType(
        name="researcher",
        tools=(
            "tool/search.web",
            "tool/fetch.page",
            "tool/summarize",
            "tool/notes.write",
            "tool/cite.lookup",
        ),
        tool_weights=(0.45, 0.05, 0.0, 0.0, 0.5),
        transitions=(
            (0.20, 0.65, 0.00, 0.00, 0.15),
            (0.10, 0.30, 0.55, 0.00, 0.05),
            (0.05, 0.10, 0.00, 0.80, 0.05),
            (0.70, 0.00, 0.00, 0.10, 0.20),
            (0.40, 0.50, 0.00, 0.10, 0.00),
        ),
        rate_hz=0.4,
        bytes_out=(math.log(600), 0.8),
        bytes_in=(math.log(20_000), 1.0),
        task_len=(12, 50),
        sources=_sources("researcher", 20, 3),
        share=0.3,
    ),
    AgentType(
        name="coder",
        tools=(
            "tool/repo.search",
            "tool/repo.read",
            "tool/code.exec",
            "tool/tests.run",
            "tool/repo.write",
        ),
        tool_weights=(0.7, 0.3, 0.0, 0.0, 0.0),
        transitions=(
            (0.15, 0.80, 0.00, 0.00, 0.05),
            (0.10, 0.45, 0.35, 0.00, 0.10),
            (0.00, 0.20, 0.30, 0.45, 0.05),
            (0.05, 0.20, 0.15, 0.10, 0.50),
            (0.10, 0.20, 0.00, 0.70, 0.00),
        ),
        rate_hz=1.0,
        bytes_out=(math.log(2_500), 1.0),
        bytes_in=(math.log(8_000), 1.1),
        task_len=(20, 120),
        sources=_sources("coder", 30, 4),
        resources_per_tool=128,
        share=0.3,
    ),
    AgentType(
        name="support-bot",
        tools=("tool/crm.lookup", "tool/kb.search", "tool/ticket.update", "tool/email.send"),
        tool_weights=(0.8, 0.2, 0.0, 0.0),
        transitions=(
            (0.10, 0.60, 0.30, 0.00),
            (0.05, 0.35, 0.50, 0.10),
            (0.20, 0.10, 0.10, 0.60),
            (0.60, 0.00, 0.40, 0.00),
        ),
        rate_hz=0.3,
        bytes_out=(math.log(1_500), 0.6),
        bytes_in=(math.log(4_000), 0.8),
        task_len=(6, 25),
        sources=_sources("support", 40, 2),
        resources_per_tool=256,
        agents=8,
        share=0.25,
    ),
    AgentType(
        name="finance",
        tools=(
            "tool/ledger.read",
            "tool/invoice.read",
            "tool/fx.rates",
            "tool/report.generate",
            "tool/payment.draft",
        ),
        tool_weights=(0.6, 0.4, 0.0, 0.0, 0.0),
        transitions=(
            (0.35, 0.30, 0.25, 0.10, 0.00),
            (0.30, 0.40, 0.10, 0.05, 0.15),
            (0.10, 0.00, 0.05, 0.85, 0.00),
            (0.00, 0.00, 0.00, 0.20, 0.80),
            (0.70, 0.30, 0.00, 0.00, 0.00),
        ),
        rate_hz=0.2,
        bytes_out=(math.log(5_000), 0.9),
        bytes_in=(math.log(30_000), 0.9),
        task_len=(8, 30),
        sources=_sources("finance", 50, 2),
        agents=4,
        share=0.15,
    ),
)

#: Probability mass spread over every transition (so no in-scope order is impossible).
_SMOOTHING: Final = 0.01


def declared_scope(agent_type: AgentType, deadline: float) -> ScopeSpec:
    """The scope a task of this type declares: every tool of the type, limits well above
    benign use (calls 3x + 50 the longest task, rate 6x the mean, bytes ~4x a long task at
    the 99.9th percentile per call), and the deadline."""
    mu, sigma = agent_type.bytes_out
    longest = agent_type.task_len[1]
    return validate(
        ScopeSpec(
            grants=tuple(f"{agent_type.action}:{tool}/*" for tool in agent_type.tools),
            audiences=(agent_type.audience,),
            limits=Limits(
                max_calls=3 * longest + 50,
                max_bytes_out=_round_up(4 * longest * math.exp(mu + 3.1 * sigma), 65_536),
                max_rate=max(2.0, round(6 * agent_type.rate_hz, 1)),
                deadline=deadline,
            ),
        )
    )


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def _lifetime(agent_type: AgentType) -> float:
    """Declared lifetime of a task of this type (seconds, a whole number of minutes)."""
    return _round_up(5 * agent_type.task_len[1] / agent_type.rate_hz + 300, 60)


# --------------------------------------------------------------------------- generation


class _Model:
    """Per-type sampling tables."""

    def __init__(self, agent_type: AgentType) -> None:
        self.type = agent_type
        n = len(agent_type.tools)
        self.first = _cumulative(agent_type.tool_weights)
        self.probs: list[list[float]] = []
        for row in agent_type.transitions:
            total = sum(row)
            smoothed = [(1 - _SMOOTHING) * p / total + _SMOOTHING / n for p in row]
            self.probs.append(smoothed)
        self.next = [_cumulative(row) for row in self.probs]
        zipf = [1.0 / (k + 1) ** 1.1 for k in range(agent_type.resources_per_tool)]
        self.items = _cumulative(zipf)
        self.median_bytes = math.exp(agent_type.bytes_out[0])

    def tool_chain(self, rng: random.Random, n: int, start: int | None = None) -> list[int]:
        tools: list[int] = []
        current = start
        for _ in range(n):
            table = self.first if current is None else self.next[current]
            current = _draw(rng, table)
            tools.append(current)
        return tools

    def item(self, rng: random.Random) -> int:
        return _draw(rng, self.items)

    def bytes_out(self, rng: random.Random, scale: float = 1.0) -> int:
        mu, sigma = self.type.bytes_out
        return max(0, int(rng.lognormvariate(mu, sigma) * scale))

    def bytes_in(self, rng: random.Random) -> int:
        mu, sigma = self.type.bytes_in
        return max(0, int(rng.lognormvariate(mu, sigma)))


def _cumulative(weights: Sequence[float]) -> list[float]:
    """Cumulative probabilities for :func:`_draw` (the last is +inf against rounding)."""
    total = float(sum(weights)) or 1.0
    out, acc = [], 0.0
    for w in weights:
        acc += w / total
        out.append(acc)
    out[-1] = float("inf")
    return out


def _draw(rng: random.Random, cumulative: list[float]) -> int:
    return bisect.bisect_right(cumulative, rng.random())


@dataclass
class _Call:
    at: float
    tool: str
    resource: str
    bytes_out: int
    bytes_in: int
    source: Source
    decision: Decision = Decision.ALLOW
    reason: str | None = None
    attack: str | None = None


@dataclass
class _Task:
    task_id: str
    agent_id: str
    agent_type: AgentType
    jti_hash: str
    opened_at: float
    deadline: float
    scope: ScopeSpec
    calls: list[_Call]
    scenario: str | None = None
    closed_at: float = 0.0


def _gap(rng: random.Random, rate: float) -> float:
    """Think time between calls: a floor plus a gamma(3) around the mean rate."""
    return _MIN_GAP + rng.gammavariate(3.0, 1.0 / (3.0 * rate))


def _task_id(rng: random.Random, at: float) -> str:
    value = (int(at * 1000) << 80) | rng.getrandbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _benign_calls(
    rng: random.Random,
    model: _Model,
    n: int,
    start_at: float,
    rate: float,
    source: Source,
    *,
    after_tool: int | None = None,
) -> list[_Call]:
    t = model.type
    calls: list[_Call] = []
    at = start_at
    for tool in model.tool_chain(rng, n, after_tool):
        at += _gap(rng, rate)
        calls.append(
            _Call(
                at=at,
                tool=t.tools[tool],
                resource=t.resource(tool, model.item(rng)),
                bytes_out=model.bytes_out(rng),
                bytes_in=model.bytes_in(rng),
                source=source,
            )
        )
    return calls


def _tool_index(t: AgentType, tool: str) -> int:
    return list(t.tools).index(tool)


def _attacker_source(rng: random.Random) -> Source:
    return Source(
        address=f"203.0.113.{rng.randrange(1, 255)}",
        user_agent=rng.choice(ATTACKER_USER_AGENTS),
    )


def _inject(rng: random.Random, model: _Model, task: _Task, scenario: str, rate: float) -> None:
    """Rewrite ``task.calls`` to carry ``scenario`` (calls it adds are marked ``attack``)."""
    t = model.type
    calls = task.calls
    limits = task.scope.limits
    max_rate = limits.max_rate or 2.0
    # The attack starts after at least 3 benign calls (so the client and habits are known).
    k = rng.randint(3, max(3, len(calls) - 1))
    prefix = calls[:k]
    at = prefix[-1].at
    last_tool = _tool_index(t, prefix[-1].tool)
    budget_calls = (limits.max_calls or 10**9) - k - 5
    budget_bytes = int(0.85 * (limits.max_bytes_out or 10**12)) - sum(c.bytes_out for c in prefix)
    attack: list[_Call] = []

    if scenario == "replay_new_source":
        # The agent carries on; meanwhile someone replays its earlier requests verbatim.
        source = _attacker_source(rng)
        start = rng.uniform(prefix[-1].at, max(prefix[-1].at + 1.0, calls[-1].at))
        replayed = rng.sample(prefix, min(len(prefix), rng.randint(5, 15)))
        replayed.sort(key=lambda c: c.at)
        for i, original in enumerate(replayed):
            start += rng.uniform(0.3, 1.5) if i else 0.0
            attack.append(
                _Call(
                    start,
                    original.tool,
                    original.resource,
                    original.bytes_out,
                    original.bytes_in,
                    source,
                    attack=scenario,
                )
            )
        task.calls = calls + attack
        return
    if scenario == "concurrent_two_sources":
        # A second client works the task alongside the agent, with the type's habits.
        source = _attacker_source(rng)
        extra = _benign_calls(
            rng, model, rng.randint(5, 20), at + rng.uniform(0.1, 3.0), rate, source
        )
        for call in extra:
            call.attack = scenario
        task.calls = calls + extra
        return
    if scenario == "use_after_end":
        # The whole task runs; later the credential shows up again (the guard denies).
        end = max(calls[-1].at, task.deadline)
        start = end + 10.0 + rng.uniform(20.0, 1800.0)
        source = calls[0].source if rng.random() < 0.5 else _attacker_source(rng)
        extra = _benign_calls(rng, model, rng.randint(1, 8), start, rate, source)
        for call in extra:
            call.attack = scenario
            call.decision = Decision.DENY
            call.reason = "token expired"
        task.calls = calls + extra
        return

    if scenario == "out_of_scope_burst":
        scope = compile_scope(task.scope)
        targets = [
            name
            for name in (*SENSITIVE_TOOLS, *(x for o in AGENT_TYPES for x in o.tools))
            if not scope.covers(t.action, f"{name}/item-0000")
        ]
        for _ in range(rng.randint(10, 25)):
            at += rng.uniform(0.1, 0.6)
            target = rng.choice(targets)
            resource = f"{target}/item-{rng.randrange(10_000):04d}"
            attack.append(
                _Call(
                    at,
                    target,
                    resource,
                    model.bytes_out(rng),
                    0,
                    prefix[0].source,
                    decision=Decision.DENY,
                    reason=f"out of scope: {t.action} {resource} is outside the scope",
                )
            )
    elif scenario == "enumeration_in_scope":
        # Sweep item after item of one or two tools, fast but under the rate limit.
        tools = rng.sample(range(len(t.tools)), min(2, len(t.tools)))
        first_item = rng.randrange(t.resources_per_tool, 4 * t.resources_per_tool)
        n = min(rng.randint(30, 80), budget_calls)
        for i in range(n):
            at += rng.uniform(0.8, 1.2) / (0.6 * max_rate)
            tool = tools[i % len(tools)]
            attack.append(
                _Call(
                    at,
                    t.tools[tool],
                    t.resource(tool, first_item + i // len(tools)),
                    model.bytes_out(rng, 0.5),
                    model.bytes_in(rng),
                    prefix[0].source,
                )
            )
    elif scenario == "exfiltration_volume":
        chain = model.tool_chain(rng, rng.randint(4, 12), last_tool)
        for tool in chain:
            at += _gap(rng, rate)
            size = int(model.median_bytes * rng.uniform(50.0, 400.0))
            if size > budget_bytes:
                if attack:
                    break
                size = max(budget_bytes, int(model.median_bytes * 20))
            budget_bytes -= size
            attack.append(
                _Call(
                    at,
                    t.tools[tool],
                    t.resource(tool, model.item(rng)),
                    size,
                    model.bytes_in(rng),
                    prefix[0].source,
                )
            )
    elif scenario == "unusual_tool_sequence":
        current = last_tool
        for _ in range(rng.randint(8, 16)):
            row = model.probs[current]
            lowest = min(row)
            choices = [j for j, p in enumerate(row) if p <= lowest * 1.01]
            current = rng.choice(choices)
            at += _gap(rng, rate)
            attack.append(
                _Call(
                    at,
                    t.tools[current],
                    t.resource(current, model.item(rng)),
                    model.bytes_out(rng),
                    model.bytes_in(rng),
                    prefix[0].source,
                )
            )
    elif scenario == "slow_drift":
        n = min(rng.randint(30, 70), budget_calls)
        sigma = t.bytes_out[1]
        fresh = t.resources_per_tool + rng.randrange(10 * t.resources_per_tool)
        for i, tool in enumerate(model.tool_chain(rng, n, last_tool)):
            progress = (i + 1) / n
            at += _gap(rng, rate)
            size = model.bytes_out(rng, math.exp(3.5 * sigma * progress))
            size = max(0, min(size, budget_bytes // max(1, n - i)))
            budget_bytes -= size
            if rng.random() < progress:
                item, fresh = fresh, fresh + 1
            else:
                item = model.item(rng)
            attack.append(
                _Call(
                    at,
                    t.tools[tool],
                    t.resource(tool, item),
                    size,
                    model.bytes_in(rng),
                    prefix[0].source,
                )
            )
    else:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    for call in attack:
        call.attack = scenario
    task.calls = prefix + attack


def _fit_before_deadline(task: _Task) -> None:
    """Compress a task's schedule (order kept) so live calls end before its deadline."""
    live = [c for c in task.calls if task.scenario != "use_after_end" or c.attack is None]
    last = max(c.at for c in live)
    limit = task.deadline - 30.0
    if last <= limit:
        return
    factor = (limit - task.opened_at) / (last - task.opened_at)
    for call in live:
        call.at = task.opened_at + (call.at - task.opened_at) * factor


def generate(
    *,
    seed: int,
    tasks: int = 1000,
    attack_rate: float = 0.05,
    agent_types: Sequence[AgentType] | None = None,
    start: float = 1.8e9,
    scenarios: Sequence[str] = SCENARIOS,
) -> Traffic:
    """Generate ``tasks`` tasks starting at ``start`` (epoch seconds); deterministic for a
    ``seed``. ``round(tasks * attack_rate)`` of them (at least one per scenario when the
    rate is > 0 and there are enough tasks) carry an attack, the scenarios assigned in
    turn so each is equally represented."""
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    if tasks < 0 or not 0.0 <= attack_rate <= 1.0:
        raise ValueError("tasks must be >= 0 and attack_rate within [0, 1]")
    types = tuple(agent_types if agent_types is not None else AGENT_TYPES)
    if not types:
        raise ValueError("at least one agent type is needed")
    rng = random.Random(seed)  # noqa: S311 - reproducible simulation, not cryptography
    models = [_Model(t) for t in types]
    type_table = _cumulative([t.share for t in types])

    n_attacks = round(tasks * attack_rate) if scenarios else 0
    if attack_rate > 0 and scenarios:
        n_attacks = min(tasks, max(n_attacks, len(scenarios)))
    order = [scenarios[i % len(scenarios)] for i in range(n_attacks)]
    rng.shuffle(order)
    attacked = dict(zip(rng.sample(range(tasks), n_attacks), order, strict=True))

    built: list[_Task] = []
    # Tasks arrive as a Poisson process: about 2 new tasks a second across all agents.
    opened = start
    for index in range(tasks):
        opened += rng.expovariate(2.0)
        ti = _draw(rng, type_table)
        t, model = types[ti], models[ti]
        instance = rng.randrange(t.agents)
        source = t.sources[instance % len(t.sources)]
        task_id = _task_id(rng, opened)
        jti = hashlib.sha256(f"{seed}:{task_id}:{rng.getrandbits(64)}".encode()).hexdigest()
        deadline = opened + _lifetime(t)
        scope = declared_scope(t, deadline)
        # Per-task pace: some tasks are brisker than others.
        rate = t.rate_hz * min(1.8, max(0.6, rng.lognormvariate(0.0, 0.25)))
        lo, hi = t.task_len
        n = round(lo + (hi - lo) * rng.betavariate(1.5, 2.5))
        calls = _benign_calls(rng, model, n, opened + rng.uniform(0.05, 0.5), rate, source)
        task = _Task(task_id, t.agent_ids()[instance], t, jti, opened, deadline, scope, calls)
        scenario = attacked.get(index)
        if scenario is not None:
            task.scenario = scenario
            _inject(rng, model, task, scenario, rate)
        _fit_before_deadline(task)
        live = [c.at for c in task.calls if c.attack != "use_after_end"]
        task.closed_at = max(live) + rng.uniform(0.2, 5.0)
        built.append(task)
    return _assemble(rng, built)


def _assemble(rng: random.Random, built: list[_Task]) -> Traffic:
    run = f"{rng.getrandbits(32):08x}"
    opened_events: list[TaskEvent] = []
    closed_events: list[TaskEvent] = []
    rows: list[tuple[float, int, int, _Task, _Call]] = []
    for ti, task in enumerate(built):
        opened_events.append(
            TaskEvent(
                event_id=f"{task.task_id}:opened",
                at=round(task.opened_at, 6),
                kind=TaskEventKind.OPENED,
                task_id=task.task_id,
                agent_id=task.agent_id,
                status="active",
                spiffe_id=f"spiffe://{TRUST_DOMAIN}/agent/{task.agent_id}/task/{task.task_id}",
                scope=task.scope,
                deadline=task.deadline,
                jti_hash=task.jti_hash,
            )
        )
        closed_events.append(
            TaskEvent(
                event_id=f"{task.task_id}:closed",
                at=round(task.closed_at, 6),
                kind=TaskEventKind.CLOSED,
                task_id=task.task_id,
                agent_id=task.agent_id,
                status="completed",
            )
        )
        for ci, call in enumerate(task.calls):
            rows.append((round(call.at, 6), ti, ci, task, call))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    events: list[UsageEvent] = []
    event_labels: list[str | None] = []
    first: dict[str, tuple[int, float]] = {}
    seen: dict[str, int] = {}
    for i, (at, _, _, task, call) in enumerate(rows):
        t = task.agent_type
        events.append(
            UsageEvent(
                event_id=f"ev-{run}-{i:08d}",
                at=at,
                agent_id=task.agent_id,
                task_id=task.task_id,
                jti_hash=task.jti_hash,
                action=t.action,
                resource=call.resource,
                audience=t.audience,
                decision=call.decision,
                reason=call.reason,
                bytes_out=call.bytes_out,
                bytes_in=call.bytes_in,
                source=call.source,
                guard=f"gw-{call.tool.removeprefix('tool/').split('.')[0]}-{1 + i % 2}",
            )
        )
        event_labels.append(call.attack)
        position = seen.get(task.task_id, 0)
        seen[task.task_id] = position + 1
        if call.attack is not None and task.task_id not in first:
            first[task.task_id] = (position, at)
    labels: dict[str, Label] = {}
    for task in built:
        start_index, start_at = first.get(task.task_id, (None, None))
        scenario = task.scenario if start_index is not None else None
        labels[task.task_id] = Label(task.task_id, scenario, start_index, start_at)
    opened_events.sort(key=lambda e: e.at)
    closed_events.sort(key=lambda e: e.at)
    return Traffic(opened_events, events, labels, event_labels, closed_events)


# --------------------------------------------------------------------------- rules replay


@dataclass(frozen=True)
class RuleHit:
    """One deterministic-rule finding during :func:`replay_rules`."""

    index: int
    """Index of the event in :attr:`Traffic.events`."""
    position: int
    """Index of the event among its task's own events (compare ``Label.attack_start_index``)."""
    rule: str
    action: str
    """``revoke`` or ``alert``."""
    at: float


def replay_rules(
    traffic: Traffic, thresholds: Thresholds | None = None
) -> dict[str, list[RuleHit]]:
    """Run the deterministic rules over ``traffic`` in-process, the way the detector's
    consumer does (task facts applied before the usage that follows them, then
    ``Store.observe`` and ``rules.evaluate`` per event; no broker, no actions, one
    partition). Returns the findings per task id (tasks without any are absent)."""
    limits = thresholds or Thresholds()
    store = Store(denied_burst=limits.denied_burst)
    lifecycle = traffic.lifecycle()
    next_fact = 0
    positions: dict[str, int] = {}
    hits: dict[str, list[RuleHit]] = {}
    for index, event in enumerate(traffic.events):
        while next_fact < len(lifecycle) and lifecycle[next_fact].at <= event.at:
            store.apply_task_event(lifecycle[next_fact])
            next_fact += 1
        position = positions.get(event.task_id, 0)
        positions[event.task_id] = position + 1
        task, agent = store.observe(event, 0, event.at)
        for finding in evaluate(event, task, agent, limits):
            hits.setdefault(event.task_id, []).append(
                RuleHit(index, position, finding.rule.id, finding.rule.action, event.at)
            )
    return hits


# --------------------------------------------------------------------------- files


def labels_path(path: str | Path) -> Path:
    """Where the labels of an events file live: ``<path>.labels.json``."""
    path = Path(path)
    return path.with_name(path.name + ".labels.json")


def _open(path: Path, mode: Literal["rb", "wb"]) -> BinaryIO:
    if path.suffix == ".gz":
        return cast(BinaryIO, gzip.open(path, mode))
    return path.open(mode)


class _LabelsFile(msgspec.Struct, frozen=True, kw_only=True):
    version: int = _LABELS_VERSION
    labels: list[Label]
    event_labels: dict[str, str]
    """event id -> scenario, for the injected events only."""


def write_events(traffic: Traffic, path: str | Path) -> Path:
    """Write ``traffic`` as JSON lines (task and usage events merged in time order) and its
    labels to :func:`labels_path`. Returns the labels path."""
    path = Path(path)
    with _open(path, "wb") as out:
        for event in traffic.stream():
            out.write(encoder.encode(event))
            out.write(b"\n")
    sidecar = labels_path(path)
    body = _LabelsFile(
        labels=list(traffic.labels.values()),
        event_labels={
            e.event_id: s
            for e, s in zip(traffic.events, traffic.event_labels, strict=True)
            if s is not None
        },
    )
    sidecar.write_bytes(msgspec.json.format(encoder.encode(body)))
    return sidecar


def read_events(path: str | Path) -> Traffic:
    """Read an events file (any JSON-lines file of task/usage events, e.g. a topic dump).

    Labels come from the sidecar; without one, ``labels`` is empty and every event is
    unlabelled. Other event types in the file are skipped; a malformed line raises
    ``ValueError`` naming its line number.
    """
    path = Path(path)
    opened: list[TaskEvent] = []
    closed: list[TaskEvent] = []
    events: list[UsageEvent] = []
    with _open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from exc
            if isinstance(event, UsageEvent):
                events.append(event)
            elif isinstance(event, TaskEvent):
                (closed if event.kind is TaskEventKind.CLOSED else opened).append(event)
    events.sort(key=lambda e: e.at)
    labels: dict[str, Label] = {}
    by_event: dict[str, str] = {}
    sidecar = labels_path(path)
    if sidecar.exists():
        body = msgspec.json.decode(sidecar.read_bytes(), type=_LabelsFile)
        if body.version != _LABELS_VERSION:
            raise ValueError(f"{sidecar}: labels version {body.version} is not supported")
        labels = {label.task_id: label for label in body.labels}
        by_event = body.event_labels
    event_labels = [by_event.get(e.event_id) for e in events]
    return Traffic(opened, events, labels, event_labels, closed)


# --------------------------------------------------------------------------- Kafka


async def publish(
    traffic: Traffic,
    settings: Settings,
    *,
    rate: float | None = None,
    progress: bool = True,
    client_id: str = "killswitch-traffic",
) -> int:
    """Publish ``traffic`` in time order: task events to ``settings.kafka_tasks_topic``
    (key = task id, like the service) and usage events to ``settings.kafka_usage_topic``
    (key = agent id, like the guard), at most ``rate`` records a second (``None``: as fast
    as the broker takes them). Shows a progress bar when ``progress``. Returns the number
    of records sent, all acknowledged."""
    from rich.progress import Progress

    from service import kafka

    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 records/s")
    total = len(traffic.events) + len(traffic.tasks) + len(traffic.closed)
    await kafka.ensure_topics(settings)
    producer = kafka.producer(settings, client_id, linger_ms=5)
    await producer.start()
    sent = 0
    chunk = 500 if rate is None else max(1, min(500, int(rate / 20)))
    began = time.monotonic()
    try:
        with Progress(disable=not progress, transient=False) as bar:
            job = bar.add_task("publishing", total=total)
            pending: list[Any] = []
            for event in traffic.stream():
                if isinstance(event, UsageEvent):
                    topic, key = settings.kafka_usage_topic, event.agent_id
                else:
                    topic, key = settings.kafka_tasks_topic, event.task_id
                pending.append(
                    await producer.send(topic, value=encoder.encode(event), key=key.encode())
                )
                if len(pending) >= chunk:
                    await asyncio.gather(*pending)
                    sent += len(pending)
                    bar.update(job, completed=sent)
                    pending = []
                    if rate is not None:
                        ahead = sent / rate - (time.monotonic() - began)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            await asyncio.gather(*pending)
            sent += len(pending)
            bar.update(job, completed=sent)
    finally:
        await producer.stop()
    return sent


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detectors.traffic", description="Synthetic agent traffic."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write an events file (+ .labels.json)")
    gen.add_argument("--seed", type=int, required=True)
    gen.add_argument("--tasks", type=int, default=1000)
    gen.add_argument("--attack-rate", type=float, default=0.05)
    gen.add_argument("--start", type=float, default=1.8e9)
    gen.add_argument("-o", "--output", type=Path, required=True)
    pub = sub.add_parser("publish", help="publish an events file to Kafka (KS_KAFKA_*)")
    pub.add_argument("path", type=Path)
    pub.add_argument("--rate", type=float, default=None, help="records/s (default: max)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        traffic = generate(
            seed=args.seed, tasks=args.tasks, attack_rate=args.attack_rate, start=args.start
        )
        sidecar = write_events(traffic, args.output)
        attacked = sum(1 for label in traffic.labels.values() if label.scenario)
        print(
            f"{len(traffic.events)} usage events, {len(traffic.tasks)} tasks "
            f"({attacked} attacked) -> {args.output} (labels: {sidecar})"
        )
        return 0
    traffic = read_events(args.path)
    sent = asyncio.run(publish(traffic, Settings.from_env(), rate=args.rate))
    print(f"published {sent} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
