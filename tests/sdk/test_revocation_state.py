"""RevocationState decides exactly like the service's DenyState (the contract the guard
mirrors), and the SDK stays importable without litestar or a database driver."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from service.credentials.rfc9068 import VerifiedToken, jti_hash
from service.events import RevocationEvent
from service.revocation import DenyState
from service.sdk import RevocationState

AGENTS = ["a1", "a2"]
TASKS = ["t1", "t2", "t3"]
JTIS = ["j1", "j2", "j3"]

events = st.builds(
    lambda target, jti, tasks, agent, cutoff, source, seq: RevocationEvent(
        revocation_id=f"r{seq}",
        seq=seq,
        at=cutoff,
        target=target,
        jti_hash=jti_hash(jti) if target == "credential" else None,
        task_ids=tasks if target != "credential" else [],
        agent_id=agent if target == "agent" else (agent if target == "cutoff" else None),
        cutoff=cutoff if target in ("agent", "cutoff") else None,
        reason="r",
        actor="a",
        source=source,
    ),
    target=st.sampled_from(["credential", "task", "agent", "cutoff"]),
    jti=st.sampled_from(JTIS),
    tasks=st.lists(st.sampled_from(TASKS), max_size=2, unique=True),
    agent=st.sampled_from([*AGENTS, None]),
    cutoff=st.integers(0, 20).map(float),
    source=st.sampled_from(["analyst", "detector"]),
    seq=st.integers(1, 10_000),
)


def deny_state(applied: list[RevocationEvent]) -> DenyState:
    """What the service's own deny state holds after the same committed revocations."""
    deny = DenyState()
    for e in applied:
        if e.target == "credential" and e.jti_hash:
            deny.revoked_jtis.add(e.jti_hash)
        deny.close_tasks(list(e.task_ids), "revoked")
        if e.target == "agent" and e.agent_id is not None:
            deny.cut_off(e.agent_id, e.cutoff if e.cutoff is not None else e.at)
        if e.target == "cutoff":
            deny.cut_off(e.agent_id, e.cutoff if e.cutoff is not None else e.at)
    return deny


@settings(max_examples=300, deadline=None)
@given(
    applied=st.lists(events, max_size=8),
    jti=st.sampled_from(JTIS),
    task=st.sampled_from(TASKS),
    agent=st.sampled_from(AGENTS),
    iat=st.integers(0, 22),
)
def test_same_decisions_as_deny_state(
    applied: list[RevocationEvent], jti: str, task: str, agent: str, iat: int
) -> None:
    state = RevocationState()
    for e in applied:
        state.apply(e)
    token = VerifiedToken(
        claims={},
        jti=jti,
        jti_hash=jti_hash(jti),
        kid="k",
        task_id=task,
        agent_id=agent,
        parent_id=None,
        iat=iat,
        exp=10**10,
        audiences=(),
        scope="",
    )
    assert state.reason_denied(jti_hash(jti), task, agent, iat) == deny_state(
        applied
    ).reason_denied(token)
    # Order and repetition do not matter: the state only grows.
    again = RevocationState()
    for e in [*reversed(applied), *applied]:
        again.apply(e)
    assert again.reason_denied(jti_hash(jti), task, agent, iat) == state.reason_denied(
        jti_hash(jti), task, agent, iat
    )


def test_iat_equal_to_cutoff_is_dead() -> None:
    state = RevocationState()
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


def test_sdk_imports_no_litestar_or_database() -> None:
    code = (
        "import sys, service.sdk\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('litestar', 'asyncpg', 'sqlite3', 'aiosqlite', 'uvicorn') or m.startswith("
        "('service.app', 'service.core', 'service.storage', 'service.api', 'service.auth')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
