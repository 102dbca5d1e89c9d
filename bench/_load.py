"""A deliberately cheap closed-loop HTTP/1.1 load generator (used by ``bench/issue.py``).

N keep-alive connections, each sending one pre-built request, waiting for the whole
response and sending the next. Responses are parsed just enough to find the status code
and the end of the body (``Content-Length``; the server never chunks these). Everything
runs as bare ``asyncio.Protocol`` callbacks on uvloop, so the client spends a few
microseconds per request instead of the ~200 µs an httpx round trip costs — on a 2-core
machine that is CPU the server keeps.

Run as a separate process so it has its own core and GIL:

    python bench/_load.py --port 8080 --concurrency 16 --duration 8 --warmup 1 \
        --request-file req.bin

It prints one JSON line on stdout: ok/error counts and latency percentiles of the
measured window, plus the 201s seen during warm-up (so the caller can reconcile the
database's row count with every credential the server handed out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any


class _Shared:
    def __init__(self) -> None:
        self.measuring = False
        self.stopping = False
        self.ok = 0
        self.errors = 0
        self.warm_ok = 0
        self.warm_errors = 0
        self.statuses: dict[int, int] = {}
        self.latencies: list[float] = []
        self.first_error: bytes | None = None
        self.closed = 0


class _Conn(asyncio.Protocol):
    __slots__ = ("buf", "done", "need", "request", "sent_at", "shared", "status", "transport")

    def __init__(self, request: bytes, shared: _Shared, done: asyncio.Future[None]) -> None:
        self.request = request
        self.shared = shared
        self.done = done
        self.buf = b""
        self.need = -1  # total bytes of the current response, once its head is parsed
        self.status = 0
        self.sent_at = 0.0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            if self.need < 0:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    self.buf = buf
                    return
                self.status = int(buf[9:12])
                cl = buf.find(b"content-length:", 0, head_end)
                if cl < 0:
                    cl = buf.lower().find(b"content-length:", 0, head_end)
                if cl < 0:
                    length = 0
                else:
                    eol = buf.find(b"\r\n", cl)
                    length = int(buf[cl + 15 : eol])
                self.need = head_end + 4 + length
            if len(buf) < self.need:
                self.buf = buf
                return
            response, buf = buf[: self.need], buf[self.need :]
            self.need = -1
            self._complete(response)
            if self.shared.stopping:
                self.buf = b""
                self.transport.close()
                return
            self._send()
            if not buf:
                self.buf = b""
                return

    def _complete(self, response: bytes) -> None:
        s = self.shared
        latency = time.perf_counter() - self.sent_at
        ok = self.status == 201
        if s.measuring:
            if ok:
                s.ok += 1
            else:
                s.errors += 1
            s.latencies.append(latency)
            s.statuses[self.status] = s.statuses.get(self.status, 0) + 1
        elif ok:
            s.warm_ok += 1
        else:
            s.warm_errors += 1
        if not ok and s.first_error is None:
            s.first_error = response[:600]

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.closed += 1
        if not self.done.done():
            self.done.set_result(None)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(
    host: str, port: int, request: bytes, concurrency: int, duration: float, warmup: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    shared = _Shared()
    dones: list[asyncio.Future[None]] = []
    for _ in range(concurrency):
        done: asyncio.Future[None] = loop.create_future()
        dones.append(done)
        await loop.create_connection(lambda d=done: _Conn(request, shared, d), host, port)
    await asyncio.sleep(warmup)
    shared.latencies = []
    shared.measuring = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    shared.measuring = False
    elapsed = time.perf_counter() - started
    shared.stopping = True  # every connection closes after its in-flight response
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*dones), timeout=30)
    lat = sorted(shared.latencies)
    ms = 1000.0
    return {
        "concurrency": concurrency,
        "elapsed_s": elapsed,
        "ok": shared.ok,
        "errors": shared.errors,
        "rate": shared.ok / elapsed if elapsed else 0.0,
        "p50_ms": _percentile(lat, 0.50) * ms,
        "p95_ms": _percentile(lat, 0.95) * ms,
        "p99_ms": _percentile(lat, 0.99) * ms,
        "max_ms": (lat[-1] * ms) if lat else float("nan"),
        "statuses": shared.statuses,
        # 201s outside the measured window (warm-up and the drain after it).
        "unmeasured_ok": shared.warm_ok,
        "unmeasured_errors": shared.warm_errors,
        "first_error": shared.first_error.decode("latin-1") if shared.first_error else None,
        "client_cpu_s": time.process_time(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--request-file", required=True, help="raw HTTP/1.1 request bytes")
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = p.parse_args()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    with open(args.request_file, "rb") as f:
        request = f.read()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - plain asyncio still works, a bit slower
        runner = asyncio.run
    result = runner(
        run(args.host, args.port, request, args.concurrency, args.duration, args.warmup)
    )
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
