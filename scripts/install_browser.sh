#!/usr/bin/env bash
# Installs Debian's Chromium for the station's end-to-end browser test (tests/test_station_browser.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo) for apt-get.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  exit 0
fi
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
    echo "install_browser: not root and no sudo; install Debian's 'chromium' package by hand" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q chromium
/usr/bin/chromium --version
