"""Training AnomalyCLIP's prompts on any MVTec-layout folder (real or generated defects).

Only :class:`~inspector.detectors.anomalyclip.torch_model.PromptLearner` trains; the image side is
frozen, so its features are computed once and cached in memory when they fit. The loss is the
official one (:func:`~inspector.detectors.anomalyclip.torch_model.anomalyclip_loss`); Adam with
betas (0.5, 0.999) as the official code; a checkpoint after every epoch, resumable bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from inspector.backbones.base import CLIP_MEAN, CLIP_STD, Preprocess
from inspector.backbones.registry import PatchBackbone, load_backbone
from inspector.data.mvtec import MVTecFolder, find_class_dirs, find_masks, list_class_images, read_mask
from inspector.detectors.anomalyclip.checkpoint import (
    _paths,
    load_train_state,
    read_checkpoint,
    save_train_state,
)
from inspector.detectors.anomalyclip.detector import AnomalyCLIP
from inspector.detectors.anomalyclip.torch_model import DEFAULT_BACKBONE, N_CTX, PRESETS, T_N_CTX

# ---------------------------------------------------------------------------------------------
# training data: any MVTec-layout folder
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None  # pixel mask file, when annotated
    has_mask: bool  # True when the pixel truth is known (normal images of annotated sets, masked defects)


def scan_mvtec(root: str | os.PathLike, splits: Sequence[str] = ("train", "test")) -> list[Sample]:
    """Samples of one MVTec-layout category (``train/good``, ``test/<type>``, ``ground_truth/<type>``)
    or of every category folder directly under ``root``.

    The layout rules are :mod:`inspector.data.mvtec`'s, the ones evaluation reads with: what a
    category folder is, which file is an image's mask (any image suffix: a ``.bmp`` mask is a
    mask), which mask pixels are defect. A category with a ``ground_truth`` folder is *annotated*:
    its normal images have a known all-zero mask and its defects their mask files (a defect
    without a mask file gets the image-level loss only). Without ``ground_truth`` every sample is
    image-level only. Every type folder of each split counts (``good`` = normal).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder {root} not found")
    cats = find_class_dirs(root)
    if not cats:
        raise ValueError(f"{root}: no MVTec-layout folder (expected train/good, test/<type>, ground_truth/<type>)")
    samples: list[Sample] = []
    for cat in cats:
        annotated = MVTecFolder(cat).annotated
        for split in splits:
            sdir = cat / split
            if not sdir.is_dir():
                continue
            for tdir in sorted(d for d in sdir.iterdir() if d.is_dir()):
                images = list_class_images(tdir)
                if tdir.name == "good":
                    samples += [Sample(img, 0, None, annotated) for img in images]
                    continue
                masks = find_masks(cat / "ground_truth" / tdir.name, images) if annotated else [None] * len(images)
                samples += [Sample(img, 1, m, m is not None) for img, m in zip(images, masks)]
    if not samples:
        raise ValueError(f"{root}: no images found under {', '.join(splits)}")
    return samples


class MaskedImages(torch.utils.data.Dataset):
    """Preprocessed images ``[3,S,S]`` (CLIP normalisation), binary masks ``[S,S]`` (the one mask
    rule, :func:`inspector.data.mvtec.read_mask`), mask-known flags, labels, indices."""

    def __init__(self, samples: Sequence[Sample], size: int):
        self.samples = list(samples)
        self.size = size
        self.pre = Preprocess(size, CLIP_MEAN, CLIP_STD)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from inspector.io import read_image

        s = self.samples[i]
        x = self.pre(read_image(s.path))[0]
        mask = read_mask(s.mask, (self.size, self.size)).astype(np.float32)
        return x, torch.from_numpy(mask), torch.tensor(s.has_mask), torch.tensor(s.label), i


# ---------------------------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    path: Path
    epochs_done: int
    history: list[dict[str, float]]
    samples: int
    annotated: int
    resumed_from: int = 0


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def train_prompts(data: str | os.PathLike | Sequence[Sample], out: str | os.PathLike, *,
                  backbone: PatchBackbone | str = DEFAULT_BACKBONE, epochs: int = 15, lr: float = 1e-3,
                  batch_size: int = 8, image_size: int | None = None, resume: bool = False, seed: int = 0,
                  n_ctx: int = N_CTX, depth: int | None = None, t_n_ctx: int = T_N_CTX,
                  dpam_start: int | str | None = "preset", cache_features: bool | None = None,
                  cache_limit_gb: float = 4.0, device: str | torch.device | None = None, workers: int = 0,
                  progress: bool = True, log: Callable[[str], None] | None = print, preset: str = "official",
                  splits: Sequence[str] | None = None, **options: Any) -> TrainResult:
    """Train AnomalyCLIP prompts on an MVTec-layout folder; checkpoint after every epoch.

    Writes ``out`` (prompts, safetensors) + ``out``'s ``.json`` config after each epoch, and the
    optimizer state + epoch counter as ``NAME.train.safetensors/.json`` beside it, so
    ``resume=True`` continues where the last run stopped (same shuffling: the order of epoch
    ``e`` depends only on ``seed`` and ``e``). Adam with betas (0.5, 0.999) as the official code.
    Image features are frozen, so they are computed once and cached in memory when they fit
    (``cache_limit_gb``); epochs then cost only the text encoder. ``preset`` / ``options`` as
    :class:`AnomalyCLIP`; ``splits``: folder splits to train on (default: the preset's, official
    ``("test",)``, as the official ``Dataset(mode='test')``).
    """
    bb = load_backbone(backbone, device=device) if isinstance(backbone, str) else backbone
    from_folder = isinstance(data, (str, os.PathLike))
    if splits is None:
        splits = options.get("train_splits") or PRESETS[preset]["train_splits"]
    samples = scan_mvtec(data, splits=tuple(splits)) if from_folder else list(data)
    st_path, _ = _paths(out)

    state = load_train_state(st_path) if resume else None
    start_epoch, history = 0, []
    if resume and st_path.is_file():
        tensors, cfg_json = read_checkpoint(st_path)
        det = AnomalyCLIP.from_state(bb, tensors, cfg_json)
        if state is None:
            start_epoch = int(det.config.training.get("epochs", 0))
            if log:
                log(f"no optimizer state beside {st_path.name}: continuing its prompts with a fresh optimizer")
    else:
        if resume and log:
            log(f"no checkpoint at {st_path}: starting from scratch")
        det = AnomalyCLIP(bb, preset=preset, n_ctx=n_ctx, depth=depth, t_n_ctx=t_n_ctx, dpam_start=dpam_start,
                          seed=seed, random_prompts=True, train_splits=tuple(splits), **options)
        state = None
    size = int(image_size or det.config.image_size or bb.preprocess.size)  # official: 518 for ViT-L-14-336
    det.config.image_size = size
    params = list(det.parameters())
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
    if state is not None:
        opt_state, info = state
        opt.load_state_dict(opt_state)
        for gparams in opt.param_groups:
            gparams["lr"] = lr
        start_epoch = int(info.get("epoch", 0))
        history = list(info.get("history", []))
        seed = int(info.get("seed", seed))
        if log:
            log(f"resuming {st_path.name} after epoch {start_epoch}")

    ds = MaskedImages(samples, size)
    annotated = sum(s.has_mask for s in samples)
    if log:
        n_bad = sum(s.label for s in samples)
        log(f"{len(samples)} images ({n_bad} anomalous, {annotated} with pixel truth) at {size}px on {bb.device}; "
            f"epochs {start_epoch + 1}..{epochs}")
    if annotated == 0 and log:
        log("no pixel masks found: training with the image-level loss only")

    # Feature cache: estimate bytes = N * (layers * tokens + 1) * E * 2 (fp16).
    grid = bb.patch_grid(size, size)
    per_image = (len(det.config.feature_layers) * grid[0] * grid[1] + 1) * bb.embed_dim * 2
    if cache_features is None:
        cache_features = len(samples) * per_image <= cache_limit_gb * 1024**3
    cache: dict[int, tuple[Tensor, list[Tensor]]] = {}
    loader_kw = dict(batch_size=batch_size, num_workers=workers, drop_last=False)
    if cache_features and start_epoch < epochs:
        cache_dtype = torch.float32 if bb.device.type == "cpu" else torch.float16
        loader = torch.utils.data.DataLoader(ds, shuffle=False, **loader_kw)
        for x, _m, _h, _l, idx in _progress(loader, len(loader), "features", progress):
            with det._autocast():
                g, patches, _ = det.image_features(x)
            for j, i in enumerate(idx.tolist()):
                cache[i] = (g[j].to("cpu", cache_dtype), [p[j].to("cpu", cache_dtype) for p in patches])

    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(ds), generator=gen).tolist()
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        sums = {"loss": 0.0, "map_loss": 0.0, "image_loss": 0.0}
        bar = _progress(batches, len(batches), f"epoch {epoch + 1}/{epochs}", progress)
        for ids in bar:
            items = [ds[i] for i in ids]
            x = torch.stack([it[0] for it in items])
            masks = torch.stack([it[1] for it in items])
            has_mask = torch.stack([it[2] for it in items])
            labels = torch.stack([it[3] for it in items])
            feats = None
            if cache_features:
                g = torch.stack([cache[i][0] for i in ids])
                patches = [torch.stack([cache[i][1][k] for i in ids]) for k in range(len(det.config.feature_layers))]
                feats = (g, patches, grid)
            total, map_loss, image_loss = det.loss(x, masks, has_mask, labels, features=feats)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            n = len(ids)
            sums["loss"] += float(total.detach()) * n
            sums["map_loss"] += float(map_loss) * n
            sums["image_loss"] += float(image_loss) * n
            bar.set_postfix(loss=f"{float(total.detach()):.4f}")
        rec = {k: v / len(ds) for k, v in sums.items()}
        rec["epoch"] = epoch + 1
        history.append(rec)
        det.config.training = {"data": str(data) if from_folder else "<samples>",
                               "epochs": epoch + 1, "lr": lr, "batch_size": batch_size, "image_size": size,
                               "samples": len(samples), "annotated": annotated, "seed": seed,
                               "last": rec}
        det.save(st_path)
        save_train_state(st_path, opt, {"epoch": epoch + 1, "history": history, "seed": seed, "epochs": epochs})
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {rec['loss']:.4f} (map {rec['map_loss']:.4f}, "
                f"image {rec['image_loss']:.4f}) -> {st_path}")
    if start_epoch >= epochs and log:
        log(f"{st_path.name} already has {start_epoch} epochs (asked for {epochs}): nothing to do")
    if not st_path.is_file():  # epochs == 0: still write the (untrained) prompts
        det.save(st_path)
    return TrainResult(st_path, max(start_epoch, epochs), history, len(samples), annotated, start_epoch)


__all__ = ["MaskedImages", "Sample", "TrainResult", "scan_mvtec", "train_prompts"]
