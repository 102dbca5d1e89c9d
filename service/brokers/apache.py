"""Apache Kafka 4.x in KRaft mode, from jars resolved on Maven Central.

``ensure_kafka_jars`` resolves ``org.apache.kafka:kafka_2.13:<version>`` with its runtime
dependencies through ``mvn dependency:copy-dependencies`` (a pom generated here) into a
cache dir; ``start_apache_kafka`` formats a single-node combined broker+controller with
``kafka.tools.StorageTool format --standalone`` and runs ``java -cp 'libs/*' kafka.Kafka``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ._probe import metadata_probe
from ._process import BrokerProcess, BrokerStartError, ensure_port_free, free_ports, tail

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "KAFKA_LIBS_ENV",
    "KafkaJarsError",
    "ensure_kafka_jars",
    "java_binary",
    "kafka_libs_dir",
    "kafka_pom",
    "new_cluster_id",
    "start_apache_kafka",
]

#: Newest 4.x release served here; aiokafka 0.14 checked against 4.0.1, 4.1.1, 4.4.0.
DEFAULT_KAFKA_VERSION = "4.4.0"
#: Directory holding the broker jars (overrides the per-version cache dir).
KAFKA_LIBS_ENV = "KS_KAFKA_LIBS"
#: log4j2 version of the slf4j binding added next to kafka_2.13 (it brings none).
LOG4J_VERSION = "2.24.3"
MAVEN_DEPENDENCY_PLUGIN = "3.8.1"
_STATE_FILE = "killswitch-kafka.json"
_COMPLETE = ".complete"

Progress = Callable[[str], None]


class KafkaJarsError(BrokerStartError):
    """The Kafka jars could not be resolved (no Maven, no network, unknown version...)."""


def kafka_pom(version: str) -> str:
    """A minimal pom whose runtime dependencies are exactly the broker's class path."""
    if not re.fullmatch(r"[0-9A-Za-z.\-]+", version):
        raise ValueError(f"not a Kafka version: {version!r}")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.killswitch</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- kafka_2.13 brings slf4j-api and log4j-core but no binding: without it the broker
         prints nothing at all -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version>
      <scope>runtime</scope>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{MAVEN_DEPENDENCY_PLUGIN}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""


def kafka_libs_dir(version: str) -> Path:
    """``$KS_KAFKA_LIBS``, else ``${XDG_CACHE_HOME:-~/.cache}/killswitch/kafka-<v>/libs``."""
    override = os.environ.get(KAFKA_LIBS_ENV)
    if override:
        return Path(override).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "killswitch" / f"kafka-{version}" / "libs"


def _libs_ready(libs: Path, version: str) -> bool:
    if (libs / _COMPLETE).is_file():
        return (libs / f"kafka_2.13-{version}.jar").is_file()
    # A hand-filled dir (e.g. the libs/ of the Apache tarball) pointed at by KS_KAFKA_LIBS.
    return os.environ.get(KAFKA_LIBS_ENV) is not None and any(libs.glob("kafka_2.13-*.jar"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_kafka_jars(
    version: str = DEFAULT_KAFKA_VERSION,
    *,
    progress: Progress | None = None,
    timeout: float = 900,
) -> Path:
    """Return a directory holding the broker's jars, resolving them with Maven if needed.

    Safe to call concurrently (a file lock serialises resolution; the result is moved
    into place only when complete). Raises :class:`KafkaJarsError` with Maven's output.
    """
    libs = kafka_libs_dir(version)
    if _libs_ready(libs, version):
        _check_libs_version(libs, version)
        return libs
    with _locked(libs.parent / f".{libs.name}.lock"):
        if _libs_ready(libs, version):
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaJarsError(
                "Maven (mvn) is needed to fetch the Apache Kafka jars "
                "(apt-get install maven), or point KS_KAFKA_LIBS at a Kafka libs/ dir"
            )
        t0 = time.monotonic()
        if progress:
            progress(f"resolving org.apache.kafka:kafka_2.13:{version} into {libs}")
        tmp = Path(tempfile.mkdtemp(prefix=".resolve-", dir=libs.parent))
        log = libs.parent / f"mvn-{version}.log"
        (tmp / "pom.xml").write_text(kafka_pom(version))
        out = tmp / "libs"
        cmd = [
            mvn,
            "-B",
            "-f",
            str(tmp / "pom.xml"),
            f"-DoutputDirectory={out}",
            "-DincludeScope=runtime",
            "dependency:copy-dependencies",
        ]
        try:
            with open(log, "w") as fh:
                proc = subprocess.Popen(  # noqa: S603 - argv built here
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                assert proc.stdout is not None
                for line in proc.stdout:
                    fh.write(line)
                    if progress and line.startswith("Downloaded from"):
                        progress(line.strip())
                    if time.monotonic() - t0 > timeout:
                        proc.kill()
                code = proc.wait()
            jar = out / f"kafka_2.13-{version}.jar"
            if code != 0 or not jar.is_file():
                raise KafkaJarsError(
                    f"could not resolve org.apache.kafka:kafka_2.13:{version} from Maven "
                    f"Central (mvn exit {code}); see {log}\n"
                    f"--- last lines ---\n{tail(log, 15)}"
                )
            (out / _COMPLETE).write_text(f"{version}\n")
            if libs.exists():
                shutil.rmtree(libs)
            os.replace(out, libs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            n = len(list(libs.glob("*.jar")))
            progress(f"{n} jars for Kafka {version} in {time.monotonic() - t0:.1f}s")
        return libs


def _check_libs_version(libs: Path, version: str) -> None:
    jars = sorted(p.name for p in libs.glob("kafka_2.13-*.jar"))
    if f"kafka_2.13-{version}.jar" not in jars:
        raise KafkaJarsError(f"{libs} holds {', '.join(jars) or 'no kafka jar'}, not {version}")


def java_binary() -> str:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH (Kafka 4.x brokers need Java 17+)."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise BrokerStartError("Apache Kafka needs Java 17+ (apt-get install openjdk-17-jre)")
    return found


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID, base64url without padding (like ``random-uuid``)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.change.name = state.change.logger
logger.change.level = WARN
"""


def _server_properties(
    *, host: str, port: int, controller_port: int, data: Path, extra: Mapping[str, str]
) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": "1",
        # single node: every internal topic with replication factor 1, few partitions
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        # first consumer-group join without the 3 s default delay
        "group.initial.rebalance.delay.ms": "0",
        # allow the short session timeouts of FAST_CONSUMER (tansu needs them, see docs)
        "group.min.session.timeout.ms": "1000",
    }
    props.update(extra)
    return "".join(f"{k}={v}\n" for k, v in props.items())


def start_apache_kafka(
    *,
    version: str = DEFAULT_KAFKA_VERSION,
    port: int | None = None,
    host: str = "127.0.0.1",
    work_dir: Path | None = None,
    ready_timeout: float = 90,
    heap: str = "512m",
    extra_properties: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> BrokerProcess:
    """Start a single-node Apache Kafka (KRaft, broker+controller) and wait until ready.

    ``work_dir`` None: a temp dir, deleted by a clean ``stop()``. A given ``work_dir`` is
    kept and reused: its data survive restarts (same cluster id and controller port).
    The broker's output goes to ``<work_dir>/broker.log``. Jars come from
    :func:`ensure_kafka_jars` (resolved on first use). ``ready_timeout`` counts from the
    JVM's spawn (jar resolution and storage formatting are not included).
    """
    libs = ensure_kafka_jars(version, progress=progress)
    java = java_binary()
    owned: list[Path] = []
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="ks-kafka-"))
        owned.append(work_dir)
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / "data"
    state_path = work_dir / _STATE_FILE
    state: dict[str, object] = {}
    if state_path.is_file() and (data / "meta.properties").is_file():
        state = json.loads(state_path.read_text())
    if state:
        cluster_id = str(state["cluster_id"])
        controller_port = int(str(state["controller_port"]))
        port = port if port is not None else int(str(state["port"]))
        ensure_port_free(host, port)
        ensure_port_free(host, controller_port)
    else:
        shutil.rmtree(data, ignore_errors=True)
        cluster_id = new_cluster_id()
        if port is None:
            port, controller_port = free_ports(2, host)
        else:
            ensure_port_free(host, port)
            controller_port = next(p for p in free_ports(2, host) if p != port)
    log_path = work_dir / "broker.log"
    props = work_dir / "server.properties"
    props.write_text(
        _server_properties(
            host=host,
            port=port,
            controller_port=controller_port,
            data=data,
            extra=extra_properties or {},
        )
    )
    log4j = work_dir / "log4j2.properties"
    log4j.write_text(_LOG4J2)
    jvm = [
        java,
        f"-Xmx{heap}",
        "-Xms64m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        f"-Dkafka.logs.dir={work_dir / 'logs'}",
        "-cp",
        str(libs / "*"),
    ]
    if not state:
        if progress:
            progress(f"formatting KRaft storage in {data} (cluster id {cluster_id})")
        with open(log_path, "ab") as fh:
            fmt = subprocess.run(  # noqa: S603 - argv built here
                [
                    *jvm,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "--cluster-id",
                    cluster_id,
                    "--config",
                    str(props),
                ],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
        if fmt.returncode != 0:
            raise BrokerStartError(
                f"kafka storage format failed (exit {fmt.returncode}); see {log_path}\n"
                f"--- last lines of the log ---\n{tail(log_path)}"
            )
        state = {
            "cluster_id": cluster_id,
            "port": port,
            "controller_port": controller_port,
            "version": version,
        }
        state_path.write_text(json.dumps(state, indent=2) + "\n")
    if progress:
        progress(f"starting Apache Kafka {version} on {host}:{port}; log {log_path}")
    broker = BrokerProcess(
        kind="apache-kafka",
        argv=[*jvm, "kafka.Kafka", str(props)],
        host=host,
        port=port,
        log_path=log_path,
        cwd=work_dir,
        cleanup_dirs=owned,
        stop_timeout=30.0,
        version=version,
    )
    broker.wait_ready(
        ready_timeout,
        lambda t: metadata_probe(broker.bootstrap, t),
        what=f"Apache Kafka {version} on {broker.bootstrap}",
    )
    return broker
