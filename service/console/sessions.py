"""Console sessions and CSRF tokens: what the session cookie means, and nothing else.

The cookie carries an opaque random id (256 bits). The server keeps, per session, the
operator's name and role, the SHA-256 of the operator token it was opened with (never
the token), a synchronizer CSRF token and pending flash messages. Every request
re-reads the operator by that hash, so disabling an operator ends its console sessions
at once. Sessions live in this process's memory: a restart signs everyone out, and a
console served by several replicas needs sticky sessions (docs/console.md).

Sign-in itself is CSRF-protected too (login CSRF): the sign-in page sets a random
pre-session nonce cookie and the form carries an HMAC of it under a per-process key.

This module never sees a request or a database: the controllers wire it in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from service.contracts import Role

SESSION_COOKIE = "ks_console"
LOGIN_COOKIE = "ks_console_login"
COOKIE_PATH = "/console"
IDLE_SECONDS = 30 * 60
ABSOLUTE_SECONDS = 12 * 60 * 60
MAX_SESSIONS = 10_000


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass
class Session:
    operator: str
    role: Role
    token_hash: str
    csrf: str
    created_at: float
    seen_at: float
    flashes: list[tuple[str, str]] = field(default_factory=list)
    """(level, text) messages shown once on the next page."""

    def flash(self, level: str, text: str) -> None:
        self.flashes.append((level, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        return taken

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented, self.csrf)


class SessionStore:
    """In-memory sessions keyed by the SHA-256 of the cookie value (a memory dump does not
    hand out live cookies). Bounded: past ``MAX_SESSIONS`` the least recently used go."""

    def __init__(self, *, idle: float = IDLE_SECONDS, absolute: float = ABSOLUTE_SECONDS) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self._login_key = secrets.token_bytes(32)
        self.idle = idle
        self.absolute = absolute

    def open(
        self, *, operator: str, role: Role, token_hash: str, now: float
    ) -> tuple[str, Session]:
        """A fresh session (a new id on every sign-in: no fixation); returns (cookie, session)."""
        sid = secrets.token_urlsafe(32)
        session = Session(
            operator=operator,
            role=role,
            token_hash=token_hash,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            seen_at=now,
        )
        with self._lock:
            self._sessions[_digest(sid)] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid, session

    def get(self, sid: str | None, now: float) -> Session | None:
        if not sid:
            return None
        key = _digest(sid)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if now - session.seen_at > self.idle or now - session.created_at > self.absolute:
                del self._sessions[key]
                return None
            session.seen_at = now
            self._sessions.move_to_end(key)
            return session

    def close(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(_digest(sid), None)

    def __len__(self) -> int:
        return len(self._sessions)

    # -- login CSRF (before there is a session) -------------------------------------

    @staticmethod
    def new_login_nonce() -> str:
        return secrets.token_urlsafe(32)

    def login_token(self, nonce: str) -> str:
        return hmac.new(self._login_key, nonce.encode(), hashlib.sha256).hexdigest()

    def login_token_ok(self, nonce: str | None, presented: str | None) -> bool:
        if not nonce or not presented:
            return False
        return hmac.compare_digest(self.login_token(nonce), presented)
