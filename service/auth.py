"""Who is calling: turn an ``Authorization`` header into a :class:`Principal`.

Accepted forms (docs/api.md#authentication):

* ``Bearer kso_…`` — an operator token (viewer, analyst, admin, detector, resource_server).
* ``Basic base64(agent_id:client_secret)`` — an agent, RFC 6749 §2.3.1 client_secret_basic.
* ``Bearer <JWT>`` with ``typ: at+jwt`` — a task credential we issued (opens sub-tasks,
  renews or completes its own task).
* ``Bearer <JWT>`` otherwise — an RFC 7523 §3 client assertion signed with the agent's
  registered key (``iss`` = ``sub`` = agent id, ``aud`` = our issuer, short ``exp``,
  single-use ``jti``).

Every failure is the same :class:`AuthenticationError` from the caller's view, so the
answer never tells which agent ids exist. Role checks live here too, in one table.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import unquote

import jwt

from service.config import Settings
from service.contracts import AgentRecord, AgentStatus, Role, TaskStatus
from service.credentials.status import StatusDeps, live_token
from service.kernel.dpop import ReplayCache, verify_proof
from service.kernel.errors import (
    AuthenticationError,
    ClientError,
    DPoPProofRejected,
    PermissionDenied,
    TokenRejected,
)
from service.kernel.jwk import load_public_jwk
from service.kernel.tokens import TOKEN_TYPES, TokenClaims
from service.metrics import Metrics
from service.secrets_ import OPERATOR_TOKEN_PREFIX, hash_secret, matches
from service.storage import repository as repo


class AuthDeps(StatusDeps, Protocol):
    """What authentication needs from the running service."""

    @property
    def dpop_proofs(self) -> ReplayCache: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def metrics(self) -> Metrics: ...


MAX_ASSERTION_LIFETIME = 300


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["operator", "agent", "task"]
    name: str
    role: Role | None = None
    agent_id: str | None = None
    audience: str | None = None
    token: TokenClaims | None = None
    agent: AgentRecord | None = None
    """The agent row read while authenticating it (saves opening a task a second read)."""

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"


READ = frozenset({Role.VIEWER, Role.ANALYST, Role.ADMIN})
REVOKE = frozenset({Role.ANALYST, Role.ADMIN, Role.DETECTOR})
ADMIN = frozenset({Role.ADMIN})
ACK = frozenset({Role.ANALYST, Role.ADMIN})
STREAM = frozenset({Role.VIEWER, Role.ANALYST, Role.ADMIN, Role.DETECTOR, Role.RESOURCE_SERVER})
INTROSPECT = frozenset({Role.RESOURCE_SERVER, Role.ANALYST, Role.ADMIN, Role.DETECTOR})


def require_operator(principal: Principal, roles: frozenset[Role]) -> Principal:
    if principal.kind != "operator" or principal.role not in roles:
        allowed = ", ".join(sorted(r.value for r in roles))
        raise PermissionDenied(f"this operation needs an operator with role: {allowed}")
    return principal


def require_agent(principal: Principal) -> Principal:
    if principal.kind not in ("agent", "task"):
        raise PermissionDenied("this operation is for agents (client credentials or task token)")
    return principal


async def authenticate(
    services: AuthDeps,
    authorization: str | None,
    *,
    dpop: Sequence[str] = (),
    htm: str = "GET",
    htu: str = "",
) -> Principal:
    """Who is calling. ``dpop`` are the request's ``DPoP`` headers and ``htm``/``htu`` its
    method and public URL: a key-bound task credential needs its proof (RFC 9449 §7.1)."""
    if not authorization:
        raise AuthenticationError("missing Authorization header")
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    try:
        if scheme == "bearer" and value.startswith(OPERATOR_TOKEN_PREFIX):
            return await _operator(services, value)
        if scheme == "basic":
            return await _agent_secret(services, value)
        if scheme in ("bearer", "dpop") and value.count(".") == 2:
            try:
                header = jwt.get_unverified_header(value)
            except jwt.PyJWTError:
                raise AuthenticationError("malformed bearer token") from None
            if header.get("typ") in TOKEN_TYPES:
                principal = await task_principal(services, value)
                _check_possession(services, principal, value, scheme, dpop, htm, htu)
                return principal
            if scheme == "bearer":
                return await _client_assertion(services, value)
    except AuthenticationError as exc:
        services.metrics.auth_failures.labels(kind=scheme or "none").inc()
        raise exc
    services.metrics.auth_failures.labels(kind="unsupported").inc()
    raise AuthenticationError("unsupported Authorization scheme; use Bearer, DPoP or Basic")


def _check_possession(
    services: AuthDeps,
    principal: Principal,
    token: str,
    scheme: str,
    proofs: Sequence[str],
    htm: str,
    htu: str,
) -> None:
    """RFC 9449 §7.1-7.2 for a task credential: a bound one needs the DPoP scheme and one
    valid, unreplayed proof for this request signed by the bound key."""
    verified = principal.token
    jkt = verified.cnf_jkt if verified is not None else None
    if jkt is None:
        if scheme == "dpop":
            raise AuthenticationError("the DPoP scheme is for key-bound credentials")
        return
    if scheme != "dpop":
        raise DPoPProofRejected("a DPoP-bound credential travels under the DPoP scheme")
    if len(proofs) != 1:
        raise DPoPProofRejected("exactly one DPoP proof header is required")
    now = services.clock.now()
    leeway = services.settings.leeway
    proof = verify_proof(
        proofs[0], method=htm, url=htu, now=now, access_token=token, jkt=jkt, leeway=leeway
    )
    refused = services.dpop_proofs.admit(proof, now, leeway)
    if refused is not None:
        raise DPoPProofRejected(refused)


async def _operator(services: AuthDeps, token: str) -> Principal:
    op = await repo.operator_by_token_hash(services.db, hash_secret(token))
    if op is None:
        raise AuthenticationError("invalid operator token")
    return Principal(kind="operator", name=op.name, role=op.role, audience=op.audience)


async def _agent_secret(services: AuthDeps, value: str) -> Principal:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise AuthenticationError("malformed Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise AuthenticationError("malformed Basic credentials")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before being joined.
    client_id, secret = unquote(client_id), unquote(secret)
    agent = await repo.get_agent(services.db, client_id)
    if agent is None or not matches(secret, agent.secret_hash):
        raise AuthenticationError("invalid client credentials")
    return Principal(kind="agent", name=agent.id, agent_id=agent.id, agent=agent)


async def task_principal(services: AuthDeps, token: str) -> Principal:
    """A task credential authenticates its own task — if it is alive in every respect."""
    try:
        # Signature, claims, deny state *and* the database's word on the credential: a
        # replica whose deny state lags must not accept a credential revoked elsewhere.
        verified = await live_token(services, token, audience=None)
    except TokenRejected as exc:
        raise AuthenticationError(f"task credential rejected: {exc.detail}") from None
    task = await repo.get_task(services.db, verified.task_id)
    now = services.clock.now()
    if task is None or task.agent_id != verified.agent_id:
        raise AuthenticationError("task credential rejected: unknown task")
    if task.effective_status(now) is not TaskStatus.ACTIVE:
        raise AuthenticationError(f"task credential rejected: task {task.effective_status(now)}")
    return Principal(kind="task", name=task.id, agent_id=task.agent_id, token=verified)


async def _client_assertion(services: AuthDeps, assertion: str) -> Principal:
    """RFC 7523 §3: validate a JWT client assertion (private_key_jwt, RFC 7521 §4.2)."""
    try:
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise AuthenticationError("malformed client assertion") from None
    agent_id = unverified.get("iss")
    if not isinstance(agent_id, str) or unverified.get("sub") != agent_id:
        raise AuthenticationError("invalid client assertion")
    agent = await repo.get_agent(services.db, agent_id)
    if agent is None or agent.public_jwk is None:
        raise AuthenticationError("invalid client assertion")
    try:
        alg, key = load_public_jwk(agent.public_jwk)
    except ClientError:
        raise AuthenticationError("invalid client assertion") from None
    issuer = services.settings.effective_issuer
    try:
        claims = jwt.decode(
            assertion,
            key=key,
            algorithms=[alg],
            audience=[issuer, f"{issuer}/v1/tasks"],
            leeway=services.settings.leeway,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
    except jwt.PyJWTError:
        # Same words as an unknown agent: the answer must not reveal which ids exist.
        raise AuthenticationError("invalid client assertion") from None
    now = services.clock.now()
    exp = float(claims["exp"])
    if exp - now > MAX_ASSERTION_LIFETIME:
        raise AuthenticationError("invalid client assertion")
    digest = hashlib.sha256(f"{agent_id}:{claims['jti']}".encode()).hexdigest()
    if not await repo.claim_assertion(services.db, digest, exp, now):
        raise AuthenticationError("invalid client assertion")
    return Principal(kind="agent", name=agent.id, agent_id=agent.id, agent=agent)


def ensure_agent_active(status: AgentStatus) -> None:
    if status is not AgentStatus.ACTIVE:
        raise PermissionDenied("agent is suspended; an admin must reinstate it")
