"""MVTec-AD folder layout: write and read.

::

    root/
      train/good/000.png ...
      test/good/000.png ...
      test/<defect_type>/000.png ...
      ground_truth/<defect_type>/000_mask.png ...   (0 / 255, same size as the image)

A defect type may come without masks (image labels only): pass ``(image, None)`` items; then no
``ground_truth/<type>`` folder is written for it. Images may be arrays (RGB uint8) or paths
(copied as-is when they are PNG, re-encoded otherwise). The layout is what anomalib's ``Folder``
datamodule reads (see :func:`folder_kwargs`) and what ``MVTecAD`` expects for one category.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ImageLike = np.ndarray | str | os.PathLike


def _write_png(path: Path, img: ImageLike) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(img, np.ndarray):
        src = Path(img)
        if src.suffix.lower() == ".png":
            shutil.copyfile(src, path)
            return
        from inspector.io import read_image

        img = read_image(src)
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"{path.name}: expected uint8, got {a.dtype}")
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), a):
        raise OSError(f"could not write {path}")


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a binary mask as a 0/255 single-channel PNG."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    _write_png(Path(path), (m > 0).astype(np.uint8) * 255)


def write_mvtec(root: str | os.PathLike, good_train: Sequence[ImageLike] = (),
                good_test: Sequence[ImageLike] = (),
                defects: Mapping[str, Iterable[tuple[ImageLike, np.ndarray | None]]] | None = None,
                *, overwrite: bool = False) -> Path:
    """Write an MVTec-layout folder at ``root`` and return it.

    ``defects``: ``{type: [(image, mask or None), ...]}``; masks are HxW arrays (any non-zero is
    defect) or paths to mask images. With ``overwrite`` an existing ``root`` is replaced, otherwise
    files are added/overwritten in place.
    """
    root = Path(root)
    if overwrite and root.exists():
        shutil.rmtree(root)
    for split, images in (("train", good_train), ("test", good_test)):
        for i, img in enumerate(images):
            _write_png(root / split / "good" / f"{i:03d}.png", img)
    for dtype, items in (defects or {}).items():
        if dtype == "good" or not dtype or "/" in dtype or dtype.startswith("."):
            raise ValueError(f"bad defect type name {dtype!r}")
        for i, (img, mask) in enumerate(items):
            _write_png(root / "test" / dtype / f"{i:03d}.png", img)
            if mask is not None:
                m = mask if isinstance(mask, np.ndarray) else cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
                write_mask(root / "ground_truth" / dtype / f"{i:03d}_mask.png", m)
    return root


@dataclass
class MVTecFolder:
    """What is in an MVTec-layout folder: paths per split/type, and masks where present."""

    root: Path
    train_good: list[Path] = field(default_factory=list)
    test_good: list[Path] = field(default_factory=list)
    defects: dict[str, list[Path]] = field(default_factory=dict)
    masks: dict[str, list[Path | None]] = field(default_factory=dict)

    @property
    def defect_types(self) -> list[str]:
        return sorted(self.defects)

    @property
    def masked_types(self) -> list[str]:
        return [t for t in self.defect_types if self.masks[t] and all(m is not None for m in self.masks[t])]

    def test_items(self) -> list[tuple[Path, int, Path | None, str]]:
        """``[(image, label 0/1, mask or None, type), ...]`` for the whole test split."""
        items: list[tuple[Path, int, Path | None, str]] = [(p, 0, None, "good") for p in self.test_good]
        for t in self.defect_types:
            items += [(p, 1, m, t) for p, m in zip(self.defects[t], self.masks[t])]
        return items


def _images(d: Path) -> list[Path]:
    from inspector.io import is_image_file

    return sorted(p for p in d.iterdir() if p.is_file() and is_image_file(p)) if d.is_dir() else []


def read_mvtec(root: str | os.PathLike) -> MVTecFolder:
    """List an MVTec-layout folder (does not decode images)."""
    root = Path(root)
    if not (root / "train" / "good").is_dir() and not (root / "test").is_dir():
        raise FileNotFoundError(f"{root}: not an MVTec-layout folder (no train/good or test/)")
    out = MVTecFolder(root, _images(root / "train" / "good"), _images(root / "test" / "good"))
    test = root / "test"
    for d in sorted(test.iterdir()) if test.is_dir() else []:
        if d.is_dir() and d.name != "good":
            imgs = _images(d)
            out.defects[d.name] = imgs
            gt = root / "ground_truth" / d.name
            masks: list[Path | None] = []
            for p in imgs:
                cands = [gt / f"{p.stem}_mask.png", gt / f"{p.stem}.png"]
                masks.append(next((c for c in cands if c.is_file()), None))
            out.masks[d.name] = masks
    return out


def folder_kwargs(root: str | os.PathLike, name: str | None = None, *, masked_only: bool = True) -> dict:
    """Arguments for ``anomalib.data.Folder`` reading this layout.

    anomalib pairs masks with abnormal images by sorted position, so with ``masked_only`` only
    defect types that have masks are listed (types without masks, e.g. the textile product's
    image-labelled defects, would break the pairing); without it all types are listed and no
    masks are passed (classification only).
    """
    info = read_mvtec(root)
    types = info.masked_types if masked_only else info.defect_types
    kw = dict(name=name or Path(root).name, root=str(info.root), normal_dir="train/good",
              normal_test_dir="test/good", abnormal_dir=[f"test/{t}" for t in types])
    if masked_only and types:
        kw["mask_dir"] = [f"ground_truth/{t}" for t in types]
    return kw
