#!/usr/bin/env bash
# apt_install.sh CALLER PKG...: installs Debian packages as root or through passwordless sudo, the
# one step of the install scripts that needs root; says what to install by hand when it cannot.
set -euo pipefail
caller=$1
shift
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
    echo "$caller: not root and no sudo; install these Debian packages by hand: $*" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q "$@"
