#!/usr/bin/env bash
# Make sure PostgreSQL server binaries exist for the throwaway test database.
# Debian's packages; the cluster the package may create is never used (tests run their own).
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "PostgreSQL server binaries are missing; install them: sudo apt-get install postgresql" >&2
  exit 1
fi
echo "installing PostgreSQL server binaries (apt-get install postgresql)..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
