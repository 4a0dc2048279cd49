"""Camera sources for the station: an OpenCV device index, an RTSP/HTTP(S) stream URL or a video
file, or a folder of images replayed as a stream (for demos, tests and "hot folders" that a
line-scan camera writes into).

Two layers:

* :class:`FrameSource` subclasses talk to one kind of input. ``read()`` returns an RGB uint8
  frame or raises :class:`FrameError` (this frame is bad, the source is fine: e.g. a corrupt
  file in the folder) or :class:`SourceLost` (the source is gone: device unplugged, stream
  ended, folder removed; it must be reopened).
* :class:`Camera` wraps a source and never raises from :meth:`Camera.next_frame`: it returns a
  :class:`Frame` whose ``error`` says what went wrong, keeps a visible :attr:`Camera.state`
  (``idle`` -> ``live`` <-> ``error`` / ``reconnecting``, ``closed``; ``failed`` when the source
  does not exist before any frame arrived: a setup error, not retried) and reconnects a lost
  source with exponential back-off. After a bad frame the next call simply reads the next one;
  after a lost source the next call (once the back-off has passed) reopens it.

``open_camera(spec)`` turns a user string into the right source: ``"0"`` (device index),
``"rtsp://..."``/``"http(s)://..."`` (stream), ``"genicam://DEVICE_ID"`` (a GigE Vision / USB3
Vision camera through Aravis, see :mod:`inspector.cameras.genicam`), a directory (folder replay) or
a video file.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from inspector.io import IMAGE_SUFFIXES, ImageError, read_file_bytes, read_image, to_rgb8

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpg", ".mjpeg")
STATES = ("idle", "live", "error", "reconnecting", "closed", "failed")


class CameraError(RuntimeError):
    """Base class of camera failures."""


class FrameError(CameraError):
    """One bad frame; the source itself is still usable."""


class SourceLost(CameraError):
    """The source is gone (dropped stream, unplugged device, removed folder, end of stream)."""


class SourceMissing(SourceLost):
    """The source does not exist (no such folder, a device or stream that never opened): a setup
    error. Before the first frame the camera reports it and stops instead of retrying forever;
    after frames were delivered it is handled like any lost source (reconnect)."""


@dataclass
class Frame:
    """One result of :meth:`Camera.next_frame`: an image, or an error saying why there is none."""

    image: np.ndarray | None
    index: int
    source: str
    timestamp: float
    name: str | None = None
    error: str | None = None
    state: str = "live"
    #: source-specific facts about this frame (GenICam: frame_id, device_timestamp_ns, ...)
    meta: dict | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None and self.error is None


class FrameSource:
    """One input. Subclasses implement ``open``, ``read`` and ``close``."""

    label: str = "source"
    #: a compact name for records and captions (folder name, device index, URL host)
    short: str = "source"

    def open(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self) -> tuple[np.ndarray, str | None]:  # pragma: no cover - interface
        """Return ``(rgb_uint8, name)``; raise :class:`FrameError` or :class:`SourceLost`."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FolderSource(FrameSource):
    """Replays the image files of a folder in name order, as a camera would deliver them.

    ``loop=True`` (demo) starts again at the first file after the last one. ``loop=False``
    (hot folder) delivers every file once, picks up files added later, and reports the end of
    the stream as :class:`SourceLost` ("no new frame") until new files arrive; files already
    delivered are remembered across reconnects. ``fps`` throttles reads to a frame rate.
    """

    def __init__(self, folder: str | os.PathLike, *, loop: bool = True, fps: float | None = None,
                 max_pixels: int | None = None, roots: tuple[str | os.PathLike, ...] | None = None):
        self.folder = Path(folder)
        #: when set, a frame file is read only if it resolves (links followed) under one of these
        self.roots = roots
        self.loop = loop
        self.fps = fps
        self.max_pixels = max_pixels
        self.label = f"folder {self.folder}"
        self.short = self.folder.name or str(self.folder)
        self._files: list[Path] = []
        self._pos = 0
        self._seen: set[str] = set()
        self._last_read = 0.0

    def _scan(self) -> list[Path]:
        if not self.folder.is_dir():
            raise SourceMissing(f"{self.label}: folder not found")
        try:
            files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise SourceLost(f"{self.label}: cannot list folder ({exc.strerror or exc})") from exc
        return files

    def open(self) -> None:
        files = self._scan()
        if not self.loop:
            files = [p for p in files if p.name not in self._seen]
        if not files:
            raise SourceLost(f"{self.label}: " + ("no new frame" if self._seen else "no image files"))
        self._files, self._pos = files, 0

    def read(self) -> tuple[np.ndarray, str | None]:
        if self.fps:
            wait = self._last_read + 1.0 / self.fps - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        self._last_read = time.monotonic()
        if not self.folder.is_dir():
            raise SourceLost(f"{self.label}: folder removed")
        if self._pos >= len(self._files):
            if not self.loop:
                fresh = [p for p in self._scan() if p.name not in self._seen]
                if not fresh:
                    raise SourceLost(f"{self.label}: stream ended (no new frame)")
                self._files, self._pos = fresh, 0
            else:
                self._files, self._pos = self._scan(), 0
                if not self._files:
                    raise SourceLost(f"{self.label}: no image files")
        path = self._files[self._pos]
        self._pos += 1
        self._seen.add(path.name)
        if not path.exists():
            raise FrameError(f"{path.name}: file vanished before it was read")
        try:
            if self.roots is not None:
                data = read_file_bytes(path, path.name, roots=self.roots)
                return read_image(data, max_pixels=self.max_pixels, name=path.name), path.name
            return read_image(path, max_pixels=self.max_pixels), path.name
        except ImageError as exc:
            raise FrameError(f"{path.name}: {exc.reason}") from exc


class OpenCVSource(FrameSource):
    """``cv2.VideoCapture`` over a device index, a stream URL or a video file.

    A failed grab (stream dropped, device unplugged, end of a file) raises :class:`SourceLost`;
    the :class:`Camera` then reopens the capture. For URLs, open/read time-outs are passed to
    the FFmpeg backend so that a dead stream does not block the station.
    """

    def __init__(self, target: int | str, *, timeout_ms: int = 5000, max_pixels: int | None = None):
        self.target = target
        self.timeout_ms = timeout_ms
        self.max_pixels = max_pixels
        self.label = f"device {target}" if isinstance(target, int) else _redact(str(target))
        self.short = (f"device{target}" if isinstance(target, int)
                      else re.sub(r"^\w+://(?:[^/@]*@)?", "", str(target)).split("/")[0] or self.label)
        self._cap: cv2.VideoCapture | None = None
        self._n = 0

    def open(self) -> None:
        self.close()
        if isinstance(self.target, int):
            cap = cv2.VideoCapture(self.target)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms]
            try:
                cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)
            except cv2.error:
                cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            raise SourceMissing(f"{self.label}: cannot open")
        self._cap = cap

    def read(self) -> tuple[np.ndarray, str | None]:
        if self._cap is None:
            raise SourceLost(f"{self.label}: not open")
        try:
            ok, frame = self._cap.read()
        except cv2.error as exc:
            raise SourceLost(f"{self.label}: read failed ({exc})") from exc
        if not ok or frame is None:
            raise SourceLost(f"{self.label}: stream ended or frame grab failed")
        self._n += 1
        if frame.ndim == 3 and frame.shape[2] == 3:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        elif frame.ndim == 3 and frame.shape[2] == 4:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2RGBA)
        try:
            return to_rgb8(frame, f"{self.label} frame {self._n}", max_pixels=self.max_pixels), f"frame-{self._n:06d}"
        except ImageError as exc:
            raise FrameError(str(exc)) from exc

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def _redact(url: str) -> str:
    """Hide credentials in ``rtsp://user:pass@host`` so they never reach the UI or logs."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def make_source(spec: str | int | os.PathLike, *, loop: bool = True, fps: float | None = None) -> FrameSource:
    """Parse a user's camera spec into a :class:`FrameSource` (see module docstring)."""
    if isinstance(spec, int):
        return OpenCVSource(spec)
    s = str(spec).strip()
    if not s:
        raise ValueError("empty camera source")
    if s.lower().startswith("genicam://"):  # GigE Vision / USB3 Vision through Aravis (optional extra)
        from inspector.cameras.genicam import GenICamSource

        return GenICamSource.from_spec(s)
    if re.fullmatch(r"\d{1,3}", s):
        return OpenCVSource(int(s))
    if re.match(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://", s, re.IGNORECASE):
        return OpenCVSource(s)
    p = Path(s).expanduser()
    if p.suffix.lower() in VIDEO_SUFFIXES:
        return OpenCVSource(str(p))
    return FolderSource(p, loop=loop, fps=fps)


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
