"""Kafka event contracts (pure data, no I/O): what flows on the killswitch topics.

Every event is a frozen msgspec Struct in one tagged union (tag field ``type``) and
carries a schema ``version``. :data:`decoder` is the one typed decoder every consumer
uses; anything it refuses goes to the DLQ with the reason (docs/events.md).

Topics (names configurable) and keys:

* ``killswitch.usage.v1``        :class:`UsageEvent`, key = agent id
* ``killswitch.tasks.v1``        :class:`TaskEvent`, key = task id
* ``killswitch.revocations.v1``  :class:`RevocationEvent`, key = :func:`revocation_key`
  (compacted: the latest record per key is what a guard needs to replay), and
  :class:`FeedCheckpoint`, key = ``checkpoint`` (the topic is whole up to here)
* ``killswitch.alerts.v1``       :class:`AlertEvent`, key = agent id
* ``killswitch.usage.dlq.v1``    :class:`DeadLetter`, key = the original key
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec

from service.kernel.scopes import ScopeSpec

SCHEMA_VERSION = 1
Text = Annotated[str, msgspec.Meta(max_length=2048)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class Decision(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Source(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a credential was presented from, as the guard saw it."""

    address: Text | None = None
    user_agent: Text | None = None
    workload: Text | None = None
    """The calling workload's own identity (e.g. its SPIFFE ID), if the guard knows it."""
    jkt: Text | None = None
    """RFC 9449 thumbprint of the proof-of-possession key used, if any."""


class UsageEvent(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="usage",
    tag_field="type",
):
    """One check of one credential at one enforcement point."""

    version: Literal[1] = 1
    event_id: Id
    at: float
    agent_id: Id
    task_id: Id
    jti_hash: Id
    action: Text
    resource: Text
    audience: Text
    decision: Decision
    reason: Text | None = None
    bytes_out: Annotated[int, msgspec.Meta(ge=0)] = 0
    bytes_in: Annotated[int, msgspec.Meta(ge=0)] = 0
    source: Source = Source()
    guard: Text = ""
    """Identifier of the guard instance that checked (host/app)."""


class TaskEventKind(StrEnum):
    OPENED = "opened"
    RENEWED = "renewed"
    CLOSED = "closed"


class TaskEvent(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="task",
    tag_field="type",
):
    version: Literal[1] = 1
    event_id: Id
    at: float
    kind: TaskEventKind
    task_id: Id
    agent_id: Id
    parent_id: Id | None = None
    status: Text
    spiffe_id: Text | None = None
    scope: ScopeSpec | None = None
    """The declared scope (opened and renewed events; absent on closed)."""
    deadline: float | None = None
    jti_hash: Id | None = None
    """Hash of the credential just issued (opened and renewed events)."""


class RevocationEvent(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="revocation",
    tag_field="type",
):
    """A committed revocation, as guards apply it."""

    version: Literal[1] = 1
    revocation_id: Id
    seq: int
    at: float
    target: Literal["credential", "task", "agent", "cutoff"]
    jti_hash: Id | None = None
    task_ids: list[Id] = []
    """Every task this revocation closed (a task revocation covers its sub-tasks)."""
    agent_id: Id | None = None
    cutoff: float | None = None
    """Credentials with ``iat`` ≤ cutoff die (agent revocations and cut-offs)."""
    reason: Text
    actor: Text
    source: Text


class FeedCheckpoint(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="checkpoint",
    tag_field="type",
):
    """Written by the service on the revocation topic once the topic is *whole*.

    The database is the source of truth; the topic is a copy. Whenever the service finds
    the topic new, empty or reset (a broker that restarted empty, a topic recreated), it
    republishes from the database every revocation that can still matter and then writes
    one checkpoint with a fresh ``epoch``. A guard becomes ready only after it has
    replayed to the end of the topic *and* seen a checkpoint, so an empty or half-built
    topic never vouches for anything; a running guard that sees a checkpoint of another
    epoch knows the log was rebuilt under it and replays from the start.
    """

    version: Literal[1] = 1
    epoch: Id
    """Identifies one build of the topic (a UUID)."""
    at: float
    through_seq: int
    """Highest revocation ``seq`` in the database when the checkpoint was written."""
    republished: int = 0
    """How many revocations the rebuild that wrote it republished (0: topic was new)."""


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class AlertEvent(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="alert",
    tag_field="type",
):
    version: Literal[1] = 1
    alert_id: Id
    at: float
    rule: Text
    severity: Severity
    agent_id: Id
    task_id: Id | None = None
    score: float | None = None
    evidence: dict[str, Any] = {}
    action: Literal["alert", "revoke"] = "alert"


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag="dead_letter", tag_field="type"):
    """An input that could not be decoded, kept with the reason instead of being lost."""

    version: Literal[1] = 1
    at: float
    topic: Text
    partition: int
    offset: int
    reason: Text
    key: bytes | None = None
    value: bytes


Event = UsageEvent | TaskEvent | RevocationEvent | FeedCheckpoint | AlertEvent | DeadLetter
RevocationRecord = RevocationEvent | FeedCheckpoint
"""What the revocation topic holds."""

decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
revocation_record_decoder: msgspec.json.Decoder[RevocationRecord] = msgspec.json.Decoder(
    RevocationRecord
)
encoder = msgspec.json.Encoder()

CHECKPOINT_KEY = "checkpoint"
"""Kafka key of every :class:`FeedCheckpoint` (compaction keeps the newest)."""


def revocation_key(event: RevocationEvent) -> str:
    """Compaction key: one live record per thing revoked."""
    match event.target:
        case "credential":
            return f"jti:{event.jti_hash}"
        case "task":
            return f"task:{event.task_ids[0] if event.task_ids else event.revocation_id}"
        case "agent":
            return f"agent:{event.agent_id}"
        case "cutoff":
            # The cut-off time is part of the key: a later cut-off with an *earlier* time
            # must not compact away the later time (that would revive credentials).
            return f"cutoff:{event.agent_id or '*'}:{event.cutoff!r}"
