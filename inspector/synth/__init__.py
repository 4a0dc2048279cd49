"""Synthetic defects: new defective images *with exact masks* from normal images.

* :mod:`.fallback` -- weight-free DRAEM-style Perlin blending, CutPaste and scar (no training).
* :mod:`.diffusion` -- Defect-Gen style diffusion generator (Defect Spectrum, ECCV 2024): a small
  diffusion model trained on a few defect images generates image + mask jointly, inpainted into
  normal images.
* :mod:`.mvtec` -- writes MVTec-layout folders (``train/good``, ``test/<type>``, ``ground_truth``).

The one call other modules need is :func:`generate_defects`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .fallback import KINDS, make_defect
from .masks import perlin_mask, perlin_noise, scar_mask

__all__ = ["KINDS", "generate_defects", "make_defect", "perlin_mask", "perlin_noise", "scar_mask"]

DefectFn = Callable[[np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


def _resolve(generator: Any) -> DefectFn:
    if generator is None or generator == "fallback":
        return lambda img, rng: make_defect(img, rng)
    if isinstance(generator, str):
        if generator in KINDS:
            return lambda img, rng: make_defect(img, rng, kind=generator)
        from .diffusion import DefectGen  # a path to a trained model

        model = DefectGen.load(generator)
        return model.make_defect
    if hasattr(generator, "make_defect"):
        return generator.make_defect
    if callable(generator):
        return generator
    raise TypeError(f"generator must be None, a kind, a model path, or have make_defect(); got {generator!r}")


def generate_defects(normal_images: Sequence[np.ndarray], n: int,
                     rng: np.random.Generator | int | None = None,
                     generator: Any = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Make ``n`` defective images from ``normal_images`` (RGB uint8 arrays, cycled at random).

    ``generator``: ``None``/``"fallback"`` (random fallback kind), one of :data:`KINDS`, a trained
    :class:`~inspector.synth.diffusion.DefectGen` (or its saved folder), or any callable
    ``(rgb, rng) -> (rgb, mask)``. Returns ``[(image uint8 HxWx3, mask uint8 HxW {0,1}), ...]``;
    each mask is non-empty and is exactly the set of changed pixels.
    """
    if not len(normal_images):
        raise ValueError("generate_defects needs at least one normal image")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    fn = _resolve(generator)
    out = []
    for _ in range(int(n)):
        img = np.asarray(normal_images[int(rng.integers(len(normal_images)))])
        out.append(fn(img, rng))
    return out
