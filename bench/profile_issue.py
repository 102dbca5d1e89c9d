"""Where the server's time goes per issuance: killswitch in-process under pyinstrument.

Runs the same app ``killswitch serve`` runs (litestar + uvicorn + httptools on uvloop,
fresh temp SQLite), in this process's main thread pinned to CPU 0, while
``bench/_load.py`` drives ``POST /v1/tasks`` from CPU 1. The sampling profiler runs
only during the measured window, then every sample's stack is put into exactly one
bucket — the innermost frame that matches a rule (so SQLite under the auth lookup counts
as SQLite, and the auth bucket is auth's own Python) — and a second table shows
inclusive time of the main steps. Needs ``pip install pyinstrument``.

    python bench/profile_issue.py --duration 10 --concurrency 16 [--html out.html]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from issue import CEILING, _free_port, build_request  # noqa: E402

# (bucket, predicate on (function, file)) — checked from the innermost frame outwards.
RULES: list[tuple[str, Any]] = [
    ("own-signature verify (Ed25519 verify)", lambda fn, f: fn == "verify_own_signature"),
    ("JWS sign (Ed25519 sign + b64 + claims JSON)", lambda fn, f: fn == "sign" and "rfc9068" in f),
    ("claims build", lambda fn, f: fn == "build_claims"),
    ("key dir stat (refresh_if_changed)", lambda fn, f: fn == "refresh_if_changed"),
    (
        "SQLite (sqlite3 C + storage/database.py)",
        lambda fn, f: "storage/database.py" in f or "sqlite3" in f,
    ),
    ("row decode / record build (repository.py)", lambda fn, f: "storage/repository.py" in f),
    (
        "scope validate / inherit / excess (scopes.py)",
        lambda fn, f: "service/kernel/scopes.py" in f or fn in ("inherit_limits", "_check_within"),
    ),
    ("auth (header parse, b64, sha256, compare)", lambda fn, f: "service/auth.py" in f),
    (
        "ids, jti, spiffe id",
        lambda fn, f: "service/kernel/ids.py" in f or fn in ("new_jti", "jti_hash"),
    ),
    ("prometheus metrics", lambda fn, f: "prometheus_client" in f),
    ("open_task / _issue own code", lambda fn, f: "service/tasks.py" in f),
    (
        "response serialization (litestar/msgspec encode)",
        lambda fn, f: "litestar" in f and ("response" in f or "serialization" in f),
    ),
    (
        "request body decode + msgspec validation",
        lambda fn, f: (
            "litestar" in f
            and (
                "_kwargs" in f
                or "_signature" in f
                or "params" in f
                or "datastructures" in f
                or "connection" in f
            )
        ),
    ),
    ("litestar routing / middleware / DI / handler glue", lambda fn, f: "litestar" in f),
    ("uvicorn + httptools protocol", lambda fn, f: "uvicorn" in f or "httptools" in f),
    (
        "asyncio / uvloop / event loop",
        lambda fn, f: (
            "asyncio" in f or "uvloop" in f or fn in ("run", "run_forever", "run_until_complete")
        ),
    ),
]

INCLUSIVE = [
    ("authenticate (auth.py, incl. agent SELECT)", "authenticate"),
    ("open_task (tasks.py, everything after auth)", "open_task"),
    ("  repo.get_agent (SELECT agent, in open_task and auth)", "get_agent"),
    ("  scopes.validate", "validate"),
    ("  scopes.excess", "excess"),
    ("  transaction (BEGIN IMMEDIATE..COMMIT)", "transaction"),
    ("  repo.insert_task", "insert_task"),
    ("  repo.insert_credential", "insert_credential"),
    ("  _issue", "_issue"),
    ("    rfc9068.sign", "sign"),
    ("    rfc9068.verify_own_signature", "verify_own_signature"),
    ("    build_claims", "build_claims"),
    ("  metrics (Histogram.observe + Counter.inc)", "observe"),
]


def _split(ident: str) -> tuple[str, str]:
    parts = ident.split("\x00")
    return parts[0], parts[1] if len(parts) > 1 else ""


def classify(
    records: list[tuple[list[tuple[str, str]], float]],
) -> tuple[dict[str, float], dict[str, float], float]:
    """records: (stack outermost-first as (function, file), weight)."""
    buckets: dict[str, float] = defaultdict(float)
    inclusive: dict[str, float] = defaultdict(float)
    total = 0.0
    for qualified, t in records:
        # py-spy names methods Class.method; pyinstrument gives the bare name.
        frames = [(fn.rsplit(".", 1)[-1], f) for fn, f in qualified]
        total += t
        for fn, f in reversed(frames):
            for name, rule in RULES:
                if rule(fn, f):
                    buckets[name] += t
                    break
            else:
                continue
            break
        else:
            leaf = frames[-1] if frames else ("?", "?")
            buckets[f"other ({leaf[0]})"] += t
        seen: set[str] = set()
        for fn, f in frames:
            if "service/" not in f and fn != "observe":
                continue
            if fn == "observe" and "prometheus" not in f:
                continue
            if fn == "sign" and "rfc9068" not in f:
                continue
            if fn == "validate" and "scopes" not in f:
                continue
            if fn in seen:
                continue
            seen.add(fn)
            inclusive[fn] += t
    return buckets, inclusive, total


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--interval", type=float, default=0.0005, help="sampling interval (s)")
    p.add_argument("--html", help="also write pyinstrument's HTML report here")
    p.add_argument("--text", help="also write pyinstrument's text tree here")
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the real `killswitch serve` subprocess with py-spy instead",
    )
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--raw-out", help="keep py-spy's collapsed stacks here (flamegraph input)")
    args = p.parse_args()
    if args.py_spy:
        return main_py_spy(args)

    import pyinstrument
    import uvicorn
    import uvloop

    from service.app import create_app
    from service.config import Settings

    os.sched_setaffinity(0, {0})
    data_dir = Path(tempfile.mkdtemp(prefix="ks-prof-"))
    port = _free_port()
    admin = "kso_" + secrets.token_urlsafe(32)
    os.environ.update(
        KS_DATA_DIR=str(data_dir),
        KS_BOOTSTRAP_ADMIN_TOKEN=admin,
        KS_LOG_LEVEL="warning",
        KS_PORT=str(port),
    )
    os.environ.pop("KS_DATABASE_URL", None)
    settings = Settings.from_env()
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            loop="none",
            http="httptools",
            lifespan="on",
        )
    )
    profiler = pyinstrument.Profiler(interval=args.interval, async_mode="disabled")
    state: dict[str, Any] = {}

    def drive(loop: asyncio.AbstractEventLoop) -> None:
        import httpx

        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            agent_id = "prof-agent"
            r = httpx.post(
                url + "/v1/agents",
                json={"id": agent_id, "ceiling": CEILING},
                headers={"Authorization": f"Bearer {admin}"},
            )
            r.raise_for_status()
            req = data_dir / "req.bin"
            req.write_bytes(build_request(port, agent_id, r.json()["client_secret"]))
            load = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "_load.py"),
                    "--port",
                    str(port),
                    "--concurrency",
                    str(args.concurrency),
                    "--duration",
                    str(args.duration),
                    "--warmup",
                    str(args.warmup),
                    "--request-file",
                    str(req),
                    "--cpu",
                    "1",
                ],
                stdout=subprocess.PIPE,
            )
            time.sleep(args.warmup)
            loop.call_soon_threadsafe(profiler.start)
            time.sleep(args.duration)
            done = threading.Event()

            def stop() -> None:
                state["session"] = profiler.stop()
                done.set()

            loop.call_soon_threadsafe(stop)
            done.wait(30)
            out, _ = load.communicate()
            state["load"] = json.loads(out.decode().strip().splitlines()[-1])
        finally:
            server.should_exit = True

    async def serve() -> None:
        threading.Thread(target=drive, args=(asyncio.get_running_loop(),), daemon=True).start()
        await server.serve()

    uvloop.run(serve())

    session = state["session"]
    load = state["load"]
    records = [([_split(i) for i in stack], t) for stack, t in session.frame_records]
    buckets, inclusive, total = classify(records)
    n = load["ok"] + load["errors"]
    per = total / n * 1e6 if n else float("nan")
    print(
        f"pyinstrument (in-process, adds per-call overhead): profiled {args.duration:g} s at "
        f"{args.concurrency} conns: {load['ok']:,} issued ({load['rate']:,.0f}/s under the "
        f"profiler, {load['errors']} non-201), {total:.2f} s of samples = {per:.0f} µs/request"
    )
    report(buckets, inclusive, total, n)
    if args.text:
        Path(args.text).write_text(profiler.output_text(unicode=True, show_all=False))
    if args.html:
        Path(args.html).write_text(profiler.output_html())
    return 0


def report(buckets: dict[str, float], inclusive: dict[str, float], total: float, n: int) -> None:
    print()
    print(f"{'bucket (innermost match wins)':<52} {'share':>6} {'µs/req':>7}")
    print("-" * 52 + " ------ -------")
    for name, t in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"{name:<52} {100 * t / total:5.1f}% {t / n * 1e6 if n else 0:7.1f}")
    print()
    print(f"{'inclusive time of steps':<52} {'share':>6} {'µs/req':>7}")
    print("-" * 52 + " ------ -------")
    for label, fn in INCLUSIVE:
        t = inclusive.get(fn, 0.0)
        print(f"{label:<52} {100 * t / total:5.1f}% {t / n * 1e6 if n else 0:7.1f}")


def main_py_spy(args: argparse.Namespace) -> int:
    """Sample the real ``killswitch serve`` subprocess from outside with py-spy
    (--nonblocking: the server is never paused, so no overhead on the measured process).
    µs/request = share × the server's measured CPU-seconds / requests."""
    import shutil

    from issue import Server

    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    server = Server(None, 0, keep=False)
    try:
        server.start()
        agent_id, secret = server.register_agent()
        req = server.data_dir / "req.bin"
        req.write_bytes(build_request(server.port, agent_id, secret))
        load = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_load.py"),
                "--port",
                str(server.port),
                "--concurrency",
                str(args.concurrency),
                "--duration",
                str(args.duration),
                "--warmup",
                str(args.warmup),
                "--request-file",
                str(req),
                "--cpu",
                "1",
            ],
            stdout=subprocess.PIPE,
        )
        time.sleep(args.warmup)
        raw = server.data_dir / "stacks.txt"
        assert server.proc is not None
        cpu0 = server.cpu_seconds()
        spy_proc = subprocess.Popen(
            [
                spy,
                "record",
                "-p",
                str(server.proc.pid),
                "-d",
                str(int(args.duration)),
                "-r",
                str(args.rate),
                "--nonblocking",
                "-f",
                "raw",
                "-o",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.sched_setaffinity(spy_proc.pid, {1})
        spy_proc.wait()
        cpu = server.cpu_seconds() - cpu0
        out, _ = load.communicate()
        result = json.loads(out.decode().strip().splitlines()[-1])
        text = raw.read_text()
        if args.raw_out:
            Path(args.raw_out).write_text(text)
    finally:
        server.stop()
        server.cleanup()
    records = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for part in stack.split(";"):
            fn, _, loc = part.partition(" (")
            frames.append((fn, loc.rstrip(")")))
        records.append((frames, float(count)))
    buckets, inclusive, total = classify(records)
    # samples -> seconds of server CPU (py-spy drops idle samples by default)
    scale = cpu / total if total else 0.0
    buckets = {k: v * scale for k, v in buckets.items()}
    inclusive = {k: v * scale for k, v in inclusive.items()}
    n = int(result["rate"] * int(args.duration))
    print(
        f"py-spy (external, --nonblocking) on `killswitch serve`: {args.concurrency} conns, "
        f"{result['rate']:,.0f} issued/s, server CPU {cpu / int(args.duration):.0%}, "
        f"{cpu / n * 1e6 if n else 0:.0f} CPU-µs/request, "
        f"{int(sum(r[1] for r in records)):,} samples"
    )
    report(buckets, inclusive, cpu, n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
