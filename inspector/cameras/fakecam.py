"""Aravis' fake GigE Vision camera (``arv-fake-gv-camera-0.8``, Debian package aravis-tools) as a
managed process: a real GigE Vision device over loopback for first runs, tests and benchmarks.

It speaks GVCP on UDP port 3956 of the interface it is given and also binds the broadcast
address, so one runs per machine at a time: :func:`fake_camera` holds a machine-wide file lock
while its camera runs, and gives every camera its own serial number, so a client can only ever
open the camera it started. By hand: ``arv-fake-gv-camera-0.8 -i 127.0.0.1 -s GV01`` serves
``genicam://Aravis-Fake-GV01``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ADDRESS = "127.0.0.1"
GVCP_PORT = 3956
_serials = itertools.count()


def executable() -> str | None:
    return shutil.which("arv-fake-gv-camera-0.8")


def _port_taken() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ADDRESS, GVCP_PORT))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class FakeCamera:
    """One ``arv-fake-gv-camera-0.8`` process; ``start``/``kill`` may be repeated (same serial)."""

    def __init__(self, serial: str):
        self.serial = serial
        self.device_id = f"Aravis-Fake-{serial}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> FakeCamera:
        exe = executable()
        if exe is None:
            raise FileNotFoundError("arv-fake-gv-camera-0.8 not found (Debian package aravis-tools; "
                                    "scripts/install_line.sh)")
        assert self.proc is None, "already running"
        deadline = time.monotonic() + timeout
        while _port_taken():  # a previous camera still closing its socket
            if time.monotonic() > deadline:
                raise RuntimeError(f"UDP {ADDRESS}:{GVCP_PORT} is taken by another process")
            time.sleep(0.05)
        self.proc = subprocess.Popen([exe, "-i", ADDRESS, "-s", self.serial],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not _port_taken():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                self.proc = None
                raise RuntimeError(f"fake camera exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("fake camera did not start")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc is not None and proc.stderr:
            proc.stderr.close()


@contextlib.contextmanager
def fake_camera(serial: str | None = None, timeout: float = 30.0):
    """Start a fake GigE Vision camera (fresh serial unless given), holding the machine-wide lock;
    ``timeout``: as :meth:`FakeCamera.start`."""
    lock = Path(tempfile.gettempdir()) / "inspector-fake-gv-camera.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        cam = FakeCamera(serial or f"T{os.getpid() % 100000}x{next(_serials)}")
        try:
            yield cam.start(timeout)
        finally:
            cam.kill()
            fcntl.flock(fh, fcntl.LOCK_UN)


__all__ = ["FakeCamera", "executable", "fake_camera"]
