"""The deny state: what is dead, and why — the one definition every enforcement point uses.

The service (introspection, its own ``/v1`` routes), every guard and the detector's view
of revocations apply :class:`~service.kernel.events.RevocationEvent` with the same
:meth:`DenyState.apply`, and ask the same :meth:`DenyState.reason_denied`:

==============  =================================================================
target          effect
==============  =================================================================
``credential``  that jti hash is dead
``task``        every id in ``task_ids`` is closed (a task revocation lists its
                sub-tasks); the reason is ``task revoked``
``agent``       credentials of ``agent_id`` with ``iat <= cutoff`` are dead, and its
                ``task_ids`` closed
``cutoff``      credentials with ``iat <= cutoff`` are dead, for ``agent_id`` or for
                everyone when ``agent_id`` is None (the panic button)
==============  =================================================================

A revocation whose ``source`` is ``task_end`` (the agent closed its own task) marks the
first of its ``task_ids`` ``completed`` and the sub-tasks it took along ``revoked``. An
``agent`` or ``cutoff`` event without a ``cutoff`` uses its ``at`` (fail closed).

Revocations only ever add (nothing is un-revoked), and a task's first status sticks, so
applying events twice or out of order gives the same state: replaying a topic that was
never compacted, or one republished after a broker reset, is harmless.

jti hashes are held as :func:`jti_key` (the first 128 bits as an ``int``: 44 bytes
instead of ~113 for the hex string) — a collision could only deny, never allow.

Pure: no I/O. Filling it from the database is a storage function
(``service.storage.repository.load_deny_state``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from service.kernel.events import RevocationEvent

__all__ = ["COMPLETED", "REVOKED", "DenyState", "jti_key"]

COMPLETED: Final = "completed"
REVOKED: Final = "revoked"
_TASK_END: Final = "task_end"


def jti_key(jti_hash: str) -> int | str:
    """The in-memory form of a jti hash: its first 128 bits as an int (non-hex kept)."""
    try:
        return int(jti_hash[:32], 16)
    except ValueError:
        return jti_hash


class DenyState:
    """What is dead, held in memory; O(1) per question."""

    __slots__ = (
        "agent_cutoffs",
        "applied",
        "closed_tasks",
        "global_cutoff",
        "last_seq",
        "revoked_jtis",
    )

    def __init__(self) -> None:
        self.revoked_jtis: set[int | str] = set()
        self.closed_tasks: dict[str, str] = {}
        self.agent_cutoffs: dict[str, float] = {}
        self.global_cutoff = float("-inf")
        self.last_seq = 0
        """Highest ``seq`` applied (the SSE resume point)."""
        self.applied = 0
        """Events applied so far (duplicates included)."""

    # ------------------------------------------------------------------ writing

    def apply(self, event: RevocationEvent) -> None:
        """Apply one committed revocation (idempotent, order-independent)."""
        match event.target:
            case "credential":
                if event.jti_hash is not None:
                    self.revoke_credential(event.jti_hash)
            case "agent" | "cutoff":
                at = event.cutoff if event.cutoff is not None else event.at
                if event.target == "cutoff" or event.agent_id is not None:
                    self.cut_off(event.agent_id, at)
                else:
                    # An agent revocation that names no agent: kill everything issued
                    # until then rather than nothing.
                    self.cut_off(None, at)
            case "task":
                pass
        if event.task_ids:
            if event.source == _TASK_END:
                # The completed task comes first; the rest are sub-tasks it took along.
                self.close_tasks(event.task_ids[:1], COMPLETED)
            self.close_tasks(event.task_ids, REVOKED)
        self.last_seq = max(self.last_seq, event.seq)
        self.applied += 1

    def revoke_credential(self, jti_hash: str) -> None:
        self.revoked_jtis.add(jti_key(jti_hash))

    def close_tasks(self, task_ids: Iterable[str], status: str) -> None:
        closed = self.closed_tasks
        for task_id in task_ids:
            closed.setdefault(task_id, status)

    def cut_off(self, agent_id: str | None, at: float) -> None:
        """Credentials of ``agent_id`` (everyone if None) with ``iat <= at`` die.

        Token ``iat`` is whole seconds: a cut-off at 100.4 kills a token with iat 100.
        """
        if agent_id is None:
            self.global_cutoff = max(self.global_cutoff, at)
        else:
            self.agent_cutoffs[agent_id] = max(self.agent_cutoffs.get(agent_id, 0.0), at)

    # ------------------------------------------------------------------ reading

    def cutoff_for(self, agent_id: str) -> float:
        return max(self.global_cutoff, self.agent_cutoffs.get(agent_id, 0.0))

    def reason_denied(self, jti_hash: str, task_id: str, agent_id: str, iat: float) -> str | None:
        """Why a (signature-verified) credential is dead, or None if it is not."""
        return self.reason_denied_key(jti_key(jti_hash), task_id, agent_id, iat)

    def reason_denied_key(
        self, key: int | str, task_id: str, agent_id: str, iat: float
    ) -> str | None:
        """:meth:`reason_denied` with the jti already in :func:`jti_key` form (hot path)."""
        if key in self.revoked_jtis:
            return "credential revoked"
        status = self.closed_tasks.get(task_id)
        if status is not None:
            return f"task {status}"
        if iat <= self.global_cutoff:
            return "issued before the global cut-off"
        cutoff = self.agent_cutoffs.get(agent_id)
        if cutoff is not None and iat <= cutoff:
            return "issued before the agent's cut-off"
        return None
