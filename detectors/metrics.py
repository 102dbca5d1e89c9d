"""The detector's Prometheus metrics and its tiny health/metrics HTTP endpoint.

One :class:`DetectorMetrics` per running detector (its own registry, so two detectors in
one process, as in tests, never collide). :class:`HealthServer` is a minimal asyncio
HTTP/1.1 server answering ``GET /livez``, ``GET /readyz`` and ``GET /metrics``; it needs
no web framework and never touches detector state beyond two probe callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["DetectorMetrics", "HealthServer"]

log = logging.getLogger("killswitch.detector.metrics")

_MAX_REQUEST_HEAD: Final = 8192


class DetectorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "killswitch_detector_events",
            "Usage records consumed, by outcome (decided or dead_letter); rate() = events/s",
            ["outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "killswitch_detector_decisions",
            "Findings acted on, by rule and action",
            ["rule", "action"],
            registry=r,
        )
        self.decision_latency = Histogram(
            "killswitch_detector_decision_seconds",
            "From a batch leaving Kafka to its actions being durable (revocation "
            "acknowledged, alerts and dead letters acknowledged by Kafka)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=r,
        )
        self.lag = Gauge(
            "killswitch_detector_consumer_lag",
            "Usage records behind the partition's high watermark",
            ["partition"],
            registry=r,
        )
        self.dead_letters = Counter(
            "killswitch_detector_dead_letters", "Records sent to the DLQ", registry=r
        )
        self.revocations = Counter(
            "killswitch_detector_revocations",
            "Revocation requests by outcome (revoked, existing, not_found, rejected)",
            ["outcome"],
            registry=r,
        )
        self.alerts = Counter(
            "killswitch_detector_alerts", "Alerts published, by rule", ["rule"], registry=r
        )
        self.lookups = Counter(
            "killswitch_detector_task_lookups",
            "Fallback task lookups on the service, by outcome (found, not_found)",
            ["outcome"],
            registry=r,
        )
        self.commits = Counter(
            "killswitch_detector_commits",
            "Offset commits by outcome (ok, failed: redelivered, harmless)",
            ["outcome"],
            registry=r,
        )
        self.tasks = Gauge("killswitch_detector_tasks", "Tasks held in detector memory", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``/livez`` (200 while the loop turns), ``/readyz`` (200 once caught up), ``/metrics``."""

    def __init__(
        self,
        metrics: DetectorMetrics,
        *,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        host: str,
        port: int,
    ) -> None:
        self._metrics = metrics
        self._live = live
        self._ready = ready
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("detector health and metrics on http://%s:%s/metrics", self._host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            if len(head) > _MAX_REQUEST_HEAD:
                raise ValueError("request head too large")
            method, path = self._request_line(head)
            status, ctype, body = self._route(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        except ValueError:
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + (body if method != "HEAD" else b"")
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    @staticmethod
    def _request_line(head: bytes) -> tuple[str, str]:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3:
            raise ValueError("bad request line")
        return parts[0], parts[1].split("?", 1)[0]

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
        if path in ("/livez", "/healthz"):
            ok = self._live()
        elif path == "/readyz":
            ok = self._ready()
        else:
            return "404 Not Found", "text/plain", b"not found\n"
        if ok:
            return "200 OK", "text/plain", b"ok\n"
        return "503 Service Unavailable", "text/plain", b"not ok\n"
