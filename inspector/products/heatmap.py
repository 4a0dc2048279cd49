"""Heatmap overlays for operators: colour map over the image plus an outline of the defect.

Maps hold raw anomaly scores (a product's units). For display they are scaled to [0, 1] with the
product's thresholds: ``low`` (typical normal pixel level; default 0) maps to 0 and ``ng_above``
maps to 1, so a red pixel means "NG-level here" on every product. Pixels below ``ok_below`` get no
tint at all (the part is shown as it is where nothing is suspicious). With ``peak`` (the image's
score) the map is first rescaled about ``low`` so that its hottest pixel equals the image score:
detectors whose image score is not the map's maximum (a global branch, top-k pooling) then show a
tint exactly when the verdict is not OK, and the hottest region in the colour of the verdict. The outline is drawn in red
around pixels at or above ``ng_above`` and, when there are none, in yellow around pixels at or
above ``ok_below`` (the UNCERTAIN band).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import cv2
import numpy as np

from inspector.verdict import Thresholds

#: Saved heatmap PNGs are at most this many pixels on their longest side (disk and UI friendly).
MAX_SIDE = int(os.environ.get("INSPECTOR_HEATMAP_MAX_SIDE", 1024))

RED = (230, 30, 30)
YELLOW = (250, 200, 0)


def normalize(amap: np.ndarray, thresholds: Thresholds | None = None, low: float | None = None) -> np.ndarray:
    """Scale ``amap`` to float32 [0, 1] for display (see module docstring); without thresholds,
    min-max over the map."""
    amap = np.nan_to_num(np.asarray(amap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if thresholds is not None:
        lo = 0.0 if low is None else float(low)
        hi = float(thresholds.ng_above)
        if hi <= lo:
            hi = lo + 1e-6
    else:
        lo, hi = float(amap.min()), float(amap.max())
        if hi - lo < 1e-12:
            return np.zeros_like(amap)
    return np.clip((amap - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _fit(rgb: np.ndarray, amap: np.ndarray, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    h, w = rgb.shape[:2]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        h, w = rgb.shape[:2]
    if amap.shape[:2] != (h, w):
        amap = cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return rgb, amap


def peak_scaled(amap: np.ndarray, peak: float | None, low: float | None = None) -> np.ndarray:
    """``amap`` rescaled about ``low`` so that its maximum equals ``peak`` (see module docstring);
    unchanged without a finite peak above ``low`` or when the map is flat at or below ``low``."""
    amap = np.asarray(amap, dtype=np.float32)
    lo = 0.0 if low is None else float(low)
    if peak is None or not np.isfinite(peak) or peak <= lo or not amap.size:
        return amap
    top = float(np.nanmax(amap))
    if not np.isfinite(top) or top <= lo:
        return amap
    return (lo + (amap - lo) * ((float(peak) - lo) / (top - lo))).astype(np.float32)


def overlay(rgb: np.ndarray, amap: np.ndarray, thresholds: Thresholds | None = None, alpha: float = 0.45,
            low: float | None = None, outline: bool = True, max_side: int | None = None,
            peak: float | None = None) -> np.ndarray:
    """RGB uint8 image with the map as a JET colour overlay and the defect outline.

    ``amap`` may be at any size (it is resized to the image); ``max_side`` downsizes both first;
    ``peak`` ties the map's maximum to the image score (module docstring).
    """
    if peak is not None:
        amap = peak_scaled(amap, peak, low)
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    rgb, amap = _fit(rgb.astype(np.uint8), np.asarray(amap, dtype=np.float32), max_side)
    norm = normalize(amap, thresholds, low)
    colour = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    # Fade the overlay where the map is low so normal regions stay readable; no tint below OK.
    a = alpha * (0.35 + 0.65 * norm)
    if thresholds is not None:
        a = np.where(amap >= thresholds.ok_below, a, 0.0)
    a = a[..., None]
    out = (rgb.astype(np.float32) * (1 - a) + colour.astype(np.float32) * a).clip(0, 255).astype(np.uint8)
    if outline and thresholds is not None:
        thick = max(1, round(max(out.shape[:2]) / 300))
        for level, col in ((thresholds.ng_above, RED), (thresholds.ok_below, YELLOW)):
            mask = (amap >= level).astype(np.uint8)
            if mask.any():
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(out, contours, -1, col, thick)
                break
    return np.ascontiguousarray(out)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError("could not encode PNG")
    return buf.tobytes()


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB image as PNG via a temporary name + rename, so a reader (or a crash) never
    sees half a file. Not fsynced: a heatmap is a derived view, cheap to redo, and batches write
    thousands."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(encode_png(rgb))
    os.replace(tmp, path)
    return path


def save_heatmap(path: str | os.PathLike, rgb: np.ndarray, amap: np.ndarray, thresholds: Thresholds | None = None,
                 low: float | None = None, max_side: int | None = MAX_SIDE, peak: float | None = None) -> Path:
    """Write the overlay of ``amap`` on ``rgb`` (at most ``max_side`` pixels) as a PNG; returns the path."""
    return save_png(path, overlay(rgb, amap, thresholds, low=low, max_side=max_side, peak=peak))


__all__ = ["MAX_SIDE", "encode_png", "normalize", "overlay", "peak_scaled", "save_heatmap", "save_png"]
