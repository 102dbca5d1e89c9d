"""Run the real ``killswitch serve`` as a subprocess on a free loopback port.

``serve(...)`` is a context manager: it starts ``python -m service serve`` with a clean
``KS_*`` environment (``KS_DATA_DIR``, ``KS_DATABASE_URL`` and, if given,
``KS_BOOTSTRAP_ADMIN_TOKEN``), writes the process's stdout and stderr to files under the
data directory's parent, waits for ``/readyz`` to answer 200 and stops the process on exit
(SIGTERM, wait, then SIGKILL). ``run_cli`` runs the ``killswitch`` console script the same
way, for commands that work without a service (``--offline``).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.brokers import free_port, stop_process

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_TOKEN_LINE = re.compile(r"^\s*export KS_TOKEN=(kso_\S+)\s*$", re.MULTILINE)
_counter = itertools.count()


class ServeError(RuntimeError):
    """The service did not come up (or died); the message carries its captured output."""


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent environment without any KS_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Served:
    port: int
    url: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    data_dir: Path
    database_url: str
    admin_token: str | None
    """The token to use as admin: the configured one, or the one the service printed."""
    printed_admin_token: str | None
    """The ``export KS_TOKEN=…`` line of this start, if it printed one."""

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


def _output(stdout_path: Path, stderr_path: Path) -> str:
    out = stdout_path.read_text(errors="replace") if stdout_path.exists() else ""
    err = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
    return f"--- stdout ---\n{out}\n--- stderr ---\n{err}"


def _wait_ready(
    url: str, process: subprocess.Popen[bytes], stdout_path: Path, stderr_path: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer yet"
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServeError(
                    f"killswitch serve exited with code {process.returncode} before it was "
                    f"ready\n{_output(stdout_path, stderr_path)}"
                )
            try:
                response = client.get(f"{url}/readyz")
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
    raise ServeError(
        f"killswitch serve was not ready on {url}/readyz within {READY_TIMEOUT:.0f}s "
        f"(last: {last})\n{_output(stdout_path, stderr_path)}"
    )


@contextmanager
def serve(
    data_dir: Path,
    database_url: str,
    *,
    admin_token: str | None = None,
    env: Mapping[str, str] | None = None,
    admin_token_hint: str | None = None,
    port: int | None = None,
) -> Iterator[Served]:
    """Start ``killswitch serve`` over ``data_dir`` and ``database_url``; stop it on exit.

    ``admin_token`` is passed as KS_BOOTSTRAP_ADMIN_TOKEN. ``admin_token_hint`` is a token
    known from an earlier start (used as ``Served.admin_token`` when nothing is printed).
    ``port`` defaults to a free one; pass the earlier start's port to restart the same
    issuer (the default issuer is ``http://127.0.0.1:<port>``, part of every token).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    n = next(_counter)
    log_dir = data_dir.parent
    stdout_path = log_dir / f"serve-{n}-{port}.out"
    stderr_path = log_dir / f"serve-{n}-{port}.err"
    extra = {"KS_DATA_DIR": str(data_dir), "KS_DATABASE_URL": database_url, **(env or {})}
    if admin_token is not None:
        extra["KS_BOOTSTRAP_ADMIN_TOKEN"] = admin_token
    url = f"http://127.0.0.1:{port}"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=clean_env(extra),
            cwd=data_dir.parent,
        )
    try:
        _wait_ready(url, process, stdout_path, stderr_path)
        printed = _TOKEN_LINE.findall(stdout_path.read_text(errors="replace"))
        if len(printed) > 1:
            raise ServeError(
                f"more than one admin token printed\n{_output(stdout_path, stderr_path)}"
            )
        printed_token = printed[0] if printed else None
        yield Served(
            port=port,
            url=url,
            process=process,
            stdout_path=stdout_path,
            stderr_path=stderr_path,
            data_dir=data_dir,
            database_url=database_url,
            admin_token=admin_token or printed_token or admin_token_hint,
            printed_admin_token=printed_token,
        )
    finally:
        stop_process(process, STOP_TIMEOUT)


def killswitch_executable() -> str:
    """The ``killswitch`` console script of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "killswitch"
    if beside.exists():
        return str(beside)
    found = shutil.which("killswitch")
    if found is None:
        raise RuntimeError("the killswitch console script is not installed (pip install -e .)")
    return found


def run_cli(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``killswitch <args>`` as a subprocess with a clean KS_* environment."""
    return subprocess.run(
        [killswitch_executable(), *args],
        env=clean_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text if input_text is not None else "",
        check=False,
    )
