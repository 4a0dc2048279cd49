"""Synthetic defects: new defective images *with exact masks* from normal images.

* :mod:`.fallback` -- weight-free DRAEM-style Perlin blending, CutPaste and scar (no training).
* :mod:`.diffusion` -- Defect-Gen style diffusion generator (Defect Spectrum, ECCV 2024): a small
  diffusion model trained on a few defect images generates image + mask jointly, inpainted into
  normal images.
* :mod:`.samples` -- the bundled sample products: real texture photographs plus generated defects.
* Products are written as MVTec-layout folders by :mod:`inspector.data.mvtec` (``train/good``,
  ``test/<type>``, ``ground_truth``).

The one call other modules need is :func:`generate_defects`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inspector.synth.fallback import KINDS, make_defect
from inspector.synth.masks import perlin_mask, perlin_noise, scar_mask

__all__ = ["KINDS", "build_synthetic_product", "describe_generator", "generate_defects", "list_generators",
           "make_defect", "perlin_mask", "perlin_noise", "scar_mask"]

DefectFn = Callable[[np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


def _resolve(generator: Any) -> Any:
    """A callable ``(img, rng, severity=None) -> (img, mask)`` or an object with batched
    ``make_defects``."""
    if generator is None or (isinstance(generator, str) and generator in ("fallback", "any")):
        return lambda img, rng, severity=None: make_defect(img, rng, severity=severity)
    if isinstance(generator, str) and generator in KINDS:
        return lambda img, rng, severity=None, kind=generator: make_defect(img, rng, kind=kind, severity=severity)
    if isinstance(generator, (str, os.PathLike)):
        from inspector.synth.diffusion.generator import DefectGen  # a path to a trained model

        return DefectGen.load(generator_path(generator))
    if hasattr(generator, "make_defects") or hasattr(generator, "make_defect"):
        return generator
    if callable(generator):
        return generator
    raise TypeError(f"generator must be None, a kind, a model path, or have make_defect(); got {generator!r}")


def generate_defects(normal_images: Sequence[np.ndarray], n: int,
                     rng: np.random.Generator | int | None = None,
                     generator: Any = None, *, severity: float | Sequence[float] | None = None,
                     batch_size: int = 32, progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Make ``n`` defective images from ``normal_images`` (RGB uint8 arrays, cycled at random).

    ``generator``: ``None``/``"fallback"`` (random fallback kind), one of :data:`KINDS`, a trained
    :class:`~inspector.synth.diffusion.generator.DefectGen` (or its saved folder), or any callable
    ``(rgb, rng) -> (rgb, mask)`` (called with ``severity=`` when it accepts it).
    ``severity``: a float in [0, 1] (0 barely visible, 1 obvious), one per defect, or None:
    spread across [0, 1] (stratified, :func:`~inspector.synth.severity.draw_severities`).
    Returns ``[(image uint8 HxWx3, mask uint8 HxW {0,1}), ...]``; each mask is non-empty and is
    exactly the set of changed pixels.
    """
    if not len(normal_images):
        raise ValueError("generate_defects needs at least one normal image")
    import inspect

    from tqdm.auto import tqdm

    from inspector.synth.severity import draw_severities

    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    gen = _resolve(generator)
    sev = draw_severities(int(n), rng, severity)
    picks = [np.asarray(normal_images[int(rng.integers(len(normal_images)))]) for _ in range(int(n))]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    if hasattr(gen, "make_defects"):  # batched (diffusion)
        for b in tqdm(range(0, len(picks), batch_size), desc="generate", disable=not progress, leave=False):
            out += gen.make_defects(picks[b:b + batch_size], rng, severity=sev[b:b + batch_size])
        return out
    fn = gen.make_defect if hasattr(gen, "make_defect") else gen
    try:
        takes_sev = "severity" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_sev = False
    for img, s in tqdm(list(zip(picks, sev)), desc="generate", disable=not progress, leave=False):
        out.append(fn(img, rng, severity=float(s)) if takes_sev else fn(img, rng))
    return out


def build_synthetic_product(normal: Sequence[str | os.PathLike | np.ndarray], out: str | os.PathLike, n: int,
                            rng: np.random.Generator | int | None = 0, generator: Any = None, *,
                            defect_type: str = "synthetic", holdout: float = 0.25,
                            progress: bool = False, severity: float | None = None) -> dict:
    """Write an MVTec-layout product from normal images plus ``n`` generated defects.

    A ``holdout`` fraction of the normal images (at least one when there are two or more) goes to
    ``test/good`` and the defects are made on those held-out images, so no ``train/good`` image
    appears defective; the rest is ``train/good``. Returns a summary (also written to
    ``out/synth.json``).
    """
    import json

    from inspector.data.mvtec import write_mvtec
    from inspector.io import read_image

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
    pairs = generate_defects(pool, n, rng, gen, progress=progress, severity=severity)
    write_mvtec(out, [images[i] for i in train_idx], [images[i] for i in test_idx], {defect_type: pairs})
    summary = {"generator": _describe(generator), "n": int(n), "defect_type": defect_type,
               "severity": "spread 0-1" if severity is None else float(severity),
               "train/good": len(train_idx), "test/good": len(test_idx),
               "mask_area": {"mean": float(np.mean([m.mean() for _, m in pairs])),
                             "min": float(np.min([m.mean() for _, m in pairs])),
                             "max": float(np.max([m.mean() for _, m in pairs]))}}
    if hasattr(gen, "stats"):
        summary["stats"] = dict(gen.stats)
    (Path(out) / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def synth_models_dir() -> Path:
    """``<models>/synth`` (``$INSPECTOR_MODELS`` or the repository's ``models/``)."""
    from inspector.paths import models_dir

    return models_dir() / "synth"


def generator_path(generator: str | os.PathLike) -> Path:
    """A trained generator's folder: the path itself, or ``NAME`` under :func:`synth_models_dir`."""
    p = Path(generator)
    if p.is_dir() or p.is_absolute() or len(p.parts) > 1:
        return p
    cand = synth_models_dir() / p
    return cand if cand.is_dir() else p


def list_generators(root: str | os.PathLike | None = None) -> list[Path]:
    """Trained diffusion generators (folders with ``defectgen.json``) under ``root``
    (default :func:`synth_models_dir`), sorted by name."""
    from inspector.synth.diffusion.generator import CONFIG_NAME

    root = Path(root) if root is not None else synth_models_dir()
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / CONFIG_NAME).is_file())


def describe_generator(generator: Any) -> dict:
    """What a product records about the generator that calibrated it: ``kind``, ``name``,
    ``version`` (content hash: the weights + config of a diffusion model, the source of the
    weight-free generator) and ``path`` for a saved model."""
    if generator is None or (isinstance(generator, str) and (generator in ("fallback", "any") or generator in KINDS)):
        return {"kind": "fallback", "name": generator if generator in KINDS else "fallback",
                "version": fallback_version(), "path": None}
    if isinstance(generator, (str, os.PathLike)):
        from inspector.synth.diffusion.generator import DefectGen

        generator = DefectGen.load(generator_path(generator), device="cpu")
    if hasattr(generator, "version") and hasattr(generator, "config"):
        path = getattr(generator, "path", None)
        return {"kind": "diffusion", "name": Path(path).name if path else type(generator).__name__,
                "version": generator.version, "path": str(path) if path else None}
    return {"kind": "custom", "name": getattr(generator, "__name__", type(generator).__name__), "version": None,
            "path": None}


def fallback_version() -> str:
    """Content hash of the weight-free generator's source (changes when its defects can change)."""
    import hashlib

    h = hashlib.sha256()
    for mod in ("fallback.py", "masks.py", "severity.py"):
        h.update((Path(__file__).parent / mod).read_bytes())
    return h.hexdigest()[:16]


def _describe(generator: Any) -> str:
    if generator is None:
        return "fallback"
    if isinstance(generator, (str, os.PathLike)):
        return str(generator)
    return type(generator).__name__
