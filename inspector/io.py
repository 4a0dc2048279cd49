"""Image input: every image enters the product through here.

Reads a path, raw bytes, or an in-memory array into a validated RGB ``uint8`` array
(H, W, 3). Whatever the source, a bad input raises :class:`ImageError` naming the source and
the reason, so a batch can record it and go on with the next file.

Handled: 8- and 16-bit, grayscale, gray+alpha, RGB, RGBA (alpha is composited on white,
the way a viewer shows it), float arrays in [0, 1].
Refused: missing, empty, corrupt or non-image files, wrong Python types, zero-sized images,
and images above a pixel limit (decompression bombs; configurable).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

#: Default upper bound on width*height. 50 MP covers line-scan crops and 8K sensors.
MAX_PIXELS = int(os.environ.get("INSPECTOR_MAX_PIXELS", 50_000_000))
#: Default upper bound on encoded file size, checked before decoding.
MAX_BYTES = int(os.environ.get("INSPECTOR_MAX_BYTES", 200 * 1024 * 1024))

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
        path = Path(source)
        if not path.exists():
            raise ImageError(label, "file not found")
        if not path.is_file():
            raise ImageError(label, "not a regular file")
        size = path.stat().st_size
        if size == 0:
            raise ImageError(label, "empty file")
        if size > MAX_BYTES:
            raise ImageError(label, f"file too large ({size} bytes > {MAX_BYTES})")
        data = np.fromfile(str(path), dtype=np.uint8)
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


def _check_header_size(data: np.ndarray, label: str, limit: int) -> None:
    """Refuse decompression bombs from the header, before allocating the decoded image."""
    head = data[:32].tobytes()
    w = h = None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if w is not None and h is not None and w * h > limit:
        raise ImageError(label, f"image too large ({w}x{h} = {w * h} pixels > limit {limit})")


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
    img = _to_float01(img, label)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 2:  # gray + alpha
        gray, alpha = img[..., :1], img[..., 1:]
        img = np.repeat(gray * alpha + (1.0 - alpha), 3, axis=2)
    elif img.shape[2] == 4:  # RGBA composited on white
        rgb, alpha = img[..., :3], img[..., 3:]
        img = rgb * alpha + (1.0 - alpha)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def _to_float01(img: np.ndarray, label: str) -> np.ndarray:
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if img.dtype == np.bool_:
        return img.astype(np.float32)
    if np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise ImageError(label, "float image contains NaN or inf")
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(label, f"float image must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        return img.astype(np.float32)
    raise ImageError(label, f"unsupported pixel type {img.dtype}")


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB (or single-channel) uint8 array with OpenCV; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"could not write image {path}")
    return path


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image-suffixed files below ``folder``, sorted for reproducible order."""
    root = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and is_image_file(p))
