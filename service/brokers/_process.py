"""Process plumbing shared by the broker launchers, ``killswitch up`` (service/stack.py)
and the test harness (free ports, :func:`stop_process`).

A :class:`BrokerProcess` owns one child process, the log file its stdout/stderr go to and
(optionally) a scratch directory. It never leaks the child:

* ``stop()`` is idempotent: its stop signal (SIGTERM unless the launcher says otherwise),
  wait, then SIGKILL;
* it is a context manager;
* every live broker is stopped by an ``atexit`` hook;
* on Linux, when started from the main thread, the child gets ``PR_SET_PDEATHSIG``
  (SIGTERM) so it dies with its parent even if the parent is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "BrokerProcess",
    "BrokerStartError",
    "RunningBroker",
    "ensure_port_free",
    "free_port",
    "free_ports",
    "keep_artifacts",
    "stop_process",
]

T = TypeVar("T")

#: Set to 1 to keep broker logs / data directories after a clean stop().
KEEP_ENV = "KS_KEEP_BROKER_FILES"


class BrokerStartError(RuntimeError):
    """The broker could not be started or did not become ready. The message names the log."""


@runtime_checkable
class RunningBroker(Protocol):
    """What callers may rely on, whichever broker runs underneath."""

    bootstrap: str
    kind: str
    log_path: Path

    def stop(self) -> None: ...

    def __enter__(self) -> RunningBroker: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def keep_artifacts() -> bool:
    return os.environ.get(KEEP_ENV, "") not in ("", "0", "false", "no")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (all held open while choosing)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    return free_ports(1, host)[0]


def ensure_port_free(host: str, port: int) -> None:
    """Raise :class:`BrokerStartError` if something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise BrokerStartError(f"port {host}:{port} is not free: {e}") from e


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def stop_process(
    proc: subprocess.Popen[Any], timeout: float = 10.0, sig: int = signal.SIGTERM
) -> None:
    """``sig`` (SIGTERM), wait ``timeout`` s, then SIGKILL. Does nothing if it already exited."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even if this thread has a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _pdeathsig_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive ``sig`` when this thread dies (Linux only).

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only used from
    the main thread (whose end is the process's end).
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_LIVE: set[BrokerProcess] = set()
_LIVE_LOCK = threading.Lock()


class BrokerProcess:
    """A running broker child process. Implements :class:`RunningBroker`."""

    def __init__(
        self,
        *,
        kind: str,
        argv: Sequence[str],
        host: str,
        port: int,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        cleanup_dirs: Sequence[Path] = (),
        stop_timeout: float = 10.0,
        stop_signal: int = signal.SIGTERM,
        version: str = "",
    ) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.bootstrap = f"{host}:{port}"
        self.log_path = log_path
        self.version = version
        self.argv = list(argv)
        self.stop_timeout = stop_timeout
        #: what stop() (and, on Linux, the parent's death) sends first
        self.stop_signal = stop_signal
        #: seconds from spawn to ready (set by the launcher)
        self.ready_seconds: float | None = None
        self._cleanup_dirs = list(cleanup_dirs)
        self._lock = threading.Lock()
        self._stopped = False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built here
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # a terminal Ctrl-C goes to us; we stop the child
                preexec_fn=_pdeathsig_preexec(stop_signal),
            )
        except OSError as e:
            self._log.close()
            raise BrokerStartError(f"{kind}: cannot execute {self.argv[0]}: {e}") from e
        self.started_at = time.monotonic()
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def fail(self, reason: str) -> BrokerStartError:
        """Stop the child (keeping its files) and build the error to raise."""
        self._stop(cleanup=False)
        msg = f"{reason}; see {self.log_path}"
        last = tail(self.log_path)
        if last:
            msg += "\n--- last lines of the log ---\n" + last
        return BrokerStartError(msg)

    def wait_ready(
        self,
        timeout: float,
        probe: Callable[[float], str | None],
        *,
        what: str,
    ) -> None:
        """Wait for the port to open, then for ``probe(remaining)`` to return None.

        ``probe`` returns None when ready, else a short reason (kept for the error).
        Raises :class:`BrokerStartError` (after stopping the child) on exit or timeout.
        """
        deadline = self.started_at + timeout
        last_reason = "port not open"
        while True:
            code = self.proc.poll()
            if code is not None:
                raise self.fail(f"{what} exited with code {code} during startup")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.fail(f"{what} did not become ready in {timeout:g}s ({last_reason})")
            if port_open(self.host, self.port, timeout=min(0.2, remaining)):
                reason = probe(min(5.0, max(remaining, 0.5)))
                if reason is None and self.proc.poll() is None:
                    self.ready_seconds = time.monotonic() - self.started_at
                    return
                last_reason = reason or "exited"
                time.sleep(0.1)
            else:
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the broker: ``stop_signal``, wait ``stop_timeout`` s, then SIGKILL. Idempotent."""
        self._stop(cleanup=not keep_artifacts())

    def _stop(self, *, cleanup: bool) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            stop_process(self.proc, self.stop_timeout, self.stop_signal)
        finally:
            self._log.close()
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if cleanup:
                for d in self._cleanup_dirs:
                    shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self.running() else "exited")
        return f"<{self.kind} broker {self.bootstrap} pid={self.pid} {state} log={self.log_path}>"


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for b in live:
        with contextlib.suppress(Exception):
            b.stop()
