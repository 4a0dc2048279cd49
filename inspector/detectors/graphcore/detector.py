"""Few-shot GraphCore: a memory bank of augmented shots plus a small GNN trained per product.

GraphCore (Xie et al., ICLR 2023) registers a product from 1-8 normal images. Here it is three
parts that share one backbone pass per test image; their scoring is one module,
:class:`~inspector.detectors.graphcore.torch_model.GraphCoreScorer` (``score`` runs it, ONNX export
traces it). This module fits it:

1. **Memory bank** (PatchCore's): patch features of the shots and their augmented views, reduced
   by greedy coreset; a test patch's distance ``d`` to its nearest bank row is the anomaly
   evidence that needs no training, so a defect unlike anything generated is still caught.
2. **Learned graph head** (torch_geometric, trained at ``fit``): every patch is a node; its input
   is the (linearly projected) patch feature and ``d / mean_image(d)`` (the distance relative to
   the image's own patches: scale-free, so normal distances of the training views and of new
   parts look alike). Edges join each node to its ``neighbors`` nearest patches **in feature
   space** (cosine kNN, as Vision GNN builds its graph; ``cdist``/matmul + ``topk``) and to its
   4 spatial grid neighbours. Two residual convolutions (EdgeConv over the feature graph, SAGE
   over the grid, mean aggregation) and a linear read-out give a per-patch defect logit. It is
   trained on the shots' augmented views with defects made by :func:`inspector.synth.generate_defects`
   (exact masks -> soft per-patch targets, balanced BCE). Patch score::

       s = d / d_scale + head_weight * sigmoid(logit)

   with ``d_scale`` the mean bank distance of held-out normal views (so both terms are O(1)).
3. **Global branch**: an image descriptor (mean and std of the patch features) and its distance
   to the nearest bank-view descriptor, in units of the same distance for held-out normal
   views, added to the image score with ``global_weight``: whole-image changes (a weave of another
   scale or direction: textile ``global`` defects) that no single patch shows.

``orientation``: ``"free"`` puts the D4 transforms (rot90 x flip; the Klein four-group for
non-square inputs) of every shot into the bank and into the head's training views, so a part
presented rotated or flipped is normal; ``"fixed"`` keeps orientation as information (only small
rotations/shifts in the views), so a rotated part or pattern is a defect. Both cost one backbone
pass per test image (the former D4 feature averaging cost 8 and hid orientation defects by
construction). Neither is exactly invariant (``tests/test_graphcore.py`` bounds how far image
scores of D4-transformed images may move under ``free``). Default ``fixed``: on the mean over
the sample classes the two are a split decision (``bench/GRAPHCORE.md``, written by
``bench/graphcore_ablation.py``), so the tie goes to what the parts need: the sample parts are
upright, and textile's real ``global`` defects include weave-direction changes that ``free``
declares normal.

Patch features: by default the backbone's shallowest and deepest layers (Lite0 ``blocks.4``
stride 8 + ``blocks.10`` stride 16, 3x3 locally averaged, on the stride-8 grid: PatchCore's
layer2 + layer3 recipe, as anomalib's PatchCore), each L2-normalised. The choice was made on
textile's *real* defects, where both layers beat the shallow one alone; the shallow layer alone
looked better on generated brick defects, which is exactly the tuning-on-generated-defects trap.
Current figures: ``bench/RESULTS.md`` (``bench/run_all.py``) and ``bench/GRAPHCORE.md``; speed:
``bench/GRAPHCORE_SPEED.md``.

:class:`PatchCoreKNN` ("patchcore") is the in-run baseline (shots only, no head, no global
branch) and :class:`AugmentedPatchCore` ("patchcore-aug") the same bank of augmented views as
GraphCore without head and global branch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inspector.backbones.registry import PatchBackbone
from inspector.detectors.base import AnomalyResult, Capabilities
from inspector.detectors.graphcore.torch_model import (
    GraphCoreScorer,
    GraphHead,
    grid_neighbors,
    image_descriptor,
    knn_neighbors,
    neighbors_to_edge_index,
    nn_distance,
)

FORMAT_VERSION = 2
ORIENTATIONS = ("free", "fixed")


# --------------------------------------------------------------------------------------------
# The dihedral group D4 acting on the last two (spatial) dims of a tensor.
# Element g = r + 4 f: flip left-right if f, then rotate by r * 90 degrees (counter-clockwise).
# --------------------------------------------------------------------------------------------
D4 = tuple(range(8))
KLEIN = (0, 2, 4, 6)  # identity, rot180, flip-lr, flip-ud: the part of D4 that keeps a rectangle


def symmetry_group(height: int, width: int) -> tuple[int, ...]:
    """D4 for a square grid, the Klein four-group for a rectangle."""
    return D4 if height == width else KLEIN


def rot90(x: Tensor, k: int, dims: tuple[int, int]) -> Tensor:
    """``torch.rot90`` from flips and a transpose: the same exact permutation, and it traces."""
    a, b = dims
    k %= 4
    if k == 0:
        return x
    if k == 1:
        return x.flip(b).transpose(a, b)
    if k == 2:
        return x.flip(a).flip(b)
    return x.transpose(a, b).flip(b)


def d4_apply(x: Tensor, g: int, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """Apply D4 element ``g`` to ``x`` over ``dims`` (rows, columns): flip if g >= 4, then rotate."""
    if g >= 4:
        x = x.flip(dims[1])
    return rot90(x, g % 4, dims)


def d4_invert(x: Tensor, g: int, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """Undo :func:`d4_apply`: ``d4_invert(d4_apply(x, g), g) == x``."""
    x = rot90(x, -(g % 4), dims)
    return x.flip(dims[1]) if g >= 4 else x


# --------------------------------------------------------------------------------------------
# Memory bank: greedy coreset (the scorer's nearest-row distance is torch_model.nn_distance).
# --------------------------------------------------------------------------------------------
def greedy_coreset(feats: Tensor, n: int, *, proj_dim: int = 128, starts: int = 10, seed: int = 0) -> Tensor:
    """PatchCore's approximate greedy k-center coreset: indices of ``n`` rows of ``feats [N,D]``.

    Rows are projected to ``proj_dim`` dims with a fixed Gaussian random matrix (Johnson-
    Lindenstrauss), the distance of every row to the selected set is initialised by its mean
    squared distance to ``starts`` random rows, then the farthest row is added ``n`` times,
    keeping the per-row minimum up to date (O(N * proj_dim) per step, no N x N matrix).
    """
    total = feats.shape[0]
    if n >= total:
        return torch.arange(total, device=feats.device)
    gen = torch.Generator().manual_seed(seed)
    z = feats.float()
    if z.shape[1] > proj_dim:
        proj = torch.randn(z.shape[1], proj_dim, generator=gen) / math.sqrt(proj_dim)
        z = z @ proj.to(z.device)
    start = torch.randperm(total, generator=gen)[: min(starts, total)].to(z.device)
    sq = (z * z).sum(1)
    min_d = (sq[:, None] - 2 * z @ z[start].T + sq[start][None]).mean(1)
    chosen = torch.empty(n, dtype=torch.long, device=z.device)
    for i in range(n):
        j = torch.argmax(min_d)
        chosen[i] = j
        min_d = torch.minimum(min_d, sq - 2 * (z @ z[j]) + sq[j])
    return chosen


def nearest_distance(queries: Tensor, memory: Tensor, chunk: int = 4096) -> Tensor:
    """:func:`nn_distance` chunked over the queries too (large query sets at fit time)."""
    return torch.cat([nn_distance(q, memory) for q in queries.split(chunk)])


def _rotate(x: Tensor, degrees: float) -> Tensor:
    """Rotate ``[B,C,H,W]`` about the centre by ``degrees`` (bilinear, reflection at the borders)."""
    a = math.radians(degrees)
    h, w = x.shape[-2:]
    theta = torch.tensor([[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]],
                         dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# --------------------------------------------------------------------------------------------
# The detector.
# --------------------------------------------------------------------------------------------
@dataclass
class GraphCoreConfig:
    """Everything that defines a fitted GraphCore besides its tensors (saved as JSON)."""

    layers: list[str] | None = None  # None = shallowest + deepest backbone layer (see module docstring)
    normalize: bool = True  # L2-normalise each layer's patch vector before concatenating
    orientation: str = "fixed"  # "fixed": orientation is information; "free": D4 views in bank + training
    head: bool = True  # the learned graph head
    global_branch: bool = True  # image-descriptor distance added to the image score
    views: int = 8  # bank views per shot, view 0 = the shot itself
    angle: float = 10.0  # max in-plane rotation of a view, degrees (reflect padding)
    shift: float = 0.03  # max shift of a view, fraction of the image side (reflect padding)
    jitter: float = 0.1  # brightness/contrast jitter amplitude of a view
    neighbors: int = 8  # K of the feature-space kNN graph (self excluded)
    hidden: int = 32  # width of the graph head
    train_defects: int = 24  # generated defective views the head trains on
    train_normals: int = 4  # held-out normal views (head training, d_scale, g_scale)
    train_steps: int = 80  # optimiser steps
    train_nodes: int = 2048  # patch nodes per step (whole graphs: 8 at 128 px, 2 at 256 px)
    lr: float = 3e-3
    head_weight: float = 1.0  # weight of sigmoid(head logit) in the patch score
    global_weight: float = 1.0  # weight of the global-descriptor distance in the image score
    memory_cap: int = 4096  # memory bank rows, whatever the number of shots
    coreset_dim: int = 128  # random projection for the coreset selection
    sigma: float = 4.0  # Gaussian smoothing of the pixel map
    reduce: str = "top_mean"  # image score: "max" or "top_mean" of the map
    top_fraction: float = 0.01  # for reduce="top_mean"
    seed: int = 0
    batch: int | None = None  # images per backbone pass; None: by device and size

    def __post_init__(self):
        if self.reduce not in ("max", "top_mean"):
            raise ValueError(f"reduce must be 'max' or 'top_mean', got {self.reduce!r}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        if self.views < 1 or self.memory_cap < 1 or self.neighbors < 1:
            raise ValueError("views, memory_cap and neighbors must be >= 1")
        if self.head and (self.train_defects < 1 or self.train_steps < 1):
            raise ValueError("the learned head needs train_defects >= 1 and train_steps >= 1")


ProgressFn = Callable[[str, int, int], None]


class GraphCore:
    """Few-shot GraphCore detector (see the module docstring). ``fit`` needs 1+ normal images.

    ``images`` are preprocessed ``Tensor[B,3,H,W]`` from ``backbone.preprocess``.
    """

    name: ClassVar[str] = "graphcore"
    capabilities: ClassVar[Capabilities] = Capabilities(
        "fit", exportable=True, fit_options=frozenset({"generator", "progress", "reuse_head_of"}), embeds=True,
        trainable=frozenset({"bank", "head", "descriptors"}))
    batchwise: ClassVar[bool] = capabilities.batchwise
    needs_fit: ClassVar[bool] = capabilities.needs_fit
    #: Per-class defaults applied before the caller's overrides.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: PatchBackbone, **config: Any):
        self.backbone = backbone
        self.config = GraphCoreConfig(**{**self.defaults, **config})
        self.scorer: GraphCoreScorer | None = None
        self.fit_info: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def memory(self) -> Tensor | None:
        return None if self.scorer is None else self.scorer.memory

    @property
    def is_fitted(self) -> bool:
        return self.scorer is not None

    @property
    def feature_layers(self) -> tuple[str, ...]:
        """``config.layers``, else the backbone's shallowest and deepest layers."""
        all_layers = tuple(self.backbone.layers)
        layers = tuple(self.config.layers) if self.config.layers else tuple(dict.fromkeys((all_layers[0], all_layers[-1])))
        unknown = [name for name in layers if name not in all_layers]
        if unknown:
            raise ValueError(f"{self.name}: layers {unknown} not in backbone {self.backbone.name} {all_layers}")
        return layers

    def _per_pass(self, height: int, width: int) -> int:
        # CPU: small passes stay in cache (about 2^18 input pixels is fastest); CUDA: large batches
        return self.config.batch or (256 if self.device.type == "cuda" else max(1, 2**18 // (height * width)))

    def _new_scorer(self, memory: Tensor, head: GraphHead | None = None, descriptors: Tensor | None = None,
                    d_scale: float = 1.0, g_scale: float = 1.0) -> GraphCoreScorer:
        """A scorer on this detector's backbone, layers and scoring options."""
        cfg = self.config
        return GraphCoreScorer(self.backbone, self.feature_layers, memory, head, descriptors, d_scale, g_scale,
                               normalize=cfg.normalize, neighbors=cfg.neighbors, sigma=cfg.sigma, reduce=cfg.reduce,
                               top_fraction=cfg.top_fraction, head_weight=cfg.head_weight,
                               global_weight=cfg.global_weight)

    def _scorer(self) -> GraphCoreScorer:
        """An unfitted scorer (empty bank) for the image-only feature stage."""
        return self.scorer or self._new_scorer(torch.zeros(1, 1))

    # ---- features -------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, images: Tensor) -> Tensor:
        """Patch features ``[B,h,w,C]`` of preprocessed images: one backbone pass, fit-independent."""
        scorer = self._scorer()
        step = self._per_pass(*images.shape[-2:])
        return torch.cat([scorer.features(part.to(self.device)) for part in images.split(step)])

    # ---- fitting ----------------------------------------------------------------------------
    def augment(self, images: Tensor, views: int, seed: int, *, keep_first: bool = True) -> Tensor:
        """``[B,3,H,W]`` -> ``[B*views,3,H,W]``: (view 0 = the shots as they are when
        ``keep_first``) shifted, slightly rotated, jittered copies; under ``orientation="free"``
        they also cycle through the symmetry group (D4 / Klein). Seeded."""
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        mean = torch.tensor(self.backbone.preprocess.mean).view(1, 3, 1, 1).to(images)
        std = torch.tensor(self.backbone.preprocess.std).view(1, 3, 1, 1).to(images)
        h, w = images.shape[-2:]
        group = symmetry_group(h, w) if cfg.orientation == "free" else (0,)
        pad = max(0, min(int(round(cfg.shift * min(h, w))), min(h, w) - 1))
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect") if pad else images
        out = [images] if keep_first else []
        for v in range(1 if keep_first else 0, views):
            dy, dx = (torch.randint(-pad, pad + 1, (2,), generator=gen) + pad).tolist()
            x = padded[..., dy : dy + h, dx : dx + w]
            if cfg.angle:
                x = _rotate(x, float((2 * torch.rand((), generator=gen) - 1) * cfg.angle))
            x = x * std + mean  # back to [0, 1] pixels
            contrast = 1 + cfg.jitter * (2 * torch.rand(images.shape[0], 1, 1, 1, generator=gen) - 1)
            bright = 0.5 * cfg.jitter * (2 * torch.rand(images.shape[0], 1, 1, 1, generator=gen) - 1)
            centre = x.mean((1, 2, 3), keepdim=True)
            x = ((x - centre) * contrast.to(x) + centre + bright.to(x)).clamp(0, 1)
            x = (x - mean) / std
            g = group[v % len(group)] if keep_first else group[int(torch.randint(len(group), (), generator=gen))]
            out.append(d4_apply(x, g))
        return torch.cat(out)

    def _to_rgb(self, x: Tensor) -> list[np.ndarray]:
        mean = torch.tensor(self.backbone.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone.preprocess.std).view(1, 3, 1, 1)
        rgb = ((x.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        return list(rgb.permute(0, 2, 3, 1).numpy())

    def fit(self, images: Tensor, *, generator: Any = None, progress: ProgressFn | None = None,
            reuse_head_of: GraphCore | None = None) -> GraphCore:
        """Bank, scales and (with ``head``) the graph head from ``images`` (1+ normal shots,
        preprocessed). ``generator``: what :func:`inspector.synth.generate_defects` makes the
        head's training defects with (None: the weight-free fallback kinds). ``progress``:
        optional ``progress(stage, done, total)`` callback; a tqdm bar shows the training.

        ``reuse_head_of``: a fitted GraphCore (same config) whose trained head is reused instead of
        training one; bank and scales still come from ``images``. Registration's held-out folds use
        it: training the head once per fold made registration 5x slower on a CPU."""
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"{self.name}: fit needs Tensor[K,3,H,W] with K >= 1 normal images")
        cfg = self.config
        report = progress or (lambda stage, done, total: None)
        images = images.detach().float().cpu()
        size = tuple(images.shape[-2:])
        report("bank", 0, 1)
        with torch.inference_mode():
            views = self.augment(images, cfg.views, cfg.seed)
            bank_feats = self.embed(views)
            flat = bank_feats.reshape(-1, bank_feats.shape[-1])
            idx = greedy_coreset(flat, min(cfg.memory_cap, flat.shape[0]), proj_dim=cfg.coreset_dim, seed=cfg.seed)
            memory = flat[idx].contiguous()
            descriptors = image_descriptor(bank_feats)
        report("bank", 1, 1)
        self.fit_info = {"shots": int(images.shape[0]), "views": int(views.shape[0]), "patches": int(flat.shape[0]),
                         "memory": int(memory.shape[0]), "image_size": list(size), "grid": list(bank_feats.shape[1:3])}
        needs_scales = cfg.head or cfg.global_branch
        if not needs_scales:
            self.scorer = self._new_scorer(memory)
            return self
        scorer = self._new_scorer(memory, None, descriptors if cfg.global_branch else None)
        # Held-out normal views (other random transforms than the bank's): the scales of both terms.
        with torch.inference_mode():
            normal = self.augment(images, max(1, cfg.train_normals // len(images) + 1), cfg.seed + 1,
                                  keep_first=False)[: max(cfg.train_normals, 1)]
            normal_feats = self.embed(normal)
            normal_dist = scorer.patch_distance(normal_feats)
            scorer.d_scale = float(normal_dist.mean().clamp_min(1e-6))
            if cfg.global_branch:
                # leave-one-shot-out is impossible at k = 1; held-out views give a scale at every k
                scorer.g_scale = float(nn_distance(image_descriptor(normal_feats), descriptors).mean().clamp_min(1e-6))
        if cfg.head and reuse_head_of is not None:
            donor = reuse_head_of._require_fit()
            if donor.head is None or reuse_head_of.config != cfg:
                raise ValueError(f"{self.name}: reuse_head_of needs a fitted detector with a head and the same config")
            scorer.head = donor.head
            self.fit_info["head"] = {**reuse_head_of.fit_info.get("head", {}), "reused": True}
        elif cfg.head:
            scorer.head = self._train_head(images, scorer, normal_feats, normal_dist, generator, report)
            self.fit_info["head"] = self._head_info
        self.fit_info.update({"d_scale": scorer.d_scale, "g_scale": scorer.g_scale})
        self.scorer = scorer
        return self

    def _train_head(self, images: Tensor, scorer: GraphCoreScorer, normal_feats: Tensor, normal_dist: Tensor,
                    generator: Any, report: ProgressFn) -> GraphHead:
        from tqdm.auto import tqdm

        from inspector.synth import generate_defects

        cfg = self.config
        report("defects", 0, cfg.train_defects)
        with torch.inference_mode():
            base = self.augment(images, cfg.train_defects // len(images) + 1, cfg.seed + 2,
                                keep_first=False)[: cfg.train_defects]
        pairs = generate_defects(self._to_rgb(base), len(base), np.random.default_rng(cfg.seed), generator=generator)
        # generate_defects picks its sources at random: pair each result with its own mask only
        rgb = np.stack([p[0] for p in pairs])
        masks = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))
        report("defects", cfg.train_defects, cfg.train_defects)
        with torch.inference_mode():
            x = self.backbone.preprocess(list(rgb))
            feats = self.embed(x)
            dist = scorer.patch_distance(feats)
        h, w = feats.shape[1:3]
        target = F.adaptive_avg_pool2d(masks[:, None], (h, w))[:, 0].clamp(0, 1)
        feats = torch.cat([feats, normal_feats]).clone()
        dist = torch.cat([dist, normal_dist]).clone()
        target = torch.cat([target, torch.zeros(len(normal_feats), h, w)]).to(feats.device)
        n, c = len(feats), feats.shape[-1]
        # graphs are fixed per training image: build them once
        nodes = feats.reshape(n, h * w, c)
        rel = dist.reshape(n, h * w)
        rel = rel / rel.mean(1, keepdim=True).clamp_min(1e-6)
        knn = knn_neighbors(nodes, cfg.neighbors)
        grid = grid_neighbors(h, w, feats.device)
        pos = float(target.sum())
        pos_weight = torch.tensor(min(50.0, (target.numel() - pos) / max(pos, 1.0)), device=feats.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head = GraphHead(c, cfg.hidden).to(feats.device)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train_steps)
        gen = torch.Generator().manual_seed(cfg.seed)
        per_step = max(1, min(n, cfg.train_nodes // (h * w)))
        bar = tqdm(range(cfg.train_steps), desc=f"{self.name} head", leave=False, mininterval=1.0)
        threads = torch.get_num_threads()
        if feats.device.type == "cpu":
            # tiny scatter/matmul kernels: OpenMP spin-waiting across threads costs 5-20x on a busy CPU
            torch.set_num_threads(1)
        try:
            losses = self._train_loop(head, opt, sched, gen, bar, per_step, n, nodes, rel, knn, grid, target,
                                      pos_weight, report)
        finally:
            torch.set_num_threads(threads)
        head.eval().requires_grad_(False)
        self._head_info = {"train_images": n, "defects": len(pairs), "steps": cfg.train_steps,
                           "graphs_per_step": per_step,
                           "loss_first": round(float(np.mean(losses[:10])), 5),
                           "loss_last": round(float(np.mean(losses[-10:])), 5), "pos_weight": float(pos_weight)}
        return head

    def _train_loop(self, head, opt, sched, gen, bar, per_step, n, nodes, rel, knn, grid, target, pos_weight,
                    report) -> list[float]:
        cfg = self.config
        c = nodes.shape[-1]
        losses: list[float] = []
        head.train()
        for step in bar:
            pick = torch.randperm(n, generator=gen)[:per_step].to(nodes.device)
            b = len(pick)
            knn_ei = neighbors_to_edge_index(knn[pick])
            grid_ei = neighbors_to_edge_index(grid.unsqueeze(0).expand(b, -1, -1))
            logits = head(nodes[pick].reshape(-1, c), rel[pick].reshape(-1), knn_ei, grid_ei)
            loss = F.binary_cross_entropy_with_logits(logits, target[pick].reshape(-1), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == cfg.train_steps - 1:
                report("train", step + 1, cfg.train_steps)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        return losses

    # ---- scoring ------------------------------------------------------------------------------
    def _require_fit(self) -> GraphCoreScorer:
        if self.scorer is None:
            raise RuntimeError(f"{self.name}: call fit(normal_images) (or load a state) before score()")
        return self.scorer

    @torch.inference_mode()
    def patch_scores(self, feats: Tensor) -> Tensor:
        """Nearest-memory distance of every patch of ``embed(images)`` ``[B,h,w,C]``: ``[B,h,w]``."""
        scorer = self._require_fit()
        if feats.shape[-1] != scorer.memory.shape[1]:
            raise ValueError(f"{self.name}: features have {feats.shape[-1]} dims, memory bank "
                             f"{scorer.memory.shape[1]}: wrong backbone or layers for this state?")
        return scorer.patch_distance(feats)

    @torch.inference_mode()
    def score_embeddings(self, feats: Tensor, size: tuple[int, int]) -> AnomalyResult:
        """Score precomputed ``embed(images)`` at input resolution ``size`` (H, W).

        Patch features depend only on the image, never on the fit, so an evaluation that
        compares several fits (shot counts, seeds) embeds its test set once."""
        scorer = self._require_fit()
        self.patch_scores(feats[:1])  # dimension check with a clear error
        step = 64
        outs = [scorer.score_features(part.to(self.device), tuple(size)) for part in feats.split(step)]
        return AnomalyResult(torch.cat([m for m, _ in outs]), torch.cat([s for _, s in outs])).cpu()

    def score(self, images: Tensor) -> AnomalyResult:
        """Maps ``[B,H,W]`` at the input resolution and image scores ``[B]``; images independent."""
        if images.ndim != 4:
            raise ValueError(f"{self.name}: expected Tensor[B,3,H,W], got {tuple(images.shape)}")
        self._require_fit()
        return self.score_embeddings(self.embed(images), tuple(images.shape[-2:]))

    def export_module(self) -> nn.Module:
        """The traceable scoring module (images -> maps, scores) that ``score`` itself runs."""
        return self._require_fit()

    # ---- state --------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        scorer = self.scorer
        if scorer is None:
            raise RuntimeError(f"{self.name}: nothing to save before fit()")
        tensors = {"memory": scorer.memory.detach().float().cpu().contiguous()}
        if scorer.descriptors is not None:
            tensors["descriptors"] = scorer.descriptors.detach().float().cpu().contiguous()
        if scorer.head is not None:
            tensors.update({f"head.{k}": v.detach().float().cpu().contiguous()
                            for k, v in scorer.head.state_dict().items()})
        config = {
            "detector": self.name,
            "format": FORMAT_VERSION,
            "backbone": self.backbone.name,
            "image_size": self.backbone.preprocess.size,
            "params": dataclasses.asdict(self.config),
            "scales": {"d_scale": scorer.d_scale, "g_scale": scorer.g_scale},
            "fit": self.fit_info,
        }
        return tensors, config

    @classmethod
    def from_state(cls, backbone: PatchBackbone, tensors: dict[str, Tensor], config: dict[str, Any]) -> GraphCore:
        if config.get("detector") != cls.name:
            raise ValueError(f"state is for detector {config.get('detector')!r}, not {cls.name!r}")
        if config.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported {cls.name} state format {config.get('format')!r} (this version reads "
                             f"{FORMAT_VERSION}); re-register the product")
        if config.get("backbone") != backbone.name:
            raise ValueError(f"state was fitted on backbone {config.get('backbone')!r}, got {backbone.name!r}")
        det = cls(backbone, **config["params"])
        dev = backbone.device
        memory = tensors["memory"].to(dev)
        head = None
        head_state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        if head_state:
            head = GraphHead(memory.shape[1], det.config.hidden)
            head.load_state_dict(head_state, strict=True)
            head = head.to(dev).eval().requires_grad_(False)
        desc = tensors.get("descriptors")
        scales = config.get("scales", {})
        det.scorer = det._new_scorer(memory, head, None if desc is None else desc.to(dev),
                                     scales.get("d_scale", 1.0), scales.get("g_scale", 1.0))
        det.fit_info = dict(config.get("fit", {}))
        return det

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (bank, head, descriptors) + ``<path>.json`` atomically."""
        from inspector.state import save_state

        return save_state(path, *self.state())

    @classmethod
    def load(cls, path: str | Path, backbone: PatchBackbone) -> GraphCore:
        from inspector.state import load_state

        return cls.from_state(backbone, *load_state(path))


class PatchCoreKNN(GraphCore):
    """In-run baseline: PatchCore kNN on the same backbone, layers and shots (no views, no head,
    no global branch): patch features of the shots, greedy coreset, nearest-neighbour distance."""

    name: ClassVar[str] = "patchcore"
    capabilities: ClassVar[Capabilities] = dataclasses.replace(GraphCore.capabilities, trainable=frozenset({"bank"}))
    defaults: ClassVar[dict[str, Any]] = {"head": False, "global_branch": False, "views": 1, "orientation": "fixed"}


class AugmentedPatchCore(GraphCore):
    """PatchCore on GraphCore's bank of augmented views (same views and orientation), no head and
    no global branch: what the graph head and the global branch are measured against."""

    name: ClassVar[str] = "patchcore-aug"
    capabilities: ClassVar[Capabilities] = dataclasses.replace(GraphCore.capabilities, trainable=frozenset({"bank"}))
    defaults: ClassVar[dict[str, Any]] = {"head": False, "global_branch": False}


__all__ = [
    "AugmentedPatchCore",
    "GraphCore",
    "GraphCoreConfig",
    "PatchCoreKNN",
    "d4_apply",
    "d4_invert",
    "greedy_coreset",
    "nearest_distance",
    "symmetry_group",
]
