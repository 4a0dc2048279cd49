"""Vision-transformer patch backbones: open_clip CLIP and timm DINOv2.

Both return the patch tokens of chosen transformer blocks, reshaped to ``[B,h,w,C]``, from one
forward pass. CLIP backbones keep the whole open_clip model so AnomalyCLIP can use its text
encoder and its visual projection.

Weights come only from a local file (``models/`` or a cache). When the file is missing the
loader raises :class:`MissingWeightsError` naming the file to place and where to get it; it never
falls back to random weights. Random weights exist only in the tiny test configs (``clip/tiny``,
``dinov2/tiny``), which are marked ``is_random``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MissingWeightsError,
    PatchBackbone,
    Preprocess,
)


def _tokens_to_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, h*w, C]`` patch tokens (no prefix tokens) -> ``[B,h,w,C]``."""
    b, n, c = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"expected {h}x{w}={h * w} patch tokens, got {n}")
    return tokens.reshape(b, h, w, c)


def _even_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """Evenly spaced block indices ending at the last block, e.g. 24 blocks -> (5, 11, 17, 23).

    AnomalyCLIP uses layers 6/12/18/24 of ViT-L (1-based); this generalises it by depth.
    """
    step = depth / count
    return tuple(int(round(step * (i + 1))) - 1 for i in range(count))


class ClipBackbone(PatchBackbone):
    """open_clip visual tower; patch tokens of blocks ``layer_ids`` (0-based) after each block."""

    def __init__(self, model: nn.Module, *, name: str, layer_ids: Sequence[int] | None = None,
                 image_size: int | None = None, is_random: bool = False, tokenizer=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.is_random = is_random
        self.tokenizer = tokenizer
        visual = model.visual
        depth = len(visual.transformer.resblocks)
        self.layer_ids = tuple(layer_ids) if layer_ids is not None else _even_layers(depth)
        self.layers = tuple(f"block{i + 1}" for i in self.layer_ids)
        width = visual.transformer.width
        self.dims = {k: width for k in self.layers}
        patch = visual.patch_size
        self.stride = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        native = visual.image_size
        native = native[0] if isinstance(native, (tuple, list)) else int(native)
        self.native_size = native
        self.preprocess = Preprocess(image_size or native, CLIP_MEAN, CLIP_STD)
        self.embed_dim = int(visual.output_dim)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        grid = self.patch_grid(*x.shape[-2:])
        out = self.visual.forward_intermediates(
            x, indices=list(self.layer_ids), intermediates_only=True, output_fmt="NLC"
        )
        inter = out["image_intermediates"] if isinstance(out, dict) else out
        return {name: _tokens_to_grid(t, grid) for name, t in zip(self.layers, inter)}

    # -- text side, for AnomalyCLIP ---------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens.to(self.device))

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images.to(self.device))


class Dinov2Backbone(PatchBackbone):
    """timm DINOv2 ViT; patch tokens (register/class tokens dropped) of blocks ``layer_ids``."""

    def __init__(self, model: nn.Module, *, name: str, layer_ids: Sequence[int] | None = None,
                 image_size: int = 448, is_random: bool = False):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.is_random = is_random
        depth = len(model.blocks)
        self.layer_ids = tuple(layer_ids) if layer_ids is not None else _even_layers(depth)
        self.layers = tuple(f"block{i + 1}" for i in self.layer_ids)
        self.dims = {k: int(model.embed_dim) for k in self.layers}
        patch = model.patch_embed.patch_size
        self.stride = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        self.preprocess = Preprocess(image_size, IMAGENET_MEAN, IMAGENET_STD)

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        grid = self.patch_grid(*x.shape[-2:])
        inter = self.model.forward_intermediates(
            x, indices=list(self.layer_ids), intermediates_only=True, output_fmt="NLC"
        )
        return {name: _tokens_to_grid(t, grid) for name, t in zip(self.layers, inter)}


# -- construction --------------------------------------------------------------------------------

CLIP_WEIGHTS = {
    # arch: (file under models/clip/, how to obtain it)
    "ViT-L-14-336": ("ViT-L-14-336px.pt", "OpenAI CLIP release (open_clip pretrained='openai'), file ViT-L-14-336px.pt"),
    "ViT-L-14": ("ViT-L-14.pt", "OpenAI CLIP release (open_clip pretrained='openai'), file ViT-L-14.pt"),
    "ViT-B-16": ("ViT-B-16.pt", "OpenAI CLIP release (open_clip pretrained='openai'), file ViT-B-16.pt"),
    "ViT-B-32": ("ViT-B-32.pt", "OpenAI CLIP release (open_clip pretrained='openai'), file ViT-B-32.pt"),
}
DINOV2_WEIGHTS = {
    # size: (timm model name, file under models/dinov2/, source)
    "small": ("vit_small_patch14_dinov2.lvd142m", "dinov2_vits14.safetensors", "timm/vit_small_patch14_dinov2.lvd142m (model.safetensors)"),
    "base": ("vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14.safetensors", "timm/vit_base_patch14_dinov2.lvd142m (model.safetensors)"),
    "large": ("vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14.safetensors", "timm/vit_large_patch14_dinov2.lvd142m (model.safetensors)"),
}


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def clip_weights_file(arch: str, models_dir: Path) -> Path:
    """The expected local weights file for ``clip/<arch>``, or raise MissingWeightsError."""
    fname, source = CLIP_WEIGHTS.get(arch, (f"{arch}.pt", f"an open_clip checkpoint for {arch}"))
    stem = Path(fname).stem
    candidates = [models_dir / "clip" / fname]
    candidates += [models_dir / "clip" / f"{stem}{ext}" for ext in (".safetensors", ".bin", ".pth")]
    candidates += [models_dir / "clip" / f"{arch}{ext}" for ext in (".pt", ".safetensors", ".bin")]
    found = _first_existing(candidates)
    if found is None:
        raise MissingWeightsError(
            f"CLIP weights for 'clip/{arch}' not found. Place the file at {models_dir / 'clip' / fname} "
            f"(source: {source}; see models/README.md). No random weights are used outside tests."
        )
    return found


def load_clip(arch: str, models_dir: Path, **kwargs) -> ClipBackbone:
    import open_clip

    path = clip_weights_file(arch, models_dir)
    model = open_clip.create_model(arch, pretrained=str(path), device="cpu")
    return ClipBackbone(model, name=f"clip/{arch}", tokenizer=open_clip.get_tokenizer(arch), **kwargs)


def load_dinov2(size: str, models_dir: Path, image_size: int = 448, **kwargs) -> Dinov2Backbone:
    import timm

    if size not in DINOV2_WEIGHTS:
        raise KeyError(f"unknown DINOv2 size {size!r}; choose from {sorted(DINOV2_WEIGHTS)} or 'tiny'")
    timm_name, fname, source = DINOV2_WEIGHTS[size]
    path = models_dir / "dinov2" / fname
    if not path.is_file():
        raise MissingWeightsError(
            f"DINOv2 weights for 'dinov2/{size}' not found. Place the file at {path} "
            f"(source: {source}; see models/README.md). No random weights are used outside tests."
        )
    model = timm.create_model(
        timm_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, img_size=image_size,
        dynamic_img_size=True,
    )
    return Dinov2Backbone(model, name=f"dinov2/{size}", image_size=image_size, **kwargs)


def tiny_clip(image_size: int = 64, seed: int = 0) -> ClipBackbone:
    """Randomly initialised 4-block CLIP (tests only): same open_clip code path as ViT-L."""
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=32,
        vision_cfg={"image_size": image_size, "patch_size": 8, "width": 48, "layers": 4, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4},
    )
    return ClipBackbone(
        model, name="clip/tiny", is_random=True, tokenizer=open_clip.get_tokenizer("ViT-B-16")
    )


def tiny_dinov2(image_size: int = 56, seed: int = 0) -> Dinov2Backbone:
    """Randomly initialised 4-block DINOv2-style ViT (tests only)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=image_size, patch_size=14, embed_dim=48, depth=4, num_heads=3, num_classes=0,
        init_values=1e-5, reg_tokens=0, dynamic_img_size=True,
    )
    return Dinov2Backbone(model, name="dinov2/tiny", image_size=image_size, is_random=True)
