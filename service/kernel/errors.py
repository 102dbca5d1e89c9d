"""The killswitch error tree: every domain failure is one of these.

Services raise these; exactly one place (``service.api.problems``) turns them into
RFC 9457 problem details on HTTP, and the CLI prints them as one-line messages.
Nothing in this module performs I/O.

::

    KillSwitchError                      500  something we did not expect
    ├── ClientError                      400  the request itself is wrong
    │   ├── ScopeSyntaxError             400  a grant or pattern does not parse
    │   └── ScopeViolation               403  declared scope exceeds ceiling/parent
    ├── AuthenticationError              401  missing/bad credentials (operator, agent)
    ├── PermissionDenied                 403  the role may not do this, or the agent is suspended
    ├── NotFound                         404  no such thing (or you may not know it exists)
    ├── Conflict                         409  state forbids it (task closed, already reinstated)
    ├── TokenRejected                    401  a presented access token failed verification
    │   └── DPoPProofRejected            401  its RFC 9449 proof of possession did not
    │                                         check out (``invalid_dpop_proof``)
    └── RevocationStateUnavailable       503  an enforcement point cannot vouch for
                                              revocation state: it fails closed

Every error becomes a problem whose ``type`` is ``PROBLEM_TYPE_PREFIX + type_slug``,
whoever answers: the service (``service.api.problems``) or a guard's middleware
(``service.sdk.asgi``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROBLEM_TYPE_PREFIX = "urn:killswitch:problem:"


class KillSwitchError(Exception):
    """Base of every error killswitch raises on purpose."""

    status: int = 500
    type_slug: str = "internal-error"
    title: str = "Internal error"

    def __init__(self, detail: str, *, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra: dict[str, Any] = dict(extra or {})


class ClientError(KillSwitchError):
    status = 400
    type_slug = "bad-request"
    title = "Bad request"


class ScopeSyntaxError(ClientError):
    type_slug = "invalid-scope"
    title = "Invalid scope"


class ScopeViolation(ClientError):
    """A declared scope asks for more than the ceiling (or the parent task) allows.

    ``extra["offending"]`` lists the grants, audiences and limits that exceed it.
    """

    status = 403
    type_slug = "scope-violation"
    title = "Scope exceeds what is allowed"


class AuthenticationError(KillSwitchError):
    status = 401
    type_slug = "unauthenticated"
    title = "Authentication required"


class PermissionDenied(KillSwitchError):
    status = 403
    type_slug = "forbidden"
    title = "Forbidden"


class NotFound(KillSwitchError):
    status = 404
    type_slug = "not-found"
    title = "Not found"


class Conflict(KillSwitchError):
    status = 409
    type_slug = "conflict"
    title = "Conflict"


class TokenRejected(KillSwitchError):
    """A presented access token failed verification (signature, claims or status).

    ``permanent`` says whether the same token string can never pass: true for a forged,
    malformed or foreign token (an enforcement point may remember the rejection), false
    when the answer depends on time or on keys not yet fetched (expired, not yet valid,
    unknown ``kid``).
    """

    status = 401
    type_slug = "token-rejected"
    title = "Token rejected"

    def __init__(
        self, detail: str, *, permanent: bool = True, extra: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(detail, extra=extra)
        self.permanent = permanent


class DPoPProofRejected(TokenRejected):
    """A DPoP proof (RFC 9449 §4.3) is missing, malformed, for another request, replayed,
    or signed by a key other than the one the credential is bound to."""

    type_slug = "invalid-dpop-proof"
    title = "Invalid DPoP proof"


class RevocationStateUnavailable(KillSwitchError):
    """A guard's revocation feed is not ready or stale: it denies rather than guess."""

    status = 503
    type_slug = "revocation-state-unavailable"
    title = "Revocation state unavailable"
