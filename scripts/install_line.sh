#!/usr/bin/env bash
# Installs the GenICam stack for line cameras (inspector/cameras/genicam.py, tests/test_line_genicam.py):
# Debian's Aravis (library, GObject typelib, the arv-fake-gv-camera-0.8 test camera) and the build
# dependencies of PyGObject, then the project's `line` extra (pygobject<3.51) into the venv.
# Idempotent: each half is skipped when already in place. apt-get needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PKGS=(aravis-tools gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev pkg-config)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  bash scripts/apt_install.sh install_line "${PKGS[@]}"
fi
check=(-c "import gi; gi.require_version('Aravis', '0.8'); from gi.repository import Aravis")
[[ -x "$VENV/bin/python" ]] || bash scripts/bootstrap.sh
if ! "$VENV/bin/python" "${check[@]}" 2>/dev/null; then
  # PyGObject 3.51+ needs girepository-2.0 (not in Debian 12); <3.51 builds against 1.0 (~1 min).
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$VENV/bin/python" -m pip install -q -e ".[line]"
  "$VENV/bin/python" "${check[@]}"
fi
echo "GenICam stack ready: $(command -v arv-fake-gv-camera-0.8)"
