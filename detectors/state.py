"""What the detector knows: per-task and per-agent state, bounded in memory.

Two kinds of knowledge live here, kept apart because they come from different places:

* **task facts** (declared scope, deadline, lifecycle) come from the tasks topic and the
  revocations topic, which every detector instance replays whole, or from the service
  (``GET /v1/tasks/{id}``) when a usage event beats its task. They are global.
* **usage counters** (calls, bytes out, rate and denied windows, first-seen clients) come
  from the usage topic, which is keyed by agent id, so all of one agent's events reach
  one partition and one detector. They belong to that partition: a rebalance drops them
  (:meth:`Store.drop_partitions`) and the next owner starts counting afresh.

This module performs no I/O and reads no clock: callers pass event times and ``now``.
Memory is bounded by :meth:`Store.sweep` (ended tasks leave after a grace period, and a
hard cap evicts the least recently seen).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Final

from service.contracts import TaskView
from service.kernel.errors import KillSwitchError
from service.kernel.events import Decision, RevocationEvent, TaskEvent, TaskEventKind, UsageEvent
from service.kernel.scopes import CompiledScope, ScopeSpec, compile_scope

__all__ = [
    "AgentState",
    "ClientSeen",
    "RateWindow",
    "Store",
    "TaskState",
]

log = logging.getLogger("killswitch.detector.state")

#: A credential's first-seen client is remembered for at most this many credentials per
#: task (a task renews its credential; it does not mint thousands).
MAX_CREDENTIALS_PER_TASK: Final = 64
#: How long a "the service does not know this task" answer is believed.
UNKNOWN_TASK_TTL: Final = 60.0
#: Revoked credentials remembered (FIFO beyond this).
MAX_REVOKED_JTIS: Final = 1_000_000

_BUCKETS: Final = 100  # 100 buckets of 100 ms: a 10 s window
_PER_SECOND: Final = 10


class RateWindow:
    """Calls per sliding 1 s and 10 s window, in 100 ms buckets (fixed memory).

    Time is event time. An event older than the window is ignored; one within the window
    but out of order lands in its own bucket.
    """

    __slots__ = ("_buckets", "_head", "total")

    def __init__(self) -> None:
        self._buckets = [0] * _BUCKETS
        self._head = -1
        self.total = 0
        """Calls in the 10 s window ending at the latest event."""

    def add(self, at: float) -> None:
        i = int(at * _PER_SECOND)
        head = self._head
        buckets = self._buckets
        if i > head:
            if head < 0 or i - head >= _BUCKETS:
                buckets = self._buckets = [0] * _BUCKETS
                self.total = 0
            else:
                for j in range(head + 1, i + 1):
                    k = j % _BUCKETS
                    self.total -= buckets[k]
                    buckets[k] = 0
            self._head = i
        elif i <= head - _BUCKETS:
            return
        buckets[i % _BUCKETS] += 1
        self.total += 1

    def last_second(self) -> int:
        """Calls in the 1 s window ending at the latest event."""
        buckets, head = self._buckets, self._head
        return sum(buckets[(head - j) % _BUCKETS] for j in range(_PER_SECOND))


@dataclass(frozen=True, slots=True)
class ClientSeen:
    """Where a credential was presented from (the fields the identity rule compares)."""

    address: str | None
    user_agent: str | None
    jkt: str | None
    at: float

    def differences(self, other: ClientSeen) -> list[str]:
        """Fields known on both sides that differ. Unknown never counts as different."""
        found = []
        if self.address and other.address and self.address != other.address:
            found.append("address")
        if self.user_agent and other.user_agent and self.user_agent != other.user_agent:
            found.append("user_agent")
        if self.jkt and other.jkt and self.jkt != other.jkt:
            found.append("jkt")
        return found


class TaskState:
    """One task: facts (scope, deadline, lifecycle) plus this partition's usage counters."""

    __slots__ = (
        "agent_id",
        "bytes_out",
        "calls",
        "clients",
        "deadline",
        "denied",
        "ended_at",
        "features",
        "fired",
        "known",
        "looked_up_at",
        "opened_at",
        "partition",
        "rate",
        "revoked_credentials",
        "scope",
        "status",
        "task_id",
        "touched",
    )

    def __init__(self, task_id: str, agent_id: str) -> None:
        self.task_id = task_id
        self.agent_id = agent_id
        self.scope: CompiledScope | None = None
        self.deadline: float | None = None
        self.status = "unknown"
        """active, completed, revoked, expired; ``unknown`` until a fact arrives."""
        self.known = False
        """Whether the tasks topic or the service has told us about this task."""
        self.ended_at: float | None = None
        """When the task was closed or revoked (not expiry: see ``deadline``)."""
        self.looked_up_at: float | None = None
        """When the service answered "no such task" (negative cache)."""
        self.opened_at: float | None = None
        """When the task was opened (its ``opened`` event or the service's answer)."""
        self.revoked_credentials: dict[str, float] | None = None
        """Credentials of this task revoked on their own (jti hash -> when)."""
        self.fired: set[str] = set()
        """Rule ids already acted on for this task (one action per rule and task)."""
        self.partition = -1
        self.touched = 0.0
        self.reset_counters()

    def reset_counters(self) -> None:
        self.calls = 0
        self.bytes_out = 0
        self.rate: RateWindow | None = None
        self.denied: deque[float] | None = None
        self.clients: dict[str, ClientSeen] = {}
        self.features: object | None = None
        """Model feature state (detectors/features.py), like the counters per partition."""

    # ---------------------------------------------------------------- facts

    def learn(self, scope: ScopeSpec, deadline: float | None, status: str, agent_id: str) -> None:
        try:
            self.scope = compile_scope(scope)
        except KillSwitchError as exc:
            # The service validated this scope; an invalid one here is a bug upstream.
            log.error("task %s: declared scope does not compile: %s", self.task_id, exc)
            self.scope = None
        if deadline is not None:
            self.deadline = deadline
        self.agent_id = agent_id
        self.known = True
        self.looked_up_at = None
        if self.ended_at is None:
            self.status = status

    def end(self, status: str, at: float) -> None:
        """Closed or revoked at ``at``. The earliest end wins; an end is never undone."""
        if self.ended_at is None or at < self.ended_at:
            self.ended_at = at
            self.status = status

    def over_at(self, at: float, leeway: float) -> tuple[str, float] | None:
        """Why the task was no longer alive at event time ``at`` (status, since)."""
        if self.ended_at is not None and at > self.ended_at:
            return self.status, self.ended_at
        if self.deadline is not None and at > self.deadline + leeway:
            return "expired", self.deadline
        return None

    def ended_before(self, now: float) -> float | None:
        """When the task ended or expired, if it has by ``now``."""
        ends = [t for t in (self.ended_at, self.deadline) if t is not None and t <= now]
        return min(ends) if ends else None


class AgentState:
    """One agent's activity on one partition."""

    __slots__ = ("agent_id", "denied", "events", "features", "partition", "tasks")

    def __init__(self, agent_id: str, partition: int) -> None:
        self.agent_id = agent_id
        self.partition = partition
        self.events = 0
        self.denied = 0
        self.tasks: set[str] = set()
        self.features: object | None = None
        """The agent's own history for the model (detectors/features.py)."""


class Store:
    """All detector state of one detector instance."""

    def __init__(self, *, denied_burst: int) -> None:
        self._denied_burst = max(1, denied_burst)
        self.tasks: dict[str, TaskState] = {}
        self.agents: dict[int, dict[str, AgentState]] = {}
        self.revoked_jtis: dict[str, float] = {}

    # ---------------------------------------------------------------- facts in

    def _task(self, task_id: str, agent_id: str) -> TaskState:
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = TaskState(task_id, agent_id)
        return task

    def apply_task_event(self, event: TaskEvent) -> None:
        task = self._task(event.task_id, event.agent_id)
        if event.scope is not None:
            task.learn(event.scope, event.deadline, event.status, event.agent_id)
        elif event.deadline is not None:
            task.deadline = event.deadline
        if event.kind is TaskEventKind.OPENED and task.opened_at is None:
            task.opened_at = event.at
        if event.kind is TaskEventKind.CLOSED:
            task.end(event.status, event.at)

    def apply_revocation(self, event: RevocationEvent) -> None:
        for task_id in event.task_ids:
            task = self.tasks.get(task_id)
            if task is None:
                # Remember the end even before the task is known: it cannot come back.
                task = self._task(task_id, event.agent_id or "")
            task.end("revoked", event.at)
        if event.target == "credential" and event.jti_hash:
            self.revoked_jtis[event.jti_hash] = event.at
            while len(self.revoked_jtis) > MAX_REVOKED_JTIS:
                del self.revoked_jtis[next(iter(self.revoked_jtis))]

    def apply_task_view(self, view: TaskView) -> None:
        """A task as the service answered a lookup."""
        task = self._task(view.id, view.agent_id)
        task.learn(view.scope, view.deadline, view.status.value, view.agent_id)
        if task.opened_at is None:
            task.opened_at = view.created_at
        if view.closed_at is not None and view.status.value in ("completed", "revoked"):
            task.end(view.status.value, view.closed_at)

    def mark_unknown(self, task_id: str, agent_id: str, now: float) -> None:
        """The service has no such task (a forged or foreign token, or a typo)."""
        task = self._task(task_id, agent_id)
        task.looked_up_at = now

    def needs_lookup(self, task_id: str, now: float) -> bool:
        task = self.tasks.get(task_id)
        if task is None:
            return True
        if task.known:
            return False
        return task.looked_up_at is None or now - task.looked_up_at > UNKNOWN_TASK_TTL

    # ---------------------------------------------------------------- usage in

    def observe(
        self, event: UsageEvent, partition: int, now: float
    ) -> tuple[TaskState, AgentState]:
        """Count one usage event; returns the (updated) task and agent state for the rules."""
        agents = self.agents.get(partition)
        if agents is None:
            agents = self.agents[partition] = {}
        agent = agents.get(event.agent_id)
        if agent is None:
            agent = agents[event.agent_id] = AgentState(event.agent_id, partition)
        task = self.tasks.get(event.task_id)
        if task is None:
            task = self.tasks[event.task_id] = TaskState(event.task_id, event.agent_id)
        if task.partition != partition:
            task.partition = partition
            agent.tasks.add(event.task_id)
        task.touched = now
        agent.events += 1
        at = event.at
        if event.decision is Decision.ALLOW:
            task.calls += 1
            scope = task.scope
            if scope is not None and scope.spec.limits.max_rate is not None:
                rate = task.rate
                if rate is None:
                    rate = task.rate = RateWindow()
                rate.add(at)
        else:
            agent.denied += 1
            denied = task.denied
            if denied is None:
                denied = task.denied = deque(maxlen=self._denied_burst)
            denied.append(at)
        task.bytes_out += event.bytes_out
        jti = event.jti_hash
        revoked_at = self.revoked_jtis.get(jti) if self.revoked_jtis else None
        if revoked_at is not None:
            if task.revoked_credentials is None:
                task.revoked_credentials = {}
            task.revoked_credentials[jti] = revoked_at
        if jti not in task.clients and len(task.clients) < MAX_CREDENTIALS_PER_TASK:
            source = event.source
            task.clients[jti] = ClientSeen(source.address, source.user_agent, source.jkt, at)
        return task, agent

    # ---------------------------------------------------------------- rebalance, bounds

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget the usage state of ``partitions`` (they moved to another detector)."""
        dropped = 0
        for partition in partitions:
            for agent in self.agents.pop(partition, {}).values():
                for task_id in agent.tasks:
                    task = self.tasks.get(task_id)
                    if task is not None and task.partition == partition:
                        task.reset_counters()
                        task.partition = -1
                dropped += 1
        return dropped

    def sweep(self, now: float, *, grace: float, max_tasks: int) -> int:
        """Evict ended tasks older than ``grace``, stale negative lookups, then the least
        recently seen beyond ``max_tasks``. Returns how many tasks left."""
        evict = []
        for task_id, task in self.tasks.items():
            ended = task.ended_before(now)
            if ended is not None:
                expired = now - ended > grace
            else:
                # Never confirmed by the tasks topic or the service: forget when idle.
                expired = not task.known and now - task.touched > max(grace, UNKNOWN_TASK_TTL)
            if expired:
                evict.append(task_id)
        for task_id in evict:
            self._evict(task_id)
        over = len(self.tasks) - max_tasks
        if over > 0:
            # Make some headroom so a full store does not sort on every sweep.
            over += max_tasks // 10
            oldest = sorted(self.tasks.values(), key=lambda t: t.touched)[:over]
            for task in oldest:
                self._evict(task.task_id)
            evict.extend(t.task_id for t in oldest)
        return len(evict)

    def _evict(self, task_id: str) -> None:
        task = self.tasks.pop(task_id, None)
        if task is None or task.partition < 0:
            return
        agents = self.agents.get(task.partition, {})
        agent = agents.get(task.agent_id)
        if agent is not None:
            agent.tasks.discard(task_id)
            if not agent.tasks:
                del agents[task.agent_id]
