#!/usr/bin/env bash
# Installs Debian's Chromium for the station's end-to-end browser test (tests/test_station_browser.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo) for apt-get.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  exit 0
fi
bash "$(dirname "$0")/apt_install.sh" install_browser chromium
/usr/bin/chromium --version
