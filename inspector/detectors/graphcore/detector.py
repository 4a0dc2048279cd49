"""Few-shot GraphCore: a memory bank of the shots, plus optional parts a product earns with real evidence.

GraphCore (Xie et al., ICLR 2023) registers a product from 1-8 normal images. Here it is a memory
bank and three optional parts that share one backbone pass per test image; their scoring is one
module, :class:`~inspector.detectors.graphcore.torch_model.GraphCoreScorer` (``score`` runs it,
ONNX export traces it). This module fits it:

1. **Memory bank** (PatchCore's): patch features of the shots (and of the product's confirmed
   normals, when it has real evidence), reduced by greedy coreset to at most ``memory_cap`` rows
   whatever the number of images, so scoring time does not grow with the evidence (the cap
   holds every patch of 4 shots at 256 px, so the usual registration loses nothing to the
   coreset; confirmed normals beyond it buy coverage, not time). A test patch's distance ``d``
   to its nearest bank row is the anomaly evidence that needs no training, so a defect unlike
   anything seen is still caught.
2. **Augmented views** (optional): shifted, slightly rotated, jittered copies of the shots in the
   bank.
3. **Learned graph head** (optional; torch_geometric, trained at ``fit``): every patch is a node;
   its input is the (linearly projected) patch feature and ``d / mean_image(d)``. Edges join each
   node to its ``neighbors`` nearest patches in feature space (cosine kNN, as Vision GNN builds
   its graph) and to its 4 grid neighbours; EdgeConv over the feature graph, SAGE over the grid,
   a linear read-out: a per-patch defect logit. It trains on generated defects
   (:func:`inspector.synth.generate_defects`, exact masks), on the product's confirmed defects
   (the drawn mask, or a multiple-instance label: :mod:`~inspector.detectors.graphcore.training`)
   and on normals. Patch score ``s = d / d_scale + head_weight * sigmoid(logit)``, ``d_scale`` the
   mean bank distance of held-out normal views (both terms O(1)).
4. **Global branch** (optional): an image descriptor (mean and std of the patch features) and its
   distance to the nearest bank-image descriptor, in units of the same distance for held-out
   normal views, added to the image score with ``global_weight``: whole-image changes that no
   single patch shows.

**Defaults: the bank of the shots, nothing else.** Every optional part was tuned on generated
defects and none held on real ones (``bench/GRAPHCORE.md``, written by
``bench/graphcore_ablation.py``). So with no real evidence GraphCore scores exactly as
:class:`PatchCoreKNN` does, and a part is switched on per product only by the rule of
:mod:`~inspector.detectors.graphcore.selection` (``select="auto"``): with at least
``MIN_DEFECTS`` confirmed defects, a part (and its weight) is kept only if it raises the held-out
separation of the product's own confirmed normals and defects. ``select="off"`` takes the
configured ``views`` / ``head`` / ``global_branch`` as they are: ``head=True,
global_branch=True, views=8, select="off"`` is the former generated-defect-tuned configuration,
for benches. Under ``"auto"`` the configured parts stand only while the evidence is below the
minimum. Confirmed normals always join the bank (more real normals are the surest gain).

``orientation``: ``"free"`` puts the D4 transforms (rot90 x flip; the Klein four-group for
non-square inputs) of every shot into the bank (and cycles the augmented views and the head's
training views through the group), so a part presented rotated or flipped is normal; ``"fixed"``
keeps orientation as information, so a rotated part or pattern is a defect. Both cost one
backbone pass per test image. ``free`` is approximate, not exact (the backbone is not
equivariant): ``tests/test_graphcore.py`` bounds the relative change of image scores under any
D4 transform at 15 %. Default ``fixed``: the parts that arrive aligned need orientation as
information.

Patch features: by default the backbone's shallowest and deepest layers (Lite0 ``blocks.4``
stride 8 + ``blocks.10`` stride 16, 3x3 locally averaged, on the stride-8 grid: PatchCore's
layer2 + layer3 recipe, as anomalib's PatchCore), each L2-normalised; chosen on real defects, not
generated ones. Figures: ``bench/GRAPHCORE.md`` (parts, real-evidence protocol) and
``bench/GRAPHCORE_SPEED.md`` (speed).

:class:`PatchCoreKNN` ("patchcore") is the in-run baseline (the bank only, never a selected
part) and :class:`AugmentedPatchCore` ("patchcore-aug") the bank of augmented views without head
and global branch; both take confirmed normals into the bank too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inspector.backbones.registry import PatchBackbone
from inspector.detectors.base import AnomalyResult, Capabilities, FitEvidence
from inspector.detectors.graphcore.selection import MIN_DEFECTS, MIN_NORMALS, RULE, Bank, EvidenceCV, reason
from inspector.detectors.graphcore.torch_model import GraphCoreScorer, GraphHead, nn_distance
from inspector.detectors.graphcore.training import HeadData, ProgressFn

FORMAT_VERSION = 2
ORIENTATIONS = ("free", "fixed")
SELECT = ("auto", "off")
#: The optional parts the selection rule decides on.
OPTIONAL = ("views", "head", "global_branch")
#: The config fields a fit chooses (the rest of the config is fixed by the caller).
PARTS = ("views", "head", "global_branch", "head_weight", "global_weight")


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
    head: bool = False  # the learned graph head (select="off", or "auto" below the evidence minimum)
    global_branch: bool = False  # image-descriptor distance added to the image score (same)
    views: int = 1  # bank views per shot, view 0 = the shot itself (same)
    select: str = "auto"  # "auto": real evidence switches the optional parts (selection.py); "off": as configured
    select_parts: list[str] = field(default_factory=lambda: list(OPTIONAL))  # the parts select="auto" may switch on
    candidate_views: int = 8  # views per shot of the augmented-views candidate under select="auto"
    weight_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # head / global weights tried
    cv_folds: int = 3  # head trainings when the evidence is cross-validated
    cv_steps: int = 40  # optimiser steps of each of them
    mil_top: float = 0.01  # patches of a confirmed defect without mask taken as positives (fraction)
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
    memory_cap: int = 4096  # memory bank rows, whatever the number of shots and confirmed normals
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
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {self.select!r}")
        if self.views < 1 or self.candidate_views < 1 or self.memory_cap < 1 or self.neighbors < 1:
            raise ValueError("views, candidate_views, memory_cap and neighbors must be >= 1")
        if self.head and (self.train_defects < 1 or self.train_steps < 1):
            raise ValueError("the learned head needs train_defects >= 1 and train_steps >= 1")
        self.weight_grid = [float(w) for w in self.weight_grid]
        self.select_parts = [str(p) for p in self.select_parts]
        if not set(self.select_parts) <= set(OPTIONAL):
            raise ValueError(f"select_parts must be among {OPTIONAL}, got {self.select_parts}")
        if not self.weight_grid or min(self.weight_grid) <= 0 or self.cv_folds < 1 or self.cv_steps < 1:
            raise ValueError("weight_grid needs positive weights; cv_folds and cv_steps must be >= 1")
        if not 0 < self.mil_top <= 1:
            raise ValueError(f"mil_top must be in (0, 1], got {self.mil_top}")


class GraphCore:
    """Few-shot GraphCore detector (see the module docstring). ``fit`` needs 1+ normal images.

    ``images`` are preprocessed ``Tensor[B,3,H,W]`` from ``backbone.preprocess``.
    """

    name: ClassVar[str] = "graphcore"
    capabilities: ClassVar[Capabilities] = Capabilities(
        "fit", exportable=True, fit_options=frozenset({"generator", "progress", "reuse_head_of", "evidence"}),
        embeds=True, trainable=frozenset({"bank", "head", "descriptors"}))
    batchwise: ClassVar[bool] = capabilities.batchwise
    needs_fit: ClassVar[bool] = capabilities.needs_fit
    #: Per-class defaults applied before the caller's overrides.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: PatchBackbone, **config: Any):
        self.backbone = backbone
        self.config = GraphCoreConfig(**{**self.defaults, **config})
        #: the configuration the fitted model scores with: ``config`` with the optional parts
        #: (:data:`PARTS`) as the fit chose them (``config`` itself stays what the caller asked,
        #: so a refit from the same configuration decides again)
        self.effective: GraphCoreConfig = self.config
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
                    d_scale: float = 1.0, g_scale: float = 1.0, cfg: GraphCoreConfig | None = None) -> GraphCoreScorer:
        """A scorer on this detector's backbone, layers and scoring options (``cfg``: default
        :attr:`effective`)."""
        cfg = cfg or self.effective
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
        """``[B,3,H,W]`` -> shifted, slightly rotated, jittered copies; seeded.

        With ``keep_first`` the shots come first as they are (under ``orientation="free"`` in
        every element of the symmetry group, D4 / Klein, group-major), then ``views - 1``
        augmented copies, view-major (``[B*(|G|+views-1),3,H,W]``, ``|G|`` 1 under ``fixed``), so
        the first ``B*(|G|+v-1)`` images are the bank of ``v`` views. Without it ``B*views`` copies,
        each in a random element of the group under ``free``."""
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        mean = torch.tensor(self.backbone.preprocess.mean).view(1, 3, 1, 1).to(images)
        std = torch.tensor(self.backbone.preprocess.std).view(1, 3, 1, 1).to(images)
        h, w = images.shape[-2:]
        group = symmetry_group(h, w) if cfg.orientation == "free" else (0,)
        pad = max(0, min(int(round(cfg.shift * min(h, w))), min(h, w) - 1))
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect") if pad else images
        out = [d4_apply(images, g) for g in group] if keep_first else []
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

    def _bank_images(self, shots: int, views: int, height: int, width: int) -> int:
        """How many of :meth:`augment`'s first images make the bank of ``views`` views."""
        group = symmetry_group(height, width) if self.config.orientation == "free" else (0,)
        return shots * (len(group) + views - 1)

    def _to_rgb(self, x: Tensor) -> list[np.ndarray]:
        mean = torch.tensor(self.backbone.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone.preprocess.std).view(1, 3, 1, 1)
        rgb = ((x.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        return list(rgb.permute(0, 2, 3, 1).numpy())

    def fit(self, images: Tensor, *, evidence: FitEvidence | None = None, generator: Any = None,
            progress: ProgressFn | None = None, reuse_head_of: GraphCore | None = None) -> GraphCore:
        """Bank, optional parts and scales from ``images`` (1+ normal shots, preprocessed).

        ``evidence``: the product's real evidence (:class:`~inspector.detectors.base.FitEvidence`,
        preprocessed like the shots). Its confirmed normals join the bank; under ``select="auto"``
        with enough of it the optional parts are chosen on it (:mod:`.selection`), and its held-out
        scores under the chosen configuration are ``fit_info["evidence_cv"]``; the decision is
        ``fit_info["selection"]`` (written with or without evidence).
        ``generator``: what :func:`inspector.synth.generate_defects` makes the head's generated
        defects with (None: the weight-free fallback kinds). ``progress``: optional
        ``progress(stage, done, total)`` callback (stages ``bank``, ``defects``, ``select``,
        ``train``); a tqdm bar shows the training.

        ``reuse_head_of``: a fitted detector of the same class and config whose chosen parts and
        trained head are reused instead of choosing and training again (no selection, no
        ``evidence_cv``); bank and scales still come from ``images`` (and the evidence's
        normals). Registration's held-out folds use it: training the head once per fold would
        multiply registration time by the number of folds."""
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"{self.name}: fit needs Tensor[K,3,H,W] with K >= 1 normal images")
        t0 = time.perf_counter()
        cfg = self.config
        report = progress or (lambda stage, done, total: None)
        images = images.detach().float().cpu()
        size = tuple(images.shape[-2:])
        ev = self._check_evidence(evidence, size)
        donor = self._check_donor(reuse_head_of)
        counts = ev.counts if ev is not None else {"normals": 0, "defects": 0}
        enough = counts["defects"] >= MIN_DEFECTS and counts["normals"] >= MIN_NORMALS
        auto = donor is None and cfg.select == "auto" and enough
        configured = donor.effective if donor is not None else cfg
        view_options = (sorted({1, cfg.candidate_views}) if auto and "views" in cfg.select_parts
                        else [1] if auto else [configured.views])
        scaled = auto or configured.head or configured.global_branch
        train = donor is None and ((auto and "head" in cfg.select_parts) or (not auto and configured.head))

        report("bank", 0, 1)
        with torch.inference_mode():
            view_feats = self.embed(self.augment(images, max(view_options), cfg.seed))
            empty = view_feats[:0]
            normal_feats = self.embed(ev.normals) if counts["normals"] else empty
            defect_feats = self.embed(ev.defects) if counts["defects"] else empty
            probe_feats = self.embed(self._probes(images)) if scaled else empty
            banks = {v: Bank.build(view_feats[: self._bank_images(len(images), v, *size)], normal_feats,
                                   cfg.memory_cap, self._coreset) for v in view_options}
        report("bank", 1, 1)
        gen_feats, gen_masks = self._generated(images, generator, report) if train else (empty, empty[..., 0])
        cv = None
        if ev is not None or scaled:
            reducer = self._new_scorer(banks[view_options[0]].core, cfg=cfg)  # map + image score only
            cv = EvidenceCV(cfg, banks, normal_feats, defect_feats, ev.masks if ev is not None else [], probe_feats,
                            gen_feats, gen_masks, reduce=lambda patch: reducer.reduce_map(patch, size)[1],
                            report=report)
        if auto:
            chosen, cands = cv.choose(cfg.candidate_views, tuple(cfg.select_parts))
            on = {"head": chosen["head_weight"] > 0, "global_branch": chosen["global_weight"] > 0}
            eff = dataclasses.replace(
                cfg, views=chosen["views"], **on,
                head_weight=chosen["head_weight"] if on["head"] else cfg.head_weight,
                global_weight=chosen["global_weight"] if on["global_branch"] else cfg.global_weight)
        else:
            cands = []
            eff = dataclasses.replace(cfg, **{k: getattr(configured, k) for k in PARTS})
        bank = banks[eff.views]
        head_w = eff.head_weight if eff.head else 0.0
        global_w = eff.global_weight if eff.global_branch else 0.0
        scorer = self._new_scorer(bank.core, None, bank.desc if eff.global_branch else None, cfg=eff)
        fit_info = {"shots": int(images.shape[0]), "views": bank.view_images, "patches": int(bank.rows.shape[0]),
                    "memory": int(bank.core.shape[0]), "image_size": list(size), "grid": list(view_feats.shape[1:3])}
        if ev is not None:
            fit_info["evidence"] = counts
        if eff.head or eff.global_branch:
            dist = cv.distances(eff.views)
            scorer.d_scale, scorer.g_scale = dist.d_scale, dist.g_scale
            fit_info.update({"d_scale": scorer.d_scale, "g_scale": scorer.g_scale})
        if eff.head and donor is not None:
            if donor.scorer.head is None:
                raise ValueError(f"{self.name}: reuse_head_of has no trained head")
            scorer.head = donor.scorer.head
            fit_info["head"] = {**donor.fit_info.get("head", {}), "reused": True}
        elif eff.head:
            sets = cv.head_sets(eff.views)
            scorer.head, info = cv.train(HeadData.cat(list(sets.values())), cfg.train_steps, report=report)
            fit_info["head"] = {**info, "defects": len(gen_feats), "real_defects": counts["defects"],
                                     "real_normals": counts["normals"]}
        if ev is not None and donor is None:
            sn, sd = cv.scores(eff.views, head_w, global_w)
            fit_info["evidence_cv"] = {"normal": [float(x) for x in sn], "defect": [float(x) for x in sd]}
        fit_info["selection"] = self._selection(auto, donor is not None, counts, cands, eff, cv)
        fit_info["seconds"] = round(time.perf_counter() - t0, 3)
        self.effective, self.scorer, self.fit_info = eff, scorer, fit_info
        return self

    def _selection(self, auto: bool, reused: bool, counts: dict[str, int], cands: list[dict],
                   eff: GraphCoreConfig, cv: EvidenceCV | None) -> dict[str, Any]:
        """``fit_info["selection"]``: the rule, the evidence it saw, what it tried and kept, why."""
        cfg = self.config
        chosen = {"views": eff.views, "head_weight": eff.head_weight if eff.head else 0.0,
                  "global_weight": eff.global_weight if eff.global_branch else 0.0}
        if reused:
            why = "parts of the fitted detector given as reuse_head_of (no selection)"
        elif cfg.select == "off":
            why = "select='off': the configured parts"
        elif not auto:
            why = (f"{counts['defects']} confirmed defects and {counts['normals']} confirmed normals, below the "
                   f"minimum of {MIN_DEFECTS} defects and {MIN_NORMALS} normals: nothing switched on by the rule "
                   "(the configured parts)")
        else:
            why = reason(chosen, cands, counts)
        return {"rule": RULE if cfg.select == "auto" else "off", "min_defects": MIN_DEFECTS,
                "min_normals": MIN_NORMALS, "evidence": dict(counts), "candidates": cands,
                "enabled": {"head": bool(eff.head), "global_branch": bool(eff.global_branch), "views": eff.views > 1},
                "weights": {"head": chosen["head_weight"], "global_branch": chosen["global_weight"]},
                "views": eff.views, "folds": cv.folds() if (cv is not None and auto) else 0, "reason": why}

    def _check_evidence(self, evidence: FitEvidence | None, size: tuple[int, ...]) -> FitEvidence | None:
        """The evidence on the CPU as float, or None when it holds no image."""
        if evidence is None or not len(evidence):
            return None
        if not isinstance(evidence, FitEvidence):
            raise TypeError(f"{self.name}: evidence must be a FitEvidence, got {type(evidence).__name__}")
        for t in (evidence.normals, evidence.defects):
            if len(t) and tuple(t.shape[-2:]) != size:
                raise ValueError(f"{self.name}: evidence of {tuple(t.shape[-2:])} for shots of {size}: preprocess "
                                 "both with the backbone's preprocessing")
        return FitEvidence(evidence.normals.detach().float().cpu(), evidence.defects.detach().float().cpu(),
                           [None if m is None else m.detach().float().cpu() for m in evidence.masks])

    def _check_donor(self, donor: GraphCore | None) -> GraphCore | None:
        if donor is None:
            return None
        donor._require_fit()
        if type(donor) is not type(self) or donor.config != self.config:
            raise ValueError(f"{self.name}: reuse_head_of needs a fitted detector of the same class and config")
        return donor

    def _coreset(self, rows: Tensor, n: int) -> Tensor:
        return greedy_coreset(rows, n, proj_dim=self.config.coreset_dim, seed=self.config.seed)

    def _probes(self, images: Tensor) -> Tensor:
        """Held-out normal views of the shots (other random transforms than the bank's): the
        scales of the bank and global terms, and the head's generated normals."""
        cfg = self.config
        n = max(cfg.train_normals, 1)
        return self.augment(images, max(1, n // len(images) + 1), cfg.seed + 1, keep_first=False)[:n]

    def _generated(self, images: Tensor, generator: Any, report: ProgressFn) -> tuple[Tensor, Tensor]:
        """Features ``[G,h,w,C]`` and exact masks ``[G,H,W]`` of generated defects on augmented views."""
        from inspector.synth import generate_defects

        cfg = self.config
        report("defects", 0, cfg.train_defects)
        with torch.inference_mode():
            base = self.augment(images, cfg.train_defects // len(images) + 1, cfg.seed + 2,
                                keep_first=False)[: cfg.train_defects]
        pairs = generate_defects(self._to_rgb(base), len(base), np.random.default_rng(cfg.seed), generator=generator)
        # generate_defects picks its sources at random: pair each result with its own mask only
        masks = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32)) if pairs else None
        report("defects", cfg.train_defects, cfg.train_defects)
        if not pairs:
            feats = self.embed(images[:1])[:0]
            return feats, torch.zeros(0, *images.shape[-2:])
        with torch.inference_mode():
            feats = self.embed(self.backbone.preprocess([p[0] for p in pairs]))
        return feats, masks.to(feats.device)

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
            "effective": {k: getattr(self.effective, k) for k in PARTS},
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
        # states written before the selection rule have no "effective": they score as configured
        det.effective = dataclasses.replace(det.config, **config.get("effective", {}))
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
    no global branch, never selected): patch features of the shots (and of confirmed normals, when
    given), greedy coreset, nearest-neighbour distance."""

    name: ClassVar[str] = "patchcore"
    capabilities: ClassVar[Capabilities] = dataclasses.replace(GraphCore.capabilities, trainable=frozenset({"bank"}))
    defaults: ClassVar[dict[str, Any]] = {"head": False, "global_branch": False, "views": 1, "orientation": "fixed",
                                          "select": "off"}


class AugmentedPatchCore(GraphCore):
    """PatchCore on the bank of augmented views GraphCore's rule may choose (``candidate_views``
    views per shot, same orientation), no head and no global branch, never selected: what the
    augmented views are measured against."""

    name: ClassVar[str] = "patchcore-aug"
    capabilities: ClassVar[Capabilities] = dataclasses.replace(GraphCore.capabilities, trainable=frozenset({"bank"}))
    defaults: ClassVar[dict[str, Any]] = {"head": False, "global_branch": False,
                                          "views": GraphCoreConfig.candidate_views, "select": "off"}


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
