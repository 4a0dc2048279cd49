"""OpenCV and folder sources: an OpenCV device index, an RTSP/HTTP(S) stream URL or a video file,
or a folder of images replayed as a stream (for demos, tests and "hot folders" that a line-scan
camera writes into).

Which spec opens which source is stated once, in :mod:`inspector.cameras.registry`: stream URL
schemes map to :class:`OpenCVSource`; a spec without a registered scheme goes to
:func:`local_source` (``"0"``: device index, a video file, else a folder).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import cv2
import numpy as np

from inspector.cameras.base import FrameError, FrameSource, SourceLost, SourceMissing
from inspector.io import IMAGE_SUFFIXES, ImageError, read_file_bytes, read_image, to_rgb8

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpg", ".mjpeg")


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


def local_source(spec: str | int | os.PathLike, *, loop: bool = True, fps: float | None = None) -> FrameSource:
    """A spec without a registered scheme: a device index (``0`` or ``"0"``..``"999"``), a video
    file (by suffix, :data:`VIDEO_SUFFIXES`) or a folder replayed as a stream (``loop``, ``fps``)."""
    if isinstance(spec, int):
        return OpenCVSource(spec)
    s = str(spec).strip()
    if re.fullmatch(r"\d{1,3}", s):
        return OpenCVSource(int(s))
    p = Path(s).expanduser()
    if p.suffix.lower() in VIDEO_SUFFIXES:
        return OpenCVSource(str(p))
    return FolderSource(p, loop=loop, fps=fps)


__all__ = ["VIDEO_SUFFIXES", "FolderSource", "OpenCVSource", "local_source"]
