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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inspector.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MissingWeightsError,
    PatchBackbone,
    Preprocess,
)
from inspector.backbones.configs import BACKBONES, BackboneConfig, clip_config


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
    return tuple(sorted({min(depth - 1, max(0, int(round(step * (i + 1))) - 1)) for i in range(count)}))


def vv_attention(blk: nn.Module, a: Tensor) -> Tensor:
    """AnomalyCLIP's V-V self-attention (DPAM) of one open_clip block on its ``ln_1`` output.

    ``out_proj(softmax(V V^T / sqrt(d)) V)`` per head with the block's own value and output
    projections, as the official ``Attention`` with ``q = k = v``. ``a`` is ``[B, N, C]``.
    """
    attn = blk.attn
    if not isinstance(attn, nn.MultiheadAttention):
        raise TypeError(f"DPAM needs nn.MultiheadAttention blocks, got {type(attn).__name__}")
    b, n, c = a.shape
    heads = attn.num_heads
    w_v = attn.in_proj_weight[2 * c:] if attn._qkv_same_embed_dim else attn.v_proj_weight
    b_v = attn.in_proj_bias[2 * c:] if attn.in_proj_bias is not None else None
    v = F.linear(a, w_v, b_v).view(b, n, heads, c // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(v, v, v)
    o = o.transpose(1, 2).reshape(b, n, c)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)


@dataclass
class ClipPass:
    """Everything one visual forward yields, for every detector on the same images.

    ``tokens[i]``: residual stream after block ``i`` (0-based), ``[B, 1+h*w, C]`` (CLS first, raw:
    no ``ln_post``); ``vv[i]``: AnomalyCLIP's V-V (DPAM) path after block ``i``, branching from the
    same stream; ``cls``: final CLS token before ``ln_post``; ``grid``: ``(h, w)``.
    """

    tokens: dict[int, Tensor]
    vv: dict[int, Tensor]
    cls: Tensor
    grid: tuple[int, int]


class ClipBackbone(PatchBackbone):
    """open_clip visual tower; patch tokens of blocks ``layer_ids`` (0-based) after each block.

    Any input size: the positional embedding is interpolated to the input's patch grid with
    ``pos_interp``, ``align_corners=False``, no antialias: ``bicubic`` as the official MuSc (its
    vendored open_clip ``resize_pos_embed``; current open_clip adds ``antialias=True``, another
    bicubic kernel) or ``bilinear`` as the official AnomalyCLIP. Non-square grids work too. :meth:`run` is the one
    forward shared by MuSc and AnomalyCLIP (:class:`ClipPass`).
    """

    def __init__(self, model: nn.Module, *, name: str, layer_ids: Sequence[int] | None = None,
                 image_size: int | None = None, is_random: bool = False, tokenizer=None,
                 pos_interp: str = "bicubic"):
        super().__init__()
        if pos_interp not in ("bicubic", "bilinear"):
            raise ValueError(f"pos_interp must be bicubic or bilinear, got {pos_interp!r}")
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.is_random = is_random
        self.tokenizer = tokenizer
        self.pos_interp = pos_interp
        visual = model.visual
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("attentional-pool CLIP towers (CoCa) are not supported")
        depth = len(visual.transformer.resblocks)
        self.depth = depth
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
        self._pos_cache: dict[tuple, Tensor] = {}

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    def pos_embed(self, h: int, w: int, mode: str | None = None) -> Tensor:
        """``[1 + h*w, C]`` positional embedding for an ``h x w`` patch grid (CLS row unchanged)."""
        mode = mode or self.pos_interp
        pos = self.visual.positional_embedding
        gh, gw = self.visual.grid_size
        if (h, w) == (gh, gw):
            return pos
        key = (h, w, mode, pos.device, pos.dtype, pos._version)
        if key not in self._pos_cache:
            with torch.no_grad():
                grid_pos = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2).float()
                grid_pos = F.interpolate(grid_pos, size=(h, w), mode=mode, align_corners=False)
                grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)
                self._pos_cache = {key: torch.cat([pos[:1], grid_pos])}  # keep only the latest grid
        return self._pos_cache[key]

    def run(self, x: Tensor, layers: Sequence[int] | None = None, *, dpam_start: int | None = None,
            vv_layers: Sequence[int] = (), pos_interp: str | None = None) -> ClipPass:
        """One visual forward of ``x [B,3,H,W]`` (any ``H, W`` divisible by the patch size).

        ``layers``: blocks whose residual stream is kept (default ``layer_ids``). ``dpam_start``:
        from this block on, the V-V path accumulates ``ls_1(vv_attention(ln_1(t)))`` on top of the
        stream it branched from (the official dual path with ``ffn=False``); ``vv_layers``: blocks
        whose V-V path is kept. The Q-K stream is never changed, so ``cls`` is ``encode_image``'s.
        ``pos_interp`` overrides the backbone's interpolation mode for this call.
        """
        v = self.visual
        keep = set(self.layer_ids if layers is None else layers)
        vv_keep = set(vv_layers)
        if vv_keep and (dpam_start is None or min(vv_keep) < dpam_start):
            raise ValueError(f"vv_layers {sorted(vv_keep)} need dpam_start <= {min(vv_keep)}")
        t = v.conv1(x.to(v.conv1.weight.dtype))
        b, c, h, w = t.shape
        t = t.reshape(b, c, h * w).permute(0, 2, 1)
        t = torch.cat([v.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(t.dtype), t], dim=1)
        t = t + self.pos_embed(h, w, pos_interp).to(t.dtype)
        t = v.patch_dropout(t)
        t = v.ln_pre(t)
        tr = v.transformer
        batch_first = getattr(tr, "batch_first", True)
        side: Tensor | None = None
        tokens: dict[int, Tensor] = {}
        vv: dict[int, Tensor] = {}
        for i, blk in enumerate(tr.resblocks):
            if dpam_start is not None and dpam_start <= i <= (max(vv_keep) if vv_keep else -1):
                y = blk.ls_1(vv_attention(blk, blk.ln_1(t)))
                side = (t if side is None else side) + y
            t = blk(t) if batch_first else blk(t.transpose(0, 1)).transpose(0, 1)
            if i in keep:
                tokens[i] = t
            if i in vv_keep:
                vv[i] = side
        return ClipPass(tokens, vv, t[:, 0], (h, w))

    def global_embedding(self, cls: Tensor, ln_post: bool = True) -> Tensor:
        """Projected global embedding from the final CLS token (``ln_post=True``: ``encode_image``)."""
        v = self.visual
        g = v.ln_post(cls) if ln_post else cls
        return g @ v.proj if v.proj is not None else g

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """``ln_post`` + ``proj`` of patch tokens (AnomalyCLIP's patch features)."""
        v = self.visual
        p = v.ln_post(tokens)
        return p @ v.proj if v.proj is not None else p

    def pass_features(self, out: ClipPass) -> dict[str, Tensor]:
        """The :class:`PatchBackbone` feature dict ``{blockN: [B,h,w,C]}`` of a pass."""
        return {name: _tokens_to_grid(out.tokens[i][:, 1:], out.grid) for name, i in zip(self.layers, self.layer_ids)}

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        return self.pass_features(self.run(x))

    # -- text side, for AnomalyCLIP ---------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens.to(self.device))

    def encode_image(self, images: Tensor) -> Tensor:
        """Global embedding through this backbone's forward (any input size)."""
        return self.global_embedding(self.run(images.to(self.device), layers=()).cls)


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

def clip_weights_file(arch: str, models_dir: Path) -> Path:
    """The imported weights file for ``clip/<arch>`` (``models/clip/<arch>.safetensors``), or raise
    MissingWeightsError saying which release file to import and how."""
    from inspector.backbones.weights import clip_safetensors

    path = clip_safetensors(models_dir, arch)
    if not path.is_file():
        cfg = clip_config(arch)
        raise MissingWeightsError(
            f"CLIP weights for 'clip/{arch}' not found at {path}. Import them once with "
            f"`inspector weights import {cfg.release} --as clip/{arch}` (source: {cfg.source}; see models/README.md). "
            "No random weights are used outside tests.")
    return path


def load_clip(arch: str, models_dir: Path, image_size: int | None = None, pos_interp: str = "bicubic",
              **kwargs) -> ClipBackbone:
    """``clip/<arch>`` from its imported safetensors (sha256-checked, OpenAI weights with QuickGELU)."""
    import open_clip

    from inspector.backbones.weights import load_clip_model

    clip_weights_file(arch, models_dir)
    model = load_clip_model(arch, models_dir)
    return ClipBackbone(model, name=f"clip/{arch}", tokenizer=open_clip.get_tokenizer(arch),
                        image_size=image_size, pos_interp=pos_interp, **kwargs)


def load_dinov2(size: str, models_dir: Path, image_size: int | None = None, **kwargs) -> Dinov2Backbone:
    """``dinov2/<size>`` from ``models/dinov2/`` (the timm ``model.safetensors``); ``image_size`` None:
    the row's default in :mod:`inspector.backbones.configs`."""
    import timm

    cfg = BACKBONES.get(f"dinov2/{size}")
    if cfg is None or cfg.test_only:
        sizes = sorted(n.split("/", 1)[1] for n, c in BACKBONES.items() if n.startswith("dinov2/") and not c.test_only)
        raise KeyError(f"unknown DINOv2 size {size!r}; choose from {sizes} or 'tiny'")
    image_size = image_size or cfg.image_size
    path = models_dir / cfg.weights
    if not path.is_file():
        raise MissingWeightsError(
            f"DINOv2 weights for 'dinov2/{size}' not found. Place the file at {path} "
            f"(source: {cfg.source}; see models/README.md). No random weights are used outside tests."
        )
    model = timm.create_model(
        cfg.arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, img_size=image_size,
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


# -- construction from a row of inspector.backbones.configs ---------------------------------------


def _layer_ids(cfg: BackboneConfig) -> tuple[int, ...] | None:
    """``("block6", ...)`` -> 0-based block indices; None (the evenly spaced default) when not given."""
    return tuple(int(layer.removeprefix("block")) - 1 for layer in cfg.layers) or None


def build_clip(cfg: BackboneConfig, models_dir: Path, image_size: int | None = None) -> ClipBackbone:
    return load_clip(cfg.arch, models_dir, image_size=image_size or cfg.image_size or None, layer_ids=_layer_ids(cfg))


def build_dinov2(cfg: BackboneConfig, models_dir: Path, image_size: int | None = None) -> Dinov2Backbone:
    return load_dinov2(cfg.name.split("/", 1)[1], models_dir, image_size=image_size, layer_ids=_layer_ids(cfg))


def build_tiny_clip(cfg: BackboneConfig, models_dir: Path, image_size: int | None = None) -> ClipBackbone:
    return tiny_clip(image_size=image_size or cfg.image_size)


def build_tiny_dinov2(cfg: BackboneConfig, models_dir: Path, image_size: int | None = None) -> Dinov2Backbone:
    return tiny_dinov2(image_size=image_size or cfg.image_size)
