"""Credential issuance throughput, end to end, next to the library limits it is built on.

One run prints:

1. Library limits, single core, measured now: raw Ed25519 signs/s (cryptography, ~500-byte
   message), PyJWT ``jwt.encode(..., algorithm="EdDSA")`` encodes/s and our own
   ``service.credentials.rfc9068.sign`` signs/s on the claims an issuance really carries
   (plus sign + own-signature verify, which is what ``_issue`` does).
2. End-to-end issuances/s over HTTP with persistence: ``killswitch serve`` runs as a
   subprocess on a free port with a fresh temporary ``KS_DATA_DIR`` (SQLite by default),
   an agent is registered through the admin API, and ``bench/_load.py`` — a raw-socket
   HTTP/1.1 keep-alive client on uvloop, in its own process — drives ``POST /v1/tasks``
   with N connections, closed loop, for each concurrency level. Server and client are
   pinned to different CPUs (``--no-pin`` to let the scheduler decide). Afterwards the
   credential and task rows in the database are counted and reconciled with the 201s
   the client saw.

Usage:
    python bench/issue.py                                 # ~45 s, SQLite, 8/16/32 conns
    python bench/issue.py --duration 5 --concurrency 16
    python bench/issue.py --database-url postgresql://user:pw@127.0.0.1:5432/ks

Targets (the issue): >= 3,000 issuances/s end to end on SQLite with p99 < 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

AUDIENCE = "https://tools.internal"
CEILING = {
    "grants": ["call:tool/invoices.*", "GET:https://api.internal/v1/**", "read:file:///data/**"],
    "audiences": [AUDIENCE],
    "limits": {"max_calls": 1000},
}
TASK_BODY = {
    "scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUDIENCE]},
    "ttl": 600,
}
TARGET_RATE = 3000.0
TARGET_P99_MS = 20.0


# --------------------------------------------------------------------------- library limits


def _rate(fn: Callable[[], object], seconds: float, repeats: int = 3) -> float:
    """Calls per second of ``fn`` on this thread: best of ``repeats`` windows that add up
    to ``seconds`` (best-of, because a shared machine only ever makes a window slower)."""
    for _ in range(200):  # warm caches / lazy imports
        fn()
    best = 0.0
    for _ in range(repeats):
        batch, n = 100, 0
        started = time.perf_counter()
        deadline = started + seconds / repeats
        while True:
            for _ in range(batch):
                fn()
            n += batch
            now = time.perf_counter()
            if now >= deadline:
                best = max(best, n / (now - started))
                break
    return best


def library_limits(seconds: float) -> list[tuple[str, float, str]]:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from service.contracts import TaskRecord, TaskStatus
    from service.credentials import rfc9068
    from service.credentials.keys import KeyMeta, SigningKey
    from service.kernel.ids import new_task_id, task_spiffe_id
    from service.kernel.jwk import public_jwk, thumbprint
    from service.kernel.scopes import ScopeSpec, validate

    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key()
    jwk = public_jwk(public)
    key = SigningKey(
        meta=KeyMeta(kid=thumbprint(jwk), alg="EdDSA", created_at=time.time(), public_jwk=jwk),
        public_key=public,
        private_key=private,
    )
    now = time.time()
    task_id = new_task_id(now)
    scope = validate(
        ScopeSpec(
            grants=tuple(TASK_BODY["scope"]["grants"]),  # type: ignore[index]
            audiences=(AUDIENCE,),
        )
    )
    scope = validate(
        ScopeSpec(
            grants=scope.grants,
            audiences=scope.audiences,
            limits=type(scope.limits)(max_calls=1000),
        )
    )
    task = TaskRecord(
        id=task_id,
        agent_id="bench-agent",
        parent_id=None,
        spiffe_id=task_spiffe_id("killswitch.local", "bench-agent", task_id),
        scope=scope,
        purpose="",
        status=TaskStatus.ACTIVE,
        created_at=now,
        deadline=now + 600,
    )
    claims = rfc9068.build_claims(
        issuer="http://127.0.0.1:8080",
        task=task,
        jti=rfc9068.new_jti(),
        issued_at=int(now),
        expires_at=int(now) + 300,
        actor_chain=None,
    )
    token = rfc9068.sign(claims, key)
    message = os.urandom(500)
    headers = {"typ": "at+jwt", "kid": key.kid}

    def own_sign_verify() -> None:
        rfc9068.verify_own_signature(rfc9068.sign(claims, key), key)

    signature = private.sign(message)
    rows = [
        ("Ed25519 sign (cryptography, 500 B)", _rate(lambda: private.sign(message), seconds), ""),
        (
            "Ed25519 verify (cryptography, 500 B)",
            _rate(lambda: public.verify(signature, message), seconds),
            "",
        ),
        (
            "pyjwt jwt.encode EdDSA",
            _rate(lambda: jwt.encode(claims, private, algorithm="EdDSA", headers=headers), seconds),
            f"{len(token)} B token",
        ),
        ("rfc9068.sign (ours)", _rate(lambda: rfc9068.sign(claims, key), seconds), ""),
        (
            "rfc9068.sign + verify_own_signature",
            _rate(own_sign_verify, seconds),
            "once per key (KeyStore.probe), not per token",
        ),
    ]
    return rows


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds; NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _machine_busy_seconds() -> float:
    """CPU-seconds all CPUs spent busy since boot (Linux /proc/stat); NaN elsewhere."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class Server:
    def __init__(self, database_url: str | None, cpu: int | None, keep: bool) -> None:
        self.port = _free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix="ks-bench-"))
        self.database_url = database_url
        self.admin_token = "kso_" + secrets.token_urlsafe(32)
        self.cpu = cpu
        self.keep = keep
        self.log_path = self.data_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "killswitch.db"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            KS_DATA_DIR=str(self.data_dir),
            KS_BOOTSTRAP_ADMIN_TOKEN=self.admin_token,
            KS_LOG_LEVEL="warning",
            KS_HOST="127.0.0.1",
            KS_PORT=str(self.port),
        )
        env.pop("KS_DATABASE_URL", None)
        if self.database_url:
            env["KS_DATABASE_URL"] = self.database_url
        exe = shutil.which("killswitch")
        cmd = [exe, "serve"] if exe else [sys.executable, "-m", "service", "serve"]
        # Port and data dir go through KS_* only: `serve --data-dir` passes a str where
        # Settings expects a Path (TypeError in effective_database_url).
        cmd += ["--port", str(self.port)]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if self.cpu is not None:
            os.sched_setaffinity(self.proc.pid, {self.cpu})
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=1.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_path.read_text()}")

    def register_agent(self) -> tuple[str, str]:
        import httpx

        agent_id = f"bench-{secrets.token_hex(4)}"
        r = httpx.post(
            self.url + "/v1/agents",
            json={"id": agent_id, "ceiling": CEILING},
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=10.0,
        )
        if r.status_code != 201:
            raise RuntimeError(f"registering the agent failed: {r.status_code} {r.text}")
        return agent_id, r.json()["client_secret"]

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return _cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "log"):
            self.log.close()

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- database counts


def count_rows(server: Server) -> dict[str, int]:
    if server.database_url:
        return asyncio.run(_count_postgres(server.database_url))
    # Read-only, after the server has stopped (its WAL is checkpointed on close; a WAL
    # left behind is read through anyway).
    conn = sqlite3.connect(f"file:{server.sqlite_path}?mode=ro", uri=True)
    try:
        credentials = conn.execute("SELECT count(*) FROM credentials").fetchone()[0]
        tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
    finally:
        conn.close()
    return {"credentials": int(credentials), "tasks": int(tasks)}


async def _count_postgres(url: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        credentials = await conn.fetchval("SELECT count(*) FROM credentials")
        tasks = await conn.fetchval("SELECT count(*) FROM tasks")
    finally:
        await conn.close()
    return {"credentials": int(credentials), "tasks": int(tasks)}


# --------------------------------------------------------------------------- load


def build_request(port: int, agent_id: str, secret: str) -> bytes:
    body = json.dumps(TASK_BODY, separators=(",", ":")).encode()
    basic = base64.b64encode(f"{agent_id}:{secret}".encode()).decode()
    head = (
        "POST /v1/tasks HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Basic {basic}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def run_level(
    server: Server,
    request_file: Path,
    concurrency: int,
    duration: float,
    warmup: float,
    client_cpu: int | None,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "_load.py"),
        "--port",
        str(server.port),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--request-file",
        str(request_file),
    ]
    if client_cpu is not None:
        cmd += ["--cpu", str(client_cpu)]
    # Server CPU is sampled around the measured window only (warm-up excluded).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(warmup)
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    client0, busy0 = _cpu_seconds(proc.pid), _machine_busy_seconds()
    time.sleep(duration)
    cpu1, t1 = server.cpu_seconds(), time.perf_counter()
    client1, busy1 = _cpu_seconds(proc.pid), _machine_busy_seconds()
    out, err = proc.communicate(timeout=duration + warmup + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{err.decode()}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    window = t1 - t0
    result["server_cpu"] = (cpu1 - cpu0) / window
    result["client_cpu"] = (client1 - client0) / window
    # Everything else on the machine (other engineers' jobs, brokers, ...): noise to report.
    result["other_cpu"] = max(
        0.0, (busy1 - busy0) / window - result["server_cpu"] - result["client_cpu"]
    )
    result["server_cpu_us_per_req"] = (
        (cpu1 - cpu0) / result["ok"] * 1e6 if result["ok"] else float("nan")
    )
    return result


# --------------------------------------------------------------------------- output


def table(headers: list[str], rows: list[list[str]], align: str) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        out = []
        for cell, width, a in zip(cells, widths, align, strict=True):
            out.append(cell.rjust(width) if a == "r" else cell.ljust(width))
        return "  ".join(out).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _machine() -> str:
    cpus = os.cpu_count() or 0
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpus} CPU(s) {model}, Python {platform.python_version()}, {platform.system()}"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/issue.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="run the server against this database (postgresql://…) instead of a fresh "
        "SQLite file; row counts are then reconciled as before/after deltas",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=8.0,
        help="measured seconds per concurrency level (default 8)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="unmeasured seconds before each level (default 1)",
    )
    p.add_argument(
        "--concurrency",
        default="8,16,32",
        help="comma-separated connection counts, one table row each (default 8,16,32)",
    )
    p.add_argument(
        "--lib-seconds",
        type=float,
        default=1.0,
        help="seconds per library-limit measurement (default 1)",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin server to CPU 0 and load generator to CPU 1",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and log")
    p.add_argument("--json", action="store_true", help="also print all results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    server_cpu, client_cpu = (0, 1) if pin else (None, None)
    started = time.perf_counter()

    print(f"killswitch issuance benchmark — {_machine()}")
    with contextlib.suppress(OSError):
        print(
            "load average at start: "
            + " ".join(Path("/proc/loadavg").read_text().split()[:3])
            + "  ('other CPU' below = busy CPU not used by server or client: noise)"
        )
    if pin:
        print("server pinned to CPU 0, load generator (separate process, uvloop) to CPU 1")
    print()

    # 1. library limits, on the server's core, before anything else runs.
    if pin:
        previous = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {0})
    lib = library_limits(args.lib_seconds)
    if pin:
        os.sched_setaffinity(0, previous)
    print("Library limits (single core, this run, best of 3 windows)")
    print(
        table(
            ["operation", "ops/s", "µs/op", "note"],
            [[name, f"{rate:,.0f}", f"{1e6 / rate:.1f}", note] for name, rate, note in lib],
            "lrrl",
        )
    )
    print()

    # 2. end to end.
    server = Server(args.database_url, server_cpu, args.keep)
    results: list[dict[str, Any]] = []
    try:
        server.start()
        agent_id, secret = server.register_agent()
        before = count_rows(server) if args.database_url else {"credentials": 0, "tasks": 0}
        request_file = server.data_dir / "request.bin"
        request_file.write_bytes(build_request(server.port, agent_id, secret))
        for c in levels:
            results.append(
                run_level(server, request_file, c, args.duration, args.warmup, client_cpu)
            )
    finally:
        server.stop()
    try:
        after = count_rows(server)
    finally:
        server.cleanup()

    db = "PostgreSQL" if args.database_url else "SQLite (WAL, fresh temp dir)"
    print(f"End to end: POST /v1/tasks over HTTP/1.1 keep-alive, {db}, {args.duration:g} s/level")
    rows = []
    for r in results:
        rows.append(
            [
                str(r["concurrency"]),
                f"{r['rate']:,.0f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p95_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['max_ms']:.1f}",
                f"{r['ok']:,}",
                str(r["errors"]),
                f"{100 * r['server_cpu']:.0f}%",
                f"{r['server_cpu_us_per_req']:.0f}",
                f"{1e6 / r['server_cpu_us_per_req']:,.0f}" if r["ok"] else "-",
                f"{100 * r['client_cpu']:.0f}%",
                f"{100 * r['other_cpu']:.0f}%",
            ]
        )
    print(
        table(
            [
                "conns",
                "issued/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "201s",
                "non-201",
                "server CPU",
                "CPU µs/issue",
                "1-core cap/s",
                "client CPU",
                "other CPU",
            ],
            rows,
            "rrrrrrrrrrrrr",
        )
    )
    print(
        "  CPU µs/issue = server process CPU-seconds / 201s in the window; 1-core cap/s = "
        "1e6 / that, i.e. the rate one fully available core would sustain"
    )
    for r in results:
        if r["first_error"]:
            print(f"  first non-201 at {r['concurrency']} conns: {r['first_error'][:300]!r}")
    print()

    client_ok = sum(r["ok"] + r["unmeasured_ok"] for r in results)
    client_err = sum(r["errors"] + r["unmeasured_errors"] for r in results)
    creds = after["credentials"] - before["credentials"]
    tasks = after["tasks"] - before["tasks"]
    consistent = creds == client_ok and tasks == client_ok
    print(
        f"Database check: {creds:,} credential rows, {tasks:,} task rows; the client saw "
        f"{client_ok:,} 201s ({client_err} non-201) incl. warm-up — "
        + ("OK, every issued credential is persisted" if consistent else "MISMATCH")
    )

    best = max(results, key=lambda r: r["rate"])
    ed_sign = next(rate for name, rate, _ in lib if name.startswith("Ed25519 sign"))
    pyjwt = next(rate for name, rate, _ in lib if name.startswith("pyjwt"))
    verdict = (
        "meets" if best["rate"] >= TARGET_RATE and best["p99_ms"] < TARGET_P99_MS else "misses"
    )
    print(
        f"Target >= {TARGET_RATE:,.0f}/s with p99 < {TARGET_P99_MS:g} ms: {verdict} "
        f"(best level: {best['concurrency']} conns)   total runtime "
        f"{time.perf_counter() - started:.0f} s"
    )
    print()
    print(
        f"issuance: {best['rate']:,.0f}/s (p99 {best['p99_ms']:.1f} ms) vs Ed25519 sign "
        f"{ed_sign:,.0f}/s, pyjwt encode {pyjwt:,.0f}/s"
    )
    if args.json:
        print(json.dumps({"library": lib, "levels": results, "db": after}, indent=2))
    return 0 if consistent else 1


if __name__ == "__main__":
    raise SystemExit(main())
