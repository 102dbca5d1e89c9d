"""Deterministic detection rules: small pure functions over one usage event and state.

Each rule has a stable id (it names the rule in revocation reasons, alerts, metrics and
idempotency keys, so never rename one), a severity and an action::

    id                      severity  action  fires when
    scope.out_of_scope      high      revoke  action/resource not covered by the declared
                                              scope (or the guard denied it as such)
    scope.audience_mismatch high      revoke  audience not among the declared audiences
    limits.calls            medium    revoke  more allowed calls than limits.max_calls
    limits.bytes_out        high      revoke  more bytes out than limits.max_bytes_out
    limits.rate             medium    revoke  > max_rate x burst calls in 1 s, or
                                              > max_rate x 10 in 10 s
    lifecycle.use_after_end high      alert   used after the task completed, was revoked,
                                              expired, or its credential was revoked;
                            low               allowed within end_grace s of the end: the
                                              revocation was still on its way to the guard
    identity.second_client  critical  revoke  one credential from a second address, user
                                              agent or proof-of-possession key
    probing.denied_burst    medium    alert   >= N denied requests of a task within W s

A rule reads state and returns a :class:`Finding` or ``None``; it never mutates state and
never does I/O. :func:`evaluate` runs the rules that apply (only the lifecycle rule once a
task is over) and suppresses a rule that already fired for the task: one action per rule
and task, which is also the idempotency key of the revocation. The one exception is the
low grade of the lifecycle rule: it fires at most once per task too, and does not stop a
later high one (a use long after the end, or one the guard refused).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from detectors.state import AgentState, ClientSeen, TaskState
from service.kernel.events import Decision, Severity, UsageEvent

__all__ = [
    "ALL_RULES",
    "NOT_SIGNALS",
    "RULES_BY_ID",
    "Finding",
    "Rule",
    "Thresholds",
    "evaluate",
]

Action = Literal["revoke", "alert"]

#: Guard deny reasons that mean "outside the declared scope" / "wrong audience". The guard
#: already refused the request; the attempt is still the violation.
OUT_OF_SCOPE_REASONS: Final = ("out-of-scope", "out_of_scope", "out of scope")
AUDIENCE_REASONS: Final = ("audience", "aud-mismatch", "audience-mismatch")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Rule parameters (from :class:`~service.config.Settings`, see docs/detector.md)."""

    rate_burst: int = 2
    denied_burst: int = 10
    denied_window: float = 10.0
    leeway: float = 5.0
    end_grace: float = 2.0
    """lifecycle.use_after_end: a use the guard *allowed* at most this many seconds after
    the end is the propagation window (the guard had not applied the revocation yet, a
    request already in flight): low severity. Later, or refused by the guard: high."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule firing on one event, with the evidence an analyst needs."""

    rule: Rule
    event: UsageEvent
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    grade: Severity | None = None
    """The severity of this finding when it differs from the rule's."""

    @property
    def severity(self) -> Severity:
        return self.rule.severity if self.grade is None else self.grade

    @property
    def task_id(self) -> str:
        return self.event.task_id

    @property
    def agent_id(self) -> str:
        return self.event.agent_id

    @property
    def reason(self) -> str:
        """The revocation reason: names the rule first."""
        return f"{self.rule.id}: {self.summary}"

    @property
    def idempotency_key(self) -> str:
        return f"{self.rule.id}:{self.event.task_id}"


Check = Callable[[UsageEvent, TaskState, AgentState, Thresholds], "Finding | None"]


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    severity: Severity
    action: Action
    check: Check = field(repr=False, compare=False)
    description: str = ""

    def finding(
        self, event: UsageEvent, summary: str, grade: Severity | None = None, **evidence: Any
    ) -> Finding:
        evidence.setdefault("event_id", event.event_id)
        return Finding(rule=self, event=event, summary=summary, evidence=evidence, grade=grade)


def _reason_is(reason: str | None, prefixes: tuple[str, ...]) -> bool:
    return reason is not None and reason.lower().startswith(prefixes)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the rules


def out_of_scope(
    ev: UsageEvent, task: TaskState, agent: AgentState, t: Thresholds
) -> Finding | None:
    scope = task.scope
    why: str | None = None
    guard_refused = ev.decision is Decision.DENY and _reason_is(ev.reason, OUT_OF_SCOPE_REASONS)
    if scope is not None:
        # The guard's own call (CompiledScope.check), so both decide every request alike,
        # refusals of non-canonical resources ('..', '%2F' …) included. A refusal by the
        # guard stands even if the event's resource (cut to 2,048 characters) would pass.
        why = scope.check(ev.action, ev.resource)
        if why is None and not guard_refused:
            return None
    elif not guard_refused:
        return None
    return OUT_OF_SCOPE.finding(
        ev,
        f"{_short(ev.action, 64)} on {_short(ev.resource)} is outside the declared scope",
        action=ev.action,
        resource=ev.resource,
        grants=list(scope.spec.grants) if scope is not None else None,
        decision=ev.decision.value,
        guard_reason=ev.reason,
        scope_reason=why,
    )


def audience_mismatch(
    ev: UsageEvent, task: TaskState, agent: AgentState, t: Thresholds
) -> Finding | None:
    scope = task.scope
    if scope is not None:
        audiences = scope.spec.audiences
        if ev.audience in audiences or (not audiences and not ev.audience):
            return None
    elif not (ev.decision is Decision.DENY and _reason_is(ev.reason, AUDIENCE_REASONS)):
        return None
    return AUDIENCE_MISMATCH.finding(
        ev,
        f"credential presented to audience {_short(ev.audience)!r} it was not issued for",
        audience=ev.audience,
        declared=list(scope.spec.audiences) if scope is not None else None,
        decision=ev.decision.value,
    )


def calls_exceeded(
    ev: UsageEvent, task: TaskState, agent: AgentState, t: Thresholds
) -> Finding | None:
    if task.scope is None:
        return None
    limit = task.scope.spec.limits.max_calls
    if limit is None or task.calls <= limit:
        return None
    return CALLS.finding(
        ev, f"{task.calls} calls exceed max_calls={limit}", calls=task.calls, max_calls=limit
    )


def bytes_out_exceeded(
    ev: UsageEvent, task: TaskState, agent: AgentState, t: Thresholds
) -> Finding | None:
    if task.scope is None:
        return None
    limit = task.scope.spec.limits.max_bytes_out
    if limit is None or task.bytes_out <= limit:
        return None
    return BYTES_OUT.finding(
        ev,
        f"{task.bytes_out} bytes out exceed max_bytes_out={limit}",
        bytes_out=task.bytes_out,
        max_bytes_out=limit,
    )


def rate_exceeded(
    ev: UsageEvent, task: TaskState, agent: AgentState, t: Thresholds
) -> Finding | None:
    rate = task.rate
    if rate is None or task.scope is None:
        return None
    max_rate = task.scope.spec.limits.max_rate
    if max_rate is None:
        return None
    burst_limit = max(1, math.floor(max_rate * t.rate_burst))
    sustained_limit = max(1, math.floor(max_rate * 10))
    last_second = rate.last_second()
    if last_second > burst_limit:
        window, count, limit = "1s", last_second, burst_limit
    elif rate.total > sustained_limit:
        window, count, limit = "10s", rate.total, sustained_limit
    else:
        return None
    return RATE.finding(
        ev,
        f"{count} calls in {window} exceed max_rate={max_rate:g}/s (limit {limit})",
        window=window,
        calls=count,
        limit=limit,
        max_rate=max_rate,
    )


def use_after_end(
    ev: UsageEvent, task: TaskState, agent: AgentState, t: Thresholds
) -> Finding | None:
    over = task.over_at(ev.at, t.leeway)
    if over is not None:
        status, since = over
        what = f"task {status}"
    else:
        revoked_at = _credential_revoked_at(task, ev)
        if revoked_at is None:
            return None
        status, since, what = "credential revoked", revoked_at, "credential revoked"
    after = ev.at - since
    # Allowed right after the end: the guard had not applied the revocation yet (or the
    # request was already in flight). That is propagation delay, not the agent's doing.
    in_window = ev.decision is Decision.ALLOW and after <= t.end_grace
    return USE_AFTER_END.finding(
        ev,
        f"credential used {after:.3f}s after {what}"
        + (f" (allowed within the {t.end_grace:g}s propagation window)" if in_window else ""),
        grade=Severity.LOW if in_window else None,
        status=status,
        ended_at=since,
        used_at=ev.at,
        decision=ev.decision.value,
        jti_hash=ev.jti_hash,
        propagation_window=in_window,
        end_grace_s=t.end_grace,
    )


#: Marks a task whose low (propagation-window) lifecycle finding was raised: one per task.
_END_GRACE_FIRED: Final = "lifecycle.use_after_end/low"
#: Marks in ``TaskState.fired`` that are not a rule having fired (and so not a signal).
NOT_SIGNALS: Final = frozenset({_END_GRACE_FIRED})


def _mark_fired(fired: set[str], finding: Finding) -> bool:
    """Record ``finding`` in ``fired``; False if one of its kind was already raised."""
    key = _END_GRACE_FIRED if finding.grade is Severity.LOW else finding.rule.id
    if key in fired:
        return False
    fired.add(key)
    return True


def _credential_revoked_at(task: TaskState, ev: UsageEvent) -> float | None:
    revoked = task.revoked_credentials
    at = revoked.get(ev.jti_hash) if revoked else None
    return at if at is not None and ev.at > at else None


def second_client(
    ev: UsageEvent, task: TaskState, agent: AgentState, t: Thresholds
) -> Finding | None:
    first = task.clients.get(ev.jti_hash)
    if first is None:
        return None
    source = ev.source
    now = ClientSeen(source.address, source.user_agent, source.jkt, ev.at)
    differs = first.differences(now)
    if not differs:
        return None
    return SECOND_CLIENT.finding(
        ev,
        f"credential presented from a second client ({', '.join(differs)} differ)",
        differs=differs,
        first={"address": first.address, "user_agent": first.user_agent, "jkt": first.jkt},
        now={"address": now.address, "user_agent": now.user_agent, "jkt": now.jkt},
        first_seen_at=first.at,
        jti_hash=ev.jti_hash,
    )


def denied_burst(
    ev: UsageEvent, task: TaskState, agent: AgentState, t: Thresholds
) -> Finding | None:
    denied = task.denied
    if ev.decision is not Decision.DENY or denied is None or len(denied) < t.denied_burst:
        return None
    span = max(denied) - min(denied)
    if span > t.denied_window:
        return None
    return DENIED_BURST.finding(
        ev,
        f"{len(denied)} denied requests within {span:.3f}s",
        denied=len(denied),
        span_s=span,
        window_s=t.denied_window,
        agent_denied_total=agent.denied,
        last_reason=ev.reason,
    )


OUT_OF_SCOPE = Rule("scope.out_of_scope", Severity.HIGH, "revoke", out_of_scope)
AUDIENCE_MISMATCH = Rule("scope.audience_mismatch", Severity.HIGH, "revoke", audience_mismatch)
CALLS = Rule("limits.calls", Severity.MEDIUM, "revoke", calls_exceeded)
BYTES_OUT = Rule("limits.bytes_out", Severity.HIGH, "revoke", bytes_out_exceeded)
RATE = Rule("limits.rate", Severity.MEDIUM, "revoke", rate_exceeded)
USE_AFTER_END = Rule("lifecycle.use_after_end", Severity.HIGH, "alert", use_after_end)
SECOND_CLIENT = Rule("identity.second_client", Severity.CRITICAL, "revoke", second_client)
DENIED_BURST = Rule("probing.denied_burst", Severity.MEDIUM, "alert", denied_burst)

ALL_RULES: Final = (
    OUT_OF_SCOPE,
    AUDIENCE_MISMATCH,
    CALLS,
    BYTES_OUT,
    RATE,
    USE_AFTER_END,
    SECOND_CLIENT,
    DENIED_BURST,
)
RULES_BY_ID: Final = {rule.id: rule for rule in ALL_RULES}
_LIVE_CHECKS: Final = tuple((r.id, r.check) for r in ALL_RULES)


def evaluate(
    ev: UsageEvent, task: TaskState, agent: AgentState, thresholds: Thresholds
) -> list[Finding]:
    """Every new finding for ``ev`` (call after :meth:`Store.observe` counted it)."""
    fired = task.fired
    if task.over_at(ev.at, thresholds.leeway) is not None:
        # A dead task's scope and limits no longer matter: the use itself is the finding.
        if USE_AFTER_END.id in fired:
            return []
        finding = use_after_end(ev, task, agent, thresholds)
        if finding is None or not _mark_fired(fired, finding):
            return []
        return [finding]
    found: list[Finding] = []
    for rule_id, check in _LIVE_CHECKS:
        if rule_id in fired:
            continue
        finding = check(ev, task, agent, thresholds)
        if finding is not None and _mark_fired(fired, finding):
            found.append(finding)
    return found
