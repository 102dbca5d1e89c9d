#!/usr/bin/env bash
# Make sure Java 17+ and Maven exist for the Apache Kafka broker tests (tests/integration):
# Maven fetches the Kafka jars from Maven Central, Java runs the broker (service/brokers).
# Debian's packages: openjdk-17-jdk-headless where the release has it, else
# default-jdk-headless (17 or later from bookworm on), and maven.
set -euo pipefail

java_major() {  # the major version of the java service/brokers would run, 0 if none
  local java=java
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then
    java="$JAVA_HOME/bin/java"
  fi
  command -v "$java" >/dev/null 2>&1 || { echo 0; return; }
  # `java -version` prints e.g. openjdk version "17.0.15" (or "1.8.0_392" for Java 8).
  "$java" -version 2>&1 | sed -n 's/.*version "\(1\.\)\{0,1\}\([0-9]*\).*/\2/p' | head -n 1
}

packages=()
if [ "$(java_major)" -lt 17 ]; then
  packages+=(java)
fi
if ! command -v mvn >/dev/null 2>&1; then
  packages+=(maven)
fi
if [ "${#packages[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "Java 17+ and Maven are needed for the Apache Kafka tests; install them:" \
    "sudo apt-get install default-jdk-headless maven" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ "${packages[0]}" = java ]; then
  if apt-cache show openjdk-17-jdk-headless >/dev/null 2>&1; then
    packages[0]=openjdk-17-jdk-headless
  else
    packages[0]=default-jdk-headless
  fi
fi
echo "installing ${packages[*]} (apt-get install)..." >&2
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
if [ "$(java_major)" -lt 17 ]; then
  echo "Java 17+ is still missing after installing ${packages[*]}; set JAVA_HOME to one" >&2
  exit 1
fi
