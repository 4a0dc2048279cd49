"""Sample products, built deterministically from images that ship inside installed packages.

``build_sample(name)`` writes an MVTec-layout folder (see :mod:`inspector.data.mvtec`) and
returns its path. Nothing is downloaded; the result is cached: a ``manifest.json`` in the folder
records the recipe (name, version, seed, size, counts) and a second call with the same recipe
returns at once. Builds take a few seconds on a CPU.

Products (see ``datasets/README.md`` and ``datasets/manifest.json``):

* ``brick`` / ``gravel`` / ``grass`` -- crops (random position and flips, fixed seed, +-4 %
  brightness) of scikit-image's bundled 512x512 textures, resized to ``size``. Defects in
  ``test/{stain,misplaced,scratch}`` are made by the weight-free generator (Perlin blend,
  CutPaste, scar) on further crops; pixel masks in ``ground_truth/``.
* ``textile`` -- simulated textile images from the ``conformal-clip-data`` wheel (Megahed et al.
  2025, MIT): ``nominal`` -> ``train/good`` and ``test/good``; ``local`` and ``global`` defect
  images -> ``test/local``, ``test/global`` with *image labels only* (the source has no masks,
  so there is no ``ground_truth/local`` or ``ground_truth/global``). ``test/synthetic`` adds
  fallback-generated defects on other nominal images, with masks, for pixel-level metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from inspector.data.mvtec import write_mvtec
from inspector.synth.fallback import make_defect

#: Bump when a recipe changes: cached folders with another version are rebuilt.
RECIPE_VERSION = 3
TEXTURE_PRODUCTS = ("brick", "gravel", "grass")
PRODUCTS = TEXTURE_PRODUCTS + ("textile",)
#: texture defect type -> fallback kind
TEXTURE_DEFECTS = {"stain": "perlin", "misplaced": "cutpaste", "scratch": "scar"}
COUNTS = {"train_good": 16, "test_good": 12, "per_defect": 4, "textile_per_defect": 12, "textile_synthetic": 8}
MANIFEST = "manifest.json"


def default_root() -> Path:
    """``$INSPECTOR_DATASETS`` if set, else ``datasets/generated`` in the source checkout, else
    ``~/.cache/inspector/datasets``."""
    env = os.environ.get("INSPECTOR_DATASETS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and (repo / "datasets").is_dir():
        return repo / "datasets" / "generated"
    return Path.home() / ".cache" / "inspector" / "datasets"


def _recipe(name: str, seed: int, size: int) -> dict:
    return {"product": name, "version": RECIPE_VERSION, "seed": int(seed), "size": int(size),
            "counts": COUNTS}


def _texture_source(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()  # 512x512 uint8 gray, bundled in the wheel


def _crop(src: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    h, w = src.shape[:2]
    side = int(min(h, w) * 0.5)
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    c = src[y:y + side, x:x + side].astype(np.float32)
    if rng.random() < 0.5:
        c = c[:, ::-1]
    if rng.random() < 0.5:
        c = c[::-1]
    c = c * rng.uniform(0.96, 1.04)
    c = cv2.resize(np.ascontiguousarray(c), (size, size), interpolation=cv2.INTER_AREA)
    g = np.clip(np.rint(c), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _build_texture(name: str, out: Path, seed: int, size: int) -> dict:
    src = _texture_source(name)
    rng = np.random.default_rng([seed, PRODUCTS.index(name)])
    train = [_crop(src, rng, size) for _ in range(COUNTS["train_good"])]
    test = [_crop(src, rng, size) for _ in range(COUNTS["test_good"])]
    defects = {}
    for dtype, kind in TEXTURE_DEFECTS.items():
        defects[dtype] = [make_defect(_crop(src, rng, size), rng, kind) for _ in range(COUNTS["per_defect"])]
    write_mvtec(out, train, test, defects)
    return {"train/good": len(train), "test/good": len(test),
            **{f"test/{t}": len(v) for t, v in defects.items()}}


def _textile_files() -> dict[str, list[Path]]:
    try:
        import conformal_clip_data as ccd
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise FileNotFoundError("the textile product needs the 'conformal-clip-data' package") from exc
    return {k: sorted(Path(d()).glob("*.jpg"))
            for k, d in (("nominal", ccd.nominal_dir), ("local", ccd.local_dir), ("global", ccd.global_dir))}


def _defect_order(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 98]).permutation(n)


def _load_resized(path: Path, size: int) -> np.ndarray:
    from inspector.io import read_image

    img = read_image(path)
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC)
    return img


def _build_textile(out: Path, seed: int, size: int) -> dict:
    files = _textile_files()
    rng = np.random.default_rng([seed, PRODUCTS.index("textile")])
    nominal = [files["nominal"][i] for i in rng.permutation(len(files["nominal"]))]
    n_tr, n_te, n_syn = COUNTS["train_good"], COUNTS["test_good"], COUNTS["textile_synthetic"]
    if len(nominal) < n_tr + n_te + n_syn:
        raise FileNotFoundError(f"conformal-clip-data has only {len(nominal)} nominal images")
    train = [_load_resized(p, size) for p in nominal[:n_tr]]
    test = [_load_resized(p, size) for p in nominal[n_tr:n_tr + n_te]]
    defects: dict[str, list] = {}
    sources: dict[str, list[str]] = {"train/good": [p.name for p in nominal[:n_tr]],
                                     "test/good": [p.name for p in nominal[n_tr:n_tr + n_te]]}
    for kind in ("local", "global"):
        pick = [files[kind][i] for i in sorted(_defect_order(len(files[kind]), seed)[:COUNTS["textile_per_defect"]])]
        defects[kind] = [(_load_resized(p, size), None) for p in pick]
        sources[f"test/{kind}"] = [p.name for p in pick]
    syn_src = nominal[n_tr + n_te:n_tr + n_te + n_syn]
    defects["synthetic"] = [make_defect(_load_resized(p, size), rng) for p in syn_src]
    sources["test/synthetic"] = [p.name for p in syn_src]
    write_mvtec(out, train, test, defects)
    return {"counts": {"train/good": len(train), "test/good": len(test),
                       **{f"test/{t}": len(v) for t, v in defects.items()}},
            "sources": sources, "masks": ["synthetic"],
            "note": "test/local and test/global carry image labels only (no masks in the source)"}


def estimate_local_mask(rgb: np.ndarray, z_thresh: float = 2.5) -> np.ndarray:
    """Estimated pixel mask (bool HxW) of the one *local* defect of a simulated textile image.

    The textile ``local`` defects are small patches of high-frequency noise on a smooth weave:
    the local energy of the residual from a 5x5 median filter peaks there. The mask is the
    connected region around the peak where that energy is ``z_thresh`` standard deviations above
    the image mean (near the peak), closed, largest blob kept. An *estimate* (the source ships no masks): used
    for training/benchmarking generators on real defects, not as evaluation ground truth.
    """
    g = rgb.mean(axis=2).astype(np.float32) if rgb.ndim == 3 else rgb.astype(np.float32)
    med = cv2.medianBlur(np.clip(g, 0, 255).astype(np.uint8), 5).astype(np.float32)
    k = max(5, int(round(min(g.shape) / 28)) | 1)
    energy = cv2.boxFilter(np.abs(g - med), -1, (k, k))
    z = (energy - energy.mean()) / (energy.std() + 1e-6)
    b = k  # resize/JPEG artefacts and filter padding make the borders noisy
    z[:b], z[-b:], z[:, :b], z[:, -b:] = 0, 0, 0, 0
    py, px = np.unravel_index(int(np.argmax(z)), z.shape)
    win = np.zeros(z.shape, bool)
    r = 3 * k
    win[max(0, py - r):py + r + 1, max(0, px - r):px + r + 1] = True
    cand = ((z > max(z_thresh, 0.3 * float(z.max()))) & win).astype(np.uint8)
    m = cv2.morphologyEx(cand, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    n, lab, st, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n > 2:  # keep the largest blob (specks of texture energy nearby are not the defect)
        m = (lab == 1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    return m.astype(bool)


def textile_local_defects(n: int = 12, size: int = 256, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` real textile *local* defect images (resized to ``size``) with estimated masks
    (:func:`estimate_local_mask`), deterministic for ``seed``; never among the files the
    ``textile`` product (same seed) puts in ``test/local``: those come from the start of one
    seeded permutation, these from its end."""
    files = _textile_files()["local"]
    order = _defect_order(len(files), seed)
    if n > len(files) - COUNTS["textile_per_defect"]:
        raise ValueError(f"at most {len(files) - COUNTS['textile_per_defect']} local defects available")
    out = []
    for i in order[::-1][:n]:
        img = _load_resized(files[i], size)
        out.append((img, estimate_local_mask(img)))
    return out


def build_sample(name: str = "brick", root: str | os.PathLike | None = None, seed: int = 0,
                 size: int = 256, *, force: bool = False) -> Path:
    """Build (or reuse) the sample product ``name`` under ``root`` and return its folder.

    The folder is ``root/name`` for the default seed and size, else ``root/name-s{seed}-{size}``.
    Written to a temporary folder first and renamed into place, so an interrupted or concurrent
    build never leaves a half-written product behind.
    """
    if name not in PRODUCTS:
        raise ValueError(f"unknown sample product {name!r}; choose from {PRODUCTS}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    root = Path(root) if root is not None else default_root()
    folder = root / (name if (seed, size) == (0, 256) else f"{name}-s{seed}-{size}")
    recipe = _recipe(name, seed, size)
    manifest = folder / MANIFEST
    if not force and manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("recipe") == recipe:
                return folder
        except (OSError, ValueError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        t0 = time.perf_counter()
        info = _build_textile(tmp, seed, size) if name == "textile" else {"counts": _build_texture(name, tmp, seed, size),
                                                                          "masks": list(TEXTURE_DEFECTS)}
        meta = {"recipe": recipe, **info, "build_seconds": round(time.perf_counter() - t0, 3)}
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # a concurrent build got there first; use it if complete
            if not (folder / MANIFEST).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_all(root: str | os.PathLike | None = None, seed: int = 0, size: int = 256) -> dict[str, Path]:
    """Build every sample product; ``{name: folder}``."""
    return {n: build_sample(n, root, seed, size) for n in PRODUCTS}
