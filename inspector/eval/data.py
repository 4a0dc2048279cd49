"""The evaluation's view of MVTec-layout data: classes, test splits, few-shot draws.

Any MVTec-layout folder: a root holding several classes (``root/<class>/{train/good,test/<type>,
ground_truth/<type>/<stem>_mask.<suffix>}``: MVTec AD, VisA converted, the generated sample
products) or one class folder; the layout, the class-folder test and the mask rule are
:mod:`inspector.data.mvtec`'s. ``test/good`` images have label 0, every other ``test/<type>``
label 1. Pixel ground truth is known for good images (all zero) and for defect types with masks;
defect types without a ``ground_truth/<type>`` folder (e.g. the textile product's
``local``/``global``) take part in the image metrics only, and pixel metrics use the images whose
masks are known. A class with no masks at all reports image metrics only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from inspector.data.mvtec import MVTecFolder, find_class_dirs, read_mask, read_mvtec


@dataclass
class ClassData:
    """One class (product) of an MVTec-layout folder; images are read on demand."""

    name: str
    folder: MVTecFolder

    @property
    def root(self) -> Path:
        return self.folder.root

    @property
    def train(self) -> list[Path]:
        return self.folder.train_good

    def test_items(self) -> list[tuple[Path, int, Path | None, str]]:
        return self.folder.test_items()

    @property
    def masked_types(self) -> list[str]:
        return self.folder.masked_types

    @property
    def unmasked_types(self) -> list[str]:
        return [t for t in self.folder.defect_types if t not in self.folder.masked_types]

    @property
    def has_masks(self) -> bool:
        return bool(self.masked_types)

    def describe(self) -> dict:
        items = self.test_items()
        return {
            "name": self.name, "root": str(self.root), "train_good": len(self.train),
            "test_good": sum(1 for it in items if it[1] == 0),
            "test_defect": sum(1 for it in items if it[1] == 1),
            "defect_types": self.folder.defect_types, "masked_types": self.masked_types,
            "unmasked_types": self.unmasked_types,
        }


def find_classes(root: str | os.PathLike, classes: Sequence[str] | None = None) -> list[ClassData]:
    """The classes under ``root`` (a dataset root with class folders, or one class folder)."""
    root = Path(root)
    found = [ClassData(d.name, read_mvtec(d)) for d in find_class_dirs(root)]
    if not found:
        raise FileNotFoundError(f"{root}: not an MVTec-layout folder (no <class>/test or test/ inside)")
    if classes:
        want = set(classes)
        missing = want - {c.name for c in found}
        if missing:
            raise FileNotFoundError(f"{root}: no class {', '.join(sorted(missing))}; found {', '.join(c.name for c in found)}")
        found = [c for c in found if c.name in want]
    for c in found:
        if not c.test_items():
            raise FileNotFoundError(f"{c.root}: no test images (test/<type>/*.png)")
    return found


@dataclass
class TestSet:
    """The test split of one class, read once and preprocessed for one backbone."""

    paths: list[Path]
    types: list[str]
    labels: np.ndarray           # [N] int 0/1
    x: Tensor                    # [N,3,S,S] preprocessed
    rgb: list[np.ndarray]        # resized RGB uint8 (what the network sees), for example plots
    mask_paths: list[Path | None]
    pixel_known: np.ndarray      # [N] bool: pixel ground truth known (good, or defect with mask)

    def __len__(self) -> int:
        return len(self.paths)

    def masks(self, size: tuple[int, int]) -> np.ndarray:
        """Masks of the whole split at ``size`` = (H, W): bool ``[N,H,W]`` (good: all False)."""
        return np.stack([read_mask(p, size) for p in self.mask_paths])


def load_test_set(data: ClassData, preprocess, max_test: int | None = None) -> TestSet:
    from inspector.io import read_image

    items = data.test_items()
    if max_test is not None and len(items) > max_test:
        # keep the good/defect proportions: a deterministic, evenly spaced subset
        idx = np.unique(np.linspace(0, len(items) - 1, max_test).round().astype(int))
        items = [items[i] for i in idx]
    images = [read_image(p) for p, *_ in items]
    rgb = [preprocess.resize(im) for im in images]
    masked = set(data.masked_types)
    return TestSet(
        paths=[p for p, *_ in items], types=[t for *_, t in items],
        labels=np.array([lab for _, lab, _, _ in items], dtype=np.int64),
        x=preprocess(images), rgb=rgb, mask_paths=[m for _, _, m, _ in items],
        pixel_known=np.array([lab == 0 or t in masked for _, lab, _, t in items], bool),
    )


def draw_shots(n_train: int, k: int, seed: int) -> list[int]:
    """Indices of ``k`` few-shot images out of ``n_train`` for ``seed`` (>= 0).

    A seeded permutation of ``train/good`` is cut into ``n_train // k`` blocks of ``k``; seed ``s``
    takes block ``s mod blocks`` of permutation ``default_rng(s // blocks)``. So seeds
    ``0 .. n_train//k - 1`` get disjoint shot sets (independent draws could repeat: with 16 images,
    seeds 0 and 2 both drew image 13 for k=1), and every seed is reproducible."""
    if k > n_train:
        raise ValueError(f"{k} shots requested but train/good has only {n_train} images")
    if k < 1 or seed < 0:
        raise ValueError(f"need k >= 1 and seed >= 0, got k={k}, seed={seed}")
    blocks = n_train // k
    perm = np.random.default_rng(seed // blocks).permutation(n_train)
    b = seed % blocks
    return sorted(int(i) for i in perm[b * k:(b + 1) * k])
