"""Behavioural features for the anomaly model, computed incrementally per usage event.

One fixed, versioned feature list (:data:`FEATURES`, :data:`FEATURE_VERSION`): a trained
model artifact records both and is refused when they differ from this module's. Every
feature is computed from the event, the task's window and the agent's own history, in
O(1) amortised pure Python (no numpy on the hot path)::

    name               what                                                        scale
    gap_z              EWMA z-score of the task's inter-arrival (log s) against   z, + = faster
                       the agent's own history                                      than usual
    rate_z             EWMA z-score of the task's decayed 10 s call rate (log)     z
    bytes_out_log      log1p(bytes out of this call)                               log bytes
    bytes_out_z        EWMA z-score of log1p(bytes out) against the agent          z
    task_bytes_log     log1p(bytes out of the task so far)                         log bytes
    bytes_excess       log1p(task's running sum of max(0, bytes_out_z - 2))        log z
    distinct_1m        log1p(distinct resources the task first reached in the      log count
                       last 60 s: distinct-resource growth)
    fresh_share        task EWMA of "first use of this resource by the task"       0..1
    new_resource       resource never used by this agent                           0/1
    new_resource_share task EWMA of new_resource minus the agent's own slow        -1..1
                       EWMA of it (new-resource share against the agent's norm)
    new_tool           tool (action + resource head) never used by this agent      0/1
    new_prefix         resource prefix (parent path) never used by this agent      0/1
    new_source         source (address/user agent/key) never seen for this agent   0/1
    scope_used         share of the declared grants exercised so far               0..1
    denied_rate        denied / all calls of the task                              0..1
    since_issue        log1p(seconds since the task was opened)                    log s
    life_left          share of the task's lifetime remaining (< 0 after deadline) -1..1
    seq_surprise       -log P(tool | previous tool) under the agent type's bigram  nats
                       model (learned at training time; 0 without one)
    seq_surprise_avg   the task's EWMA of seq_surprise (sustained odd sequences)   nats
    task_events_log    log1p(calls of the task so far)                             log count
    task_sources       distinct sources presenting the task's credentials (≤ 8)    count

The agent's history (EWMA means/variances, first-seen sets) warms up over
:data:`WARMUP` events; until then its z-scores are 0 and first-seen flags are off, so a
detector that just started (or took over a partition) does not flag everything as new.
State hangs off :class:`~detectors.state.TaskState` / :class:`~detectors.state.AgentState`
(``features`` slot), so eviction and rebalances drop it with the rest of the counters.

This module does no I/O and reads no clock. The agent *type* (which model and bigram
table apply) is derived from the agent id by :class:`AgentTyper`.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

from detectors.state import AgentState, TaskState
from service.kernel.events import Decision, UsageEvent
from service.kernel.scopes import CompiledScope, ScopeSpec, compile_scope

__all__ = [
    "DEFAULT_AGENT_TYPE_PATTERN",
    "FEATURES",
    "FEATURE_INDEX",
    "FEATURE_VERSION",
    "WARMUP",
    "AgentTyper",
    "FeatureExtractor",
    "SequenceModel",
    "resource_prefix",
    "tool_of",
]

FEATURE_VERSION: Final = 2
FEATURES: Final = (
    "gap_z",
    "rate_z",
    "bytes_out_log",
    "bytes_out_z",
    "task_bytes_log",
    "bytes_excess",
    "distinct_1m",
    "fresh_share",
    "new_resource",
    "new_resource_share",
    "new_tool",
    "new_prefix",
    "new_source",
    "scope_used",
    "denied_rate",
    "since_issue",
    "life_left",
    "seq_surprise",
    "seq_surprise_avg",
    "task_events_log",
    "task_sources",
)
FEATURE_INDEX: Final = {name: i for i, name in enumerate(FEATURES)}

#: Events of an agent before its own history is trusted (z-scores, first-seen flags).
WARMUP: Final = 30
#: EWMA weight of the agent's history (~ the last 1/ALPHA events).
ALPHA: Final = 0.02
#: EWMA weight of a task's running sequence surprise.
SEQ_ALPHA: Final = 0.3
#: EWMA weight of a task's running shares of first-used / never-seen resources.
TASK_ALPHA: Final = 0.2
#: EWMA weight of the agent's own share of calls reaching never-used resources (slow, so
#: an enumeration does not teach the agent's norm within the attack).
NEW_ALPHA: Final = 0.005
#: A call's bytes-out z-score counts towards the task's excess beyond this.
EXCESS_Z: Final = 2.0
#: Time constant of the task's decayed call rate, and the distinct-resources window.
RATE_TAU: Final = 10.0
WINDOW: Final = 60.0
#: Bounds on per-agent first-seen sets and per-task resource sets (memory).
MAX_SEEN: Final = 4096
MAX_TASK_RESOURCES: Final = 512
MAX_TASK_SOURCES: Final = 8
MIN_GAP: Final = 1e-3
#: Agent type fallback: the model trained on every type pooled.
ANY_TYPE: Final = "*"
START: Final = "^"

DEFAULT_AGENT_TYPE_PATTERN: Final = r"^(?P<type>.+?)[-_.](?=[0-9a-f]*[0-9])[0-9a-f]+$"

_ALLOW: Final = Decision.ALLOW
_ALPHA_N: Final = round(1.0 / ALPHA)
_NEW_ALPHA_N: Final = round(1.0 / NEW_ALPHA)
_TASK_ALPHA_N: Final = round(1.0 / TASK_ALPHA)
_INV_TAU: Final = 1.0 / RATE_TAU
_TABLE: Final = 4096
_LOG1P: Final = tuple(math.log1p(i) for i in range(_TABLE))

_log = math.log
_log1p = math.log1p
_exp = math.exp
_sqrt = math.sqrt


def resource_prefix(resource: str) -> str:
    """The parent of a resource: ``file:///data/r/q1.csv`` -> ``file:///data/r``."""
    resource = resource.split("?", 1)[0]
    cut = resource.rfind("/")
    if cut <= 0 or resource[cut - 1] == "/":
        return resource
    return resource[:cut]


def tool_of(action: str, resource: str) -> str:
    """What was used: the action and the resource's first two path segments.

    ``call tool/invoices.read`` -> ``call:tool/invoices.read``;
    ``GET https://api.internal/v1/repos/x/y`` -> ``GET:https://api.internal/v1/repos``.
    """
    resource = resource.split("?", 1)[0]
    start = resource.find("://")
    start = resource.find("/", start + 3) if start >= 0 else 0
    if start < 0:
        return f"{action}:{resource}"
    rest = resource[start:]
    keep = 3 if rest.startswith("/") else 2
    return f"{action}:{resource[:start]}{'/'.join(rest.split('/', keep)[:keep])}"


class AgentTyper:
    """Agent id -> agent type, by a regex with a ``type`` group (or group 1).

    The default strips a trailing id-like token: ``research-0003`` -> ``research``,
    ``agent-1a2b3c4d`` -> ``agent``; an id that does not match is its own type.
    """

    def __init__(self, pattern: str = DEFAULT_AGENT_TYPE_PATTERN) -> None:
        self.pattern = pattern or DEFAULT_AGENT_TYPE_PATTERN
        self._regex = re.compile(self.pattern)
        self._group: str | int = "type" if "type" in self._regex.groupindex else 1
        if self._regex.groups < 1:
            raise ValueError(f"agent type pattern {pattern!r} has no group")

    def __call__(self, agent_id: str) -> str:
        match = self._regex.match(agent_id)
        if match is None:
            return agent_id
        return match.group(self._group) or agent_id


class SequenceModel:
    """Per agent type, the surprise ``-log P(tool | previous tool)`` of a bigram model with
    add-``smoothing`` counts, learned at training time. Unknown types use the pooled table.
    """

    def __init__(
        self,
        counts: Mapping[str, Mapping[str, Mapping[str, int]]],
        *,
        smoothing: float = 0.5,
    ) -> None:
        self.counts = {t: {p: dict(n) for p, n in c.items()} for t, c in counts.items()}
        self.smoothing = smoothing
        self._tables: dict[str, tuple[dict[str, tuple[dict[str, float], float]], float]] = {}
        for agent_type, table in self.counts.items():
            vocab = {tool for nexts in table.values() for tool in nexts}
            v = len(vocab) + 1  # + "anything unseen"
            rows: dict[str, tuple[dict[str, float], float]] = {}
            for prev, nexts in table.items():
                total = sum(nexts.values()) + smoothing * v
                rows[prev] = (
                    {tool: -_log((n + smoothing) / total) for tool, n in nexts.items()},
                    -_log(smoothing / total),
                )
            unseen_prev = -_log(1.0 / v)
            self._tables[agent_type] = (rows, unseen_prev)

    @classmethod
    def learn(
        cls, sequences: Iterable[tuple[str, Iterable[str]]], *, smoothing: float = 0.5
    ) -> SequenceModel:
        """From (agent type, the tools of one task in order) pairs; also pools them."""
        counts: dict[str, dict[str, dict[str, int]]] = {}
        for agent_type, tools in sequences:
            for key in (agent_type, ANY_TYPE):
                table = counts.setdefault(key, {})
                prev = START
                for tool in tools:
                    row = table.setdefault(prev, {})
                    row[tool] = row.get(tool, 0) + 1
                    prev = tool
        return cls(counts, smoothing=smoothing)

    def table(self, agent_type: str) -> tuple[dict[str, tuple[dict[str, float], float]], float]:
        found = self._tables.get(agent_type) or self._tables.get(ANY_TYPE)
        return found if found is not None else ({}, 0.0)

    def surprise(self, agent_type: str, prev: str, tool: str) -> float:
        rows, unseen = self.table(agent_type)
        row = rows.get(prev)
        if row is None:
            return unseen if rows else 0.0
        return row[0].get(tool, row[1])


_NO_SEQUENCES = SequenceModel({})
_GRANTS_CACHE: dict[ScopeSpec, tuple[tuple[str, CompiledScope], ...]] = {}


def _grants(spec: ScopeSpec) -> tuple[tuple[str, CompiledScope], ...]:
    """One single-grant compiled scope per grant (to see which grants were exercised)."""
    found = _GRANTS_CACHE.get(spec)
    if found is None:
        if len(_GRANTS_CACHE) > 4096:
            _GRANTS_CACHE.clear()
        found = tuple(
            (text.split(":", 1)[0], compile_scope(ScopeSpec(grants=(text,))))
            for text in spec.grants
        )
        _GRANTS_CACHE[spec] = found
    return found


class AgentHistory:
    """One agent's own behaviour: EWMA mean/variance of three quantities, first-seen sets."""

    __slots__ = (
        "agent_type",
        "bytes_m",
        "bytes_v",
        "gap_m",
        "gap_v",
        "n",
        "n_gap",
        "new_m",
        "prefixes",
        "rate_m",
        "rate_v",
        "resources",
        "seq_rows",
        "seq_unseen",
        "sources",
        "tools",
    )

    def __init__(self, agent_type: str, sequences: SequenceModel) -> None:
        self.agent_type = agent_type
        self.seq_rows, self.seq_unseen = sequences.table(agent_type)
        self.n = 0
        self.n_gap = 0
        self.gap_m = self.gap_v = 0.0
        self.rate_m = self.rate_v = 0.0
        self.bytes_m = self.bytes_v = 0.0
        self.new_m = 0.0
        """The agent's own (slow) EWMA share of calls reaching a resource it never used."""
        self.resources: dict[str, str] = {}
        """Resources this agent used (first MAX_SEEN), with their tool."""
        self.tools: set[str] = set()
        self.prefixes: set[str] = set()
        self.sources: set[str] = set()


class TaskWindow:
    """One task's running window (and the model policy's per-task state)."""

    __slots__ = (
        "bytes",
        "cusum",
        "denied",
        "events",
        "excess",
        "first_uses",
        "fresh_avg",
        "grants_left",
        "inv_life",
        "last_at",
        "max_score",
        "n_grants",
        "new_avg",
        "novel_source",
        "opened",
        "prev_tool",
        "rate",
        "resources",
        "scope_used",
        "seq_avg",
        "sources",
    )

    def __init__(self, grants: tuple[tuple[str, CompiledScope], ...]) -> None:
        self.events = 0
        self.denied = 0
        self.bytes = 0
        self.excess = 0.0
        self.last_at: float | None = None
        self.opened = 0.0
        self.inv_life = 0.0
        self.rate = 0.0
        self.prev_tool = START
        self.seq_avg = 0.0
        self.fresh_avg = 0.0
        self.new_avg = 0.0
        self.first_uses: deque[float] = deque()
        """Times the task first reached each of its resources, the last WINDOW s."""
        self.resources: dict[str, str] = {}
        """Resources the task used (first MAX_TASK_RESOURCES), with their tool."""
        self.sources: set[str] = set()
        self.grants_left = list(grants)
        self.n_grants = len(grants)
        self.scope_used = 0.0
        self.novel_source = False
        """A source this agent never used presented the task's credential (after warm-up)."""
        self.cusum = 0.0
        """The model's running task score (detectors/models.py)."""
        self.max_score = 0.0


class FeatureExtractor:
    """Computes :data:`FEATURES` for each usage event, after :meth:`Store.observe`."""

    def __init__(
        self,
        sequences: SequenceModel | None = None,
        typer: AgentTyper | None = None,
    ) -> None:
        self.sequences = sequences or _NO_SEQUENCES
        self.typer = typer or AgentTyper()
        self.last_type = ANY_TYPE
        """The agent type of the last event :meth:`update` saw."""

    def agent_type(self, agent: AgentState) -> str:
        return self._history(agent).agent_type

    def _history(self, agent: AgentState) -> AgentHistory:
        history = agent.features
        if history is None:
            history = agent.features = AgentHistory(self.typer(agent.agent_id), self.sequences)
        assert isinstance(history, AgentHistory)
        return history

    def window(self, task: TaskState) -> TaskWindow | None:
        found = task.features
        return found if isinstance(found, TaskWindow) else None

    def update(self, ev: UsageEvent, task: TaskState, agent: AgentState) -> tuple[float, ...]:
        """Fold ``ev`` into the task's window and the agent's history; its feature row."""
        h = agent.features
        if h is None:
            h = agent.features = AgentHistory(self.typer(agent.agent_id), self.sequences)
        w = task.features
        if w is None:
            w = task.features = self._open_window(task, ev.at)
        if TYPE_CHECKING:
            assert isinstance(h, AgentHistory)
            assert isinstance(w, TaskWindow)
        self.last_type = h.agent_type
        at = ev.at
        n = h.n = h.n + 1
        warm = n > WARMUP
        events = w.events = w.events + 1
        # Plain running mean/variance until 1/ALPHA events, then exponential forgetting.
        alpha = ALPHA if n >= _ALPHA_N else 1.0 / n

        # -- inter-arrival and rate against the agent's own history
        last = w.last_at
        if last is None:
            gap_z = 0.0
            rate = w.rate = 1.0
            w.last_at = at
        else:
            dt = at - last
            if at > last:
                w.last_at = at
            if dt < MIN_GAP:
                dt = MIN_GAP
            x = _log(dt)
            m = h.gap_m
            d = x - m
            n_gap = h.n_gap = h.n_gap + 1
            gap_z = (m - x) / _sqrt(h.gap_v + 0.01) if n_gap > WARMUP else 0.0
            a = ALPHA if n_gap >= _ALPHA_N else 1.0 / n_gap
            h.gap_m = m + a * d
            h.gap_v = (1 - a) * (h.gap_v + a * d * d)
            rate = w.rate = w.rate * _exp(-dt * _INV_TAU) + 1.0
        d = _log(rate) - h.rate_m
        rate_z = d / _sqrt(h.rate_v + 0.01) if warm else 0.0
        h.rate_m += alpha * d
        h.rate_v = (1 - alpha) * (h.rate_v + alpha * d * d)

        # -- bytes out: this call against the agent, the task's running excess
        nbytes = ev.bytes_out
        bytes_log = _log1p(nbytes)
        d = bytes_log - h.bytes_m
        if warm:
            bytes_z = d / _sqrt(h.bytes_v + 0.01)
            if bytes_z > EXCESS_Z:
                w.excess += bytes_z - EXCESS_Z
        else:
            bytes_z = 0.0
        h.bytes_m += alpha * d
        h.bytes_v = (1 - alpha) * (h.bytes_v + alpha * d * d)
        task_bytes = w.bytes = w.bytes + nbytes

        # -- resources: first use by the task, by the agent; first-seen tool and prefix
        resource = ev.resource
        first_uses = w.first_uses
        tool = w.resources.get(resource)
        a = TASK_ALPHA if events >= _TASK_ALPHA_N else 1.0 / events
        b = NEW_ALPHA if n >= _NEW_ALPHA_N else 1.0 / n
        if tool is not None:
            new_resource = new_tool = new_prefix = 0.0
            w.fresh_avg -= a * w.fresh_avg
            w.new_avg -= a * w.new_avg
            h.new_m -= b * h.new_m
        else:
            first_uses.append(at)
            w.fresh_avg += a * (1.0 - w.fresh_avg)
            tool = h.resources.get(resource)
            if tool is not None:
                new_resource = new_tool = new_prefix = 0.0
                w.new_avg -= a * w.new_avg
                h.new_m -= b * h.new_m
            else:
                tool, new_resource, new_tool, new_prefix = self._new_resource(
                    h, ev.action, resource, warm
                )
                w.new_avg += a * (1.0 - w.new_avg)
                h.new_m += b * (1.0 - h.new_m)
            if len(w.resources) < MAX_TASK_RESOURCES:
                w.resources[resource] = tool
            if w.grants_left:
                self._use_grant(w, ev.action, resource)
        horizon = at - WINDOW
        while first_uses and first_uses[0] < horizon:
            first_uses.popleft()

        # -- sources: first seen on the task, by the agent
        source = ev.source
        source_key = source.address or source.user_agent or source.jkt or ""
        new_source = 0.0
        if source_key not in w.sources:
            if len(w.sources) < MAX_TASK_SOURCES:
                w.sources.add(source_key)
            if source_key not in h.sources:
                if warm:
                    new_source = 1.0
                    w.novel_source = True
                if len(h.sources) < MAX_SEEN:
                    h.sources.add(source_key)

        # -- denied share, lifetime
        if ev.decision is not _ALLOW:
            w.denied += 1
        since = at - w.opened
        inv_life = w.inv_life
        if inv_life:
            life_left = 1.0 - since * inv_life
            life_left = 1.0 if life_left > 1.0 else (-1.0 if life_left < -1.0 else life_left)
        else:
            life_left = 1.0

        # -- tool sequence under the agent type's bigram model
        row = h.seq_rows.get(w.prev_tool)
        if row is None:
            surprise = h.seq_unseen if h.seq_rows else 0.0
        else:
            surprise = row[0].get(tool, row[1])
        w.prev_tool = tool
        seq_avg = w.seq_avg = (
            surprise if events == 1 else w.seq_avg + SEQ_ALPHA * (surprise - w.seq_avg)
        )
        n_first = len(first_uses)
        return (
            gap_z,
            rate_z,
            bytes_log,
            bytes_z,
            _LOG1P[task_bytes] if task_bytes < _TABLE else _log1p(task_bytes),
            _log1p(w.excess),
            _LOG1P[n_first] if n_first < _TABLE else _log1p(n_first),
            w.fresh_avg,
            new_resource,
            w.new_avg - h.new_m,
            new_tool,
            new_prefix,
            new_source,
            w.scope_used,
            w.denied / events,
            _log1p(since) if since > 0.0 else 0.0,
            life_left,
            surprise,
            seq_avg,
            _LOG1P[events] if events < _TABLE else _log1p(events),
            float(len(w.sources)),
        )

    def _open_window(self, task: TaskState, at: float) -> TaskWindow:
        scope = task.scope
        w = TaskWindow(_grants(scope.spec) if scope is not None else ())
        opened = task.opened_at
        if opened is None:
            opened = task.opened_at = at
        w.opened = opened
        deadline = task.deadline
        if deadline is not None and deadline > opened:
            w.inv_life = 1.0 / (deadline - opened)
        return w

    @staticmethod
    def _new_resource(
        h: AgentHistory, action: str, resource: str, warm: bool
    ) -> tuple[str, float, float, float]:
        """A resource this agent never used: its tool, and the first-seen flags."""
        tool = tool_of(action, resource)
        if len(h.resources) < MAX_SEEN:
            h.resources[resource] = tool
        new_tool = new_prefix = 0.0
        if tool not in h.tools:
            new_tool = 1.0 if warm else 0.0
            if len(h.tools) < MAX_SEEN:
                h.tools.add(tool)
        prefix = resource_prefix(resource)
        if prefix not in h.prefixes:
            new_prefix = 1.0 if warm else 0.0
            if len(h.prefixes) < MAX_SEEN:
                h.prefixes.add(prefix)
        return tool, (1.0 if warm else 0.0), new_tool, new_prefix

    @staticmethod
    def _use_grant(w: TaskWindow, action: str, resource: str) -> None:
        """Scope share: the first grant covering a resource's first use is exercised."""
        left = w.grants_left
        for i, (grant_action, grant) in enumerate(left):
            if (grant_action == action or grant_action == "*") and grant.covers(action, resource):
                del left[i]
                w.scope_used = (w.n_grants - len(left)) / w.n_grants
                return
