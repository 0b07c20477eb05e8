#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the browser tests (make test-browser), if
# missing. Needs root for that. Exits non-zero when they cannot be installed: the browser tests
# must then fail, not skip (WBC_TESTS_REQUIRE_ALL=1 in .ci/run).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "error: chromium/chromedriver missing and not root: apt-get install chromium chromium-driver" >&2
  exit 1
fi
echo "installing chromium and chromium-driver from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
chromium --version
