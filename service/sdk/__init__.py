"""killswitch SDK: the guard for resource servers and the client for agents.

Importable with only httpx, msgspec, cryptography and aiokafka installed: nothing here
imports litestar or the database (``tests/sdk/test_imports.py`` checks it).

* :class:`Guard` (``service.sdk.guard``) — verify, enforce scope, honour revocations,
  report usage; :class:`GuardMiddleware` (``service.sdk.asgi``) wraps any ASGI app.
* :class:`KafkaRevocationFeed` / :class:`SseRevocationFeed` (``service.sdk.revocations``),
  filling the kernel's :class:`DenyState`.
* :class:`UsageEmitter` (``service.sdk.usage``).
* :class:`KillSwitchClient` (``service.sdk.client``) — ``async with client.task(...)``.

See docs/sdk.md.
"""

from service.kernel.deny import DenyState
from service.sdk.asgi import GuardMiddleware
from service.sdk.client import (
    ConflictError,
    Forbidden,
    KillSwitchAPIError,
    KillSwitchClient,
    NotFoundError,
    ScopeRejected,
    TaskCredential,
    Unauthenticated,
)
from service.sdk.guard import Guard, Outcome, Verdict
from service.sdk.revocations import KafkaRevocationFeed, RevocationFeed, SseRevocationFeed
from service.sdk.usage import UsageEmitter

__all__ = [
    "ConflictError",
    "DenyState",
    "Forbidden",
    "Guard",
    "GuardMiddleware",
    "KafkaRevocationFeed",
    "KillSwitchAPIError",
    "KillSwitchClient",
    "NotFoundError",
    "Outcome",
    "RevocationFeed",
    "ScopeRejected",
    "SseRevocationFeed",
    "TaskCredential",
    "Unauthenticated",
    "UsageEmitter",
    "Verdict",
]
