"""The kernel's deny state against its specification (the table in service/kernel/deny.py).

The oracle below is the spec written as plainly as possible — per token, look through
every applied event — not a second implementation of the fast structure. Every
enforcement point (service, guard, detector) uses ``DenyState`` itself, so this is the
one place its semantics are pinned.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.kernel.deny import DenyState
from service.kernel.events import RevocationEvent
from service.kernel.tokens import jti_hash

AGENTS = ["a1", "a2"]
TASKS = ["t1", "t2", "t3"]
JTIS = ["j1", "j2", "j3"]

events = st.builds(
    lambda target, jti, tasks, agent, cutoff, source, seq, has_cutoff: RevocationEvent(
        revocation_id=f"r{seq}",
        seq=seq,
        at=cutoff + 0.5,
        target=target,
        jti_hash=jti_hash(jti) if target == "credential" else None,
        task_ids=tasks if target != "credential" else [],
        agent_id=agent if target in ("agent", "cutoff") else None,
        cutoff=cutoff if target in ("agent", "cutoff") and has_cutoff else None,
        reason="r",
        actor="a",
        source=source,
    ),
    target=st.sampled_from(["credential", "task", "agent", "cutoff"]),
    jti=st.sampled_from(JTIS),
    tasks=st.lists(st.sampled_from(TASKS), max_size=2, unique=True),
    agent=st.sampled_from([*AGENTS, None]),
    cutoff=st.integers(0, 20).map(float),
    source=st.sampled_from(["analyst", "detector", "task_end"]),
    seq=st.integers(1, 10_000),
    has_cutoff=st.booleans(),
)


# A history of revocations, and one credential to ask about.
QUESTION = {
    "applied": st.lists(events, max_size=8),
    "jti": st.sampled_from(JTIS),
    "task": st.sampled_from(TASKS),
    "agent": st.sampled_from(AGENTS),
    "iat": st.integers(0, 22),
}


def spec(applied: list[RevocationEvent], jti: str, task: str, agent: str, iat: float) -> str | None:
    """docs: the first matching rule, in the order reason_denied reports them."""
    if any(e.target == "credential" and e.jti_hash == jti_hash(jti) for e in applied):
        return "credential revoked"
    for e in applied:  # a task's first status sticks
        if task in e.task_ids:
            first = e.source == "task_end" and e.task_ids[0] == task
            return "task completed" if first else "task revoked"
    cutoffs = [e for e in applied if e.target in ("agent", "cutoff")]
    if any(e.agent_id is None and iat <= _cutoff(e) for e in cutoffs):
        return "issued before the global cut-off"
    if any(e.agent_id == agent and iat <= _cutoff(e) for e in cutoffs):
        return "issued before the agent's cut-off"
    return None


def _cutoff(e: RevocationEvent) -> float:
    return e.cutoff if e.cutoff is not None else e.at


@settings(max_examples=400, deadline=None)
@given(**QUESTION)
def test_decides_as_specified(
    applied: list[RevocationEvent], jti: str, task: str, agent: str, iat: int
) -> None:
    state = DenyState()
    for e in applied:
        state.apply(e)
    assert state.reason_denied(jti_hash(jti), task, agent, iat) == spec(
        applied, jti, task, agent, iat
    )


@settings(max_examples=300, deadline=None)
@given(**QUESTION)
def test_replay_twice_or_reversed_denies_the_same_tokens(
    applied: list[RevocationEvent], jti: str, task: str, agent: str, iat: int
) -> None:
    once, again = DenyState(), DenyState()
    for e in applied:
        once.apply(e)
    for e in [*reversed(applied), *applied]:
        again.apply(e)
    # Dead or alive does not depend on order or repetition (the wording of the reason for
    # a task closed twice may: its first status sticks).
    assert (once.reason_denied(jti_hash(jti), task, agent, iat) is None) == (
        again.reason_denied(jti_hash(jti), task, agent, iat) is None
    )
    assert once.last_seq == again.last_seq


def test_task_end_completes_the_task_and_revokes_its_sub_tasks() -> None:
    state = DenyState()
    state.apply(
        RevocationEvent(
            revocation_id="r",
            seq=3,
            at=1.0,
            target="task",
            task_ids=["parent", "child"],
            reason="done",
            actor="agent",
            source="task_end",
        )
    )
    assert state.reason_denied(jti_hash("x"), "parent", "a", 0) == "task completed"
    assert state.reason_denied(jti_hash("x"), "child", "a", 0) == "task revoked"
    assert state.last_seq == 3


def test_iat_equal_to_cutoff_is_dead() -> None:
    state = DenyState()
    state.apply(
        RevocationEvent(
            revocation_id="r",
            seq=1,
            at=100.4,
            target="cutoff",
            cutoff=100.0,
            reason="panic",
            actor="a",
            source="analyst",
        )
    )
    assert state.reason_denied(jti_hash("x"), "t", "a", 100) == "issued before the global cut-off"
    assert state.reason_denied(jti_hash("x"), "t", "a", 101) is None


def test_agent_revocation_without_cutoff_fails_closed() -> None:
    state = DenyState()
    state.apply(
        RevocationEvent(
            revocation_id="r",
            seq=1,
            at=50.0,
            target="agent",
            agent_id="a1",
            reason="x",
            actor="a",
            source="analyst",
        )
    )
    assert state.reason_denied(jti_hash("x"), "t", "a1", 50) == "issued before the agent's cut-off"
    assert state.reason_denied(jti_hash("x"), "t", "a2", 50) is None
