"""AnomalyCLIP: zero-shot anomaly detection with object-agnostic prompts on the shared CLIP backbone.

After Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly
Detection" (ICLR 2024) and its official code (github.com/zqhang/AnomalyCLIP). Two text prompts
are learned once, on any annotated auxiliary data (real or generated defects), and then detect
anomalies on products never seen in training. The model (prompts, deep text tokens, DPAM,
maps, image score, loss) is :mod:`inspector.detectors.anomalyclip.torch_model`; training
:mod:`~inspector.detectors.anomalyclip.train`; prompt files
:mod:`~inspector.detectors.anomalyclip.checkpoint`. This module is the detector around them.

Presets (:data:`~inspector.detectors.anomalyclip.torch_model.PRESETS`). ``official`` (default) is
the code that produced the paper's numbers and the released checkpoints (test.sh / train.sh):
layer 24 only, DPAM on the last 19 blocks, 518 px, bilinear position interpolation, global
embedding = CLS @ proj without ``ln_post``, ``w = 0``, training on the auxiliary set's test split.
``project`` keeps this repository's earlier choices (layers 6/12/18/24 averaged, DPAM from the
first feature layer, bicubic, ``ln_post`` on the global embedding, ``w = 0.5``, train + test
splits); each is an option, none is measured better.

Differences from the official code, on purpose: it runs on open_clip models without changing
them (the shared backbone is never patched; V-V attention is computed functionally from each
block's weights, in the same :meth:`ClipBackbone.run` that MuSc uses), positional embeddings are
interpolated for any input size (also non-square), everything is batch-size invariant (the
official code assumes batch 1 at test and squeezes masks in training), and layer maps are
averaged (the official test sums them: identical for the official single layer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inspector.backbones.registry import MissingWeightsError, PatchBackbone, load_backbone
from inspector.backbones.vit import ClipBackbone
from inspector.detectors.anomalyclip.checkpoint import (
    _checkpoint_path,
    _paths,
    read_checkpoint,
    write_checkpoint,
)
from inspector.detectors.anomalyclip.torch_model import (
    DEFAULT_BACKBONE,
    N_CTX,
    OFFICIAL_IMAGE_SIZE,
    PRESETS,
    T_N_CTX,
    TEMPERATURE,
    AnomalyCLIPConfig,
    AnomalyCLIPGraph,
    PromptLearner,
    anomalyclip_loss,
    default_depth,
    encode_text_deep,
    normalized_features,
    official_dpam_start,
    pass_spec,
    probabilities,
    run_visual,
    score_visual,
    visual_output,
)
from inspector.detectors.base import AnomalyResult, Capabilities
from inspector.paths import models_dir

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
    embeddings are interpolated), scores every image independently (mode ``"zero"``; any
    batch split gives the same maps) and returns maps ``[B,H,W]`` and scores ``[B]`` in [0, 1].

    Construct with a prompt checkpoint for real use (``checkpoint=``, :meth:`load` or
    :meth:`from_pretrained`); without one the prompts are the seeded random initialisation
    (the starting point for training, and tests) and the detector is *not* meaningful.
    """

    name: ClassVar[str] = "anomalyclip"
    capabilities: ClassVar[Capabilities] = Capabilities(
        "zero", exportable=True, needs_clip=True, default_backbone=DEFAULT_BACKBONE, default_image_size=True,
        shared_pass=True, pretrained=True, trainable=frozenset({"prompts"}))
    batchwise: ClassVar[bool] = capabilities.batchwise
    needs_fit: ClassVar[bool] = capabilities.needs_fit

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
        if not isinstance(bb, ClipBackbone):
            raise TypeError(f"AnomalyCLIP needs a clip/... backbone with a text tower, got {bb.name!r}")
        if loaded is not None and bb.name != loaded[1].backbone:
            raise ValueError(f"prompts in {checkpoint} were trained on {loaded[1].backbone!r}, not {bb.name!r}")
        if loaded is None and not random_prompts and not bb.is_random:
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
        """Zero-shot: nothing to fit (prompts are trained separately:
        :func:`inspector.detectors.anomalyclip.train.train_prompts`)."""
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
            g, patches = normalized_features(out)
        return g, patches, out.grid

    def _autocast(self):
        return self.backbone.autocast()

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
            amap, scores = score_visual(self.config, vis, self._cached_text_features(), size)
        return AnomalyResult(amap.float().cpu(), scores.float().cpu())

    def export_module(self) -> nn.Module:
        """The traceable scoring (images -> maps, scores): the same :func:`score_visual` as
        :meth:`score`, with this detector's prompt-text embeddings as a constant."""
        with torch.no_grad():
            text = self.text_features()
        return AnomalyCLIPGraph(self.backbone, self.config, text)

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
            logits, maps = probabilities(self.config, g, patches, grid, text, tuple(masks.shape[-2:]))
        return anomalyclip_loss(maps, masks.to(dev), has_mask.to(dev), logits, labels.to(dev),
                                self.config.map_loss_weight)


__all__ = ["AnomalyCLIP"]
