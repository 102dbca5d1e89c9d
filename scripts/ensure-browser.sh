#!/usr/bin/env bash
# Make sure Debian's Chromium exists for the console's browser tests (tests/console).
# Playwright drives it through its bundled driver; `playwright install` is never run.
set -euo pipefail
CHROMIUM="${KS_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "Chromium is missing; install it: sudo apt-get install chromium" >&2
  exit 1
fi
echo "installing Chromium (apt-get install chromium)..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
