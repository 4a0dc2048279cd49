"""Mask samplers shared by the weight-free fallback and the diffusion generator.

* :func:`perlin_noise` -- 2-D gradient (Perlin) noise of any shape, from a numpy ``Generator``.
* :func:`perlin_mask` -- a DRAEM-style defect mask: rotated, thresholded Perlin noise, here
  localised by a Gaussian envelope around a random centre and thresholded at a quantile so its
  area is a chosen fraction of the image (DRAEM thresholds the whole image, which often gives
  defects spread over most of it; inspection defects are local).
* :func:`scar_mask` / :func:`rect_mask` -- the thin rotated rectangle and the rectangle of
  CutPaste.

Every sampler is deterministic for a given generator state.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: Default defect area as a fraction of the image (low, high).
DEFAULT_AREA = (0.005, 0.10)


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise in roughly [-1, 1] with ``res`` lattice cells along (y, x); any ``shape``."""
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = 2 * math.pi * rng.random((ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = np.arange(h, dtype=np.float64) * ry / h
    x = np.arange(w, dtype=np.float64) * rx / w
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        return gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return math.sqrt(2) * (top * (1 - uy) + bottom * uy)


def _rotate(img: np.ndarray, angle: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(img.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def _area_target(rng: np.random.Generator, area: tuple[float, float]) -> float:
    lo, hi = area
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator,
                area: tuple[float, float] = DEFAULT_AREA, *, within: np.ndarray | None = None) -> np.ndarray:
    """A localised Perlin blob mask (bool HxW) with area ~ log-uniform in ``area`` (fraction).

    ``within`` (bool HxW) restricts the mask, e.g. to the foreground of an object.
    """
    h, w = shape
    s = min(h, w)
    max_log = max(1, min(5, int(math.log2(max(2, s // 4)))))
    res = (2 ** int(rng.integers(1, max_log + 1)), 2 ** int(rng.integers(1, max_log + 1)))
    noise = perlin_noise((h, w), res, rng)
    noise = _rotate(noise, float(rng.uniform(-90, 90)))
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-8)
    target = _area_target(rng, area)
    # Gaussian envelope around a random centre (inside `within` when given) keeps the defect local.
    if within is not None and within.any():
        ys, xs = np.nonzero(within)
        k = int(rng.integers(len(ys)))
        cy, cx = float(ys[k]), float(xs[k])
    else:
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    sigma = s * math.sqrt(target) * rng.uniform(0.6, 1.2)
    yy, xx = np.mgrid[0:h, 0:w]
    env = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    score = (0.35 + noise) * env
    if within is not None:
        score = np.where(within, score, -1.0)
    n = max(1, int(round(target * h * w)))
    if within is not None:
        n = min(n, int(within.sum()))
    thr = np.partition(score.ravel(), -n)[-n]
    mask = score >= thr
    if within is not None:
        mask &= within
    return mask


def rect_mask(shape: tuple[int, int], top: int, left: int, ph: int, pw: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + ph, left:left + pw] = True
    return mask


def scar_mask(shape: tuple[int, int], rng: np.random.Generator,
              area: tuple[float, float] = DEFAULT_AREA) -> np.ndarray:
    """A thin rotated rectangle (CutPaste-scar): length 15-50 % of the short side, width set by
    the target area (log-uniform in ``area``), at least 2 px and at most 8 % of the short side."""
    h, w = shape
    s = min(h, w)
    target = min(_area_target(rng, area), 0.5 * 0.08)  # a scar is thin: cap at 0.5 x 8 % of the side
    length = rng.uniform(0.15, 0.5) * s
    width = target * h * w / length
    if width < 2.0:
        width, length = 2.0, max(4.0, min(0.9 * s, target * h * w / 2.0))
    width = min(width, max(2.0, 0.08 * s))
    angle = rng.uniform(0, 180)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    box = cv2.boxPoints(((cx, cy), (length, width), angle))
    m = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(m, [np.round(box).astype(np.int32)], 1)
    if not m.any():
        m[int(cy), int(cx)] = 1
    return m.astype(bool)
