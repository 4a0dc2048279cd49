"""The camera worker: :class:`Camera` wraps one :class:`~inspector.cameras.base.FrameSource` and
never raises from :meth:`Camera.next_frame`: it returns a :class:`~inspector.cameras.base.Frame`
whose ``error`` says what went wrong, keeps a visible :attr:`Camera.state` (``idle`` -> ``live``
<-> ``error`` / ``reconnecting``, ``closed``; ``failed`` when the source does not exist before any
frame arrived: a setup error, not retried) and reconnects a lost source with exponential back-off.
After a bad frame the next call simply reads the next one; after a lost source the next call (once
the back-off has passed) reopens it.

:func:`open_camera` builds one over :func:`inspector.cameras.registry.make_source`;
:class:`CameraPool` shares one per source among the station's sessions.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from inspector.cameras.base import Frame, FrameError, FrameSource, SourceLost, SourceMissing
from inspector.cameras.registry import make_source

STATES = ("idle", "live", "error", "reconnecting", "closed", "failed")


@dataclass
class Camera:
    """A source with a visible state, error reporting and automatic reconnection.

    ``next_frame()`` never raises. On :class:`FrameError` it returns an error frame and stays
    connected (the next call reads the next frame). On :class:`SourceLost` it closes the
    source, returns an error frame, and reconnects on a later call once ``backoff`` seconds
    have passed (doubling up to ``max_backoff`` while it keeps failing; reset on success).
    Thread-safe: one lock serialises access, so a Live loop and an Inspect button can share it.
    """

    source: FrameSource
    backoff: float = 0.5
    max_backoff: float = 10.0
    state: str = "idle"
    last_error: str | None = None
    frames: int = 0
    errors: int = 0
    reconnects: int = 0
    _open: bool = field(default=False, repr=False)
    _retry_at: float = field(default=0.0, repr=False)
    _delay: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def label(self) -> str:
        return self.source.label

    def _error(self, msg: str, *, lost: bool) -> Frame:
        self.errors += 1
        self.last_error = msg
        if lost:
            self.state = "reconnecting"
            self._delay = min(self.max_backoff, self._delay * 2 if self._delay else self.backoff)
            self._retry_at = time.monotonic() + self._delay
        else:
            self.state = "error"
        return Frame(None, self.frames, self.label, time.time(), error=msg, state=self.state)

    def next_frame(self) -> Frame:
        with self._lock:
            if self.state == "closed":
                self.state = "idle"
            if self.state == "failed":  # setup error: reported, not retried until closed and started again
                return Frame(None, self.frames, self.label, time.time(), error=self.last_error, state="failed")
            if not self._open:
                now = time.monotonic()
                if self._retry_at and now < self._retry_at:
                    wait = self._retry_at - now
                    return Frame(None, self.frames, self.label, time.time(),
                                 error=f"{self.last_error}; reconnecting in {wait:.1f} s", state="reconnecting")
                try:
                    self.source.open()
                except SourceMissing as exc:
                    if self.frames == 0:  # never delivered a frame: the source is wrong, not lost
                        self.errors += 1
                        self.state, self.last_error = "failed", f"setup error: {exc}"
                        return Frame(None, 0, self.label, time.time(), error=self.last_error, state="failed")
                    return self._error(str(exc), lost=True)
                except SourceLost as exc:
                    return self._error(str(exc), lost=True)
                except Exception as exc:  # noqa: BLE001 - never let a camera crash the station
                    return self._error(f"{self.label}: cannot open ({exc})", lost=True)
                if self.errors or self.reconnects or self._retry_at:
                    self.reconnects += 1
                self._open = True
            try:
                image, name = self.source.read()
            except FrameError as exc:
                return self._error(str(exc), lost=False)
            except SourceLost as exc:
                self._close_source()
                return self._error(str(exc), lost=True)
            except Exception as exc:  # noqa: BLE001
                self._close_source()
                return self._error(f"{self.label}: {exc}", lost=True)
            self.frames += 1
            self.state, self.last_error, self._delay, self._retry_at = "live", None, 0.0, 0.0
            return Frame(image, self.frames, self.label, time.time(), name=name, state="live",
                         meta=getattr(self.source, "last_meta", None))

    def _close_source(self) -> None:
        self._open = False
        try:
            self.source.close()
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        """Close the source; waits for a frame being read (the lock), so none arrives after it."""
        with self._lock:
            self._close_source()
            self.state = "closed"
            self._retry_at = self._delay = 0.0

    def status(self) -> dict:
        return {"source": self.label, "state": self.state, "frames": self.frames, "errors": self.errors,
                "reconnects": self.reconnects, "last_error": self.last_error}


def open_camera(spec: str | int | os.PathLike, *, loop: bool = True, fps: float | None = None,
                backoff: float = 0.5, max_backoff: float = 10.0) -> Camera:
    """A :class:`Camera` over ``make_source(spec)``; nothing is opened until the first frame."""
    return Camera(make_source(spec, loop=loop, fps=fps), backoff=backoff, max_backoff=max_backoff)


class CameraPool:
    """One :class:`Camera` per source spec, shared by the station's sessions (a physical device
    can be opened only once)."""

    def __init__(self, **camera_kw):
        self._kw = camera_kw
        self._cams: dict[str, Camera] = {}
        self._lock = threading.Lock()

    def get(self, spec: str | int) -> Camera:
        key = str(spec).strip()
        with self._lock:
            cam = self._cams.get(key)
            if cam is None:
                cam = self._cams[key] = open_camera(key, **self._kw)
            return cam

    def close_all(self) -> None:
        with self._lock:
            for cam in self._cams.values():
                cam.close()
            self._cams.clear()


__all__ = ["STATES", "Camera", "CameraPool", "open_camera"]
