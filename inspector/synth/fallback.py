"""Weight-free synthetic defects: DRAEM-style Perlin blending, CutPaste and CutPaste-scar.

``make_defect(rgb, rng, kind)`` returns ``(image, mask)`` where ``mask`` (uint8 HxW, {0, 1}) is
*exactly* the set of pixels whose value changed: every masked pixel differs from the input in at
least one channel (a minimum change is enforced where a blend happened to leave it equal) and no
pixel outside the mask is touched. Masks are local (area about 0.5-10 % of the image by default).

* ``perlin``: thresholded, rotated Perlin noise localised around a random point (see
  :mod:`inspector.synth.masks`), alpha-blended with a foreign texture. DRAEM blends DTD textures;
  here the foreign source is one of scikit-image's bundled photos/textures (randomly cropped,
  rotated, tinted), a colour/brightness shift of the image itself (stain, burn), or a blurred copy
  (smudge).
* ``cutpaste``: a rectangle cut from another place of the same image, colour-jittered, pasted.
* ``scar``: a thin rotated rectangle filled from another place of the image, colour-jittered.

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed reproduces the output.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from inspector.synth.masks import DEFAULT_AREA, perlin_mask, rect_mask, scar_mask

KINDS = ("perlin", "cutpaste", "scar")
#: Probability of each kind when ``kind="any"``.
KIND_WEIGHTS = (0.5, 0.25, 0.25)
#: Foreign textures for Perlin blending: scikit-image files shipped inside the wheel (no download).
TEXTURE_NAMES = ("brick", "grass", "gravel", "coffee", "astronaut", "chelsea", "rocket",
                 "immunohistochemistry", "hubble_deep_field", "moon", "coins", "camera")


@functools.cache
def _texture(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
    if min(a.shape[:2]) < 8:
        raise ValueError(f"image too small for a defect: {a.shape[:2]}")
    return np.ascontiguousarray(a)


def _foreign_texture(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A float32 HxWx3 source to blend in: external texture, colour shift or smudge of ``img``."""
    h, w = img.shape[:2]
    f = img.astype(np.float32)
    choice = rng.choice(3, p=(0.5, 0.3, 0.2))
    if choice == 0:
        tex = _texture(TEXTURE_NAMES[int(rng.integers(len(TEXTURE_NAMES)))])
        th, tw = tex.shape[:2]
        side = int(rng.uniform(0.25, 0.8) * min(th, tw))
        y0, x0 = int(rng.integers(0, th - side + 1)), int(rng.integers(0, tw - side + 1))
        crop = tex[y0:y0 + side, x0:x0 + side]
        crop = np.rot90(crop, int(rng.integers(4)))
        out = cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        if rng.random() < 0.5:  # tint (gray textures otherwise stay gray)
            out = out * rng.uniform(0.6, 1.4, size=3).astype(np.float32)
        return np.clip(out, 0, 255)
    if choice == 1:  # stain / burn: per-channel gain and offset of the image itself
        gain = rng.uniform(0.4, 1.6, size=3).astype(np.float32)
        bias = rng.uniform(-60, 60, size=3).astype(np.float32)
        return np.clip(f * gain + bias, 0, 255)
    k = int(2 * int(rng.integers(2, 6)) + 1)  # smudge: blurred, darkened copy
    return np.clip(cv2.GaussianBlur(f, (k, k), 0) * rng.uniform(0.5, 0.9), 0, 255)


def _color_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness/contrast/per-channel jitter, float32 in [0, 255]."""
    p = patch.astype(np.float32)
    mean = p.mean(axis=(0, 1), keepdims=True)
    contrast = 1 + rng.uniform(-strength, strength)
    bright = 1 + rng.uniform(-strength, strength)
    chan = 1 + rng.uniform(-strength, strength, size=3).astype(np.float32) * 0.5
    return np.clip(((p - mean) * contrast + mean) * bright * chan, 0, 255)


def enforce_change(orig: np.ndarray, blended: np.ndarray, mask: np.ndarray, min_delta: int = 4) -> np.ndarray:
    """Round ``blended`` to uint8, copy ``orig`` outside ``mask`` and make every masked pixel differ.

    Masked pixels whose largest channel change is below ``min_delta`` are pushed by ``min_delta``
    (all channels, in the direction of the blend, else away from the nearer end of the range);
    a pixel that clipping still leaves unchanged is pushed the other way, which always works.
    """
    out = np.clip(np.rint(blended), 0, 255).astype(np.int16)
    o = orig.astype(np.int16)
    out[~mask] = o[~mask]
    diff = out - o
    weak = mask & (np.abs(diff).max(axis=2) < min_delta)
    if weak.any():
        s = np.sign(diff[weak].sum(axis=1))
        gray = o[weak].mean(axis=1)
        s = np.where(s == 0, np.where(gray > 127, -1, 1), s)
        pushed = np.clip(o[weak] + s[:, None] * min_delta, 0, 255)
        same = (pushed == o[weak]).all(axis=1)
        pushed[same] = np.clip(o[weak][same] - s[same, None] * min_delta, 0, 255)
        out[weak] = pushed
    return out.astype(np.uint8)


def _perlin(img: np.ndarray, rng: np.random.Generator, area, strength: float, feather: float = 2.0):
    h, w = img.shape[:2]
    mask = perlin_mask((h, w), rng, area)
    tex = _foreign_texture(img, rng)
    beta = min(1.0, rng.uniform(0.45, 0.9) * strength)
    # feathered edge: alpha ramps up over ~`feather` px inside the mask (edge pixels still change)
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    alpha = (beta * np.clip(dist / feather, 0.35, 1.0))[..., None].astype(np.float32)
    blended = img.astype(np.float32) * (1 - alpha) + tex * alpha
    return blended, mask


def _rect_size(h: int, w: int, rng: np.random.Generator, area) -> tuple[int, int]:
    lo = area[0]
    hi = max(lo, min(area[1], 0.08))
    frac = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    ratio = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    ph = int(round(math.sqrt(frac * h * w * ratio)))
    pw = int(round(math.sqrt(frac * h * w / ratio)))
    return max(2, min(ph, h // 2)), max(2, min(pw, w // 2))


def _cutpaste(img: np.ndarray, rng: np.random.Generator, area, strength: float, feather: float = 2.0):
    h, w = img.shape[:2]
    ph, pw = _rect_size(h, w, rng, area)
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    ty, tx = sy, sx
    for _ in range(20):  # target away from the source so the content really moves
        ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if abs(ty - sy) >= ph // 2 or abs(tx - sx) >= pw // 2:
            break
    patch = img[sy:sy + ph, sx:sx + pw]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = _color_jitter(patch, rng, 0.1 * strength + 0.05)
    blended = img.astype(np.float32).copy()
    blended[ty:ty + ph, tx:tx + pw] = patch
    return blended, rect_mask((h, w), ty, tx, ph, pw)


def _scar(img: np.ndarray, rng: np.random.Generator, area, strength: float, feather: float = 2.0):
    h, w = img.shape[:2]
    mask = scar_mask((h, w), rng, area)
    dy, dx = int(rng.integers(h // 4, 3 * h // 4 + 1)), int(rng.integers(w // 4, 3 * w // 4 + 1))
    src = np.roll(img, (dy, dx), axis=(0, 1))
    src = _color_jitter(src, rng, 0.2 * strength + 0.1)
    if rng.random() < 0.5:  # scratch: brighter or darker line
        src = np.clip(src + rng.choice([-1, 1]) * rng.uniform(20, 60) * strength, 0, 255)
    blended = np.where(mask[..., None], src, img.astype(np.float32))
    return blended, mask


_MAKERS = {"perlin": _perlin, "cutpaste": _cutpaste, "scar": _scar}


def make_defect(rgb: np.ndarray, rng: np.random.Generator, kind: str = "any", *,
                area: tuple[float, float] = DEFAULT_AREA, min_delta: int = 4,
                min_mean_change: float = 12.0, max_tries: int = 8,
                severity: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(defective RGB uint8, mask uint8 HxW in {0, 1})`` for a normal ``rgb`` image.

    ``kind``: ``"perlin"``, ``"cutpaste"``, ``"scar"`` or ``"any"`` (random, weights
    :data:`KIND_WEIGHTS`). ``area``: target defect area as a fraction of the image.
    ``min_delta``: every masked pixel changes by at least this much in some channel (unless the
    clip to [0, 255] forbids, in which case it still changes). ``min_mean_change``: the mean
    absolute change inside the mask must reach this, otherwise a stronger defect is drawn (a
    CutPaste from a flat region is invisible). A grayscale HxW input is treated as RGB, and an
    image whose channels are equal gets gray defects.

    ``severity`` (0 barely visible .. 1 obvious; None = the unconditioned mix above) sets the
    area inside ``area`` (log scale), the blend/colour strength, the edge feathering and the mean
    change a draw must reach (:func:`inspector.synth.severity.severity_params`); failed draws are
    redrawn at the same strength, so the severity is not overridden.
    """
    img = _as_rgb(rgb)
    base, step, feather = 1.0, 0.5, 2.0
    if severity is not None:
        from inspector.synth.severity import severity_params

        sp = severity_params(severity, area)
        area, base, step, min_mean_change = sp["area"], sp["strength"], 0.0, sp["min_mean_change"]
        feather = 2.0 + 4.0 * (1.0 - float(severity))
    if kind == "any":
        kind = KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
    if kind not in _MAKERS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {('any',) + KINDS}")
    # a gray product (all channels equal) gets gray defects: a tinted blob would be too easy a cue
    is_gray = int((img.max(axis=2).astype(np.int16) - img.min(axis=2)).max()) <= 2
    best = None
    for attempt in range(max_tries):
        strength = base + step * attempt
        blended, mask = _MAKERS[kind](img, rng, area, strength, feather)
        if is_gray:
            blended = np.repeat(blended.mean(axis=2, keepdims=True), 3, axis=2)
        if not mask.any():
            continue
        out = enforce_change(img, blended, mask, min_delta)
        changed = (out != img).any(axis=2)
        mean_change = float(np.abs(out.astype(np.int16) - img)[changed].mean())
        if best is None or mean_change > best[0]:
            best = (mean_change, out, changed)
        if mean_change >= min_mean_change:
            break
    if best is None:  # pathological: no mask drawn at all; a small central square always works
        h, w = img.shape[:2]
        mask = rect_mask((h, w), h // 2 - h // 10, w // 2 - w // 10, max(2, h // 5), max(2, w // 5))
        out = enforce_change(img, 255.0 - img.astype(np.float32), mask, min_delta)
        changed = (out != img).any(axis=2)
        best = (0.0, out, changed)
    _, out, changed = best
    return out, changed.astype(np.uint8)
