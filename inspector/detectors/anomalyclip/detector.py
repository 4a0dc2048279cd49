"""AnomalyCLIP: zero-shot anomaly detection with object-agnostic prompts on the shared CLIP backbone.

After Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly
Detection" (ICLR 2024) and its official code (github.com/zqhang/AnomalyCLIP). Two text prompts
are learned once, on any annotated auxiliary data (real or generated defects), and then detect
anomalies on products never seen in training:

* **Object-agnostic prompts** ``[V1..VE] object.`` / ``[W1..WE] damaged object.`` with
  ``E = n_ctx`` (12) learnable word embeddings each, plus **deep text tokens**: ``t_n_ctx`` (4)
  learnable tokens that *replace* positions ``1..t_n_ctx`` of the text stream before each of
  the text blocks ``1 .. depth-1`` (depth 9 of 12 for CLIP-L; scaled by depth for other towers).
  Text and image encoders stay frozen: only :class:`PromptLearner` has parameters.
* **DPAM** (diagonally prominent attention map): from block ``dpam_start`` on, a *parallel*
  path accumulates V-V self-attention (``softmax(V V^T / sqrt(d)) V``, with the block's own
  value and output projections, no MLP) computed from the original stream, exactly as the
  official dual path with ``ffn=False``. The original Q-K stream is untouched. Patch tokens for
  the maps come from the V-V path. The official ``DPAM_layer=20`` replaces
  ``resblocks[-1..-19]``: blocks 6..24 of ViT-L/14 (``dpam_start`` 5, :func:`official_dpam_start`).
* **Maps**: patch tokens of the feature layers through ``ln_post`` + ``proj``, L2-normalised,
  cosine similarity with the two text embeddings, ``softmax(sim / 0.07)``, bilinear upsampling to
  the input size; the anomaly channel is averaged over layers and smoothed (Gaussian, sigma 4;
  scipy's edge-repeating padding as the official test).
* **Image score**: ``(1 - w) * p_anomalous(global embedding) + w * max(map)``; both terms lie in
  [0, 1], so the score does too.
* **Training loss** (official): ``4 * sum_layers(focal + dice(anomaly, mask) + dice(normal,
  1 - mask)) + cross_entropy(global logits / 0.07, label)``. Samples without a pixel mask
  contribute only the image-level term.

Presets (:data:`PRESETS`). ``official`` (default) is the code that produced the paper's numbers
and the released checkpoints (test.sh / train.sh): layer 24 only, DPAM on the last 19 blocks,
518 px, bilinear position interpolation, global embedding = CLS @ proj without ``ln_post``,
``w = 0``, training on the auxiliary set's test split. ``project`` keeps this repository's earlier
choices (layers 6/12/18/24 averaged, DPAM from the first feature layer, bicubic, ``ln_post`` on
the global embedding, ``w = 0.5``, train + test splits); each is an option, none is measured better.

Differences from the official code, on purpose: it runs on open_clip models without changing
them (the shared backbone is never patched; V-V attention is computed functionally from each
block's weights, in the same :meth:`ClipBackbone.run` that MuSc uses), positional embeddings are
interpolated for any input size (also non-square), everything is batch-size invariant (the
official code assumes batch 1 at test and squeezes masks in training), and layer maps are
averaged (the official test sums them: identical for the official single layer).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inspector.backbones.base import CLIP_MEAN, CLIP_STD, Preprocess
from inspector.backbones.registry import MissingWeightsError, PatchBackbone, load_backbone, models_dir
from inspector.detectors.base import AnomalyResult, gaussian_blur

FORMAT = "inspector.anomalyclip/1"
DEFAULT_BACKBONE = "clip/ViT-L-14-336"

# Paper / official defaults (ViT-L/14@336px, 24 visual and 12 text blocks).
N_CTX = 12
T_N_CTX = 4
DEPTH_OF_12 = 9
TEMPERATURE = 0.07
FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
MAP_LOSS_WEIGHT = 4.0


# ---------------------------------------------------------------------------------------------
# configuration and prompts
# ---------------------------------------------------------------------------------------------


@dataclass
class AnomalyCLIPConfig:
    """Everything needed to rebuild a detector from a prompt checkpoint (saved as JSON)."""

    backbone: str
    n_ctx: int = N_CTX
    depth: int = DEPTH_OF_12
    t_n_ctx: int = T_N_CTX
    feature_layers: tuple[int, ...] = ()  # 0-based visual block indices
    dpam_start: int | None = None  # 0-based block where the V-V path starts; None = no DPAM
    temperature: float = TEMPERATURE
    sigma: float = 4.0
    map_weight: float = 0.0
    normal_text: str = "object"
    abnormal_text: str = "damaged object"
    image_size: int | None = None  # training / official resolution (any size works at inference)
    seed: int = 0
    pos_interp: str = "bilinear"  # positional-embedding interpolation (official: bilinear)
    global_ln_post: bool = False  # official: global embedding = CLS @ proj, without ln_post
    map_loss_weight: float = MAP_LOSS_WEIGHT
    train_splits: tuple[str, ...] = ("test",)  # official: the test split of the auxiliary set
    blur_padding: str = "symmetric"  # official: scipy gaussian_filter (edge repeated)
    preset: str = "official"
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        d["train_splits"] = list(self.train_splits)
        d["format"] = FORMAT
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AnomalyCLIPConfig:
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"not an AnomalyCLIP prompt checkpoint (format {fmt!r}, expected {FORMAT!r})")
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        if "preset" not in d:  # written before presets existed: the behaviour it was trained with
            kw.update({k: v for k, v in PRESETS["project"].items() if k in known and k not in d
                       and k not in ("feature_layers", "dpam_start")})
            kw["preset"] = "project"
        kw["feature_layers"] = tuple(int(i) for i in kw.get("feature_layers", ()))
        kw["train_splits"] = tuple(kw.get("train_splits", ("test",)))
        return cls(**kw)


# ``official``: zqhang/AnomalyCLIP as in its test.sh/train.sh (features_list 24, image_size 518,
# DPAM_layer 20, bilinear position interpolation, image score = global text probability only,
# global embedding without ln_post, prompts trained on the auxiliary set's test split, map loss x4).
# ``project``: this repository's earlier choices (4 layers averaged, DPAM from the first feature
# layer, bicubic, ln_post kept, 0.5 global + 0.5 map max, train+test). Not measured better: options.
PRESETS: dict[str, dict[str, Any]] = {
    "official": {"feature_layers": "last", "dpam_start": "official", "pos_interp": "bilinear",
                 "global_ln_post": False, "map_weight": 0.0, "sigma": 4.0, "map_loss_weight": MAP_LOSS_WEIGHT,
                 "train_splits": ("test",), "blur_padding": "symmetric"},
    "project": {"feature_layers": "even", "dpam_start": "auto", "pos_interp": "bicubic",
                "global_ln_post": True, "map_weight": 0.5, "sigma": 4.0, "map_loss_weight": MAP_LOSS_WEIGHT,
                "train_splits": ("train", "test"), "blur_padding": "reflect"},
}
OFFICIAL_DPAM_LAYER = 20  # official DPAM_layer: blocks [-1 .. -(DPAM_layer-1)] get the V-V path
OFFICIAL_IMAGE_SIZE = 518  # official test/train resolution for ViT-L/14@336px


def official_dpam_start(depth: int) -> int:
    """0-based first DPAM block of the official ``DAPM_replace(DPAM_layer=20)``: the last 19 blocks."""
    return max(0, depth - (OFFICIAL_DPAM_LAYER - 1))


def default_depth(text_layers: int) -> int:
    """Deep-prompt depth scaled from the paper's 9 of 12 text blocks (at least 1)."""
    return max(1, min(text_layers, int(round(DEPTH_OF_12 * text_layers / 12))))


class PromptLearner(nn.Module):
    """The only trainable part: two context vectors and the deep text tokens.

    Parameters (the checkpoint's tensors): ``ctx_normal`` and ``ctx_abnormal`` ``[n_ctx, D]``,
    ``deep.{i}`` ``[t_n_ctx, D]`` for ``i < depth - 1`` (deep token ``i`` enters before text
    block ``i + 1``). ``forward`` returns the two prompt embeddings ``[2, L, D]`` (normal
    first), their token ids ``[2, L]`` (for EOT pooling) and the deep tokens.
    """

    def __init__(self, token_embeds: Tensor, tokens: Tensor, n_ctx: int, depth: int, t_n_ctx: int,
                 seed: int = 0):
        super().__init__()
        if t_n_ctx > n_ctx and depth > 1:
            raise ValueError(f"t_n_ctx ({t_n_ctx}) must not exceed n_ctx ({n_ctx}): deep tokens replace context slots")
        dim = token_embeds.shape[-1]
        self.n_ctx, self.depth, self.t_n_ctx = n_ctx, depth, t_n_ctx
        g = torch.Generator().manual_seed(seed)
        # Official init: N(0, 0.02) for context and deep tokens.
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, dim, generator=g) * 0.02)
        self.ctx_abnormal = nn.Parameter(torch.randn(n_ctx, dim, generator=g) * 0.02)
        self.deep = nn.ParameterList(
            [nn.Parameter(torch.randn(t_n_ctx, dim, generator=g) * 0.02) for _ in range(depth - 1)]
        )
        # Fixed parts, rebuilt from the backbone: not saved.
        self.register_buffer("token_embeds", token_embeds.detach().clone(), persistent=False)
        self.register_buffer("tokens", tokens.detach().clone(), persistent=False)

    def forward(self) -> tuple[Tensor, Tensor, list[Tensor]]:
        ctx = torch.stack([self.ctx_normal, self.ctx_abnormal]).to(self.token_embeds.dtype)
        e = self.token_embeds
        embeds = torch.cat([e[:, :1], ctx, e[:, 1 + self.n_ctx:]], dim=1)
        return embeds, self.tokens, list(self.deep)


# ---------------------------------------------------------------------------------------------
# frozen encoders, run functionally over the shared open_clip model
# ---------------------------------------------------------------------------------------------


def encode_text_deep(model: nn.Module, embeds: Tensor, tokens: Tensor, deep: Sequence[Tensor] = ()) -> Tensor:
    """open_clip ``CLIP.encode_text`` on given token embeddings, with deep prompt tokens.

    ``embeds [N, L, D]`` replace ``token_embedding(tokens)``; ``deep[i] [t, D]`` replaces the
    stream positions ``1..t`` before text block ``i + 1``. With ``embeds =
    token_embedding(tokens)`` and no deep tokens this is ``model.encode_text(tokens)``, op for op.
    ``L`` may be shorter than the context length (positional embedding and causal mask are
    cut to ``L``): with a causal mask and EOT pooling, positions after the EOT never reach it.
    """
    from open_clip.transformer import text_global_pool

    tr = model.transformer
    cast = tr.get_cast_dtype()
    n_tok = embeds.shape[1]
    x = embeds.to(cast) + model.positional_embedding[:n_tok].to(cast)
    mask = model.attn_mask[:n_tok, :n_tok] if model.attn_mask is not None else None
    batch_first = getattr(tr, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for i, blk in enumerate(tr.resblocks):
        if 1 <= i <= len(deep):
            d = deep[i - 1]
            n = d.shape[0]
            if batch_first:
                ctx = d.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], ctx, x[:, 1 + n:]], dim=1)
            else:
                ctx = d.to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
                x = torch.cat([x[:1], ctx, x[1 + n:]], dim=0)
        x = blk(x, attn_mask=mask)
    if not batch_first:
        x = x.transpose(0, 1)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


@dataclass
class VisualOutput:
    """Global embedding ``[B, E]``, projected patch tokens per feature layer ``[B, h*w, E]`` (not
    normalised) and the patch grid."""

    global_embedding: Tensor
    patch_tokens: list[Tensor]
    grid: tuple[int, int]


def pass_spec(config: AnomalyCLIPConfig) -> dict[str, Any]:
    """What AnomalyCLIP needs from the shared :meth:`ClipBackbone.run`."""
    dpam = config.dpam_start
    return {"dpam_start": dpam, "vv_layers": tuple(config.feature_layers) if dpam is not None else (),
            "layers": () if dpam is not None else tuple(config.feature_layers), "pos_interp": config.pos_interp}


def visual_output(backbone: PatchBackbone, config: AnomalyCLIPConfig, out) -> VisualOutput:
    """AnomalyCLIP's image side from a shared pass (:class:`~inspector.backbones.vit.ClipPass`).

    Patch tokens: the V-V path (or, without DPAM, the residual stream) of each feature layer
    through ``ln_post`` + ``proj``; global: the final CLS through ``proj`` (``ln_post`` only with
    ``global_ln_post``, as ``encode_image``; the official code drops it).
    """
    src = out.vv if config.dpam_start is not None else out.tokens
    patches = [backbone.project_tokens(src[i][:, 1:]) for i in config.feature_layers]
    g = backbone.global_embedding(out.cls, ln_post=config.global_ln_post)
    return VisualOutput(g, patches, out.grid)


def run_visual(backbone: PatchBackbone, config: AnomalyCLIPConfig, images: Tensor) -> VisualOutput:
    """One visual forward of ``images`` with AnomalyCLIP's pass spec."""
    return visual_output(backbone, config, backbone.run(images, **pass_spec(config)))


def anomaly_outputs(config: AnomalyCLIPConfig, logits: Tensor, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Map ``[B,H,W]`` (anomaly channel averaged over layers, Gaussian ``sigma``) and image score
    ``(1 - map_weight) * p_anomalous(global) + map_weight * max(map)`` (official: weight 0)."""
    amap = torch.stack([m[:, 1] for m in maps]).mean(0)
    amap = gaussian_blur(amap.float(), config.sigma, config.blur_padding).clamp(0.0, 1.0)
    p_global = logits.float().softmax(-1)[:, 1]
    w = config.map_weight
    scores = p_global if w == 0 else (1 - w) * p_global + w * amap.flatten(1).amax(1)
    return amap, scores.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# losses (official AnomalyCLIP: focal + two dice terms on the maps, CE on the image score)
# ---------------------------------------------------------------------------------------------


def focal_loss(prob: Tensor, target: Tensor, gamma: float = FOCAL_GAMMA, smooth: float = FOCAL_SMOOTH) -> Tensor:
    """Focal loss on probabilities ``prob [B, 2, H, W]`` vs a binary ``target [B, H, W]``.

    As the official ``FocalLoss(apply_nonlin=None)``: one-hot clamped to ``[smooth, 1-smooth]``,
    ``pt = <one_hot, prob> + smooth``, ``-(1 - pt)^gamma log(pt)``, mean over pixels.
    """
    one_hot = torch.stack([1.0 - target, target], dim=1).clamp(smooth, 1.0 - smooth)
    pt = (one_hot * prob).sum(1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Official ``BinaryDiceLoss``: per-sample soft dice with smoothing 1, averaged over the batch."""
    p = pred.flatten(1)
    g = target.flatten(1)
    dice = (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)
    return 1 - dice.mean()


def anomalyclip_loss(prob_maps: Sequence[Tensor], masks: Tensor, has_mask: Tensor, logits: Tensor,
                     labels: Tensor, map_loss_weight: float = MAP_LOSS_WEIGHT) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, map_loss, image_loss)``; map terms only over samples with ``has_mask``."""
    image_loss = F.cross_entropy(logits.float(), labels.long())
    map_loss = logits.new_zeros(())
    sel = has_mask.bool()
    if bool(sel.any()):
        gt = masks[sel].float()
        for prob in prob_maps:
            p = prob[sel].float()
            map_loss = map_loss + focal_loss(p, gt) + dice_loss(p[:, 1], gt) + dice_loss(p[:, 0], 1 - gt)
        map_loss = map_loss_weight * map_loss
    return map_loss + image_loss, map_loss.detach(), image_loss.detach()


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------


def _causal_eot_pooling(model: nn.Module) -> bool:
    mask = getattr(model, "attn_mask", None)
    if getattr(model, "text_pool_type", None) != "argmax" or mask is None or mask.ndim != 2:
        return False
    causal = torch.full_like(mask, float("-inf")).triu(1)
    return bool(torch.equal(mask, causal))


class AnomalyCLIP:
    """Zero-shot detector: learned object-agnostic prompts + DPAM on a shared ``clip/...`` backbone.

    ``score(images)`` takes preprocessed ``Tensor[B,3,H,W]`` of any size (positional
    embeddings are interpolated), scores every image independently (``batchwise = False``; any
    batch split gives the same maps) and returns maps ``[B,H,W]`` and scores ``[B]`` in [0, 1].

    Construct with a prompt checkpoint for real use (``checkpoint=``, :meth:`load` or
    :meth:`from_pretrained`); without one the prompts are the seeded random initialisation
    (the starting point for training, and tests) and the detector is *not* meaningful.
    """

    name: ClassVar[str] = "anomalyclip"
    batchwise: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = False

    def __init__(self, backbone: PatchBackbone | str = DEFAULT_BACKBONE, *, preset: str = "official",
                 n_ctx: int = N_CTX, depth: int | None = None, t_n_ctx: int = T_N_CTX,
                 feature_layers: Sequence[int] | str | None = None, dpam_start: int | str | None = "preset",
                 temperature: float = TEMPERATURE, sigma: float | None = None, map_weight: float | None = None,
                 pos_interp: str | None = None, global_ln_post: bool | None = None,
                 map_loss_weight: float | None = None, train_splits: Sequence[str] | None = None,
                 blur_padding: str | None = None, normal_text: str = "object", abnormal_text: str = "damaged object", seed: int = 0,
                 chunk: int = 16, checkpoint: str | os.PathLike | None = None, random_prompts: bool = False,
                 image_size: int | None = None, device: str | torch.device | None = None):
        if preset not in PRESETS:
            raise ValueError(f"unknown AnomalyCLIP preset {preset!r}; choose from {sorted(PRESETS)}")
        loaded = None
        if checkpoint is not None:
            # A prompt checkpoint fixes the prompt structure and its preset; its config wins.
            tensors, cj = read_checkpoint(_checkpoint_path(checkpoint))
            loaded = (tensors, AnomalyCLIPConfig.from_json(cj))
            c = loaded[1]
            n_ctx, depth, t_n_ctx, feature_layers, dpam_start = c.n_ctx, c.depth, c.t_n_ctx, c.feature_layers, c.dpam_start
            temperature, normal_text, abnormal_text, seed = c.temperature, c.normal_text, c.abnormal_text, c.seed
            preset = c.preset
            sigma = c.sigma if sigma is None else sigma
            map_weight = c.map_weight if map_weight is None else map_weight
            pos_interp = c.pos_interp if pos_interp is None else pos_interp
            global_ln_post = c.global_ln_post if global_ln_post is None else global_ln_post
            map_loss_weight = c.map_loss_weight if map_loss_weight is None else map_loss_weight
            train_splits = c.train_splits if train_splits is None else train_splits
            blur_padding = c.blur_padding if blur_padding is None else blur_padding
            image_size = c.image_size if image_size is None else image_size
            if isinstance(backbone, str) and backbone != c.backbone:
                backbone = c.backbone if backbone == DEFAULT_BACKBONE else backbone
        bb = load_backbone(backbone, device=device) if isinstance(backbone, str) else backbone
        if not hasattr(bb, "model") or not hasattr(bb.model, "visual") or not hasattr(bb, "tokenize"):
            raise TypeError(f"AnomalyCLIP needs a clip/... backbone with a text tower, got {bb.name!r}")
        if loaded is not None and bb.name != loaded[1].backbone:
            raise ValueError(f"prompts in {checkpoint} were trained on {loaded[1].backbone!r}, not {bb.name!r}")
        if loaded is None and not random_prompts and not getattr(bb, "is_random", False):
            raise MissingWeightsError(
                f"AnomalyCLIP on {bb.name} needs trained prompts: import the official checkpoint with "
                f"`inspector weights import epoch_15.pth --as anomalyclip/NAME --backbone {bb.name}` (or train "
                f"them with `inspector train anomalyclip`), then pass checkpoint NAME (register: --config "
                "'{\"checkpoint\": \"NAME\"}'). Random prompts are not a detector.")
        self.backbone = bb
        model = bb.model
        p = PRESETS[preset]
        depth_v = len(model.visual.transformer.resblocks)
        if feature_layers is None:
            feature_layers = p["feature_layers"]
        if feature_layers == "last":
            layers: tuple[int, ...] = (depth_v - 1,)
        elif feature_layers == "even":
            layers = tuple(bb.layer_ids)
        else:
            layers = tuple(int(i) for i in feature_layers)
        if not layers or min(layers) < 0 or max(layers) >= depth_v:
            raise ValueError(f"feature layers {layers} out of range for {depth_v} blocks")
        if dpam_start == "preset":
            dpam_start = p["dpam_start"]
        if dpam_start == "auto":
            dpam_start = layers[0]
        elif dpam_start == "official":
            dpam_start = official_dpam_start(depth_v)
        if dpam_start is not None and not 0 <= int(dpam_start) <= min(layers):
            raise ValueError(f"dpam_start {dpam_start} must be in 0..{min(layers)} (the first feature layer)")
        if image_size is None and preset == "official" and bb.name == DEFAULT_BACKBONE:
            image_size = OFFICIAL_IMAGE_SIZE
        text_layers = len(model.transformer.resblocks)
        self.config = AnomalyCLIPConfig(
            backbone=bb.name, n_ctx=n_ctx, depth=depth if depth is not None else default_depth(text_layers),
            t_n_ctx=t_n_ctx, feature_layers=layers, dpam_start=None if dpam_start is None else int(dpam_start),
            temperature=temperature, sigma=p["sigma"] if sigma is None else float(sigma),
            map_weight=p["map_weight"] if map_weight is None else float(map_weight),
            normal_text=normal_text, abnormal_text=abnormal_text, seed=seed, image_size=image_size,
            pos_interp=p["pos_interp"] if pos_interp is None else pos_interp,
            global_ln_post=p["global_ln_post"] if global_ln_post is None else bool(global_ln_post),
            map_loss_weight=p["map_loss_weight"] if map_loss_weight is None else float(map_loss_weight),
            train_splits=tuple(p["train_splits"] if train_splits is None else train_splits), preset=preset,
            blur_padding=p["blur_padding"] if blur_padding is None else blur_padding,
        )
        if self.config.pos_interp not in ("bicubic", "bilinear"):
            raise ValueError(f"pos_interp must be bicubic or bilinear, got {self.config.pos_interp!r}")
        if not 1 <= self.config.depth <= text_layers:
            raise ValueError(f"depth {self.config.depth} must be in 1..{text_layers} (text blocks)")
        self.chunk = max(1, int(chunk))
        self.prompts = self._build_prompts().to(bb.device)
        self._text_cache: tuple[tuple, Tensor] | None = None
        if loaded is not None:
            self.config.training = loaded[1].training
            self.load_tensors(loaded[0])

    @classmethod
    def default_image_size(cls, backbone: str, config: dict[str, Any] | None = None) -> int | None:
        """Input size a product should use: the prompt checkpoint's, else 518 px for the official
        preset on ViT-L-14-336 (the papers' setting), else None (the backbone's native size)."""
        config = dict(config or {})
        if config.get("image_size"):
            return int(config["image_size"])
        if config.get("checkpoint") is not None:
            _, js = _paths(_checkpoint_path(config["checkpoint"]))
            if js.is_file():
                return json.loads(js.read_text()).get("image_size")
        if config.get("preset", "official") == "official" and backbone == DEFAULT_BACKBONE:
            return OFFICIAL_IMAGE_SIZE
        return None

    # -- construction helpers ----------------------------------------------------------------
    def _build_prompts(self) -> PromptLearner:
        cfg = self.config
        model = self.backbone.model
        prefix = " ".join(["X"] * cfg.n_ctx)
        texts = [f"{prefix} {cfg.normal_text}.", f"{prefix} {cfg.abnormal_text}."]
        tokens = self.backbone.tokenize(texts).to(self.backbone.device)
        if _causal_eot_pooling(model):
            # Nothing after the EOT reaches the pooled EOT token under a causal mask: drop the
            # padding (77 -> ~17 tokens), a 4x cheaper text encoder for training and inference.
            tokens = tokens[:, : int(tokens.argmax(-1).max()) + 1]
        with torch.no_grad():
            embeds = model.token_embedding(tokens).to(model.transformer.get_cast_dtype())
        return PromptLearner(embeds, tokens, cfg.n_ctx, cfg.depth, cfg.t_n_ctx, seed=cfg.seed)

    @classmethod
    def from_state(cls, backbone: PatchBackbone | None, tensors: dict[str, Tensor], config: dict[str, Any],
                   device: str | torch.device | None = None) -> AnomalyCLIP:
        cfg = AnomalyCLIPConfig.from_json(config)
        if backbone is None:
            backbone = load_backbone(cfg.backbone, device=device)  # MissingWeightsError without weights
        elif backbone.name != cfg.backbone:
            raise ValueError(f"prompts were trained on {cfg.backbone!r}, not {backbone.name!r}")
        det = cls(backbone, preset=cfg.preset, n_ctx=cfg.n_ctx, depth=cfg.depth, t_n_ctx=cfg.t_n_ctx,
                  feature_layers=cfg.feature_layers, dpam_start=cfg.dpam_start, temperature=cfg.temperature,
                  sigma=cfg.sigma, map_weight=cfg.map_weight, pos_interp=cfg.pos_interp,
                  global_ln_post=cfg.global_ln_post, map_loss_weight=cfg.map_loss_weight,
                  train_splits=cfg.train_splits, blur_padding=cfg.blur_padding, normal_text=cfg.normal_text, abnormal_text=cfg.abnormal_text,
                  seed=cfg.seed, image_size=cfg.image_size, random_prompts=True)
        det.config.training = cfg.training
        det.load_tensors(tensors)
        return det

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        own = self.prompts.state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise ValueError(f"prompt checkpoint does not fit this config: missing {missing}, unexpected {extra}")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"prompt tensor {k}: shape {tuple(v.shape)} != expected {tuple(own[k].shape)}")
        self.prompts.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in tensors.items()})
        self._text_cache = None

    @classmethod
    def load(cls, path: str | os.PathLike, backbone: PatchBackbone | None = None,
             device: str | torch.device | None = None) -> AnomalyCLIP:
        """Load a prompt checkpoint ``NAME.safetensors`` (+ ``NAME.json``).

        Without ``backbone`` the CLIP named in the checkpoint is loaded; when its weights are
        absent that raises :class:`MissingWeightsError` naming the file to place.
        """
        tensors, config = read_checkpoint(path)
        return cls.from_state(backbone, tensors, config, device=device)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, backbone: PatchBackbone | str | None = None,
                        device: str | torch.device | None = None) -> AnomalyCLIP:
        """Prompts from a path, or by name from ``models/anomalyclip/<name>.safetensors``.

        Default name: the backbone's architecture (``clip/ViT-L-14-336`` -> ``ViT-L-14-336``).
        """
        bb = load_backbone(backbone, device=device) if isinstance(backbone, str) else backbone
        if name_or_path is None:
            arch = (bb.name if bb is not None else DEFAULT_BACKBONE).split("/", 1)[-1]
            name_or_path = arch
        path = Path(name_or_path)
        if path.suffix != ".safetensors" and not path.is_file():
            path = models_dir() / "anomalyclip" / f"{path.name}.safetensors"
        if not path.is_file():
            raise MissingWeightsError(
                f"AnomalyCLIP prompts not found at {path}. Import the official checkpoint with `inspector weights "
                f"import epoch_15.pth --as anomalyclip/{path.stem}` or train them with `inspector train anomalyclip "
                f"--data DIR --backbone {bb.name if bb is not None else DEFAULT_BACKBONE} --out {path}` "
                "(see models/README.md)."
            )
        return cls.load(path, backbone=bb, device=device)

    # -- protocol ----------------------------------------------------------------------------
    def fit(self, images: Tensor | None = None) -> AnomalyCLIP:
        """Zero-shot: nothing to fit (prompts are trained separately with :func:`train_prompts`)."""
        return self

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.prompts.state_dict().items()}
        return tensors, self.config.to_json()

    def save(self, path: str | os.PathLike) -> Path:
        tensors, config = self.state()
        return write_checkpoint(path, tensors, config)

    def parameters(self) -> Iterable[nn.Parameter]:
        """Trainable parameters: the prompts only."""
        return self.prompts.parameters()

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # -- forward pieces ----------------------------------------------------------------------
    def text_features(self) -> Tensor:
        """Normalised ``[2, E]`` text embeddings (normal, anomalous), differentiable in the prompts."""
        embeds, tokens, deep = self.prompts()
        feats = encode_text_deep(self.backbone.model, embeds, tokens, deep).float()
        return F.normalize(feats, dim=-1)

    def _cached_text_features(self) -> Tensor:
        dev = self.device
        key = (tuple(p._version for p in self.prompts.parameters()), str(dev), torch.is_autocast_enabled(dev.type))
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                self._text_cache = (key, self.text_features())
        return self._text_cache[1]

    def image_features(self, images: Tensor) -> tuple[Tensor, list[Tensor], tuple[int, int]]:
        """Frozen image side (no autograd): normalised global ``[B,E]`` and patch ``[B,h*w,E]`` features."""
        with torch.no_grad():
            out = run_visual(self.backbone, self.config, images.to(self.device))
            g = F.normalize(out.global_embedding.float(), dim=-1)
            patches = [F.normalize(p.float(), dim=-1) for p in out.patch_tokens]
        return g, patches, out.grid

    def probabilities(self, g: Tensor, patches: Sequence[Tensor], grid: tuple[int, int], text: Tensor,
                      size: tuple[int, int]) -> tuple[Tensor, list[Tensor]]:
        """Global logits ``[B,2]`` (already divided by the temperature) and per-layer
        probability maps ``[B,2,H,W]`` (softmax at patch level, then bilinear upsampling)."""
        t = self.config.temperature
        h, w = grid
        maps = []
        # Small matmuls; kept in fp32 (a bf16 cosine / 0.07 would be noisy).
        with torch.autocast(g.device.type, enabled=False):
            text = text.float()
            logits = g.float() @ text.t() / t
            for p in patches:
                prob = (p.float() @ text.t() / t).softmax(-1)  # [B, h*w, 2]
                prob = prob.transpose(1, 2).reshape(p.shape[0], 2, h, w)
                maps.append(F.interpolate(prob, size=size, mode="bilinear", align_corners=False))
        return logits, maps

    def _autocast(self):
        return self.backbone.autocast() if hasattr(self.backbone, "autocast") else contextlib.nullcontext()

    def score(self, images: Tensor) -> AnomalyResult:
        """Maps ``[B,H,W]`` at the input resolution and scores ``[B]``, all in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"anomalyclip: expected Tensor[B,3,H,W], got {tuple(images.shape)}")
        results = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, images.shape[0], self.chunk):
                x = images[start:start + self.chunk].to(self.device)
                out = self.backbone.run(x, **pass_spec(self.config))
                results.append(self.score_pass(out, (int(x.shape[-2]), int(x.shape[-1]))))
        return AnomalyResult.cat(results)

    def pass_spec(self) -> dict[str, Any]:
        """What this detector needs from a shared :meth:`ClipBackbone.run` (:func:`pass_spec`)."""
        return pass_spec(self.config)

    def score_pass(self, out, size: tuple[int, int]) -> AnomalyResult:
        """Score from a shared backbone pass (:meth:`ClipBackbone.run` with at least :func:`pass_spec`)."""
        with torch.inference_mode(), self._autocast():
            vis = visual_output(self.backbone, self.config, out)
            g = F.normalize(vis.global_embedding.float(), dim=-1)
            patches = [F.normalize(p.float(), dim=-1) for p in vis.patch_tokens]
            logits, maps = self.probabilities(g, patches, vis.grid, self._cached_text_features(), size)
            amap, scores = anomaly_outputs(self.config, logits, maps)
        return AnomalyResult(amap.float().cpu(), scores.float().cpu())

    def loss(self, images: Tensor, masks: Tensor, has_mask: Tensor, labels: Tensor,
             features: tuple[Tensor, list[Tensor], tuple[int, int]] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training loss for a batch (differentiable in the prompts only). ``features`` may carry
        precomputed :meth:`image_features` (they do not depend on the prompts)."""
        dev = self.device
        with self._autocast():
            g, patches, grid = features if features is not None else self.image_features(images)
            g = g.to(dev).float()
            patches = [p.to(dev).float() for p in patches]
            text = self.text_features()
            logits, maps = self.probabilities(g, patches, grid, text, tuple(masks.shape[-2:]))
        return anomalyclip_loss(maps, masks.to(dev), has_mask.to(dev), logits, labels.to(dev),
                                self.config.map_loss_weight)


# ---------------------------------------------------------------------------------------------
# checkpoint files: safetensors + JSON, never pickle
# ---------------------------------------------------------------------------------------------


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_name(p.name[: -len(".safetensors")] + ".json")


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Atomically write ``NAME.safetensors`` and ``NAME.json``; returns the safetensors path."""
    from safetensors.torch import save

    from inspector.state import atomic_write_bytes, atomic_write_json

    st, js = _paths(path)
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(st, save(clean, metadata={"format": FORMAT}))
    atomic_write_json(js, config)
    return st


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    st, js = _paths(path)
    if not st.is_file():
        raise MissingWeightsError(f"AnomalyCLIP prompt checkpoint {st} not found")
    if not js.is_file():
        raise FileNotFoundError(f"{js} (the checkpoint's config) is missing beside {st}")
    return load_file(str(st)), json.loads(js.read_text())


def _checkpoint_path(name_or_path: str | os.PathLike) -> Path:
    """A path, or a name under ``models/anomalyclip/`` (``NAME`` -> ``models/anomalyclip/NAME.safetensors``)."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.is_file() or p.with_name(p.name + ".safetensors").is_file():
        return p
    return models_dir() / "anomalyclip" / f"{p.name}.safetensors"


def map_official_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official ``prompt_learner`` state dict -> this module's :class:`PromptLearner` tensors.

    ``ctx_pos [1,1,n_ctx,D]`` -> ``ctx_normal``, ``ctx_neg`` -> ``ctx_abnormal``,
    ``compound_prompts_text.{i} [t_n_ctx,D]`` -> ``deep.{i}``. The projections
    (``compound_prompt_projections.*``, unused by the official forward) and the token buffers
    (rebuilt from the tokenizer) are dropped.
    """
    missing = [k for k in ("ctx_pos", "ctx_neg") if k not in sd]
    if missing:
        raise ValueError(f"not an official AnomalyCLIP prompt_learner: missing {missing}")
    out = {}
    for src, dst in (("ctx_pos", "ctx_normal"), ("ctx_neg", "ctx_abnormal")):
        t = sd[src]
        if t.ndim != 4 or t.shape[:2] != (1, 1):
            raise ValueError(f"{src}: shape {tuple(t.shape)}, expected [1, 1, n_ctx, D] (one class, one state)")
        out[dst] = t[0, 0].float().contiguous()
    i = 0
    while f"compound_prompts_text.{i}" in sd:
        out[f"deep.{i}"] = sd[f"compound_prompts_text.{i}"].float().contiguous()
        i += 1
    unknown = [k for k in sd if not (k in ("ctx_pos", "ctx_neg") or k.startswith("compound_prompts_text.")
                                     or k.startswith("compound_prompt_projections.") or k.startswith("token_"))]
    if unknown:
        raise ValueError(f"unexpected keys in the official checkpoint: {unknown[:5]}")
    return out


def import_official_checkpoint(src: str | os.PathLike, name: str, models_root: Path | None = None, *,
                               backbone: str = DEFAULT_BACKBONE) -> Path:
    """Official ``epoch_N.pth`` (``{"prompt_learner": ...}``) -> ``models/anomalyclip/NAME.safetensors``
    + ``.json`` with the official preset; sha256s recorded in ``models/manifest.json``.

    Read with ``torch.load(weights_only=True)``; shapes checked against ``backbone``'s text width
    (from the architecture config: the CLIP weights are not needed here).
    """
    from inspector.backbones.weights import (
        TINY_CONFIG,
        WeightsError,
        clip_arch,
        sha256_file,
        update_manifest,
    )

    src = Path(src)
    root = Path(models_root) if models_root is not None else models_dir()
    if not src.is_file():
        raise MissingWeightsError(f"{src}: no such file")
    sha = sha256_file(src)
    arch = backbone.split("/", 1)[-1]
    cfg = TINY_CONFIG if arch == "tiny" else clip_arch(arch).config
    dim, text_layers = cfg["text_cfg"]["width"], cfg["text_cfg"]["layers"]
    vis_layers = cfg["vision_cfg"]["layers"]
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
        sd = obj.get("prompt_learner", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"expected a dict with 'prompt_learner', found {type(obj).__name__}")
        tensors = map_official_keys(sd)
    except Exception as exc:  # noqa: BLE001 - one clear message for any unreadable file
        raise WeightsError(
            f"{src}: not an official AnomalyCLIP checkpoint for {backbone} ({type(exc).__name__}: {exc}); expected "
            f"{{'prompt_learner': {{ctx_pos [1,1,12,{dim}], ctx_neg, compound_prompts_text.0..7 [4,{dim}], ...}}}} "
            f"(file sha256 {sha})") from exc
    n_ctx, d = tensors["ctx_normal"].shape
    deep = [tensors[f"deep.{i}"] for i in range(len(tensors) - 2)]
    t_n_ctx = int(deep[0].shape[0]) if deep else T_N_CTX
    bad = [k for k, v in tensors.items() if v.shape[-1] != dim] + \
          [f"deep.{i}" for i, t in enumerate(deep) if tuple(t.shape) != (t_n_ctx, dim)]
    if bad or tensors["ctx_abnormal"].shape != (n_ctx, d) or len(deep) + 1 > text_layers:
        raise WeightsError(
            f"{src}: prompt shapes do not fit {backbone} (text width {dim}, {text_layers} text blocks): "
            f"ctx {tuple(tensors['ctx_normal'].shape)}, {len(deep)} deep tokens, mismatched {bad[:3]} (file sha256 {sha})")
    config = AnomalyCLIPConfig(
        backbone=backbone, n_ctx=int(n_ctx), depth=len(deep) + 1, t_n_ctx=t_n_ctx, feature_layers=(vis_layers - 1,),
        dpam_start=official_dpam_start(vis_layers), map_weight=0.0, pos_interp="bilinear", global_ln_post=False,
        blur_padding="symmetric",
        image_size=OFFICIAL_IMAGE_SIZE if backbone == DEFAULT_BACKBONE else None, preset="official",
        training={"source": "official zqhang/AnomalyCLIP checkpoint", "file": src.name, "sha256": sha},
    )
    out = write_checkpoint(root / "anomalyclip" / f"{name}.safetensors", tensors, config.to_json())
    entry = {"name": f"anomalyclip/{name}", "file": str(out.relative_to(root)), "sha256": sha256_file(out),
             "backbone": backbone, "imported_from": src.name, "source_sha256": sha, "preset": "official"}
    update_manifest(root, entry)
    return out


def _train_state_paths(path: str | os.PathLike) -> Path:
    st, _ = _paths(path)
    return st.with_name(st.name[: -len(".safetensors")] + ".train.safetensors")


def save_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> Path:
    """Optimizer state (tensors -> safetensors, the rest -> JSON) and progress beside the prompts."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    config = {"format": FORMAT + "-train", "param_groups": sd["param_groups"], "scalars": scalars, **info}
    return write_checkpoint(_train_state_paths(path), tensors, config)


def load_train_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(optimizer_state_dict, info)`` or None when no training state sits beside ``path``."""
    p = _train_state_paths(path)
    if not p.is_file():
        return None
    tensors, config = read_checkpoint(p)
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for idx, kv in config.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    info = {k: v for k, v in config.items() if k not in ("param_groups", "scalars", "format")}
    return {"state": state, "param_groups": config["param_groups"]}, info


# ---------------------------------------------------------------------------------------------
# training data: any MVTec-layout folder
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None  # pixel mask file, when annotated
    has_mask: bool  # True when the pixel truth is known (normal images of annotated sets, masked defects)


def _is_category(d: Path) -> bool:
    return (d / "test").is_dir() or (d / "train").is_dir()


def find_mask(gt_dir: Path, defect: str, stem: str) -> Path | None:
    from inspector.io import IMAGE_SUFFIXES

    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_SUFFIXES:
            p = gt_dir / defect / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def scan_mvtec(root: str | os.PathLike, splits: Sequence[str] = ("train", "test")) -> list[Sample]:
    """Samples of one MVTec-layout category (``train/good``, ``test/<type>``, ``ground_truth/<type>``)
    or of every category folder directly under ``root``.

    A category with a ``ground_truth`` folder is *annotated*: its normal images have a known
    all-zero mask and its defects their mask files (a defect without a mask file gets the
    image-level loss only). Without ``ground_truth`` every sample is image-level only.
    """
    from inspector.io import list_images

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder {root} not found")
    cats = [root] if _is_category(root) else sorted(d for d in root.iterdir() if d.is_dir() and _is_category(d))
    if not cats:
        raise ValueError(f"{root}: no MVTec-layout folder (expected train/good, test/<type>, ground_truth/<type>)")
    samples: list[Sample] = []
    for cat in cats:
        gt_dir = cat / "ground_truth"
        annotated = gt_dir.is_dir()
        for split in splits:
            sdir = cat / split
            if not sdir.is_dir():
                continue
            for tdir in sorted(d for d in sdir.iterdir() if d.is_dir()):
                normal = tdir.name == "good"
                for img in list_images(tdir, recursive=False):
                    if normal:
                        samples.append(Sample(img, 0, None, annotated))
                    else:
                        m = find_mask(gt_dir, tdir.name, img.stem) if annotated else None
                        samples.append(Sample(img, 1, m, m is not None))
    if not samples:
        raise ValueError(f"{root}: no images found under {', '.join(splits)}")
    return samples


class MaskedImages(torch.utils.data.Dataset):
    """Preprocessed images ``[3,S,S]`` (CLIP normalisation), binary masks ``[S,S]``, flags, labels."""

    def __init__(self, samples: Sequence[Sample], size: int):
        self.samples = list(samples)
        self.size = size
        self.pre = Preprocess(size, CLIP_MEAN, CLIP_STD)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import cv2

        from inspector.io import read_image

        s = self.samples[i]
        x = self.pre(read_image(s.path))[0]
        mask = np.zeros((self.size, self.size), np.float32)
        if s.mask is not None:
            m = read_image(s.mask)[..., 0]
            m = cv2.resize(m, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
            mask = (m > (127 if m.max() > 1 else 0)).astype(np.float32)  # 0/255 (MVTec) or 0/1
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
            if hasattr(bar, "set_postfix"):
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


def pixel_auroc(maps: Tensor, masks: Tensor) -> float:
    """Pixel-level AUROC (rank statistic), for quick checks without anomalib."""
    y = masks.flatten().numpy().astype(bool)
    s = maps.flatten().numpy().astype(np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    from scipy.stats import rankdata

    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


__all__ = [
    "AnomalyCLIP",
    "AnomalyCLIPConfig",
    "PRESETS",
    "anomaly_outputs",
    "import_official_checkpoint",
    "pass_spec",
    "run_visual",
    "visual_output",
    "PromptLearner",
    "Sample",
    "TrainResult",
    "anomalyclip_loss",
    "dice_loss",
    "encode_text_deep",
    "focal_loss",
    "load_train_state",
    "pixel_auroc",
    "read_checkpoint",
    "scan_mvtec",
    "train_prompts",
    "write_checkpoint",
]
