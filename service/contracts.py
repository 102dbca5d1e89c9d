"""Contracts: the shapes that cross a boundary (HTTP bodies, stored records, claims).

Pure data: msgspec Structs and enums, no I/O, no behaviour beyond trivial properties.
Inbound bodies are ``frozen``, ``kw_only`` and ``forbid_unknown_fields`` so a typo in a
field name is an error, not a silently ignored field.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec

from service.kernel.events import Severity
from service.kernel.scopes import Limits, ScopeSpec

AgentId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Agent id: 1-64 of A-Z a-z 0-9 . _ - (a valid SPIFFE path segment)",
        examples=["billing-agent"],
    ),
]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
OperatorName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")]


class Role(StrEnum):
    """Operator roles. viewer ⊂ analyst ⊂ admin; detector and resource_server are machine roles."""

    VIEWER = "viewer"
    ANALYST = "analyst"
    ADMIN = "admin"
    DETECTOR = "detector"
    RESOURCE_SERVER = "resource_server"


class TaskStatus(StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    REVOKED = "revoked"
    EXPIRED = "expired"


class AgentStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class RevocationSource(StrEnum):
    ANALYST = "analyst"
    DETECTOR = "detector"
    TASK_END = "task_end"
    CLIENT = "client"


# --------------------------------------------------------------------------- records


class AgentRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    ceiling: ScopeSpec
    max_task_ttl: int | None
    secret_hash: str | None
    public_jwk: dict[str, Any] | None
    status: AgentStatus
    created_at: float
    suspended_at: float | None = None
    suspend_reason: str | None = None


class TaskRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    agent_id: str
    parent_id: str | None
    spiffe_id: str
    scope: ScopeSpec
    purpose: str
    status: TaskStatus
    created_at: float
    deadline: float
    closed_at: float | None = None
    close_reason: str | None = None
    dpop_jkt: str | None = None

    def effective_status(self, now: float) -> TaskStatus:
        if self.status is TaskStatus.ACTIVE and now >= self.deadline:
            return TaskStatus.EXPIRED
        return self.status


class OperatorRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    role: Role
    audience: str | None
    created_at: float
    disabled_at: float | None = None


# --------------------------------------------------------------------------- requests


class CreateAgent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Register an agent: its id, the most it may ever be granted, and how it authenticates."""

    id: AgentId
    ceiling: ScopeSpec
    name: str = ""
    # Stored in an INTEGER column (32-bit on PostgreSQL); ~68 years is no real limit.
    max_task_ttl: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] | None = None
    public_jwk: dict[str, Any] | None = None
    """A public JWK (OKP/Ed25519 or EC/P-256) for RFC 7523 private_key_jwt assertions."""
    issue_secret: bool = True
    """Issue a client secret (shown once). Set false for assertion-only agents."""


class SuspendAgent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Reason


class ReinstateAgent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Reason


class CreateTask(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Open a task: the scope it declares and how long it may live."""

    scope: ScopeSpec
    ttl: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Seconds until the task deadline; default KS_DEFAULT_TASK_TTL, capped by the agent."""
    purpose: Annotated[str, msgspec.Meta(max_length=500)] = ""
    dpop_jkt: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{43}$")] | None = None
    """RFC 9449 §10 JWK SHA-256 thumbprint to bind the credential to (``cnf.jkt``)."""


class CompleteTask(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=1000)] = "task completed"


class CredentialTarget(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="credential",
    tag_field="type",
):
    jti: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class TaskTarget(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="task",
    tag_field="type",
):
    task_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class AgentTarget(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="agent",
    tag_field="type",
):
    agent_id: AgentId


class CutoffTarget(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="cutoff",
    tag_field="type",
):
    """The panic button: every credential issued at or before ``before`` dies."""

    before: float | None = None
    """Epoch seconds; default now. Must not be in the future."""
    agent_id: AgentId | None = None
    """Limit the cut-off to one agent; default every agent."""


RevocationTarget = CredentialTarget | TaskTarget | AgentTarget | CutoffTarget


class CreateRevocation(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    target: RevocationTarget
    reason: Reason
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    """Repeating a key returns the first revocation (200) instead of revoking again: how the
    detector stays idempotent per rule and task across redeliveries."""


class CreateOperator(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: OperatorName
    role: Role
    audience: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    """For resource_server operators: the audience they serve (introspection answers
    ``active: false`` for tokens not addressed to it)."""


# --------------------------------------------------------------------------- responses


class AgentView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    status: AgentStatus
    ceiling: ScopeSpec
    max_task_ttl: int | None
    auth_methods: list[str]
    created_at: float
    suspended_at: float | None = None
    suspend_reason: str | None = None


class AgentCreated(msgspec.Struct, frozen=True, kw_only=True):
    agent: AgentView
    client_secret: str | None
    """Shown once; only its hash is stored."""


class TaskView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    agent_id: str
    parent_id: str | None
    spiffe_id: str
    status: TaskStatus
    scope: ScopeSpec
    purpose: str
    created_at: float
    deadline: float
    closed_at: float | None = None
    close_reason: str | None = None


class IssuedCredential(msgspec.Struct, frozen=True, kw_only=True):
    access_token: str
    token_type: Literal["Bearer", "DPoP"]
    expires_in: int
    expires_at: float
    jti: str
    task: TaskView


class RevocationView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    seq: int
    target: RevocationTarget
    reason: str
    actor: str
    source: RevocationSource
    created_at: float
    affected_tasks: int
    affected_credentials: int


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    at: float
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


class OperatorView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    role: Role
    audience: str | None
    created_at: float
    disabled_at: float | None = None


class OperatorCreated(msgspec.Struct, frozen=True, kw_only=True):
    operator: OperatorView
    token: str
    """Shown once; only its hash is stored."""


class KeyView(msgspec.Struct, frozen=True, kw_only=True):
    kid: str
    alg: str
    created_at: float
    active: bool
    retired_at: float | None
    published_until: float | None


class Page(msgspec.Struct, frozen=True, kw_only=True):
    """A page of a list; ``next_cursor`` is null on the last page."""

    items: list[Any]
    next_cursor: str | None


class AckAlert(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/alerts/{alert_id}/ack`` (the body itself may be omitted)."""

    note: Annotated[str, msgspec.Meta(max_length=1000)] | None = None


class AlertView(msgspec.Struct, frozen=True, kw_only=True):
    """An alert as stored: the detector's AlertEvent plus when it arrived and its ack."""

    seq: int
    """Storage order: the list cursor and the SSE event id (``Last-Event-ID``)."""
    alert_id: str
    at: float
    rule: str
    severity: Severity
    agent_id: str
    task_id: str | None
    score: float | None
    evidence: dict[str, Any]
    action: Literal["alert", "revoke"]
    received_at: float
    acked_at: float | None = None
    acked_by: str | None = None
    ack_note: str | None = None


class TimelinePoint(msgspec.Struct, frozen=True, kw_only=True):
    """One minute of the console's live chart."""

    minute: float
    """Start of the minute (epoch seconds, a multiple of 60)."""
    alerts: int
    """Alerts raised (their ``at``) in this minute."""
    revocations: int
    """Kills recorded in this minute: revocations by an analyst or the detector (task
    completions and an agent revoking its own credential are not counted)."""


class Introspection(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """RFC 7662 §2.2 introspection response. Inactive tokens carry only ``active``."""

    active: bool
    scope: str | None = None
    client_id: str | None = None
    sub: str | None = None
    aud: list[str] | None = None
    iss: str | None = None
    exp: int | None = None
    iat: int | None = None
    nbf: int | None = None
    jti: str | None = None
    token_type: str | None = None
    cnf: dict[str, str] | None = None
    """RFC 9449 §6.2: the proof-of-possession key the token is bound to."""


__all__ = [
    "AckAlert",
    "AgentCreated",
    "AgentId",
    "AgentRecord",
    "AgentStatus",
    "AgentTarget",
    "AgentView",
    "AlertView",
    "AuditEntry",
    "CompleteTask",
    "CreateAgent",
    "CreateOperator",
    "CreateRevocation",
    "CreateTask",
    "CredentialTarget",
    "CutoffTarget",
    "Introspection",
    "IssuedCredential",
    "KeyView",
    "Limits",
    "OperatorCreated",
    "OperatorRecord",
    "OperatorView",
    "Page",
    "ReinstateAgent",
    "RevocationSource",
    "RevocationTarget",
    "RevocationView",
    "Role",
    "ScopeSpec",
    "SuspendAgent",
    "TaskRecord",
    "TaskStatus",
    "TaskTarget",
    "TaskView",
    "TimelinePoint",
]
