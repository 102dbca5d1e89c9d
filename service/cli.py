"""The ``killswitch`` command line.

``serve`` runs the service; ``up``, ``demo``, ``down`` and ``env`` run, stop and point at
the whole system (``service.stack``). Every other command is a thin client of the HTTP API
(``--url``/``KS_URL``, ``--token``/``KS_TOKEN``), so the running service stays the only
writer and its in-memory state never goes stale — except ``operators add --offline`` and
``keys rotate --offline``, which work on the database and key directory directly for
bootstrap and recovery when no service runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import httpx

from service.config import Settings, describe
from service.kernel.errors import KillSwitchError

EPILOG = """\
environment:
  KS_URL     service URL for client commands (default http://127.0.0.1:8080)
  KS_TOKEN   operator token for client commands (printed by the first `killswitch serve`)
             eval "$(killswitch env)" sets both for the running `killswitch up`
  KS_*       service settings; `killswitch config` lists them all
"""


SHUTDOWN_GRACE_SECONDS = 3
"""On SIGTERM/Ctrl-C, how long ``serve`` lets open requests finish before cutting them."""


def _die(message: str, code: int = 1) -> NoReturn:
    print(f"killswitch: error: {message}", file=sys.stderr)
    raise SystemExit(code)


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app
    from service.core import Services

    settings = Settings.from_env().with_overrides(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        database_url=args.database_url,
    )
    settings.validate()

    def on_ready(services: Services) -> None:
        s = services.settings
        lines = [
            f"killswitch serving on http://{s.host}:{s.port}",
            f"  issuer      {s.effective_issuer}",
            f"  database    {_redact_url(s.effective_database_url)}",
            f"  signing key {services.keys.active.kid} ({services.keys.active.alg})",
            f"  OpenAPI     http://{s.host}:{s.port}/schema/openapi.json",
        ]
        if services.bootstrap_admin_token is not None:
            lines += [
                "",
                "  Bootstrap admin token (shown once, store it now):",
                f"    export KS_TOKEN={services.bootstrap_admin_token}",
            ]
        print("\n".join(lines), flush=True)

    app = create_app(settings, on_ready=on_ready)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=args.access_log,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        lifespan="on",
        # SSE streams (revocations, alerts) never finish by themselves: without a bound a
        # stop would wait for every listener to hang up. They reconnect with Last-Event-ID.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )


def cmd_up(args: argparse.Namespace) -> None:
    import signal as _signal

    from service.stack import (
        StackError,
        announce,
        refuse_if_running,
        start_detached,
        up,
        withdraw,
    )

    data_dir = Path(args.data_dir)
    if getattr(args, "detach", False):
        if args.demo:
            _die("--detach runs the system in the background; the demo runs in the foreground", 2)
        try:
            state = start_detached(data_dir, port=args.port, kafka=args.kafka)
        except StackError as exc:
            _die(str(exc))
        print(state.banner, flush=True)
        return

    if args.demo:
        from service.demo import fresh_data_dir

        data_dir = fresh_data_dir(data_dir)  # earlier runs' tasks and revocations stay out

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    _signal.signal(_signal.SIGTERM, _terminate)
    pid = os.getpid()
    try:
        refuse_if_running(data_dir)
        with up(data_dir, port=args.port, kafka=args.kafka) as stack:
            # `up` (with --demo too) runs until stopped; `demo` only with --keep-running.
            keep_running = getattr(args, "keep_running", True)
            if args.demo:
                from service.demo import demo_banner, run_demo

                print(demo_banner(stack, keep_running=keep_running), flush=True)
            else:
                print(stack.banner(), flush=True)
            announce(stack, pid)
            if args.demo:
                run_demo(stack, keep_running=keep_running)
            while keep_running:
                _signal.pause()
    except StackError as exc:
        _die(str(exc))
    except KeyboardInterrupt:
        print("\nstopping killswitch...", file=sys.stderr)
    finally:
        withdraw(data_dir, pid)  # after every part has stopped: `down` waits for this


def cmd_down(args: argparse.Namespace) -> None:
    from service.stack import StackError, stop_running

    try:
        state = stop_running(Path(args.data_dir))
    except StackError as exc:
        _die(str(exc))
    if state is None:
        print(f"killswitch: nothing is up for {args.data_dir}", file=sys.stderr)
    else:
        print(f"stopped killswitch at {state.url} (pid {state.pid})", file=sys.stderr)


def cmd_env(args: argparse.Namespace) -> None:
    import shlex

    from service.stack import wait_running

    state = wait_running(Path(args.data_dir), args.wait)
    if state is None:
        waited = f" (waited {args.wait:g} s)" if args.wait else ""
        _die(
            f"no `killswitch up` is running for {args.data_dir}{waited}; "
            "start one with `killswitch up --detach`"
        )
    print(f"export KS_URL={shlex.quote(state.url)} KS_TOKEN={shlex.quote(state.admin_token)}")


def cmd_demo(args: argparse.Namespace) -> None:
    args.demo = True
    cmd_up(args)


def _redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# --------------------------------------------------------------------------- API client


class Api:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Any = None,
        form: dict[str, str] | None = None,
    ) -> Any:
        return self.call_with_status(method, path, body, params, form)[1]

    def call_with_status(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Any = None,
        form: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """The status and the decoded JSON answer; a problem answer ends the command."""
        if not self.token:
            _die("no operator token: pass --token or set KS_TOKEN", 2)
        try:
            response = httpx.request(
                method,
                self.url + path,
                json=body,
                data=form,
                params=params,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=30,
            )
        except httpx.HTTPError as exc:
            _die(
                f"cannot reach killswitch at {self.url} ({exc}); is `killswitch serve` running?", 2
            )
        if response.status_code >= 400:
            try:
                problem = response.json()
                detail = f"{problem.get('title')}: {problem.get('detail')}"
                # Scope violations name what exceeds (offending); syntax errors name every
                # bad item (invalid), of which the detail line shows only the first three.
                for item in (problem.get("offending") or []) + (problem.get("invalid") or []):
                    detail += f"\n  - {item}"
            except ValueError:
                detail = response.text[:500]
            _die(f"HTTP {response.status_code} {detail}")
        return response.status_code, (response.json() if response.content else None)


def _api(args: argparse.Namespace) -> Api:
    return Api(args.url, args.token)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _scope(args: argparse.Namespace) -> dict[str, Any]:
    limits = {
        k: v
        for k, v in {
            "max_calls": args.max_calls,
            "max_bytes_out": args.max_bytes_out,
            "max_rate": args.max_rate,
        }.items()
        if v is not None
    }
    return {"grants": args.grant, "audiences": args.audience or [], "limits": limits}


def cmd_agents_add(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"id": args.agent_id, "name": args.name or "", "ceiling": _scope(args)}
    if args.max_ttl:
        body["max_task_ttl"] = args.max_ttl
    if args.public_jwk:
        with open(args.public_jwk) as fh:
            body["public_jwk"] = json.load(fh)
    if args.no_secret:
        body["issue_secret"] = False
        if args.secret_file:
            _die("--secret-file needs a client secret: drop --no-secret", 2)
    created = _api(args).call("POST", "/v1/agents", body)
    secret = created.get("client_secret")
    if secret and args.secret_file:
        try:
            _write_secret(Path(args.secret_file), secret)
        except OSError as exc:
            print(f"client secret (shown once): {secret}", file=sys.stderr)
            _die(f"cannot write {args.secret_file}: {exc.strerror or exc}")
        created = {**created, "client_secret": None}  # the file is the only copy
    _print(created if args.json else created["agent"])
    if secret and args.secret_file:
        print(f"client secret written to {args.secret_file} (mode 0600)", file=sys.stderr)
    elif secret and not args.json:
        print(f"\nclient secret (shown once): {secret}", file=sys.stderr)


def _write_secret(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path``, mode 0600 from the first byte on (replacing the file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def cmd_agents_list(args: argparse.Namespace) -> None:
    page = _api(args).call("GET", "/v1/agents", params={"limit": args.limit})
    for agent in page["items"]:
        grants = " ".join(agent["ceiling"]["grants"])
        print(f"{agent['id']:<24} {agent['status']:<10} {grants}")


def cmd_agents_suspend(args: argparse.Namespace) -> None:
    _print(_api(args).call("POST", f"/v1/agents/{args.agent_id}/suspend", {"reason": args.reason}))


def cmd_agents_reinstate(args: argparse.Namespace) -> None:
    _print(
        _api(args).call("POST", f"/v1/agents/{args.agent_id}/reinstate", {"reason": args.reason})
    )


def cmd_operators_add(args: argparse.Namespace) -> None:
    body = {"name": args.name, "role": args.role}
    if args.audience:
        body["audience"] = args.audience
    if args.offline:
        created = asyncio.run(_operators_add_offline(body))
    else:
        created = _api(args).call("POST", "/v1/operators", body)
    _print(created["operator"])
    print(f"\noperator token (shown once): {created['token']}", file=sys.stderr)


async def _operators_add_offline(body: dict[str, Any]) -> dict[str, Any]:
    import msgspec

    from service import operators
    from service.contracts import CreateOperator
    from service.core import start

    services = await start(Settings.from_env(), bootstrap=False)
    try:
        request = msgspec.convert(body, CreateOperator)
        created = await operators.create(services, request, actor="cli:offline")
        result: dict[str, Any] = msgspec.to_builtins(created)
        return result
    finally:
        await services.close()


def cmd_operators_disable(args: argparse.Namespace) -> None:
    _print(_api(args).call("POST", f"/v1/operators/{args.name}/disable"))


def cmd_revoke(args: argparse.Namespace) -> None:
    target: dict[str, Any] = {"type": args.target}
    if args.target == "credential":
        target["jti"] = args.id
    elif args.target == "task":
        target["task_id"] = args.id
    elif args.target == "agent":
        target["agent_id"] = args.id
    else:
        if args.before is not None:
            target["before"] = args.before
        if args.agent:
            target["agent_id"] = args.agent
        if not args.yes:
            scope = f"agent {args.agent}" if args.agent else "EVERY agent"
            when = "now" if args.before is None else f"{args.before}"
            interactive = sys.stdin.isatty()
            if interactive:  # on stderr, so that stdout stays the JSON answer
                print(
                    f"Revoke every credential of {scope} issued up to {when}? [y/N] ",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            answer = sys.stdin.readline()
            if not answer:  # end of input: nobody can answer (a script, </dev/null, Ctrl-D)
                if interactive:
                    print(file=sys.stderr)
                _die("a cut-off needs a confirmation and standard input is closed: pass --yes")
            if answer.strip().lower() not in ("y", "yes"):
                _die("aborted", 1)
    status, revocation = _api(args).call_with_status(
        "POST", "/v1/revocations", {"target": target, "reason": args.reason}
    )
    _print(revocation)
    if status == 200:
        print(
            f"already revoked: this is revocation #{revocation['seq']}, nothing new was written",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- tasks


def cmd_tasks_list(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"limit": args.limit}
    if args.agent:
        params["agent_id"] = args.agent
    if args.status:
        params["status"] = args.status
    page = _api(args).call("GET", "/v1/tasks", params=params)
    if args.json:
        _print(page)
        return
    if args.quiet:
        for task in page["items"]:
            print(task["id"])
        return
    print(f"{'task':<26}  {'agent':<24} {'status':<9}  {'deadline (UTC)':<20}  grants")
    for task in page["items"]:
        print(
            f"{task['id']:<26}  {task['agent_id']:<24} {task['status']:<9}  "
            f"{_stamp(task['deadline']):<20}  {' '.join(task['scope']['grants'])}"
        )
    if page["next_cursor"]:
        print(f"(more: --limit, or the API with cursor={page['next_cursor']})", file=sys.stderr)


def cmd_tasks_show(args: argparse.Namespace) -> None:
    from urllib.parse import quote

    _print(_api(args).call("GET", f"/v1/tasks/{quote(args.task_id, safe='')}"))


def cmd_introspect(args: argparse.Namespace) -> None:
    credential = sys.stdin.readline().strip() if args.credential == "-" else args.credential
    if not credential:
        _die("no access token to introspect", 2)
    _print(_api(args).call("POST", "/oauth2/introspect", form={"token": credential}))


# --------------------------------------------------------------------------- alerts

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}
WATCH_READ_TIMEOUT = 10.0
"""A stream quiet this long (five missed heartbeats) is taken for dead and reconnected."""


def _when(value: str) -> float:
    """Epoch seconds, or a duration ago: ``90s``, ``15m``, ``2h``, ``7d``."""
    unit = value[-1:].lower()
    try:
        if unit in _DURATION:
            return time.time() - float(value[:-1]) * _DURATION[unit]
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither epoch seconds nor a duration like 15m"
        ) from None


def _stamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _alert_line(alert: dict[str, Any]) -> str:
    summary = alert.get("evidence", {}).get("summary", "")
    acked = f"  acked by {alert['acked_by']}" if alert.get("acked_at") else ""
    return (
        f"{_stamp(alert['at'])}  #{alert['seq']:<6} {alert['severity'].upper():<8} "
        f"{alert['rule']:<28} agent={alert['agent_id']} task={alert.get('task_id') or '-'} "
        f"action={alert['action']}{acked}  {summary}"
    ).rstrip()


def cmd_alerts_list(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"limit": args.limit}
    for name, value in (
        ("severity", args.severity),
        ("rule", args.rule),
        ("agent_id", args.agent),
        ("task_id", args.task),
        ("since", args.since),
        ("until", args.until),
    ):
        if value:
            params[name] = value
    if args.open:
        params["acked"] = "false"
    page = _api(args).call("GET", "/v1/alerts", params=params)
    if args.json:
        _print(page)
        return
    print(f"{'time (UTC)':<20}  {'seq':<7} {'severity':<8} {'rule':<28} agent/task/action  summary")
    for alert in page["items"]:
        print(_alert_line(alert))
    if page["next_cursor"]:
        print(f"(more: --limit, or the API with cursor={page['next_cursor']})", file=sys.stderr)


def cmd_alerts_watch(args: argparse.Namespace) -> None:
    from service.sdk.sse import messages as sse_messages

    api = _api(args)
    if not api.token:
        _die("no operator token: pass --token or set KS_TOKEN", 2)
    if args.all:
        last = 0
    elif args.after is not None:
        last = args.after
    else:  # start at the newest stored alert: only what comes next is shown
        newest = api.call("GET", "/v1/alerts", params={"limit": 1})["items"]
        last = newest[0]["seq"] if newest else 0
    wanted = set(args.severity or ())
    delay = 0.5
    print(f"watching {api.url}/v1/alerts/stream (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            headers = {"Authorization": f"Bearer {api.token}", "Last-Event-ID": str(last)}
            try:
                with httpx.stream(
                    "GET",
                    f"{api.url}/v1/alerts/stream",
                    headers=headers,
                    timeout=httpx.Timeout(10.0, read=WATCH_READ_TIMEOUT),
                ) as response:
                    if response.status_code in (401, 403):
                        _die(f"HTTP {response.status_code}: {response.read().decode()[:300]}")
                    response.raise_for_status()
                    delay = 0.5
                    for message in sse_messages(response.iter_lines()):
                        event = message.event
                        if event not in ("alert", "ack"):
                            continue
                        alert = json.loads(message.data)
                        if event == "alert" and message.id is not None:
                            last = int(message.id)
                        if wanted and alert["severity"] not in wanted:
                            continue
                        prefix = "" if event == "alert" else "ACK "
                        print(prefix + _alert_line(alert), flush=True)
            except httpx.HTTPError as exc:
                print(
                    f"stream interrupted ({type(exc).__name__}); reconnecting after #{last}",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    except KeyboardInterrupt:
        print("", file=sys.stderr)


def cmd_keys_list(args: argparse.Namespace) -> None:
    for key in _api(args).call("GET", "/v1/keys"):
        state = "active" if key["active"] else f"retired, published until {key['published_until']}"
        print(f"{key['kid']}  {key['alg']:<6} {state}")


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    if args.offline:
        from service.credentials.keys import KeyStore
        from service.kernel.clock import SystemClock

        s = Settings.from_env()
        store = KeyStore(
            s.effective_key_dir,
            alg=s.signing_alg,
            clock=SystemClock(),
            credential_ttl=s.credential_ttl,
            leeway=s.leeway,
        )
        store.load_or_create()
        new = store.rotate()
        print(f"rotated: new signing key {new.kid} ({new.alg}) in {s.effective_key_dir}")
        return
    keys = _api(args).call("POST", "/v1/keys/rotate")
    active = next(k for k in keys if k["active"])
    print(f"rotated: new signing key {active['kid']} ({active['alg']})")


def cmd_config(args: argparse.Namespace) -> None:
    for _name, env, default, doc in describe():
        print(f"{env:<26} default {default or '(empty)'!s:<20} {doc}")


def cmd_train(args: argparse.Namespace) -> None:
    from detectors.train import main as train_main

    raise SystemExit(train_main(["train", *args.args], prog="killswitch"))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="killswitch",
        description="Identity and task-scoped credentials for AI agents, with a kill switch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--url",
        default=os.environ.get("KS_URL", "http://127.0.0.1:8080"),
        help="service URL (env KS_URL; default %(default)s)",
    )
    client.add_argument(
        "--token", default=os.environ.get("KS_TOKEN"), help="operator token (env KS_TOKEN)"
    )

    for name, text in (
        ("up", "run the whole system on this machine: broker, service, detector"),
        ("demo", "run the system and drive simulated agents, one of which goes rogue"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=text[0].upper() + text[1:] + ". Needs no Docker: the Kafka broker is "
            "the embedded tansu (memory-only) unless --kafka names one. Prints the service "
            "URL and an admin token; "
            + (
                "Ctrl-C stops everything."
                if name == "up"
                else "the demo runs in a fresh <data-dir>/demo-N and stops everything when "
                "it is over, unless --keep-running (then Ctrl-C stops everything)."
            ),
        )
        p.add_argument(
            "--data-dir",
            default=".killswitch",
            help="data directory: SQLite, keys, tokens, logs (default %(default)s)"
            + ("" if name == "up" else "; each demo gets a fresh demo-N directory inside it"),
        )
        p.add_argument("--port", type=int, help="service port (default 8080, or a free one)")
        p.add_argument("--kafka", help="bootstrap servers of an existing Kafka instead of tansu")
        if name == "up":
            p.add_argument(
                "--demo",
                action="store_true",
                help="also run the demo (in a fresh <data-dir>/demo-N), then keep running",
            )
            p.add_argument(
                "--detach",
                action="store_true",
                help="run in the background (output in <data-dir>/logs/up.log), return once "
                "every part is ready; `killswitch down` stops it",
            )
            p.set_defaults(func=cmd_up)
        else:
            p.add_argument(
                "--keep-running",
                action="store_true",
                help="keep the system up after the demo (to look at it in the console) "
                "until Ctrl-C or `killswitch down --data-dir <its demo-N directory>`",
            )
            p.set_defaults(func=cmd_demo)

    data_dir_help = "data directory of the `killswitch up` (default %(default)s)"
    p = sub.add_parser(
        "down",
        help="stop the system a `killswitch up` (or --detach) runs on this data directory",
        description="Stop the `killswitch up` of a data directory (found through "
        "<data-dir>/up.json): SIGTERM, then wait until the detector, the service and the "
        "broker have stopped. Nothing running is not an error.",
    )
    p.add_argument("--data-dir", default=".killswitch", help=data_dir_help)
    p.set_defaults(func=cmd_down)
    p = sub.add_parser(
        "env",
        help="print `export KS_URL=… KS_TOKEN=…` for a running `killswitch up`",
        description="Print the shell lines that point the client commands at the running "
        "`killswitch up` of a data directory, with its admin token.",
        epilog='example: eval "$(killswitch env)"',
    )
    p.add_argument("--data-dir", default=".killswitch", help=data_dir_help)
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for a starting `killswitch up` to be ready (default: do not wait)",
    )
    p.set_defaults(func=cmd_env)

    p = sub.add_parser(
        "serve",
        help="run the service (HTTP API, JWKS, introspection)",
        description="Run the killswitch service on its embedded defaults: a "
        "SQLite file and a generated signing key under KS_DATA_DIR. The first "
        "start prints a bootstrap admin token.",
    )
    p.add_argument("--host", help="bind address (env KS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (env KS_PORT, default 8080)")
    p.add_argument("--data-dir", help="data directory (env KS_DATA_DIR, default .killswitch)")
    p.add_argument("--database-url", help="sqlite:///… or postgresql://… (env KS_DATABASE_URL)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    agents = sub.add_parser("agents", help="register, list, suspend, reinstate agents")
    asub = agents.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    p = asub.add_parser(
        "add",
        parents=[client],
        help="register an agent (admin)",
        description="Register an agent with a scope ceiling. Prints the client secret once.",
        epilog="example: killswitch agents add billing "
        "--grant 'call:tool/invoices.*' --audience https://tools.internal",
    )
    p.add_argument("agent_id", help="agent id (A-Z a-z 0-9 . _ -, up to 64)")
    p.add_argument(
        "--grant",
        action="append",
        required=True,
        help="grant <action>:<resource-pattern>; repeat for more (see docs/scopes.md)",
    )
    p.add_argument("--audience", action="append", help="allowed audience; repeat for more")
    p.add_argument("--max-calls", type=int, help="ceiling on calls per task")
    p.add_argument("--max-bytes-out", type=int, help="ceiling on bytes out per task")
    p.add_argument("--max-rate", type=float, help="ceiling on calls per second")
    p.add_argument("--max-ttl", type=int, help="longest task lifetime in seconds")
    p.add_argument("--name", help="display name")
    p.add_argument("--public-jwk", help="file with a public JWK for private_key_jwt")
    p.add_argument("--no-secret", action="store_true", help="no client secret (key-only agent)")
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help="write the client secret to FILE (mode 0600) instead of printing it",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the API's whole answer (agent and client secret) as JSON on stdout",
    )
    p.set_defaults(func=cmd_agents_add)
    p = asub.add_parser("list", parents=[client], help="list agents (viewer)")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_agents_list)
    for action, func, text in (
        ("suspend", cmd_agents_suspend, "suspend an agent: revoke its tasks, refuse new ones"),
        ("reinstate", cmd_agents_reinstate, "let a suspended agent open tasks again"),
    ):
        p = asub.add_parser(action, parents=[client], help=f"{text} (admin)")
        p.add_argument("agent_id")
        p.add_argument("--reason", required=True, help="why (kept in the audit log)")
        p.set_defaults(func=func)

    ops = sub.add_parser("operators", help="create or disable operator tokens")
    osub = ops.add_subparsers(dest="operators_command", required=True, metavar="ACTION")
    p = osub.add_parser(
        "add",
        parents=[client],
        help="create an operator (admin)",
        description="Create an operator token. Roles: viewer (read), analyst "
        "(+ revoke), admin (+ agents, operators, keys), detector (revoke, read "
        "tasks), resource_server (introspect tokens for one audience).",
    )
    p.add_argument("name")
    p.add_argument(
        "--role",
        required=True,
        choices=["viewer", "analyst", "admin", "detector", "resource_server"],
    )
    p.add_argument("--audience", help="audience served (resource_server only)")
    p.add_argument(
        "--offline",
        action="store_true",
        help="write to the database directly (no running service needed)",
    )
    p.set_defaults(func=cmd_operators_add)
    p = osub.add_parser("disable", parents=[client], help="disable an operator token (admin)")
    p.add_argument("name")
    p.set_defaults(func=cmd_operators_disable)

    p = sub.add_parser(
        "revoke",
        parents=[client],
        help="revoke a credential, task, agent, or everything before a cut-off (analyst)",
        description="Revoke by target. `cutoff` is the panic button: every "
        "credential issued up to now (or --before), globally or for --agent.",
        epilog=textwrap.dedent("""\
                           examples:
                             killswitch revoke task 01jc... --reason 'exfiltration alert'
                             killswitch revoke agent billing --reason 'compromised host'
                             killswitch revoke cutoff --reason 'key leak' --yes"""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", choices=["credential", "task", "agent", "cutoff"])
    p.add_argument("id", nargs="?", help="jti, task id or agent id (not for cutoff)")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    p.add_argument("--before", type=float, help="cutoff: epoch seconds (default now)")
    p.add_argument("--agent", help="cutoff: only this agent")
    p.add_argument("--yes", action="store_true", help="cutoff: do not ask for confirmation")
    p.set_defaults(func=cmd_revoke)

    tasks = sub.add_parser("tasks", help="list or show tasks")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    p = tsub.add_parser(
        "list",
        parents=[client],
        help="list tasks, newest first (viewer)",
        epilog="example: TASK=$(killswitch tasks list --agent billing --status active --quiet)",
    )
    p.add_argument("--agent", help="only this agent's tasks")
    p.add_argument(
        "--status", choices=["active", "completed", "revoked"], help="only tasks in this state"
    )
    p.add_argument("--limit", type=int, default=50, help="how many (default %(default)s)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the API's JSON page")
    output.add_argument("-q", "--quiet", action="store_true", help="print only task ids")
    p.set_defaults(func=cmd_tasks_list)
    p = tsub.add_parser("show", parents=[client], help="show one task as JSON (viewer)")
    p.add_argument("task_id", help="task id")
    p.set_defaults(func=cmd_tasks_show)

    p = sub.add_parser(
        "introspect",
        parents=[client],
        help="ask the service whether an access token is live, RFC 7662 (analyst)",
        description="Introspect an access token (POST /oauth2/introspect): its claims "
        'while it is live, {"active": false} once it is revoked, expired or forged.',
        epilog='example: killswitch introspect "$TOKEN"   (or - to read it from stdin)',
    )
    p.add_argument("credential", metavar="TOKEN", help="the access token, or - for stdin")
    p.set_defaults(func=cmd_introspect)

    alerts = sub.add_parser("alerts", help="list or watch the detector's alerts")
    alsub = alerts.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    severities = ["low", "medium", "high", "critical"]
    p = alsub.add_parser(
        "list",
        parents=[client],
        help="list alerts, newest first (viewer)",
        epilog="example: killswitch alerts list --severity critical --since 1h --open",
    )
    p.add_argument(
        "--severity", action="append", choices=severities, help="only this severity; repeatable"
    )
    p.add_argument("--rule", help="only this rule or model id")
    p.add_argument("--agent", help="only this agent's alerts")
    p.add_argument("--task", help="only this task's alerts")
    p.add_argument("--since", type=_when, help="raised at or after: epoch seconds or 15m/2h/7d ago")
    p.add_argument("--until", type=_when, help="raised before: epoch seconds or a duration ago")
    p.add_argument("--open", action="store_true", help="only alerts nobody acknowledged yet")
    p.add_argument("--limit", type=int, default=50, help="how many (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the API's JSON page")
    p.set_defaults(func=cmd_alerts_list)
    p = alsub.add_parser(
        "watch",
        parents=[client],
        help="follow alerts live, one line each (viewer)",
        description="Follow GET /v1/alerts/stream: one line per new alert (and per "
        "acknowledgement, prefixed ACK). Reconnects by itself with Last-Event-ID, so "
        "nothing is missed across a network blip or a service restart. Ctrl-C stops.",
    )
    p.add_argument(
        "--severity", action="append", choices=severities, help="only this severity; repeatable"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--all", action="store_true", help="replay every stored alert first")
    start.add_argument("--after", type=int, metavar="SEQ", help="replay alerts after this seq")
    p.set_defaults(func=cmd_alerts_watch)

    keys = sub.add_parser("keys", help="list or rotate signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = ksub.add_parser("list", parents=[client], help="published signing keys (viewer)")
    p.set_defaults(func=cmd_keys_list)
    p = ksub.add_parser(
        "rotate",
        parents=[client],
        help="rotate the signing key (admin)",
        description="Make a new key the signer. The old public key stays in "
        "the JWKS until every token it signed has expired.",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="rotate in the key directory directly; a running service picks it up",
    )
    p.set_defaults(func=cmd_keys_rotate)

    p = sub.add_parser(
        "train",
        help="train the detector's anomaly model from an events file or Kafka",
        description="Train the detector's anomaly model (same as `python -m detectors "
        "train`): killswitch train --events FILE | --from-kafka -o model.ksm. Pass --help "
        "after `train` options for all of them.",
        add_help=False,
        prefix_chars="+",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python -m detectors train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="list every KS_* setting with its default")
    p.set_defaults(func=cmd_config)
    _explain(parser)
    return parser


def _explain(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand without a description its one-line help as one, so that
    ``killswitch <command> --help`` says what the command does, not only its usage."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, subparser in action.choices.items():
            text = helps.get(name)
            if subparser.description is None and text:
                subparser.description = text[0].upper() + text[1:] + "."
            _explain(subparser)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "target", None) in ("credential", "task", "agent") and not args.id:
        parser.error(f"revoke {args.target} needs an id")
    try:
        args.func(args)
    except KillSwitchError as exc:
        _die(exc.detail)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
