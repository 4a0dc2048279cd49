#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its pinned dependencies.
#
# Why the pip environment is scrubbed: some build machines carry a pip config that adds a local
# CPU-only torch wheel to every resolve; beside it PyPI's torchvision fails to import
# ("operator torchvision::nms does not exist"). We install the matching PyPI pair explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PIPENV=(env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1)
stamp="$VENV/.installed"
# The `line` extra (PyGObject, for GenICam cameras) builds from source against the system's
# girepository and cairo: install it only where those are present (scripts/install_line.sh
# installs them); everything else, `make demo` included, works without it.
extras=dev
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists gobject-introspection-1.0 cairo 2>/dev/null; then
  extras=dev,line
fi
want=$( (cat pyproject.toml requirements-lock.txt 2>/dev/null; echo "$extras") | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then exit 0; fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PIP=("${PIPENV[@]}" "$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip wheel setuptools
"${PIP[@]}" install -q torch==2.13.0 torchvision==0.28.0
lock=()
[[ -f requirements-lock.txt ]] && lock=(-c requirements-lock.txt)
"${PIP[@]}" install -q "${lock[@]}" -e ".[$extras]"
"$VENV/bin/python" -c "import torch, torchvision, open_clip, anomalib, torch_geometric, cv2; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ok')"
echo "$want" > "$stamp"
