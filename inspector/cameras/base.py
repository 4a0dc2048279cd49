"""The types every frame source shares: :class:`FrameSource`, :class:`Frame` and the camera errors.

A :class:`FrameSource` talks to one kind of input. ``read()`` returns an RGB uint8 frame or
raises :class:`FrameError` (this frame is bad, the source is fine: e.g. a corrupt file in a
folder) or :class:`SourceLost` (the source is gone: device unplugged, stream ended, folder
removed; it must be reopened). :class:`SourceMissing` is a lost source that never existed (a
setup error). :class:`~inspector.cameras.camera.Camera` turns these into :class:`Frame` results
with a visible state.

Every source module (:mod:`.sources`, :mod:`.genicam`) imports only this module of the package, so a
new kind of camera is one module plus one row in :data:`inspector.cameras.registry.SCHEMES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


__all__ = ["CameraError", "Frame", "FrameError", "FrameSource", "SourceLost", "SourceMissing"]
