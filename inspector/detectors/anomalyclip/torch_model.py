"""AnomalyCLIP's model: prompt learner, text encoder with deep prompts, DPAM visual side, scoring, loss.

After Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly
Detection" (ICLR 2024) and its official code (github.com/zqhang/AnomalyCLIP):

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

The encoders run functionally over the shared open_clip model, which is never patched: V-V
attention is computed from each block's weights in the same
:meth:`~inspector.backbones.vit.ClipBackbone.run` that MuSc uses. :func:`score_visual` is the one
statement of the scoring formula: the detector's ``score`` runs it, and :class:`AnomalyCLIPGraph`
(the ONNX export, text embeddings folded in as constants) runs it too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inspector.backbones.registry import PatchBackbone
from inspector.detectors.ops import gaussian_blur

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

def probabilities(config: AnomalyCLIPConfig, g: Tensor, patches: Sequence[Tensor], grid: tuple[int, int],
                  text: Tensor, size: tuple[int, int]) -> tuple[Tensor, list[Tensor]]:
    """Global logits ``[B,2]`` (already divided by the temperature) and per-layer probability maps
    ``[B,2,H,W]`` (softmax at patch level, then bilinear upsampling) from normalised features."""
    t = config.temperature
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


def normalized_features(vis: VisualOutput) -> tuple[Tensor, list[Tensor]]:
    """L2-normalised fp32 global embedding ``[B,E]`` and patch tokens ``[B,h*w,E]`` of a visual output."""
    return F.normalize(vis.global_embedding.float(), dim=-1), [F.normalize(p.float(), dim=-1) for p in vis.patch_tokens]


def anomaly_outputs(config: AnomalyCLIPConfig, logits: Tensor, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Map ``[B,H,W]`` (anomaly channel averaged over layers, Gaussian ``sigma``) and image score
    ``(1 - map_weight) * p_anomalous(global) + map_weight * max(map)`` (official: weight 0)."""
    amap = torch.stack([m[:, 1] for m in maps]).mean(0)
    amap = gaussian_blur(amap.float(), config.sigma, config.blur_padding).clamp(0.0, 1.0)
    p_global = logits.float().softmax(-1)[:, 1]
    w = config.map_weight
    scores = p_global if w == 0 else (1 - w) * p_global + w * amap.flatten(1).amax(1)
    return amap, scores.clamp(0.0, 1.0)


def score_visual(config: AnomalyCLIPConfig, vis: VisualOutput, text: Tensor,
                 size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The scoring formula: ``(map [B,H,W], score [B])`` from the image side and the two
    normalised text embeddings ``text [2,E]`` (normal, anomalous)."""
    g, patches = normalized_features(vis)
    logits, maps = probabilities(config, g, patches, vis.grid, text, size)
    return anomaly_outputs(config, logits, maps)


class AnomalyCLIPGraph(nn.Module):
    """Images -> ``(maps, scores)`` with the prompt-text embeddings folded in as a constant ``[2,E]``.

    The ONNX export of a detector (``AnomalyCLIP.export_module``): the image side is the shared
    backbone pass (:func:`run_visual`, DPAM V-V path included) and the scoring :func:`score_visual`,
    as in ``AnomalyCLIP.score``; the text encoder is not in the graph.
    """

    def __init__(self, backbone: PatchBackbone, config: AnomalyCLIPConfig, text: Tensor):
        super().__init__()
        self.backbone = backbone
        self.config = copy.deepcopy(config)
        self.register_buffer("text", text.detach().float(), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return score_visual(self.config, run_visual(self.backbone, self.config, images), self.text, size)


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


__all__ = [
    "DEFAULT_BACKBONE",
    "FORMAT",
    "N_CTX",
    "OFFICIAL_IMAGE_SIZE",
    "PRESETS",
    "T_N_CTX",
    "AnomalyCLIPConfig",
    "AnomalyCLIPGraph",
    "PromptLearner",
    "VisualOutput",
    "anomaly_outputs",
    "anomalyclip_loss",
    "default_depth",
    "dice_loss",
    "encode_text_deep",
    "focal_loss",
    "normalized_features",
    "official_dpam_start",
    "pass_spec",
    "probabilities",
    "run_visual",
    "score_visual",
    "visual_output",
]
