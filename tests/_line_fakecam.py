"""The real fake GigE Vision camera for the line tests (see inspector.cameras.fakecam), skipping
with the reason where the GenICam stack is not installed."""

from __future__ import annotations

import contextlib

import pytest
from conftest import deadline

from inspector.cameras import fakecam


def require_genicam():
    from inspector.cameras.genicam import available

    if not available():
        pytest.skip("GenICam stack missing (run scripts/install_line.sh)")
    if fakecam.executable() is None:
        pytest.skip("arv-fake-gv-camera-0.8 missing (Debian package aravis-tools; scripts/install_line.sh)")


@contextlib.contextmanager
def fake_camera():
    require_genicam()
    with fakecam.fake_camera(timeout=deadline(30)) as cam:  # waits for its GVCP port to be bound
        yield cam
