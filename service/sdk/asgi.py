"""``GuardMiddleware``: a pure ASGI middleware that puts a :class:`Guard` in front of an app.

Works with any ASGI 3 framework (litestar, starlette, FastAPI, …). For each HTTP request
it reads ``Authorization: Bearer <credential>`` (or ``DPoP <credential>`` with one
``DPoP`` proof header, RFC 9449 §7.1, which a key-bound credential needs), asks the
guard about ``(action_for(scope), resource_for(scope))`` and either passes the request on — with the
verified claims in ``scope["state"]["killswitch"]`` — or answers itself with an RFC 9457
``application/problem+json`` body:

======================  ======  ==================================================
verdict outcome         status  ``WWW-Authenticate`` (RFC 6750 §3)
======================  ======  ==================================================
no credential           401     ``Bearer realm="…"`` (no error code, §3.1)
invalid_token           401     ``Bearer realm="…", error="invalid_token", …``
invalid_dpop_proof      401     ``DPoP realm="…", algs="EdDSA ES256",
                                error="invalid_dpop_proof", …`` (RFC 9449 §7.1)
insufficient_scope      403     ``Bearer realm="…", error="insufficient_scope", …``
revoked                 403     ``Bearer realm="…", error="invalid_token", …``
unavailable (fail       503     none; ``Retry-After: 1``
closed: feed stale)
======================  ======  ==================================================

The one ``UsageEvent`` of the request is emitted when the response has been sent, with
``bytes_out`` = the response body bytes the app (or the denial) produced. Lifespan and
other scope types pass through untouched; websockets are checked like HTTP and closed
with code 1008 (policy violation) when denied.

This module imports nothing from litestar or the database.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from service.kernel.errors import (
    PROBLEM_TYPE_PREFIX,
    DPoPProofRejected,
    KillSwitchError,
    PermissionDenied,
    RevocationStateUnavailable,
    TokenRejected,
)
from service.kernel.events import Source
from service.sdk.guard import Guard, Outcome, Verdict

__all__ = ["GuardMiddleware", "default_action", "default_resource"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Each outcome answers as the kernel's error of that kind: its status, slug and title.
_ERRORS: Final[dict[Outcome, type[KillSwitchError]]] = {
    Outcome.INVALID: TokenRejected,
    Outcome.INVALID_DPOP: DPoPProofRejected,
    Outcome.FORBIDDEN: PermissionDenied,
    Outcome.REVOKED: PermissionDenied,
    Outcome.UNAVAILABLE: RevocationStateUnavailable,
}


# Decoded path characters that would change how the resource URL parses: re-escaped.
_PATH_ESCAPES: Final = {code: f"%{code:02X}" for code in (*b"%?#", *range(0x20), 0x7F)}


def default_action(scope: Scope) -> str:
    """The HTTP method (``GET``, ``POST`` …); ``WS`` for a websocket."""
    method: str = scope.get("method", "WS")
    return method


def default_resource(scope: Scope) -> str:
    """``scheme://host[:port]/root_path/path`` (no query string).

    The host comes from the ``Host`` header; behind a proxy, or if one app answers for
    several names, pass ``resource_for`` with a fixed origin instead.

    ASGI gives the path percent-decoded, as the app will route it. It is re-escaped where
    a decoded character would change how the URL parses (``%``, ``?``, ``#``, ASCII
    controls), so the guard sees the path the app sees: ``/a%2F..%2Fb`` arrives as
    ``/a/../b`` and is refused for its dot-segment, ``/a%3F/../b`` arrives as ``/a?/../b``
    and stays a path. A ``resource_for`` of your own should do the same (or use
    ``raw_path`` verbatim).
    """
    host = ""
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = value.decode("latin-1")
            break
    if not host and scope.get("server"):
        server_host, port = scope["server"]
        host = f"{server_host}:{port}" if port not in (None, 80, 443) else server_host
    scheme = scope.get("scheme", "http")
    path = f"{scope.get('root_path', '')}{scope['path']}"
    if "%" in path or "?" in path or "#" in path or not path.isprintable():
        path = path.translate(_PATH_ESCAPES)
    return f"{scheme}://{host}{path}"


class GuardMiddleware:
    """Enforce ``guard`` on every HTTP/websocket request except ``skip_paths``."""

    def __init__(
        self,
        app: ASGIApp,
        guard: Guard,
        *,
        action_for: Callable[[Scope], str] = default_action,
        resource_for: Callable[[Scope], str] = default_resource,
        skip_paths: Iterable[str] = (),
        source_for: Callable[[Scope], Source] | None = None,
        realm: str = "killswitch",
    ) -> None:
        self.app = app
        self.guard = guard
        self.action_for = action_for
        self.resource_for = resource_for
        self.skip_paths = frozenset(skip_paths)
        self.source_for = source_for or _source
        self.realm = realm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in self.skip_paths:
            await self.app(scope, receive, send)
            return
        scheme, token, proofs = _credentials(scope)
        action = self.action_for(scope)
        resource = self.resource_for(scope)
        source = self.source_for(scope)
        guard = self.guard
        if token is None:
            verdict = Verdict(allowed=False, reason="missing token", outcome=Outcome.INVALID)
        elif len(proofs) > 1:
            # RFC 9449 §4.3 item 1: exactly one DPoP header.
            verdict = Verdict(
                allowed=False, reason="more than one DPoP header", outcome=Outcome.INVALID_DPOP
            )
        else:
            # A dot-segment or encoded slash in the path is refused by the guard itself
            # (service.kernel.resources), as "out of scope": 403 insufficient_scope. A
            # DPoP-bound credential needs a proof for this method and URL (RFC 9449 §7.1).
            verdict = await guard.check(
                token,
                action,
                resource,
                emit=False,
                dpop=proofs[0] if proofs else None,
                htm=scope.get("method", "GET"),
                htu=default_resource(scope),
            )
            if verdict.allowed and scheme == "bearer" and _bound(verdict):
                # §7.2: a bound credential travels under the DPoP scheme, not Bearer.
                verdict = Verdict(
                    allowed=False,
                    reason="DPoP-bound credential presented with the Bearer scheme",
                    claims=verdict.claims,
                    outcome=Outcome.INVALID_DPOP,
                    agent_id=verdict.agent_id,
                    task_id=verdict.task_id,
                    jti_hash=verdict.jti_hash,
                )
        if verdict.allowed:
            await self._forward(scope, receive, send, verdict, action, resource, source)
            return
        sent = await self._deny(scope, send, verdict, token is not None)
        guard.record(verdict, action, resource, bytes_out=sent, source=source)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        verdict: Verdict,
        action: str,
        resource: str,
        source: Source,
    ) -> None:
        state = scope.setdefault("state", {})
        state["killswitch"] = verdict.claims
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "websocket.send":
                sent += len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.guard.record(verdict, action, resource, bytes_out=sent, source=source)

    async def _deny(self, scope: Scope, send: Send, verdict: Verdict, had_token: bool) -> int:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": verdict.reason[:120]})
            return 0
        outcome = verdict.outcome
        error = _ERRORS[outcome]
        status = error.status
        body = json.dumps(
            {
                "type": PROBLEM_TYPE_PREFIX + error.type_slug,
                "title": error.title,
                "status": status,
                "detail": verdict.reason,
                "instance": scope["path"],
            }
        ).encode()
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        challenge = self._challenge(outcome, verdict.reason, had_token)
        if challenge:
            headers.append((b"www-authenticate", challenge.encode("latin-1", "replace")))
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return len(body)

    def _challenge(self, outcome: Outcome, reason: str, had_token: bool) -> str | None:
        realm = f'Bearer realm="{self.realm}"'
        if not had_token:
            return realm  # RFC 6750 §3.1: no error code when no credential was sent
        description = reason.replace("\\", "").replace('"', "'")[:200]
        if outcome is Outcome.INVALID_DPOP:
            # RFC 9449 §7.1: the DPoP scheme's challenge, with the algorithms we accept.
            return (
                f'DPoP realm="{self.realm}", algs="EdDSA ES256", error="invalid_dpop_proof", '
                f'error_description="{description}"'
            )
        if outcome in (Outcome.INVALID, Outcome.REVOKED):
            return f'{realm}, error="invalid_token", error_description="{description}"'
        if outcome is Outcome.FORBIDDEN:
            return f'{realm}, error="insufficient_scope", error_description="{description}"'
        return None


def _credentials(scope: Scope) -> tuple[str, str | None, list[str]]:
    """(scheme, token, DPoP proofs): ``Authorization: Bearer|DPoP <token>`` (RFC 6750,
    RFC 9449 §7.1) and every ``DPoP`` header (the caller insists on exactly one)."""
    scheme, token = "", None
    proofs: list[str] = []
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and token is None:
            text: str = value.decode("latin-1")
            kind, _, credential = text.partition(" ")
            credential = credential.strip()
            if kind.lower() in ("bearer", "dpop") and credential:
                scheme, token = kind.lower(), credential
        elif name == b"dpop":
            proofs.append(value.decode("latin-1").strip())
    return scheme, token, proofs


def _bound(verdict: Verdict) -> bool:
    cnf = verdict.claims.get("cnf") if verdict.claims is not None else None
    return isinstance(cnf, dict) and "jkt" in cnf


def _source(scope: Scope) -> Source:
    address = None
    client = scope.get("client")
    if client:
        address = str(client[0])
    user_agent = None
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            user_agent = value.decode("latin-1")[:2048]
            break
    return Source(address=address, user_agent=user_agent)
