"""Synthetic defects: new defective images *with exact masks* from normal images.

* :mod:`.fallback` -- weight-free DRAEM-style Perlin blending, CutPaste and scar (no training).
* :mod:`.diffusion` -- Defect-Gen style diffusion generator (Defect Spectrum, ECCV 2024): a small
  diffusion model trained on a few defect images generates image + mask jointly, inpainted into
  normal images.
* :mod:`.mvtec` -- writes MVTec-layout folders (``train/good``, ``test/<type>``, ``ground_truth``).

The one call other modules need is :func:`generate_defects`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .fallback import KINDS, make_defect
from .masks import perlin_mask, perlin_noise, scar_mask

__all__ = ["KINDS", "build_synthetic_product", "generate_defects", "make_defect", "perlin_mask", "perlin_noise", "scar_mask"]

DefectFn = Callable[[np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


def _resolve(generator: Any) -> Any:
    """A callable ``(img, rng) -> (img, mask)`` or an object with batched ``make_defects``."""
    if generator is None or (isinstance(generator, str) and generator in ("fallback", "any")):
        return lambda img, rng: make_defect(img, rng)
    if isinstance(generator, str) and generator in KINDS:
        return lambda img, rng, kind=generator: make_defect(img, rng, kind=kind)
    if isinstance(generator, (str, os.PathLike)):
        from .diffusion import DefectGen  # a path to a trained model

        return DefectGen.load(generator)
    if hasattr(generator, "make_defects") or hasattr(generator, "make_defect"):
        return generator
    if callable(generator):
        return generator
    raise TypeError(f"generator must be None, a kind, a model path, or have make_defect(); got {generator!r}")


def generate_defects(normal_images: Sequence[np.ndarray], n: int,
                     rng: np.random.Generator | int | None = None,
                     generator: Any = None, *, batch_size: int = 32,
                     progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Make ``n`` defective images from ``normal_images`` (RGB uint8 arrays, cycled at random).

    ``generator``: ``None``/``"fallback"`` (random fallback kind), one of :data:`KINDS`, a trained
    :class:`~inspector.synth.diffusion.DefectGen` (or its saved folder), or any callable
    ``(rgb, rng) -> (rgb, mask)``. Returns ``[(image uint8 HxWx3, mask uint8 HxW {0,1}), ...]``;
    each mask is non-empty and is exactly the set of changed pixels.
    """
    if not len(normal_images):
        raise ValueError("generate_defects needs at least one normal image")
    from tqdm.auto import tqdm

    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    gen = _resolve(generator)
    picks = [np.asarray(normal_images[int(rng.integers(len(normal_images)))]) for _ in range(int(n))]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    if hasattr(gen, "make_defects"):  # batched (diffusion)
        for b in tqdm(range(0, len(picks), batch_size), desc="generate", disable=not progress, leave=False):
            out += gen.make_defects(picks[b:b + batch_size], rng)
        return out
    fn = gen.make_defect if hasattr(gen, "make_defect") else gen
    for img in tqdm(picks, desc="generate", disable=not progress, leave=False):
        out.append(fn(img, rng))
    return out


def build_synthetic_product(normal: Sequence[str | os.PathLike | np.ndarray], out: str | os.PathLike, n: int,
                            rng: np.random.Generator | int | None = 0, generator: Any = None, *,
                            defect_type: str = "synthetic", holdout: float = 0.25,
                            progress: bool = False) -> dict:
    """Write an MVTec-layout product from normal images plus ``n`` generated defects.

    A ``holdout`` fraction of the normal images (at least one when there are two or more) goes to
    ``test/good`` and the defects are made on those held-out images, so no ``train/good`` image
    appears defective; the rest is ``train/good``. Returns a summary (also written to
    ``out/synth.json``).
    """
    import json

    from ..io import read_image
    from .mvtec import write_mvtec

    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    images = [read_image(p) if not isinstance(p, np.ndarray) else p for p in normal]
    if not images:
        raise ValueError("no normal images")
    order = rng.permutation(len(images))
    k = int(round(holdout * len(images)))
    k = min(len(images) - 1, max(1, k)) if len(images) >= 2 else 0
    test_idx, train_idx = order[:k], order[k:]
    pool = [images[i] for i in test_idx] or images
    gen = _resolve(generator)
    pairs = generate_defects(pool, n, rng, gen, progress=progress)
    write_mvtec(out, [images[i] for i in train_idx], [images[i] for i in test_idx], {defect_type: pairs})
    summary = {"generator": _describe(generator), "n": int(n), "defect_type": defect_type,
               "train/good": len(train_idx), "test/good": len(test_idx),
               "mask_area": {"mean": float(np.mean([m.mean() for _, m in pairs])),
                             "min": float(np.min([m.mean() for _, m in pairs])),
                             "max": float(np.max([m.mean() for _, m in pairs]))}}
    if hasattr(gen, "stats"):
        summary["stats"] = dict(gen.stats)
    (Path(out) / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _describe(generator: Any) -> str:
    if generator is None:
        return "fallback"
    if isinstance(generator, (str, os.PathLike)):
        return str(generator)
    return type(generator).__name__
