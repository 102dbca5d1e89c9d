"""The agent SDK: open a task, keep its credential fresh, close it when the work ends.

::

    async with KillSwitchClient(url, agent_id, secret) as ks:
        async with ks.task(grants=["call:tool/invoices.read"], audiences=[aud], ttl=600) as cred:
            await tools.post("/invoices/read", auth=cred.auth)  # always the current token

``task()`` opens the task (``POST /v1/tasks``, HTTP Basic as the agent), renews the
credential in the background at ``renew_at`` (2/3) of its lifetime
(``POST /v1/tasks/{id}/renew``), and completes the task on exit
(``POST /v1/tasks/{id}/complete``) — also when the block raises, with a reason naming the
exception. A renewal that keeps failing is retried with backoff until the credential
expires; a task closed by someone else (revoked, 403/404/409) stops renewals and is
reported on ``cred.closed``.

Errors are RFC 9457 problem details turned into exceptions::

    KillSwitchAPIError          any problem answer (status, type, title, detail, problem)
    ├── Unauthenticated         401  wrong agent id or secret
    ├── Forbidden               403  suspended agent, not yours
    │   └── ScopeRejected       403  declared scope exceeds the agent's ceiling
    ├── NotFoundError           404
    └── ConflictError           409  task already closed

This module imports nothing from litestar or the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Generator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import httpx

from service.sdk.dpop import DPoPKey

__all__ = [
    "ConflictError",
    "Forbidden",
    "KillSwitchAPIError",
    "KillSwitchClient",
    "NotFoundError",
    "ScopeRejected",
    "TaskCredential",
    "Unauthenticated",
]

log = logging.getLogger("killswitch.sdk.client")


class KillSwitchAPIError(Exception):
    """The service answered with a problem (RFC 9457)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.type = str(problem.get("type", "about:blank"))
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", ""))
        super().__init__(f"{status} {self.title}: {self.detail}".strip())


class Unauthenticated(KillSwitchAPIError):
    pass


class Forbidden(KillSwitchAPIError):
    pass


class ScopeRejected(Forbidden):
    """The declared scope asks for more than allowed; ``offending`` lists what."""

    @property
    def offending(self) -> list[str]:
        value = self.problem.get("offending", [])
        return [str(v) for v in value] if isinstance(value, list) else []


class NotFoundError(KillSwitchAPIError):
    pass


class ConflictError(KillSwitchAPIError):
    pass


def _raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    status = response.status_code
    cls: type[KillSwitchAPIError] = KillSwitchAPIError
    if status == 401:
        cls = Unauthenticated
    elif status == 403:
        scope_violation = str(problem.get("type", "")).endswith("scope-violation")
        cls = ScopeRejected if scope_violation else Forbidden
    elif status == 404:
        cls = NotFoundError
    elif status == 409:
        cls = ConflictError
    raise cls(status, problem)


class _BearerAuth(httpx.Auth):
    def __init__(self, credential: TaskCredential) -> None:
        self._credential = credential

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._credential.token}"
        yield request


class _DPoPAuth(httpx.Auth):
    """RFC 9449 §7.1: ``Authorization: DPoP <token>`` and a fresh proof per request; one
    retry with the server's ``DPoP-Nonce`` when it asks for one (§8)."""

    def __init__(self, credential: TaskCredential, key: DPoPKey) -> None:
        self._credential = credential
        self._key = key

    def _sign(self, request: httpx.Request, nonce: str | None) -> None:
        token = self._credential.token
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = self._key.proof(
            request.method, str(request.url), access_token=token, nonce=nonce
        )

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._sign(request, None)
        response = yield request
        nonce = response.headers.get("DPoP-Nonce")
        if response.status_code in (400, 401) and nonce:
            self._sign(request, nonce)
            yield request


class TaskCredential:
    """The live credential of one open task. ``token`` is always the newest one.

    With ``dpop_key`` set the credential is bound to that key (``cnf.jkt``): ``auth``
    signs a DPoP proof for every request, and the bare ``headers`` are refused.
    """

    def __init__(self, issued: dict[str, Any], dpop_key: DPoPKey | None = None) -> None:
        self.task_id: str = issued["task"]["id"]
        self.renewals = 0
        self.closed: str | None = None
        """Why the task ended under us (revoked, expired), if it did."""
        self.last_error: Exception | None = None
        self.dpop_key = dpop_key
        self.auth: httpx.Auth = _BearerAuth(self) if dpop_key is None else _DPoPAuth(self, dpop_key)
        self._update(issued)

    def _update(self, issued: dict[str, Any]) -> None:
        self.token: str = issued["access_token"]
        self.jti: str = issued["jti"]
        self.expires_at: float = float(issued["expires_at"])
        self.expires_in: float = float(issued["expires_in"])
        self.task: dict[str, Any] = issued["task"]
        self.received = time.monotonic()

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization`` for a bearer credential (use :meth:`headers_for` with DPoP)."""
        if self.dpop_key is not None:
            raise TypeError("a DPoP-bound credential needs a proof: use headers_for(method, url)")
        return {"Authorization": f"Bearer {self.token}"}

    def headers_for(self, method: str, url: str) -> dict[str, str]:
        """The headers of one request to ``method url`` (a fresh proof when bound)."""
        if self.dpop_key is None:
            return {"Authorization": f"Bearer {self.token}"}
        return {
            "Authorization": f"DPoP {self.token}",
            "DPoP": self.dpop_key.proof(method, url, access_token=self.token),
        }

    def __repr__(self) -> str:
        return f"TaskCredential(task_id={self.task_id!r}, renewals={self.renewals})"


class KillSwitchClient:
    """An agent's connection to killswitch (HTTP Basic with its client secret)."""

    def __init__(
        self,
        base_url: str,
        agent_id: str,
        client_secret: str,
        *,
        renew_at: float = 2 / 3,
        http: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not 0 < renew_at < 1:
            raise ValueError("renew_at is a fraction of the credential lifetime, in (0, 1)")
        self.base_url = base_url.rstrip("/")
        self.agent_id = agent_id
        self.renew_at = renew_at
        self._auth = httpx.BasicAuth(agent_id, client_secret)
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)

    def __repr__(self) -> str:
        return f"KillSwitchClient({self.base_url!r}, agent_id={self.agent_id!r})"

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> KillSwitchClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self._http.post(self.base_url + path, json=body, auth=self._auth)
        _raise_for_problem(response)
        result: dict[str, Any] = response.json()
        return result

    async def open_task(
        self,
        *,
        grants: Sequence[str],
        audiences: Sequence[str] = (),
        ttl: int | None = None,
        limits: dict[str, Any] | None = None,
        purpose: str = "",
        dpop: bool | DPoPKey = False,
    ) -> TaskCredential:
        """Open a task. ``dpop=True`` binds its credentials to a fresh in-memory key
        (RFC 9449; pass a :class:`DPoPKey` to choose it): a copied token is then useless
        without the key, which never leaves this process."""
        body: dict[str, Any] = {
            "scope": {"grants": list(grants), "audiences": list(audiences), "limits": limits or {}},
            "purpose": purpose,
        }
        if ttl is not None:
            body["ttl"] = ttl
        key = dpop if isinstance(dpop, DPoPKey) else DPoPKey.generate() if dpop else None
        if key is not None:
            body["dpop_jkt"] = key.jkt
        return TaskCredential(await self._post("/v1/tasks", body), key)

    async def renew(self, credential: TaskCredential) -> None:
        credential._update(await self._post(f"/v1/tasks/{credential.task_id}/renew"))
        credential.renewals += 1

    async def complete(self, credential: TaskCredential, reason: str = "task completed") -> None:
        await self._post(f"/v1/tasks/{credential.task_id}/complete", {"reason": reason[:1000]})

    @asynccontextmanager
    async def task(
        self,
        *,
        grants: Sequence[str],
        audiences: Sequence[str] = (),
        ttl: int | None = None,
        limits: dict[str, Any] | None = None,
        purpose: str = "",
        dpop: bool | DPoPKey = False,
    ) -> AsyncIterator[TaskCredential]:
        """Open a task for the ``async with`` block; renew while it runs; complete after."""
        credential = await self.open_task(
            grants=grants, audiences=audiences, ttl=ttl, limits=limits, purpose=purpose, dpop=dpop
        )
        renewer = asyncio.create_task(self._keep_fresh(credential), name="killswitch-renew")
        reason = "task completed"
        try:
            yield credential
        except BaseException as exc:
            reason = f"task failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            if credential.closed is None:
                try:
                    await self.complete(credential, reason)
                except (KillSwitchAPIError, httpx.HTTPError) as exc:
                    # Never mask the block's own exception; the task dies at its deadline.
                    log.warning("could not complete task %s: %s", credential.task_id, exc)

    async def _keep_fresh(self, credential: TaskCredential) -> None:
        while True:
            due = credential.received + credential.expires_in * self.renew_at
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            backoff = 0.2
            while True:
                try:
                    await self.renew(credential)
                    credential.last_error = None
                    break
                except (Forbidden, NotFoundError, ConflictError) as exc:
                    credential.closed = exc.detail or exc.title
                    credential.last_error = exc
                    log.warning("task %s ended under us: %s", credential.task_id, exc)
                    return
                except (KillSwitchAPIError, httpx.HTTPError) as exc:
                    credential.last_error = exc
                    left = credential.expires_at - time.time()
                    if left <= 0:
                        log.error("credential of task %s expired unrenewed", credential.task_id)
                        return
                    await asyncio.sleep(min(backoff, left))
                    backoff = min(backoff * 2, 5.0)
