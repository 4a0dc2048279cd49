"""Image input: every image enters the product through here.

Reads a path, raw bytes, or an in-memory array into a validated RGB ``uint8`` array
(H, W, 3). Whatever the source, a bad input raises :class:`ImageError` naming the source and
the reason, so a batch can record it and go on with the next file.

Handled: 8- and 16-bit, grayscale, gray+alpha, RGB, RGBA, float arrays in [0, 1].

**The alpha rule** (one rule for every entry point: CLI, batch, station upload, camera): alpha is
composited on white, the way a viewer shows a transparent image, in :func:`to_rgb8`. The station's
upload widgets hand the file over untouched (``image_mode=None``), so an RGBA file scores the same
in the station as with ``inspector inspect``.

Refused: missing, unreadable, empty, corrupt or non-image files, formats outside
:data:`FORMATS`, wrong Python types, images smaller than :data:`MIN_SIDE` pixels a side, and
images above a pixel limit. **Decompression bombs** (a 2 KB JPEG claiming 32000x32000 pixels)
are refused from the header, before any pixel is decoded: Pillow's ``Image.open`` parses only the
header of every accepted format, and the width x height it reports is checked against the limit
before OpenCV decodes. Second lines, in case a header parser and a decoder ever disagree:
OpenCV's own decoder cap ``OPENCV_IO_MAX_IMAGE_PIXELS`` (set here before OpenCV is first
imported; ``inspector/__init__`` does it too) and Pillow's ``MAX_IMAGE_PIXELS`` (Pillow refuses
above twice it), both set to the process-wide :data:`MAX_PIXELS`.
"""

from __future__ import annotations

import io as _io
import os
import re
import stat as _stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inspector.paths import display, within

#: Default upper bound on width*height. 50 MP covers line-scan crops and 8K sensors.
MAX_PIXELS = int(os.environ.get("INSPECTOR_MAX_PIXELS", 50_000_000))
#: Default upper bound on encoded file size, checked before decoding.
MAX_BYTES = int(os.environ.get("INSPECTOR_MAX_BYTES", 200 * 1024 * 1024))
#: Smallest accepted side: a 1x1 (or 3x500) "image" carries no part to inspect.
MIN_SIDE = int(os.environ.get("INSPECTOR_MIN_SIDE", 8))
#: Pillow format names accepted (what the header says, not the file suffix). MPO is a camera JPEG.
FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF", "WEBP"})

# Decoder-level caps (second line). OpenCV reads its variable once, when the library loads.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402
from PIL import Image  # noqa: E402

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
Image.init()  # register every plugin once, so that ``formats=`` below can name them
_PIL_FORMATS = [f for f in Image.ID if f in FORMATS]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray


class ImageError(ValueError):
    """An input that cannot be used as an image. ``source`` names it, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def _name(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return f"<{type(source).__name__}>"


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the name has an image suffix (content is checked only when read)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(
    source: ImageSource, *, max_pixels: int | None = None, name: str | None = None
) -> np.ndarray:
    """Return ``source`` as a contiguous RGB uint8 array (H, W, 3) or raise :class:`ImageError`."""
    label = name or _name(source)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, np.ndarray):
        return to_rgb8(source, label, max_pixels=limit)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = np.frombuffer(bytes(source), dtype=np.uint8)
    elif isinstance(source, (str, os.PathLike)):
        data = np.frombuffer(read_file_bytes(source, label), dtype=np.uint8)
    else:
        raise ImageError(label, f"unsupported input type {type(source).__name__}; expected path, bytes or array")
    if data.size == 0:
        raise ImageError(label, "empty file")
    _check_header_size(data, label, limit)
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV raises on some malformed headers
        raise ImageError(label, f"corrupt image ({exc.msg if hasattr(exc, 'msg') else exc})") from exc
    if img is None:
        raise ImageError(label, "not a decodable image (corrupt or unsupported format)")
    if img.ndim == 3 and img.shape[2] in (3, 4):  # OpenCV decodes to BGR(A)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return to_rgb8(img, label, max_pixels=limit)


def read_file_bytes(path: str | os.PathLike, label: str | None = None, *,
                    roots: Sequence[str | os.PathLike] | None = None) -> bytes:
    """The bytes of a regular file, or :class:`ImageError` (missing, dangling link, link loop,
    permission denied, a folder or a FIFO, above :data:`MAX_BYTES`; an empty file gives ``b""``). Never blocks on a FIFO:
    the type is checked on the opened descriptor.

    ``roots``: the file actually opened (symlinks resolved, read back from the descriptor, so a
    link swapped between check and open cannot escape) must lie under one of them."""
    label = label or str(path)
    target, flags = path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if roots is not None:
        # Check BEFORE opening: a file outside the roots must never be opened, not even to look.
        # (Opening and closing the station's own SQLite file would drop that process's POSIX locks
        # on it and let another writer corrupt the database.) The resolved name is opened without
        # following a final link, and the opened descriptor is checked again below.
        target = os.path.realpath(path)
        if not within(target, roots):
            raise ImageError(label, "outside the allowed folders (after following links)")
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        reason = "dangling link" if os.path.islink(path) else "file not found"
        raise ImageError(label, reason) from None
    except IsADirectoryError:
        raise ImageError(label, "not a regular file (a folder)") from None
    except OSError as exc:
        raise ImageError(label, f"unreadable: {exc.strerror or exc}") from None
    try:
        if roots is not None and not within(_opened_path(fd, path), roots):
            raise ImageError(label, "outside the allowed folders (after following links)")
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            kind = "a folder" if _stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
            raise ImageError(label, f"not a regular file ({kind})")
        if st.st_size > MAX_BYTES:
            raise ImageError(label, f"file too large ({st.st_size} bytes > {MAX_BYTES})")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ImageError(label, f"unreadable: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _opened_path(fd: int, path: str | os.PathLike) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc (not Linux): resolve the name instead
        return os.path.realpath(path)


def image_header(data: bytes | np.ndarray) -> tuple[str, int, int]:
    """``(format, width, height)`` from the header alone (Pillow parses it; no pixel is decoded).
    Raises ``ValueError`` when no accepted format recognises the bytes."""
    buf = memoryview(data) if isinstance(data, np.ndarray) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns above its own limit; the caller decides
            with Image.open(_io.BytesIO(buf), formats=_PIL_FORMATS) as im:
                return str(im.format), int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError as exc:
        raise _Bomb(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means "not an accepted image"
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


class _Bomb(ValueError):
    """Pillow's own cap fired while parsing the header (claims above twice MAX_PIXELS)."""


def _check_header_size(data: np.ndarray, label: str, limit: int) -> None:
    """Refuse decompression bombs (and formats outside :data:`FORMATS`) from the header, before a
    single pixel is decoded."""
    try:
        fmt, w, h = image_header(data)
    except _Bomb as exc:
        m = re.search(r"\((\d+) pixels\)", str(exc))
        claim = f"{m.group(1)} pixels" if m else "more than twice the pixel limit"
        raise ImageError(label, f"image too large (header claims {claim} > limit {limit})") from None
    except ValueError:
        raise ImageError(label, "not a decodable image (corrupt or unsupported format)") from None
    if w * h > limit:
        raise ImageError(label, f"image too large ({w}x{h} = {w * h} pixels > limit {limit})")
    if min(w, h) < MIN_SIDE:
        raise ImageError(label, f"image too small ({w}x{h}; at least {MIN_SIDE} pixels a side)")


def to_rgb8(img: np.ndarray, label: str = "<array>", *, max_pixels: int | None = None) -> np.ndarray:
    """Convert a decoded array (RGB channel order) of any supported depth/layout to RGB uint8."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if not isinstance(img, np.ndarray):
        raise ImageError(label, f"unsupported input type {type(img).__name__}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (2, 3, 4)):
        raise ImageError(label, f"unsupported array shape {img.shape}; expected HxW, HxWx3 or HxWx4")
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ImageError(label, "image has zero size")
    if h * w > limit:
        raise ImageError(label, f"image too large ({w}x{h} = {w * h} pixels > limit {limit})")
    if min(h, w) < MIN_SIDE:
        raise ImageError(label, f"image too small ({w}x{h}; at least {MIN_SIDE} pixels a side)")
    if img.dtype == np.uint8 and (img.ndim == 2 or img.shape[2] == 3):  # common case: no float copy
        out = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        return np.ascontiguousarray(out)
    if not (img.dtype in (np.uint8, np.uint16, np.bool_) or np.issubdtype(img.dtype, np.floating)):
        raise ImageError(label, f"unsupported pixel type {img.dtype}")
    # Row bands of about a million pixels: the float32 temporaries of a 50 MP RGBA or 16-bit image
    # stay ~16 MB instead of ~800 MB, so memory per decoded image is the image plus a band.
    step = max(1, _BAND_PIXELS // w)
    if np.issubdtype(img.dtype, np.floating):
        lo, hi = np.inf, -np.inf
        for r0 in range(0, h, step):
            band = img[r0:r0 + step]
            if not np.isfinite(band).all():
                raise ImageError(label, "float image contains NaN or inf")
            lo, hi = min(lo, float(band.min())), max(hi, float(band.max()))
        if lo < 0.0 or hi > 1.0:
            raise ImageError(label, f"float image must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    out = np.empty((h, w, 3), np.uint8)
    for r0 in range(0, h, step):
        out[r0:r0 + step] = _band_rgb8(img[r0:r0 + step])
    return out


_BAND_PIXELS = 1 << 20


def _band_rgb8(img: np.ndarray) -> np.ndarray:
    """One row band to RGB uint8: scale to [0, 1], composite alpha on white (the alpha rule)."""
    img = _to_float01(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 2:  # gray + alpha
        gray, alpha = img[..., :1], img[..., 1:]
        img = np.repeat(gray * alpha + (1.0 - alpha), 3, axis=2)
    elif img.shape[2] == 4:  # RGBA composited on white
        rgb, alpha = img[..., :3], img[..., 3:]
        img = rgb * alpha + (1.0 - alpha)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _to_float01(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    return img.astype(np.float32)  # bool, or float already checked to lie in [0, 1]


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB (or single-channel) uint8 array with OpenCV; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    # encode in memory and write with Python: cv2.imwrite crashes the process (SIGSEGV) on a
    # file name that is not UTF-8, which any folder may hold
    ok, buf = cv2.imencode(path.suffix or ".png", arr)
    if not ok:
        raise OSError(f"could not encode image {display(path)}")
    path.write_bytes(buf.tobytes())
    return path


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image-suffixed files below ``folder``, sorted for reproducible order."""
    root = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and is_image_file(p))
