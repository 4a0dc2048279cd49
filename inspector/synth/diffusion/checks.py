"""What a sampled patch must satisfy to be accepted as a defect with an exact mask.

The generated mask channel is cleaned (holes filled, specks dropped) and compared with the pixels
the sample actually changed (``changed_pixels``, ``mask_iou``); a disagreement rejects the draw.
These are plain array functions, separate from the sampler so they can be tested and reused on
their own.
"""

from __future__ import annotations

import cv2
import numpy as np


def _fill_holes(m: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(m)


def changed_pixels(generated: np.ndarray, normal: np.ndarray, region: np.ndarray | None = None,
                   *, sigma: float = 1.5, floor: float = 8.0) -> np.ndarray:
    """Where ``generated`` (HxWx3, 0-255) differs from ``normal`` as a *defect*, not as a re-drawn
    texture: per pixel, the larger of the local-mean difference and the local-contrast
    (standard deviation) difference, Gaussian windows of ``sigma``, largest channel; thresholded by
    Otsu inside ``region`` but never below ``floor`` grey levels. A regenerated but normal
    texture changes every pixel and neither local statistic, so it does not count as changed.
    The window widens the changed set by ~``sigma`` px at the edge, so IoU against a small defect
    is biased low (a 12 px square scores ~0.7-0.9, 6 px ~0.4): the check is strict on tiny defects."""
    a = np.asarray(generated, np.float32)
    b = np.asarray(normal, np.float32)

    def stats(x):
        mu = cv2.GaussianBlur(x, (0, 0), sigma)
        var = cv2.GaussianBlur(x * x, (0, 0), sigma) - mu * mu
        return mu, np.sqrt(np.maximum(var, 0))

    (ma, sa), (mb, sb) = stats(a), stats(b)
    d = np.maximum(np.abs(ma - mb), np.abs(sa - sb))
    d = d.max(axis=2) if d.ndim == 3 else d
    inside = np.ones(d.shape, bool) if region is None else np.asarray(region, bool)
    if not inside.any():
        return np.zeros(d.shape, bool)
    vals = np.clip(d[inside], 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(vals.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return (d > max(float(otsu), floor)) & inside


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def _drop_specks(m: np.ndarray, min_size: int) -> np.ndarray:
    n, lab, st, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = st[1:, cv2.CC_STAT_AREA] >= min_size
    return keep[lab]


__all__ = ["changed_pixels", "mask_iou"]
