#!/usr/bin/env bash
# Prefetch the Apache Kafka broker jars from Maven Central (e.g. in CI before the tests).
# Prints the directory holding them. Cache: ~/.cache/killswitch/kafka-<version>/libs,
# or $KS_KAFKA_LIBS. Needs Maven (mvn) and Java 17+.
#   scripts/kafka-jars.sh            # the default version (service.brokers.DEFAULT_KAFKA_VERSION)
#   scripts/kafka-jars.sh 4.1.1
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m service.brokers jars ${1:+--version "$1"}
