"""Defect images in, training crops out: the data side of the diffusion generator.

Loading defect images with their masks (given, or estimated where missing), resizing them to the
working resolution (chosen from the defects' sizes by ``_fit_scale``) and drawing the random
4-channel patches both UNets train on. Kept apart from the model so the loaders can be used (CLI,
benches, tests) without reading the generator, and from the generator so training and evaluation
share one sampler.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from inspector.synth.diffusion.model import DefectGenConfig


def _fit_scale(images, masks, cfg: DefectGenConfig) -> int | None:
    """Working short side at which 90 % of the defects' bounding boxes fit in 0.6 x patch
    (never above ``cfg.image_size``, never below the patch). Large defects -> train and generate
    at a lower resolution, i.e. a larger field of view per patch."""
    ratios = []
    for img, m in zip(images, masks):
        ys, xs = np.nonzero(np.asarray(m))
        if len(ys):
            ratios.append(max(np.ptp(ys) + 1, np.ptp(xs) + 1) / min(img.shape[:2]))
    if not ratios:
        return cfg.image_size
    r = float(np.percentile(ratios, 90))
    short = min(min(i.shape[:2]) for i in images)
    cap = cfg.image_size or short
    return int(max(cfg.patch, min(cap, round(0.6 * cfg.patch / max(r, 1e-6)))))


def _to_rgb(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a[..., :3].astype(np.uint8)


def _resize_pair(img: np.ndarray, mask: np.ndarray, short: int | None, patch: int):
    h, w = img.shape[:2]
    target = short if short else min(h, w)
    target = max(target, patch)
    if min(h, w) != target:
        s = target / min(h, w)
        size = (max(patch, round(w * s)), max(patch, round(h * s)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return img, mask > 0


def load_defect_images(defects: str | os.PathLike, masks: str | os.PathLike | None = None,
                       types: Sequence[str] | None = None):
    """``[(rgb, mask bool or None)]`` and the normal images' paths.

    ``defects``: an MVTec-layout folder (``test/<type>`` for every type but ``good``, or only
    ``types``; masks from ``ground_truth/<type>`` where present; normals from ``train/good``) or a
    plain folder of defect images with masks in ``masks`` (``<stem>_mask.<suffix>`` /
    ``<stem>.<suffix>``, as :func:`inspector.data.mvtec.find_mask`; an image without one gets None).
    Masks are binarised by :func:`inspector.data.mvtec.read_mask`, at the image's size."""
    from inspector.data.mvtec import find_masks, is_class_dir, list_class_images, read_mask, read_mvtec
    from inspector.io import read_image

    root = Path(defects)
    pairs: list[tuple[Path, Path | None]] = []
    normals: list[Path] = []
    if masks is None and is_class_dir(root):
        info = read_mvtec(root)
        normals = list(info.train_good)
        chosen = list(types) if types else info.defect_types
        unknown = [t for t in chosen if t not in info.defect_types]
        if unknown:
            raise FileNotFoundError(f"{root}: no defect type {unknown} (has {info.defect_types})")
        for t in chosen:
            ms = info.masks.get(t) or [None] * len(info.defects[t])
            pairs += list(zip(info.defects[t], ms))
    else:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a folder")
        mdir = Path(masks) if masks else None
        imgs = list_class_images(root)
        pairs = list(zip(imgs, find_masks(mdir, imgs) if mdir else [None] * len(imgs)))
    if not pairs:
        raise FileNotFoundError(f"{root}: no defect images")
    out = []
    for ip, mp in pairs:
        img = read_image(ip)
        out.append((img, None if mp is None else read_mask(mp, img.shape[:2])))
    return out, normals


def load_defect_pairs(defects: str | os.PathLike, masks: str | os.PathLike | None = None, *,
                      types: Sequence[str] | None = None, report: dict | None = None):
    """``[(rgb, mask bool)]`` for training: given masks where there are any, estimated masks
    (:func:`inspector.synth.estimate.estimate_mask_self`) for the rest; images whose mask is
    empty are dropped. ``report`` (a dict) receives the counts ``given``, ``estimated``,
    ``dropped_empty``."""
    from inspector.synth.estimate import estimate_masks

    items, _ = load_defect_images(defects, masks, types)
    missing = [i for i, (_, m) in enumerate(items) if m is None]
    if missing:
        est = estimate_masks([items[i][0] for i in missing])
        for i, m in zip(missing, est):
            items[i] = (items[i][0], m)
    out = [(img, m) for img, m in items if m is not None and m.any()]
    if report is not None:
        report.update(given=len(items) - len(missing), estimated=len(missing), dropped_empty=len(items) - len(out))
    if not out:
        raise FileNotFoundError(f"{defects}: no defect image with a non-empty (given or estimated) mask")
    return out


class _PatchSampler:
    """Random 4-channel crops (RGB [-1,1] + mask {-1,1}), centred on defects with jitter."""

    def __init__(self, images, masks, cfg: DefectGenConfig, device):
        self.cfg, self.device = cfg, device
        self.data, self.coords = [], []
        for img, m in zip(images, masks):
            img, m = _resize_pair(_to_rgb(img), np.asarray(m), cfg.image_size, cfg.patch)
            t = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
            mm = torch.from_numpy(m.astype(np.float32))[None] * 2 - 1
            self.data.append(torch.cat([t, mm]).to(device))
            self.coords.append(np.argwhere(m))

    def __call__(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        p = self.cfg.patch
        out = []
        for _ in range(n):
            i = int(rng.integers(len(self.data)))
            x = self.data[i]
            h, w = x.shape[1:]
            c = self.coords[i]
            if len(c) and rng.random() < self.cfg.defect_crop_prob:
                cy, cx = c[int(rng.integers(len(c)))]
                cy += int(rng.integers(-p // 4, p // 4 + 1))
                cx += int(rng.integers(-p // 4, p // 4 + 1))
                y0 = int(np.clip(cy - p // 2, 0, h - p))
                x0 = int(np.clip(cx - p // 2, 0, w - p))
            else:
                y0, x0 = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            crop = x[:, y0:y0 + p, x0:x0 + p]
            k = int(rng.integers(4))
            if k:
                crop = torch.rot90(crop, k, dims=(1, 2))
            if rng.random() < 0.5:
                crop = torch.flip(crop, dims=(2,))
            out.append(crop)
        return torch.stack(out)


__all__ = ["load_defect_images", "load_defect_pairs"]
