"""Which camera spec opens which source, as data: URL scheme -> ``"module:factory"``.

``make_source(spec)`` turns a user string into a :class:`~inspector.cameras.base.FrameSource`:
``"0"`` (device index), ``"rtsp://..."``/``"http(s)://..."`` (stream), ``"genicam://DEVICE_ID"`` (a
GigE Vision / USB3 Vision camera through Aravis, see :mod:`inspector.cameras.genicam`), a directory
(folder replay) or a video file. The factory's module is imported only when its scheme is used,
so the optional stacks (Aravis) load only for the cameras that need them, and no source module
imports another: each imports only :mod:`inspector.cameras.base`.

A new kind of camera: a module with a :class:`~inspector.cameras.base.FrameSource` and a factory
``factory(spec: str)`` taking the whole spec, plus one row in :data:`SCHEMES`. A kind with
settings of its own also takes ``base=`` (the caller's defaults, e.g. the line's ``[line.camera]``
table; the spec's query parameters override them); it is passed only when the caller gives one.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

from inspector.cameras.base import FrameSource

#: URL scheme (lower case) -> "module:factory" (a dotted attribute path after the colon)
SCHEMES: dict[str, str] = {
    "genicam": "inspector.cameras.genicam:GenICamSource.from_spec",
    "rtsp": "inspector.cameras.sources:OpenCVSource",
    "rtsps": "inspector.cameras.sources:OpenCVSource",
    "rtmp": "inspector.cameras.sources:OpenCVSource",
    "http": "inspector.cameras.sources:OpenCVSource",
    "https": "inspector.cameras.sources:OpenCVSource",
    "udp": "inspector.cameras.sources:OpenCVSource",
    "tcp": "inspector.cameras.sources:OpenCVSource",
}
#: a spec without a registered scheme: device index, video file or folder (``loop``, ``fps``)
LOCAL = "inspector.cameras.sources:local_source"

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(spec: str | int | os.PathLike) -> str | None:
    """The registered scheme of ``spec`` (lower case), or None (a local device, file or folder)."""
    m = _SCHEME_RE.match(str(spec).strip())
    scheme = m.group(1).lower() if m else None
    return scheme if scheme in SCHEMES else None


def resolve(target: str):
    """``"module:attr.attr"`` -> the object, importing the module now."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def make_source(spec: str | int | os.PathLike, *, loop: bool = True, fps: float | None = None,
                base: Mapping[str, Any] | None = None) -> FrameSource:
    """Parse a user's camera spec into a :class:`FrameSource` (see the module docstring).

    ``loop``/``fps``: folder replay. ``base``: default settings per scheme, e.g.
    ``{"genicam": GenICamSettings(...)}``; the spec's query parameters override them."""
    if isinstance(spec, int):
        return resolve(LOCAL)(spec, loop=loop, fps=fps)
    s = str(spec).strip()
    if not s:
        raise ValueError("empty camera source")
    scheme = scheme_of(s)
    if scheme is None:
        return resolve(LOCAL)(s, loop=loop, fps=fps)
    factory = resolve(SCHEMES[scheme])
    settings = (base or {}).get(scheme)
    return factory(s) if settings is None else factory(s, base=settings)


__all__ = ["LOCAL", "SCHEMES", "make_source", "resolve", "scheme_of"]
