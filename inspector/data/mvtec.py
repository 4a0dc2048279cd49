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

This module is the one statement of the layout for every reader (eval, AnomalyCLIP training,
the diffusion generator's data, benches): what a class folder is (:func:`is_class_dir`,
:func:`find_class_dirs`), where an image's mask is (:func:`find_mask`: ``<stem>_mask`` or
``<stem>`` with any suffix of :data:`inspector.io.IMAGE_SUFFIXES`, so a ``.bmp`` mask is a mask
everywhere) and which mask pixels are defect (:func:`binarize_mask`, :func:`read_mask`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from inspector.io import IMAGE_SUFFIXES, ImageError, list_images, read_file_bytes, read_image

ImageLike = np.ndarray | str | os.PathLike


def _write_png(path: Path, img: ImageLike) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(img, np.ndarray):
        src = Path(img)
        if src.suffix.lower() == ".png":
            shutil.copyfile(src, path)
            return
        img = read_image(src)
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"{path.name}: expected uint8, got {a.dtype}")
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), a):
        raise OSError(f"could not write {path}")


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """The one mask rule: a pixel is defect where the mask is non-zero (in any colour channel).

    Why ``> 0`` and not ``> 127``: MVTec AD and VisA masks are 0/255, where both agree; masks saved
    as 0/1 (a common export, and what :mod:`inspector.synth` returns) are all background under
    ``> 127``; and ``> 0`` is what anomalib's ``read_mask`` uses, so our metrics and its datamodules
    see the same pixels. An HxWx3 (or x4) array is reduced over its colour channels (alpha ignored)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., :3].max(axis=2) if m.shape[2] > 1 else m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"a mask is HxW or HxWxC, got shape {m.shape}")
    return m > 0


def read_mask(path: str | os.PathLike | None, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as bool ``HxW`` (:func:`binarize_mask`), resized to ``size`` = (H, W) with
    nearest neighbour when given; ``path=None`` gives an all-False mask of ``size`` (the known,
    empty mask of a good image). Any image format :func:`inspector.io.read_file_bytes` reads;
    an undecodable file raises :class:`inspector.io.ImageError`."""
    if path is None:
        if size is None:
            raise ValueError("read_mask(None) needs a size")
        return np.zeros(size, bool)
    data = np.frombuffer(read_file_bytes(path), np.uint8)
    m = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if m is None:
        raise ImageError(str(path), "mask is not a decodable image")
    b = binarize_mask(m)
    if size is not None and b.shape != tuple(size):
        h, w = size
        b = cv2.resize(b.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return b


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a binary mask (:func:`binarize_mask`) as a 0/255 single-channel PNG."""
    _write_png(Path(path), binarize_mask(mask).astype(np.uint8) * 255)


def is_class_dir(path: str | os.PathLike) -> bool:
    """The one "is this a class (category) folder" test: it has ``test/`` or ``train/good/``."""
    p = Path(path)
    return (p / "test").is_dir() or (p / "train" / "good").is_dir()


def find_class_dirs(root: str | os.PathLike) -> list[Path]:
    """``[root]`` when ``root`` is a class folder, else its class sub-folders (sorted, hidden ones
    skipped; ``[]`` when there are none). ``FileNotFoundError`` when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    if is_class_dir(root):
        return [root]
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and is_class_dir(d)]


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    """``{file stem: path}`` of the image files in ``gt_dir``; where two files share a stem, the
    suffix listed first in ``IMAGE_SUFFIXES`` wins (``.png`` before ``.bmp``)."""
    if not gt_dir.is_dir():
        return {}
    rank = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    out: dict[str, Path] = {}
    for p in sorted(list_images(gt_dir, recursive=False), key=lambda q: rank.get(q.suffix.lower(), len(rank))):
        out.setdefault(p.stem, p)
    return out


def find_mask(gt_dir: str | os.PathLike, stem: str) -> Path | None:
    """The mask of image ``stem`` in ``gt_dir`` (``ground_truth/<type>``): ``<stem>_mask.<suffix>``,
    else ``<stem>.<suffix>``, for any suffix of ``inspector.io.IMAGE_SUFFIXES``; ``None`` if absent."""
    return find_masks(gt_dir, [stem])[0]


def find_masks(gt_dir: str | os.PathLike, images: Sequence[str | os.PathLike]) -> list[Path | None]:
    """:func:`find_mask` for each image (a ``Path``, or a stem given as ``str``), listing ``gt_dir`` once."""
    idx = _mask_index(Path(gt_dir))
    stems = [i if isinstance(i, str) else Path(i).stem for i in images]
    return [idx.get(f"{st}_mask") or idx.get(st) for st in stems]


def write_mvtec(root: str | os.PathLike, good_train: Sequence[ImageLike] = (),
                good_test: Sequence[ImageLike] = (),
                defects: Mapping[str, Iterable[tuple[ImageLike, np.ndarray | None]]] | None = None,
                *, overwrite: bool = False) -> Path:
    """Write an MVTec-layout folder at ``root`` and return it.

    ``defects``: ``{type: [(image, mask or None), ...]}``; masks are HxW arrays or paths to mask
    images, binarised by :func:`binarize_mask`. With ``overwrite`` an existing ``root`` is replaced, otherwise
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
                m = mask if isinstance(mask, np.ndarray) else read_mask(mask)
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
    def annotated(self) -> bool:
        """The folder has ``ground_truth/``: pixel truth is known for its good images (all zero)."""
        return (self.root / "ground_truth").is_dir()

    @property
    def masked_types(self) -> list[str]:
        return [t for t in self.defect_types if self.masks[t] and all(m is not None for m in self.masks[t])]

    def test_items(self) -> list[tuple[Path, int, Path | None, str]]:
        """``[(image, label 0/1, mask or None, type), ...]`` for the whole test split."""
        items: list[tuple[Path, int, Path | None, str]] = [(p, 0, None, "good") for p in self.test_good]
        for t in self.defect_types:
            items += [(p, 1, m, t) for p, m in zip(self.defects[t], self.masks[t])]
        return items


def list_class_images(d: str | os.PathLike) -> list[Path]:
    """The image files directly in ``d`` (e.g. ``train/good``), sorted; ``[]`` when ``d`` is absent."""
    return list_images(d, recursive=False) if Path(d).is_dir() else []


def read_mvtec(root: str | os.PathLike) -> MVTecFolder:
    """List an MVTec-layout class folder (does not decode images); masks by :func:`find_mask`."""
    root = Path(root)
    if not is_class_dir(root):
        raise FileNotFoundError(f"{root}: not an MVTec-layout folder (no train/good or test/)")
    out = MVTecFolder(root, list_class_images(root / "train" / "good"), list_class_images(root / "test" / "good"))
    test = root / "test"
    for d in sorted(test.iterdir()) if test.is_dir() else []:
        if d.is_dir() and d.name != "good":
            imgs = list_class_images(d)
            out.defects[d.name] = imgs
            out.masks[d.name] = find_masks(root / "ground_truth" / d.name, imgs)
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
