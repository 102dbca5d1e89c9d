"""What the detector does about a finding, and how it knows the action is durable.

* **revoke** — ``POST /v1/revocations`` on the service as the ``detector`` role, target the
  task, ``reason`` naming the rule, ``idempotency_key`` ``<rule id>:<task id>``: a
  redelivered event (after a crash or rebalance) gets the first revocation back (200)
  instead of a second one. Durable when the service answers 200/201.
* **alert** — an :class:`~service.kernel.events.AlertEvent` on the alerts topic, keyed by agent
  id, with a deterministic ``alert_id`` (rule, task, triggering event) so a consumer can
  drop redelivered duplicates. Durable when Kafka acknowledges it (``acks=all``).
* **dead letter** — an undecodable usage record goes to the DLQ with the reason, counted.

Every action retries transient failures (transport errors, 408/429/5xx, Kafka errors) with
capped exponential backoff until it succeeds, fails finally (404 unknown task, other 4xx),
or the detector is stopping and its shutdown grace ran out (:class:`Abandoned`: the batch
is then not committed and will be redelivered). 401/403 mean the detector's token is
wrong: :class:`DetectorAuthError`, fatal, nothing committed.

The service is also asked for a task the tasks topic has not told us about yet
(:meth:`ServiceClient.get_task`). Nothing here decides anything: decisions are rules.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar
from urllib.parse import quote

import httpx
import msgspec
from aiokafka import AIOKafkaProducer

from detectors.metrics import DetectorMetrics
from detectors.rules import Finding
from service.contracts import TaskView
from service.kernel.clock import Clock
from service.kernel.errors import KillSwitchError
from service.kernel.events import AlertEvent, DeadLetter, encoder

__all__ = [
    "Abandoned",
    "Actions",
    "DetectorAuthError",
    "RevokeOutcome",
    "ServiceClient",
    "StopGate",
]

log = logging.getLogger("killswitch.detector.actions")

MAX_DLQ_VALUE: Final = 64 * 1024
MAX_REASON: Final = 1000
_ALERT_NS: Final = uuid.UUID("8f1d6c1e-3a47-4f0e-9b52-6d1f0a9c2e71")
_BACKOFF_START: Final = 0.05
_BACKOFF_CAP: Final = 2.0

T = TypeVar("T")


class DetectorAuthError(KillSwitchError):
    """The service refused the detector's token (401/403): a configuration error."""


class Abandoned(Exception):
    """Stopping, and an action could not complete within the shutdown grace."""


class _Transient(Exception):
    """Worth retrying."""


class StopGate:
    """Tells retry loops when to give up: ``grace`` seconds after ``stop`` is set."""

    def __init__(self, stop: asyncio.Event, grace: float) -> None:
        self._stop = stop
        self._grace = grace
        self._stopped_at: float | None = None

    def expired(self) -> bool:
        if not self._stop.is_set():
            return False
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return time.monotonic() - self._stopped_at > self._grace


async def retrying(what: str, gate: StopGate, attempt: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt`` until it returns, raising on anything but :class:`_Transient`."""
    delay = _BACKOFF_START
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except _Transient as exc:
            if gate.expired():
                raise Abandoned(f"{what}: gave up while stopping ({exc})") from exc
            if tries in (1, 5) or tries % 20 == 0:
                log.warning("%s failed (try %d), retrying: %s", what, tries, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_CAP)


@dataclass(frozen=True, slots=True)
class RevokeOutcome:
    outcome: Literal["revoked", "existing", "not_found", "rejected"]
    revocation_id: str | None = None
    created_at: float | None = None
    detail: str = ""


class ServiceClient:
    """The two calls the detector makes to the service, authenticated as ``detector``."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 5.0) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": "killswitch-detector"},
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status in (401, 403):
            raise DetectorAuthError(
                f"the service refused the detector token ({status}): {response.text[:200]}"
            )
        if status in (408, 425, 429) or status >= 500:
            raise _Transient(f"HTTP {status}: {response.text[:200]}")
        return response

    async def get_task(self, task_id: str) -> TaskView | None:
        """The task, or None if the service has no such task (final)."""
        response = await self._send("GET", f"/v1/tasks/{quote(task_id, safe='')}")
        if response.status_code in (400, 404):
            return None
        if response.status_code != 200:
            raise _Transient(f"HTTP {response.status_code}: {response.text[:200]}")
        return msgspec.json.decode(response.content, type=TaskView)

    async def revoke_task(self, task_id: str, reason: str, idempotency_key: str) -> RevokeOutcome:
        body = {
            "target": {"type": "task", "task_id": task_id},
            "reason": reason[:MAX_REASON],
            "idempotency_key": idempotency_key,
        }
        response = await self._send("POST", "/v1/revocations", json=body)
        status = response.status_code
        if status in (200, 201):
            view = msgspec.json.decode(response.content, type=_RevocationAnswer)
            return RevokeOutcome(
                "revoked" if status == 201 else "existing", view.id, view.created_at
            )
        if status == 404:
            return RevokeOutcome("not_found", detail=response.text[:200])
        return RevokeOutcome("rejected", detail=f"HTTP {status}: {response.text[:200]}")


class _RevocationAnswer(msgspec.Struct):
    """The part of RevocationView the detector reads (tolerant of additions)."""

    id: str
    created_at: float


def alert_id(finding: Finding) -> str:
    """Deterministic: a redelivered event produces the same alert id."""
    name = f"{finding.rule.id}\x00{finding.task_id}\x00{finding.event.event_id}"
    return str(uuid.uuid5(_ALERT_NS, name))


class Actions:
    """Performs findings and dead letters; every coroutine returns once durable."""

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        service: ServiceClient,
        alerts_topic: str,
        dlq_topic: str,
        metrics: DetectorMetrics,
        clock: Clock,
        gate: StopGate,
    ) -> None:
        self._producer = producer
        self._service = service
        self._alerts_topic = alerts_topic
        self._dlq_topic = dlq_topic
        self._metrics = metrics
        self._clock = clock
        self._gate = gate

    async def _publish(self, what: str, topic: str, key: bytes | None, value: bytes) -> None:
        async def attempt() -> None:
            try:
                await self._producer.send_and_wait(topic, value=value, key=key)
            except Exception as exc:  # aiokafka raises KafkaError subclasses and timeouts
                raise _Transient(f"{type(exc).__name__}: {exc}") from exc

        await retrying(what, self._gate, attempt)

    async def act(
        self, finding: Finding, *, skip_revoke: str | None = None
    ) -> RevokeOutcome | None:
        """Revoke (if the rule says so and ``skip_revoke`` gives no reason not to) and raise
        the alert; returns once both are durable, with the revocation outcome if any."""
        evidence = dict(finding.evidence)
        # When the offending use happened (the guard's clock): the service measures kill
        # latency from it (killswitch_kill_latency_seconds).
        evidence.setdefault("event_at", finding.event.at)
        outcome: RevokeOutcome | None = None
        if finding.rule.action == "revoke":
            if skip_revoke is not None:
                evidence["revocation"] = f"skipped: {skip_revoke}"
            else:
                outcome = await retrying(
                    f"revoke task {finding.task_id}",
                    self._gate,
                    lambda: self._service.revoke_task(
                        finding.task_id, finding.reason, finding.idempotency_key
                    ),
                )
                self._metrics.revocations.labels(outcome=outcome.outcome).inc()
                evidence["revocation"] = outcome.outcome
                if outcome.revocation_id:
                    evidence["revocation_id"] = outcome.revocation_id
                if outcome.outcome in ("not_found", "rejected"):
                    log.warning(
                        "revoke task %s for %s: %s %s",
                        finding.task_id,
                        finding.rule.id,
                        outcome.outcome,
                        outcome.detail,
                    )
        score = evidence.get("score")
        alert = AlertEvent(
            alert_id=alert_id(finding),
            at=self._clock.now(),
            rule=finding.rule.id,
            severity=finding.severity,
            agent_id=finding.agent_id,
            task_id=finding.task_id,
            score=float(score) if isinstance(score, int | float) else None,
            evidence={"summary": finding.summary, **evidence},
            action=finding.rule.action,
        )
        await self._publish(
            f"alert {alert.alert_id}",
            self._alerts_topic,
            finding.agent_id.encode(),
            encoder.encode(alert),
        )
        self._metrics.alerts.labels(rule=finding.rule.id).inc()
        return outcome

    async def dead_letter(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
    ) -> None:
        raw = value or b""
        key = key[:1024] if key is not None else None
        if len(raw) > MAX_DLQ_VALUE:
            reason = f"{reason} (value truncated from {len(raw)} bytes)"
            raw = raw[:MAX_DLQ_VALUE]
        letter = DeadLetter(
            at=self._clock.now(),
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason[:2000],
            key=key,
            value=raw,
        )
        await self._publish(
            f"dead letter {topic}/{partition}@{offset}",
            self._dlq_topic,
            key,
            encoder.encode(letter),
        )
        self._metrics.dead_letters.inc()
