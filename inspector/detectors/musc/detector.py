"""MuSc: zero-shot anomaly classification and segmentation by mutual scoring of unlabeled images.

Li et al., ICLR 2024, "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with
Mutual Scoring of the Unlabeled Images". No normal samples: every image of a batch is scored
against the other images of the same batch, because defects are rare and local while normal
patches find near-duplicates in most other images.

The stages (LNAMD, MSM, RsCIN) are pure functions in :mod:`inspector.detectors.musc.torch_model`;
the time and memory model and the block sizing in :mod:`inspector.detectors.musc.budget`. This
module runs them over a set: the patch score is the mean of MSM over layers and ``r``; pixel maps
are bilinear upsampling to the input size then Gaussian smoothing (``sigma``); the image score is
the max of the patch-score map, re-scored by RsCIN with image-level features (CLIP backbones'
global image embedding, ``encode_image``; else the spatial mean of the deepest returned layer).

Differences from the official code, on purpose:

* **Small N.** The official interval ``[int(lo*(N-1)), int(hi*(N-1)))`` is empty for N < 5 and the
  score is NaN. Here the interval is clamped to hold at least one image (``k_hi >= 1``,
  ``k_lo <= k_hi - 1``, ``k_hi <= N-1``): for N = 2..4 the patch score is the distance to the
  most similar other image (degraded: one defective neighbour can hide a defect, but finite and
  still ranking a lone defect first). N = 1 raises ValueError. For N >= 5 the numbers are the
  official ones. RsCIN's ``k`` values are clamped to N; when all raw scores are equal RsCIN is
  skipped (the official code divides by zero).
* RsCIN weights are clamped at 0 (cosine similarities of CNN features can be negative; with the
  self-similarity kept the row sum stays >= 1, so no division by ~0).
* ``divide_num`` splits the set into that many subsets with a seeded random permutation (the
  official split is stratified by the ground-truth defect type, which an unlabeled folder does not
  have); each subset is mutually scored on its own, RsCIN runs once over all images. Subsets never
  drop below 2 images (``divide_num`` is reduced to ``N // 2`` if needed).
* With the EfficientNet backbone the features arrive already 3x3-averaged by the backbone (its
  PatchCore-style local aggregation), so ``r = 1`` here already sees a 3x3 context.
* ``position_norm`` (default on; off = official): after averaging over layers and ``r``, the
  per-location median over the set is subtracted from every map (its mean added back, so units
  and level stay) -- :func:`~inspector.detectors.musc.torch_model.position_compensate`. CNN padding
  makes border/corner patches match worse in *every* image; at 128 px (16x16 grid) that border
  noise outranks small defects (``tests/test_musc.py`` checks a lone brick defect is ranked first
  and localised; ``bench/RESULTS.md`` has the current figures).

Precision: fp32 on CPU; on CUDA TF32 tensor-core matmuls by default (``precision="tf32"``),
``"bf16"`` or ``"fp32"`` on request. Speed and memory: ``bench/musc.py`` (``bench/out/musc.json``)
and ``bench/CLIP_SPEED.md``.

Contract: ``capabilities.mode == "mutual"``: ``score(images)`` scores the batch against itself, so
results depend on the whole batch. ``score_features`` takes already extracted backbone features
so the folder scorer can stream images through the backbone and call MuSc once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from inspector.backbones.registry import PatchBackbone
from inspector.backbones.vit import ClipBackbone
from inspector.detectors.base import AnomalyResult, Capabilities
from inspector.detectors.musc.budget import MAP_GROUP, call_peak_bytes
from inspector.detectors.musc.torch_model import interval_bounds, lnamd, msm, position_compensate, rscin
from inspector.detectors.ops import patch_to_pixel

# ``official``: xrli-U/MuSc's models/musc.py (no position normalisation, no smoothing, maps
# upsampled with align_corners=True, image score = max of the upsampled map before RsCIN).
# ``project``: this repository's defaults, chosen on held-out real data (not on generated
# defects), so they stay the default; current figures in bench/RESULTS.md.
PRESETS: dict[str, dict[str, Any]] = {
    "official": {"position_norm": False, "sigma": 0.0, "align_corners": True, "image_score": "map"},
    "project": {"position_norm": True, "sigma": 4.0, "align_corners": False, "image_score": "patch"},
}
OFFICIAL_IMAGE_SIZE = 518  # configs/musc.yaml img_resize
# Official RsCIN windows per dataset (models/musc.py: VisA [1, 8, 9], MVTec AD and others [1, 2, 3]).
RSCIN_WINDOWS: dict[str, tuple[int, ...]] = {"mvtec": (1, 2, 3), "visa": (1, 8, 9), "btad": (1, 2, 3)}

__all__ = ["MuSc", "OFFICIAL_IMAGE_SIZE", "PRESETS", "RSCIN_WINDOWS"]


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------

class MuSc:
    """Zero-shot MuSc detector on a shared :class:`PatchBackbone` (see the module docstring).

    Args:
        backbone: the patch backbone; ``score`` runs it, ``score_features`` takes its output.
        r_list: LNAMD aggregation degrees (odd).
        topmin: MSM interval ``(lo, hi)`` of the sorted per-image minima, fractions of ``N-1``.
        layers: backbone layers to use (default: all returned layers).
        rscin: re-score image scores with RsCIN.
        rscin_k: RsCIN window sizes (None: by ``dataset``; official (1, 2, 3) MVTec AD, (1, 8, 9) VisA).
        aligned: aligned-parts mode (compare only within ``align_radius`` grid cells).
        align_radius: window half-size in patch-grid cells for ``aligned``.
        chunk_size: images per distance block; None = auto from ``block_bytes``.
        divide_num: split the set into this many subsets, each mutually scored on its own.
        sigma: Gaussian smoothing of the pixel maps (pixels at the input resolution; None: preset).
        position_norm: (None: preset) subtract the per-location median baseline over the set
            (:func:`position_compensate`; not in the paper, off = the official pipeline).
        precision: ``fp32`` | ``tf32`` | ``bf16`` for the distance matmuls; None = tf32 on CUDA,
            fp32 on CPU (bf16 on CPU is emulated and slow).
        symmetric: force / forbid the half-FLOP schedule (None = auto by table size).
        batch_size: images per backbone forward in :meth:`score`.
        seed: seed of the ``divide_num`` split.
        preset: ``project`` (default: position_norm + sigma 4, measured better on held-out real
            data) or ``official`` (xrli-U/MuSc: no position norm, no blur, ``align_corners=True``,
            image score from the upsampled map). Explicit arguments override the preset.
        align_corners: bilinear upsampling of the patch maps (official: True).
        image_score: ``patch`` (max of the patch grid) or ``map`` (max of the upsampled map, official).
        dataset: ``mvtec`` | ``visa`` | ``btad``: the official RsCIN windows when ``rscin_k`` is None.
        pos_interp: CLIP position-embedding interpolation (None: the backbone's, bicubic as official).

    After each call, ``last_info`` holds diagnostics: raw (pre-RsCIN) image scores, patch-level
    score maps, FLOPs issued and timings.
    """

    name: ClassVar[str] = "musc"
    capabilities: ClassVar[Capabilities] = Capabilities("mutual", default_image_size=True, shared_pass=True)
    batchwise: ClassVar[bool] = capabilities.batchwise
    needs_fit: ClassVar[bool] = capabilities.needs_fit

    def __init__(
        self,
        backbone: PatchBackbone,
        r_list: Sequence[int] = (1, 3, 5),
        topmin: Sequence[float] = (0.0, 0.3),
        layers: Sequence[str] | None = None,
        rscin: bool = True,
        rscin_k: Sequence[int] | None = None,
        aligned: bool = False,
        align_radius: int = 1,
        chunk_size: int | None = None,
        divide_num: int = 1,
        sigma: float | None = None,
        position_norm: bool | None = None,
        precision: str | None = None,
        symmetric: bool | None = None,
        batch_size: int = 16,
        seed: int = 0,
        preset: str = "project",
        align_corners: bool | None = None,
        image_score: str | None = None,
        dataset: str | None = None,
        pos_interp: str | None = None,
    ):
        if preset not in PRESETS:
            raise ValueError(f"unknown MuSc preset {preset!r}; choose from {sorted(PRESETS)}")
        p = PRESETS[preset]
        self.preset = preset
        if dataset is not None and dataset not in RSCIN_WINDOWS:
            raise ValueError(f"unknown dataset {dataset!r} for RsCIN windows; choose from {sorted(RSCIN_WINDOWS)}")
        self.dataset = dataset
        if rscin_k is None:
            rscin_k = RSCIN_WINDOWS[dataset or "mvtec"]
        sigma = p["sigma"] if sigma is None else sigma
        position_norm = p["position_norm"] if position_norm is None else position_norm
        self.align_corners = bool(p["align_corners"] if align_corners is None else align_corners)
        self.image_score = p["image_score"] if image_score is None else image_score
        if self.image_score not in ("patch", "map"):
            raise ValueError(f"image_score must be 'patch' (max of the patch grid) or 'map' (max of the "
                             f"upsampled map), got {self.image_score!r}")
        self.backbone = backbone
        self.pos_interp = pos_interp  # CLIP position interpolation (None: the backbone's, bicubic as official)
        self.r_list = tuple(int(r) for r in r_list)
        for r in self.r_list:
            if r < 1 or r % 2 == 0:
                raise ValueError(f"r_list entries must be odd and >= 1, got {r}")
        if not self.r_list:
            raise ValueError("r_list must not be empty")
        self.topmin = (float(topmin[0]), float(topmin[1]))
        interval_bounds(4, self.topmin)  # validates
        self.layers = tuple(layers) if layers is not None else None
        self.rscin = bool(rscin)
        self.rscin_k = tuple(int(k) for k in rscin_k)
        self.aligned = bool(aligned)
        self.align_radius = int(align_radius)
        if self.align_radius < 0:
            raise ValueError("align_radius must be >= 0")
        self.chunk_size = int(chunk_size) if chunk_size else None
        self.divide_num = max(1, int(divide_num))
        self.sigma = float(sigma)
        self.position_norm = bool(position_norm)
        if precision not in (None, "fp32", "tf32", "bf16"):
            raise ValueError(f"precision must be fp32, tf32, bf16 or None, got {precision!r}")
        self.precision = precision
        self.symmetric = symmetric
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.last_info: dict[str, Any] = {}

    @classmethod
    def default_image_size(cls, backbone: str, config: dict[str, Any] | None = None) -> int | None:
        """518 px for the official preset on ViT-L-14-336 (configs/musc.yaml ``img_resize``), else
        None (the backbone's default size)."""
        if (config or {}).get("preset") == "official" and backbone == "clip/ViT-L-14-336":
            return OFFICIAL_IMAGE_SIZE
        return None

    # -- protocol ----------------------------------------------------------------------------
    def fit(self, images: Tensor | None = None) -> MuSc:
        """Zero-shot: nothing to learn."""
        return self

    def config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.name,
            "r_list": list(self.r_list),
            "topmin": list(self.topmin),
            "layers": list(self.layers) if self.layers is not None else None,
            "rscin": self.rscin,
            "rscin_k": list(self.rscin_k),
            "aligned": self.aligned,
            "align_radius": self.align_radius,
            "chunk_size": self.chunk_size,
            "divide_num": self.divide_num,
            "sigma": self.sigma,
            "position_norm": self.position_norm,
            "precision": self.precision,
            "symmetric": self.symmetric,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "preset": self.preset,
            "align_corners": self.align_corners,
            "image_score": self.image_score,
            "dataset": self.dataset,
            "pos_interp": self.pos_interp,
        }

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, self.config()

    @classmethod
    def from_state(cls, backbone: PatchBackbone, tensors: dict[str, Tensor] | None = None,
                   config: dict[str, Any] | None = None) -> MuSc:
        cfg = dict(config or {})
        cfg.pop("backbone", None)
        return cls(backbone, **cfg)

    # -- scoring -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def _precision(self, device: torch.device) -> str:
        if self.precision is not None:
            return self.precision
        return "tf32" if device.type == "cuda" else "fp32"

    def pass_spec(self) -> dict[str, Any]:
        """What MuSc needs from a shared :meth:`ClipBackbone.run`: the residual stream of the
        backbone's layers (the CLS token comes with every pass)."""
        return {"layers": tuple(self.backbone.layer_ids), "pos_interp": self.pos_interp}

    def from_pass(self, out) -> tuple[dict[str, Tensor], Tensor | None]:
        """Features and RsCIN's image-level features (``encode_image``: ``ln_post`` + ``proj`` of the
        CLS token) from one shared CLIP pass."""
        feats = {k: v.float() for k, v in self.backbone.pass_features(out).items()}
        glob = self.backbone.global_embedding(out.cls).float() if self.rscin else None
        return feats, glob

    @torch.inference_mode()
    def extract(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """Backbone features ``{layer: [N,h,w,C]}`` and image-level features ``[N,D]`` (or None).

        CLIP backbones: one forward per image gives both (the patch tokens and the global
        embedding of the same pass). Other backbones: no image-level features (RsCIN then uses
        the spatial mean of the deepest layer).
        """
        feats: dict[str, list[Tensor]] = {}
        globals_: list[Tensor] = []
        shared = isinstance(self.backbone, ClipBackbone)
        for b0 in range(0, images.shape[0], self.batch_size):
            x = images[b0:b0 + self.batch_size]
            if shared:
                with self.backbone.autocast():
                    out, g = self.from_pass(self.backbone.run(x.to(self.device), **self.pass_spec()))
                if g is not None:
                    globals_.append(g)
            else:
                out = self.backbone.embed(x)
            for k, v in out.items():
                feats.setdefault(k, []).append(v.float())
        cat = {k: torch.cat(v) for k, v in feats.items()}
        return cat, (torch.cat(globals_) if globals_ else None)

    def score(self, images: Tensor) -> AnomalyResult:
        """Score a preprocessed batch ``Tensor[N,3,H,W]`` (N >= 2) against itself."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"MuSc.score expects Tensor[N,3,H,W], got {tuple(images.shape)}")
        self._check_n(images.shape[0])
        t0 = time.perf_counter()
        feats, glob = self.extract(images)
        t_bb = time.perf_counter() - t0
        res = self.score_features(feats, image_size=tuple(images.shape[-2:]), image_features=glob)
        self.last_info["backbone_s"] = t_bb
        return res

    @staticmethod
    def _check_n(n: int) -> None:
        if n < 2:
            raise ValueError(
                f"MuSc scores images against each other and needs at least 2 images, got {n} "
                "(5 or more for the paper's interval; 2-4 give a degraded nearest-image score)")

    def _layer_names(self, feats: dict[str, Tensor]) -> list[str]:
        if self.layers is None:
            return list(feats)
        missing = [k for k in self.layers if k not in feats]
        if missing:
            raise KeyError(f"MuSc: layers {missing} not in features ({list(feats)})")
        return list(self.layers)

    def _subsets(self, n: int, device: torch.device) -> list[Tensor]:
        d = min(self.divide_num, max(1, n // 2))
        if d == 1:
            return [torch.arange(n, device=device)]
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g).to(device)
        return [perm[k::d].sort().values for k in range(d)]

    def score_features(self, feats: dict[str, Tensor], image_size: tuple[int, int] | None = None,
                       image_features: Tensor | None = None) -> AnomalyResult:
        """MuSc on stored backbone features.

        Args:
            feats: ``{layer: Tensor[N,h,w,C]}`` as returned by the backbone (all layers on one grid).
            image_size: ``(H, W)`` of the pixel maps; default ``backbone.stride * (h, w)``.
            image_features: ``[N,D]`` image-level features for RsCIN; default: spatial mean of the
                deepest used layer.
        """
        names = self._layer_names(feats)
        if not names:
            raise ValueError("MuSc: no feature layers given")
        first = feats[names[0]]
        n, h, w = first.shape[:3]
        self._check_n(n)
        for k in names:
            if tuple(feats[k].shape[:3]) != (n, h, w):
                raise ValueError(f"MuSc: layer {k} has shape {tuple(feats[k].shape)}, expected [{n},{h},{w},C]")
        if image_features is not None and image_features.shape[0] != n:
            raise ValueError(f"MuSc: image_features has {image_features.shape[0]} rows for {n} images")
        if image_size is None:
            s = self.backbone.stride
            image_size = (h * s, w * s)
        dev = self.device if first.device.type == "cpu" and self.device.type != "cpu" else first.device
        precision = self._precision(dev)
        stats: dict[str, Any] = {"flops": 0, "blocks": 0}
        t0 = time.perf_counter()
        patch = torch.zeros(n, h, w, device=dev, dtype=torch.float32)
        for idx in self._subsets(n, dev):
            acc = torch.zeros(len(idx), h, w, device=dev, dtype=torch.float32)
            for name in names:
                f = feats[name].to(dev)[idx] if len(idx) < n else feats[name].to(dev)
                for r in self.r_list:
                    z = lnamd(f, r)
                    acc += msm(z, self.topmin, chunk_size=self.chunk_size, symmetric=self.symmetric,
                               align_radius=self.align_radius if self.aligned else None,
                               precision=precision, stats=stats)
                    del z
            acc /= len(names) * len(self.r_list)
            if self.position_norm:
                acc = position_compensate(acc)
            patch[idx] = acc
        t_msm = time.perf_counter() - t0
        # Whole-call memory model (budget.call_peak_bytes; the input features are the caller's).
        n_sub = max(len(i) for i in self._subsets(n, dev))
        c_max = max(int(feats[k].shape[-1]) for k in names)
        hw_px = int(image_size[0]) * int(image_size[1])
        stats["call_peak_bytes"] = call_peak_bytes(stats.get("peak_bytes", 0), n, n_sub, h, w, c_max, hw_px)
        # Upsampling + Gaussian smoothing in groups: the blur's convolutions need ~20 map-sized
        # buffers per image, which would dominate the peak for a large set at full resolution.
        maps = torch.cat([patch_to_pixel(patch[g:g + MAP_GROUP], tuple(image_size), self.sigma,
                                         align_corners=self.align_corners)
                          for g in range(0, n, MAP_GROUP)])
        # Image score before RsCIN: max of the patch grid, or (official) of the upsampled map.
        raw = (maps.flatten(1) if self.image_score == "map" else patch.flatten(1)).amax(1)
        if self.rscin:
            if image_features is None:
                image_features = feats[names[-1]].to(dev).float().mean((1, 2))
            scores = rscin(raw, image_features.to(dev).float(), self.rscin_k)
        else:
            scores = raw.clone()
        self.last_info = {
            "raw_scores": raw.detach().cpu(),
            "patch_scores": patch.detach().cpu(),
            "flops": stats["flops"],
            "blocks": stats["blocks"],
            "chunk": stats.get("chunk"),
            "symmetric": stats.get("symmetric"),
            "predicted_peak_bytes": stats.get("call_peak_bytes", 0),
            "predicted_msm_peak_bytes": stats.get("peak_bytes", 0),
            "msm_s": t_msm,
            "precision": precision,
            "device": str(dev),
        }
        return AnomalyResult(maps, scores.float()).cpu()
