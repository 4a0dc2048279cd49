"""Few-shot GraphCore: isometric-invariant graph features and a small memory bank.

GraphCore (Xie et al., ICLR 2023, "Pushing the limits of few-shot anomaly detection in industry
vision: GraphCore") registers a product from 1-8 normal images. It replaces PatchCore's CNN patch
features by *visual isometric invariant features* (VIIF): patches become nodes of a graph whose
edges join each node to its K nearest neighbours **in feature space** (as Vision GNN builds its
graph), and a graph convolution with max-relative aggregation (Vision GNN / DeepGCN's MRConv)

    x_i'  =  [ x_i  ||  max_{j in N(i)} (x_j - x_i) ]          (channel-wise max)

updates every node. The memory bank is then PatchCore's: features of the (augmented) shots,
reduced by greedy coreset; a test patch scores its distance to the nearest memory feature.

What is invariant here, and why (read before relying on it):

* The graph stage is exactly *permutation equivariant*: node ``i``'s output depends on ``x_i`` and
  on the multiset of the other nodes' features, never on where a patch lies on the grid. Moving,
  rotating or flipping a pattern therefore changes nothing downstream **provided the per-patch
  features move with it**.
* A CNN's patch features do not do that: they see oriented edges, and with strided "SAME"
  padding even a flip shifts the sampling grid. Rotating a vertical brick wall by 90 degrees
  gives features of horizontal bricks, which a memory bank of vertical bricks calls anomalous.
  GraphCore's paper credits the GNN alone; here we make the claim true by construction:
  ``symmetrize=True`` averages the backbone over the dihedral group D4 (rot90 x 4, x flip, exact
  index permutations of a square tensor), ``F_sym(x) = 1/8 sum_g g^-1 F(g x)``. Then
  ``F_sym(h x) = h F_sym(x)`` exactly for every ``h`` in D4, the graph stage makes each node's
  feature independent of its position, and the maps of a rotated/flipped image are the rotated/
  flipped maps (image scores equal up to float rounding). Non-square inputs use the subgroup
  {identity, rot180, both flips}. Cost: 8 backbone passes per image.
  With ``symmetrize=False`` the shots are augmented with all eight D4 transforms instead (the
  paper's "feature augmentation"), which makes rotated test images only *approximately* match:
  image scores move by up to about 10 % under D4 (tests), against 2e-7 with symmetrization.
* The feature-space kNN graph (``neighbors`` K, self included as in Vision GNN) turns the
  max-relative half into a within-image context descriptor: for a normal texture patch the K
  most similar patches of the same image are close, so ``max_j (x_j - x_i)`` is small; a patch
  without close twins gets a large one. Measured honestly (brick, Lite0, 128 px, k=1, six
  draws of 16 good + 16 defective images): with the graph stage 0.968 image AUROC, without it
  0.968, with ``relative_weight`` 0.25/1.0 0.969/0.967. The graph is neutral on this data; the
  gain over PatchCore (0.885 upright, 0.849 on rotated parts) comes from the D4-averaged
  features and the augmented bank. ``relative_weight`` 2 hurt (0.70 vs 0.83 in an earlier
  run without per-layer normalisation), hence the default 0.5.

Trainable weights: none, by design. Vision GNN's update is a learned linear map; GraphCore uses
pretrained weights. With 1-8 unlabelled normal shots the only self-supervised signal is
invariance between D4 views, which the symmetrized features already satisfy exactly, so such a
loss is identically zero and a learned map would only fit noise of a few images. An orthogonal
(e.g. fixed random) update matrix would not change any L2 nearest-neighbour distance, so the
update is the identity with a fixed weight ``relative_weight`` on the relative half, and the GNN
output is concatenated with the raw (locally averaged) patch features as the paper's residual
Grapher combines them. The memory bank tensor is the whole fitted state (plus the JSON config).

Patch features: by default the backbone's shallowest layer (Lite0 ``blocks.4``, native stride
8), each layer's patch vector L2-normalised. On brick at 128 px this beat the two shallowest
layers (0.968 vs 0.962 at k=1) and un-normalised concatenation; objects whose defects need
more context may want ``layers=[...]`` with a deeper layer too.

Memory bank: each shot gives ``views`` views (view 0 is the shot; the others are rotated by up
to ``angle`` degrees and shifted by up to ``shift`` of the side, both with reflect padding, and
get a light brightness/contrast jitter; without symmetrization they also cycle through D4).
All node features are reduced with PatchCore's approximate greedy k-center coreset (random
projection to ``coreset_dim`` when wider) to at most ``memory_cap`` rows, whatever the number of
shots. Patch scores (nearest-neighbour L2 distance, chunked matmuls) -> bilinear upsampling +
Gaussian sigma=4 -> ``maps`` at input resolution; image score = mean of the top 1 % of the map
(``reduce="top_mean"``, default) or its maximum (``reduce="max"``).

:class:`PatchCoreKNN` ("patchcore") is the in-run baseline: the same class with the graph stage,
the symmetrization and the augmentation switched off — plain PatchCore on the same backbone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F
from torch_geometric.nn import MessagePassing

from ..backbone import PatchBackbone
from .base import AnomalyResult, patch_to_pixel, top_mean

FORMAT_VERSION = 1


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
    """``torch.rot90`` from flips and a transpose: the same exact permutation, and it traces to
    ONNX (which has no rot90 symbolic), so the exported graph uses this very function."""
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
# Graph stage: feature-space kNN graph + max-relative graph convolution (torch_geometric).
# --------------------------------------------------------------------------------------------
def knn_edge_index(x: Tensor, k: int, *, loop: bool = True, chunk: int = 16) -> Tensor:
    """kNN graph of each image's nodes, in feature space (cosine similarity, as Vision GNN).

    ``x``: ``[B,N,C]`` node features of ``B`` graphs. Returns ``edge_index [2, B*N*k]`` in
    torch_geometric's ``source_to_target`` convention over the flattened ``B*N`` nodes (graph
    ``b`` owns nodes ``b*N .. b*N+N-1``): row 0 the neighbour ``j``, row 1 the centre ``i``.
    With ``loop`` each node is its own first neighbour (Vision GNN keeps it); without, it is
    excluded. Equivalent to ``torch_geometric.nn.knn_graph(x, k, batch, loop, cosine=True)``,
    which needs torch_cluster; here one ``[N,N]`` similarity matmul + ``topk`` per image.
    """
    b, n, _ = x.shape
    k = min(k, n if loop else n - 1)
    xn = F.normalize(x, dim=-1)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nbrs = []
    for part in xn.split(chunk):
        sim = part @ part.transpose(1, 2)
        # self-similarity is 1 up to rounding: pin it so the self loop is always in (or out)
        sim.masked_fill_(eye, math.inf if loop else -math.inf)
        nbrs.append(sim.topk(k, dim=-1).indices)
    nbr = torch.cat(nbrs)  # [B,N,k]
    offset = (torch.arange(b, device=x.device) * n).view(b, 1, 1)
    src = (nbr + offset).reshape(-1)
    dst = (torch.arange(n, device=x.device).view(1, n, 1) + offset).expand(b, n, k).reshape(-1)
    return torch.stack([src, dst])


class MaxRelativeConv(MessagePassing):
    """Max-relative graph convolution (DeepGCN / Vision GNN), parameter-free update.

    ``out_i = [x_i || w * max_{j in N(i)} (x_j - x_i)]`` with ``N(i)`` the sources of edges into
    ``i``. Vision GNN follows this with a learned linear layer; see the module docstring for why
    the update here is the identity (an orthogonal map leaves every L2 distance unchanged).
    Nodes without incoming edges get a zero relative part.
    """

    def __init__(self, relative_weight: float = 1.0):
        super().__init__(aggr="max", flow="source_to_target")
        self.relative_weight = float(relative_weight)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        rel = self.propagate(edge_index, x=x)
        return torch.cat([x, self.relative_weight * rel], dim=-1)

    def message(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        return x_j - x_i


# --------------------------------------------------------------------------------------------
# Memory bank: greedy coreset and nearest-neighbour distances.
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
    """L2 distance of each row of ``queries [Q,D]`` to its nearest row of ``memory [M,D]``.

    Chunked over queries (peak ``chunk x M`` floats); squared distances by one matmul each.
    """
    m_sq = (memory * memory).sum(1)
    out = []
    for q in queries.split(chunk):
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ memory.T + m_sq
        out.append(d2.amin(1))
    return torch.cat(out).clamp_min_(0).sqrt_()


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
    """Everything that defines a fitted GraphCore besides the memory bank (saved as JSON)."""

    layers: list[str] | None = None  # backbone layers; None = the shallowest (see module docstring)
    normalize: bool = True  # L2-normalise each layer's patch vector before concatenating
    graph: bool = True  # the graph stage; False = PatchCore features
    neighbors: int = 9  # K of the feature-space kNN graph (Vision GNN: 9), self included
    relative_weight: float = 0.5  # weight of the max-relative half against the raw features
    symmetrize: bool = True  # D4 group-averaged backbone features (exact rotation/flip equivariance)
    views: int = 4  # views per shot for the memory bank, view 0 = the shot itself
    d4_views: bool | None = None  # cycle the views through D4 (default: when not symmetrized)
    angle: float = 10.0  # max in-plane rotation of a view, degrees (reflect padding)
    shift: float = 0.03  # max shift of a view, fraction of the image side (reflect padding)
    jitter: float = 0.1  # brightness/contrast jitter amplitude of a view
    memory_cap: int = 4096  # memory bank rows, whatever the number of shots
    coreset_dim: int = 128  # random projection for the coreset selection
    sigma: float = 4.0  # Gaussian smoothing of the pixel map
    reduce: str = "top_mean"  # image score: "max" or "top_mean" of the map
    top_fraction: float = 0.01  # for reduce="top_mean"
    seed: int = 0
    batch: int | None = None  # images per backbone pass (group copies included); None: by device and size

    def __post_init__(self):
        if self.reduce not in ("max", "top_mean"):
            raise ValueError(f"reduce must be 'max' or 'top_mean', got {self.reduce!r}")
        if self.views < 1 or self.memory_cap < 1 or self.neighbors < 1:
            raise ValueError("views, memory_cap and neighbors must be >= 1")

    @property
    def use_d4_views(self) -> bool:
        return (not self.symmetrize) if self.d4_views is None else bool(self.d4_views)


class GraphCore:
    """Few-shot GraphCore detector (see the module docstring). ``fit`` needs 1+ normal images.

    ``images`` are preprocessed ``Tensor[B,3,H,W]`` from ``backbone.preprocess``.
    """

    name: ClassVar[str] = "graphcore"
    batchwise: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True
    #: Per-class defaults applied before the caller's overrides.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: PatchBackbone, **config: Any):
        self.backbone = backbone
        self.config = GraphCoreConfig(**{**self.defaults, **config})
        self.conv = MaxRelativeConv(self.config.relative_weight)
        self.memory: Tensor | None = None
        self.fit_info: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def feature_layers(self) -> tuple[str, ...]:
        """Backbone layers used: ``config.layers``, else the backbone's shallowest (finest) layer."""
        layers = tuple(self.config.layers) if self.config.layers else tuple(self.backbone.layers[:1])
        unknown = [name for name in layers if name not in self.backbone.layers]
        if unknown:
            raise ValueError(f"{self.name}: layers {unknown} not in backbone {self.backbone.name} {self.backbone.layers}")
        return layers

    # ---- features -------------------------------------------------------------------------
    @torch.inference_mode()
    def patch_features(self, images: Tensor) -> Tensor:
        """Backbone stage: ``[B,3,H,W]`` -> ``[B,h,w,C]``, the chosen layers (each L2-normalised)
        concatenated, D4-averaged when symmetrizing."""
        group = symmetry_group(*images.shape[-2:]) if self.config.symmetrize else (0,)
        height, width = images.shape[-2:]
        # CPU: small passes stay in cache (about 2^18 input pixels is fastest); CUDA: large batches
        per_pass = self.config.batch or (256 if self.device.type == "cuda" else max(1, 2**18 // (height * width)))
        out = []
        for part in images.split(max(1, per_pass // len(group))):
            part = part.to(self.device)
            batch = torch.cat([d4_apply(part, g) for g in group]) if len(group) > 1 else part
            f = torch.cat([self._layer_features(b) for b in batch.split(per_pass)])
            if len(group) > 1:
                f = torch.stack([d4_invert(v, g, dims=(1, 2)) for g, v in zip(group, f.chunk(len(group)))]).mean(0)
            out.append(f)
        return torch.cat(out)

    def _layer_features(self, batch: Tensor) -> Tensor:
        feats = self.backbone.embed(batch)
        parts = [feats[layer] for layer in self.feature_layers]
        if self.config.normalize:
            parts = [F.normalize(p, dim=-1) for p in parts]
        return torch.cat(parts, dim=-1)

    @torch.inference_mode()
    def graph_features(self, feats: Tensor) -> Tensor:
        """Graph stage on ``[B,h,w,C]`` patch features -> ``[B,h,w,2C]`` node features."""
        b, h, w, c = feats.shape
        nodes = feats.reshape(b, h * w, c)
        edge_index = knn_edge_index(nodes, self.config.neighbors, loop=True)
        return self.conv(nodes.reshape(b * h * w, c), edge_index).reshape(b, h, w, -1)

    @torch.inference_mode()
    def embed(self, images: Tensor) -> Tensor:
        """Node features ``[B,h,w,D]`` of preprocessed images (what the memory bank stores)."""
        feats = self.patch_features(images)
        return self.graph_features(feats) if self.config.graph else feats

    # ---- fitting ----------------------------------------------------------------------------
    def augment(self, images: Tensor) -> Tensor:
        """``[B,3,H,W]`` shots -> ``[B*views,3,H,W]``: view 0 each shot as is, then shifted,
        jittered (and, with ``use_d4_views``, rotated/flipped) copies. Seeded."""
        cfg = self.config
        if cfg.views == 1:
            return images
        gen = torch.Generator().manual_seed(cfg.seed)
        mean = torch.tensor(self.backbone.preprocess.mean).view(1, 3, 1, 1).to(images)
        std = torch.tensor(self.backbone.preprocess.std).view(1, 3, 1, 1).to(images)
        h, w = images.shape[-2:]
        group = symmetry_group(h, w)
        pad = max(0, min(int(round(cfg.shift * min(h, w))), min(h, w) - 1))
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect") if pad else images
        views = [images]
        for v in range(1, cfg.views):
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
            if cfg.use_d4_views:
                x = d4_apply(x, group[v % len(group)])
            views.append(x)
        return torch.cat(views)

    @torch.inference_mode()
    def fit(self, images: Tensor) -> GraphCore:
        """Build the memory bank from ``images`` (1+ normal shots, preprocessed)."""
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"{self.name}: fit needs Tensor[K,3,H,W] with K >= 1 normal images")
        views = self.augment(images)
        feats = self.embed(views)
        flat = feats.reshape(-1, feats.shape[-1])
        idx = greedy_coreset(flat, min(self.config.memory_cap, flat.shape[0]), proj_dim=self.config.coreset_dim,
                             seed=self.config.seed)
        self.memory = flat[idx].contiguous()
        self.fit_info = {"shots": int(images.shape[0]), "views": int(views.shape[0]),
                         "patches": int(flat.shape[0]), "memory": int(self.memory.shape[0]),
                         "image_size": list(images.shape[-2:]), "grid": list(feats.shape[1:3])}
        return self

    # ---- scoring ------------------------------------------------------------------------------
    @torch.inference_mode()
    def patch_scores(self, feats: Tensor) -> Tensor:
        """Nearest-memory distance of every node of ``embed(images)`` ``[B,h,w,D]``: ``[B,h,w]``."""
        if self.memory is None:
            raise RuntimeError(f"{self.name}: call fit(normal_images) (or load a state) before score()")
        b, h, w, d = feats.shape
        if d != self.memory.shape[1]:
            raise ValueError(f"{self.name}: features have {d} dims, memory bank {self.memory.shape[1]}: "
                             "wrong backbone or layers for this state?")
        return nearest_distance(feats.reshape(-1, d), self.memory).reshape(b, h, w)

    @torch.inference_mode()
    def score_embeddings(self, feats: Tensor, size: tuple[int, int]) -> AnomalyResult:
        """Score precomputed ``embed(images)`` at input resolution ``size`` (H, W).

        Node features depend only on the image itself, never on the memory bank, so an
        evaluation that compares several fits (shot counts, seeds) embeds its test set once.
        """
        maps = patch_to_pixel(self.patch_scores(feats), tuple(size), self.config.sigma)
        if self.config.reduce == "max":
            scores = maps.flatten(1).amax(1)
        else:
            scores = top_mean(maps, self.config.top_fraction)
        return AnomalyResult(maps, scores).cpu()

    def score(self, images: Tensor) -> AnomalyResult:
        """Maps ``[B,H,W]`` at the input resolution and image scores ``[B]``; images independent."""
        if images.ndim != 4:
            raise ValueError(f"{self.name}: expected Tensor[B,3,H,W], got {tuple(images.shape)}")
        if self.memory is None:
            raise RuntimeError(f"{self.name}: call fit(normal_images) (or load a state) before score()")
        return self.score_embeddings(self.embed(images), tuple(images.shape[-2:]))

    # ---- state --------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.memory is None:
            raise RuntimeError(f"{self.name}: nothing to save before fit()")
        config = {
            "detector": self.name,
            "format": FORMAT_VERSION,
            "backbone": self.backbone.name,
            "image_size": self.backbone.preprocess.size,
            "params": dataclasses.asdict(self.config),
            "fit": self.fit_info,
        }
        return {"memory": self.memory.detach().float().cpu()}, config

    @classmethod
    def from_state(cls, backbone: PatchBackbone, tensors: dict[str, Tensor], config: dict[str, Any]) -> GraphCore:
        if config.get("detector") != cls.name:
            raise ValueError(f"state is for detector {config.get('detector')!r}, not {cls.name!r}")
        if config.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported {cls.name} state format {config.get('format')!r}")
        if config.get("backbone") != backbone.name:
            raise ValueError(f"state was fitted on backbone {config.get('backbone')!r}, got {backbone.name!r}")
        det = cls(backbone, **config["params"])
        det.memory = tensors["memory"].to(backbone.device)
        det.fit_info = dict(config.get("fit", {}))
        return det

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (memory bank) + ``<path>.json`` (config) atomically."""
        from ..state import save_state

        return save_state(path, *self.state())

    @classmethod
    def load(cls, path: str | Path, backbone: PatchBackbone) -> GraphCore:
        from ..state import load_state

        return cls.from_state(backbone, *load_state(path))


class PatchCoreKNN(GraphCore):
    """In-run baseline: PatchCore-style kNN on the same backbone and shots.

    The GraphCore code path with the graph stage, D4 symmetrization and shot augmentation off:
    raw locally averaged patch features of the shots, greedy coreset, nearest-neighbour distance.
    """

    name: ClassVar[str] = "patchcore"
    defaults: ClassVar[dict[str, Any]] = {"graph": False, "symmetrize": False, "views": 1}


__all__ = [
    "GraphCore",
    "GraphCoreConfig",
    "MaxRelativeConv",
    "PatchCoreKNN",
    "d4_apply",
    "d4_invert",
    "greedy_coreset",
    "knn_edge_index",
    "nearest_distance",
    "symmetry_group",
]
