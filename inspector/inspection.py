"""The inspection record and the one inspect step shared by every runtime (torch and ONNX).

Why one step: the rule "score -> decide -> resize the map to the image -> :class:`Inspection`"
decides what operators see and what the PLC gets; the torch product runtime and the onnxruntime
runner both call :func:`inspections_from` so they can never disagree on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from inspector.io import to_rgb8
from inspector.verdict import Thresholds, Verdict


@dataclass
class Inspection:
    """One scored image: ``map`` is float32 HxW at the ORIGINAL image size, in raw score units
    (see :func:`inspector.products.heatmap.normalize` for display)."""

    score: float
    verdict: Verdict
    map: np.ndarray
    latency_ms: float


def resize_map(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Model-resolution map -> the original image's ``(H, W)`` (bilinear; unchanged when equal)."""
    h, w = int(shape[0]), int(shape[1])
    m = np.asarray(m)
    if m.shape == (h, w):
        return np.ascontiguousarray(m, dtype=np.float32)
    return cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def as_rgb8_list(images) -> list[np.ndarray]:
    """One image or a sequence of images -> validated RGB uint8 arrays. Already valid arrays pass
    through untouched (no float round trip of a large image)."""
    if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object:
        images = [images]
    out = []
    for im in images:
        im = np.asarray(im)
        ok = im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 and im.shape[0] and im.shape[1]
        out.append(im if ok else to_rgb8(im))
    return out


def inspections_from(images: Sequence[np.ndarray], maps: np.ndarray, scores: Sequence[float],
                     thresholds: Thresholds | None, latency_ms: float) -> list[Inspection]:
    """The inspect step: decide each score, resize each map to its image. Without thresholds the
    verdict is UNCERTAIN (a bare exported graph knows no product)."""
    out = []
    for im, m, s in zip(images, maps, scores):
        score = float(s)
        verdict = thresholds.decide(score) if thresholds is not None else Verdict.UNCERTAIN
        out.append(Inspection(score=score, verdict=verdict, map=resize_map(m, im.shape[:2]), latency_ms=latency_ms))
    return out


__all__ = ["Inspection", "as_rgb8_list", "inspections_from", "resize_map"]
