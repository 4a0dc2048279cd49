"""GraphCore's scoring as one ``nn.Module``: what ``GraphCore.score`` runs and ONNX export traces.

:class:`GraphCoreScorer` holds a fitted GraphCore's tensors (memory bank, graph head, global
descriptors, scales) and the backbone, and is the one statement of the scoring math::

    s = d / d_scale + head_weight * sigmoid(logit)          per patch
    image = reduce(map) + global_weight * g / g_scale          per image

with ``d`` the distance of a patch to its nearest bank row, ``logit`` the graph head's output on
the patch graph (feature-space kNN + grid), ``g`` the image descriptor's distance to the nearest
bank-view descriptor. Everything here traces: the loops run over fixed sizes (bank chunks) and the
graph head aggregates with means (ONNX ScatterElements-add). Fitting (bank, scales, head
training) is :mod:`inspector.detectors.graphcore.detector`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch_geometric.nn import EdgeConv, SAGEConv

from inspector.backbones.registry import PatchBackbone
from inspector.detectors.ops import patch_to_pixel


# --------------------------------------------------------------------------------------------
# Graphs: feature-space kNN and the spatial grid, as torch_geometric edge_index.
# --------------------------------------------------------------------------------------------
def knn_neighbors(x: Tensor, k: int, *, loop: bool = False) -> Tensor:
    """``[B,N,k]`` indices of each node's ``k`` nearest nodes of the same image (cosine).

    One ``[N,N]`` similarity matmul + ``topk`` per image (what ``torch_geometric.nn.knn_graph``
    does through torch_cluster, absent here). Without ``loop`` the node itself is excluded."""
    n = x.shape[1]
    k = min(k, n if loop else n - 1)
    xn = F.normalize(x, dim=-1)
    sim = xn @ xn.transpose(1, 2)
    idx = torch.arange(n, device=x.device)
    eye = idx[:, None] == idx[None, :]  # not torch.eye: onnxruntime has no bool EyeLike kernel
    # self-similarity is 1 up to rounding: pin it so the self loop is always in (or out)
    sim = sim.masked_fill(eye, math.inf if loop else -math.inf)
    return sim.topk(k, dim=-1).indices


def neighbors_to_edge_index(nbr: Tensor) -> Tensor:
    """``[B,N,k]`` per-image neighbour indices -> ``edge_index [2, B*N*k]`` over the flattened
    ``B*N`` nodes (graph ``b`` owns nodes ``b*N ..``): row 0 the neighbour ``j`` (source), row 1
    the centre ``i`` (target), torch_geometric's ``source_to_target`` convention."""
    b, n, k = nbr.shape
    offset = (torch.arange(b, device=nbr.device) * n).view(-1, 1, 1)
    src = (nbr + offset).reshape(-1)
    dst = (torch.arange(n, device=nbr.device).view(1, n, 1) + offset).expand(b, n, k).reshape(-1)
    return torch.stack([src, dst])


def knn_edge_index(x: Tensor, k: int, *, loop: bool = True) -> Tensor:
    """Feature-space kNN graph of ``B`` images' nodes ``x [B,N,C]`` as ``edge_index``."""
    return neighbors_to_edge_index(knn_neighbors(x, k, loop=loop))


def grid_neighbors(h: int, w: int, device=None) -> Tensor:
    """``[h*w, 4]`` up/down/left/right neighbour of each cell of an ``h x w`` grid (the cell
    itself where the neighbour would fall outside)."""
    r = torch.arange(h, device=device).view(h, 1).expand(h, w)
    c = torch.arange(w, device=device).view(1, w).expand(h, w)
    nb = [((r - 1).clamp_min(0), c), ((r + 1).clamp_max(h - 1), c), (r, (c - 1).clamp_min(0)),
          (r, (c + 1).clamp_max(w - 1))]
    return torch.stack([(rr * w + cc).reshape(-1) for rr, cc in nb], dim=1)



def nn_distance(queries: Tensor, bank: Tensor, chunk: int = 4096, bank_sqnorm: Tensor | None = None) -> Tensor:
    """Euclidean distance from each row of ``queries [N,C]`` to its nearest row of ``bank [M,C]``.

    ``|q|^2 - 2 q.m + |m|^2`` by matmul, min over the bank chunk by chunk (peak ``N x chunk``;
    the loop runs over the fixed-size bank, so it unrolls in an exported graph), clamped at 0
    before the sqrt."""
    q2 = (queries * queries).sum(-1, keepdim=True)
    m2 = (bank * bank).sum(-1) if bank_sqnorm is None else bank_sqnorm
    best = None
    for start in range(0, bank.shape[0], chunk):
        part = bank[start:start + chunk]
        cur = (q2 - 2.0 * (queries @ part.T) + m2[start:start + chunk][None]).amin(1)
        best = cur if best is None else torch.minimum(best, cur)
    return best.clamp_min(0.0).sqrt()



def image_descriptor(feats: Tensor) -> Tensor:
    """Global descriptor of ``[B,h,w,C]`` patch features: per-channel mean and std, ``[B,2C]``."""
    flat = feats.flatten(1, 2)
    mean = flat.mean(1)
    return torch.cat([mean, (flat - mean[:, None]).square().mean(1).clamp_min(1e-12).sqrt()], dim=-1)


# --------------------------------------------------------------------------------------------
# The learned head.
# --------------------------------------------------------------------------------------------
class GraphHead(nn.Module):
    """Per-patch defect logit from a patch graph (torch_geometric layers, trained at fit).

    ``x [N,C]`` node features, ``rel [N]`` relative bank distance, ``knn_edges`` / ``grid_edges``
    as ``edge_index``. Input projection, EdgeConv over the feature-space kNN graph (message
    ``MLP([h_i, h_j - h_i])``, mean), SAGEConv over the grid (mean), each residual, linear
    read-out. Mean aggregation (not max) so the exported graph needs only ONNX ScatterElements-add.
    """

    def __init__(self, in_dim: int, hidden: int = 32):
        super().__init__()
        self.inp = nn.Linear(in_dim + 1, hidden)
        self.feat_conv = EdgeConv(nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU()), aggr="mean")
        self.grid_conv = SAGEConv(hidden, hidden, aggr="mean")
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, rel: Tensor, knn_edges: Tensor, grid_edges: Tensor) -> Tensor:
        h = F.relu(self.inp(torch.cat([x, rel[:, None]], dim=-1)))
        h = h + self.feat_conv(h, knn_edges)
        h = h + F.relu(self.grid_conv(h, grid_edges))
        return self.out(h)[:, 0]


# --------------------------------------------------------------------------------------------
# Scoring: one module, used by GraphCore.score and traced for ONNX.
# --------------------------------------------------------------------------------------------
class GraphCoreScorer(nn.Module):
    """Images ``[B,3,S,S]`` -> ``(maps [B,S,S], scores [B])`` from a fitted GraphCore's tensors.

    The keyword options are the scoring fields of ``GraphCoreConfig`` (same names and defaults).
    ``features`` (backbone, layers, normalisation) depends on the image only; ``score_features``
    is the fitted part (bank distance, graph head, global branch, map, image score).
    """

    def __init__(self, backbone: PatchBackbone, layers: tuple[str, ...], memory: Tensor,
                 head: GraphHead | None = None, descriptors: Tensor | None = None,
                 d_scale: float = 1.0, g_scale: float = 1.0, *, normalize: bool = True, neighbors: int = 8,
                 sigma: float = 4.0, reduce: str = "top_mean", top_fraction: float = 0.01,
                 head_weight: float = 1.0, global_weight: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.normalize = bool(normalize)
        self.neighbors = int(neighbors)
        self.sigma = float(sigma)
        self.reduce = reduce
        self.top_fraction = float(top_fraction)
        self.head_weight = float(head_weight)
        self.global_weight = float(global_weight)
        self.head = head
        self.register_buffer("memory", memory.detach().float(), persistent=False)
        self.register_buffer("memory_sqnorm", self.memory.square().sum(1), persistent=False)
        self.register_buffer("descriptors", None if descriptors is None else descriptors.detach().float(),
                             persistent=False)
        self.d_scale = float(d_scale)
        self.g_scale = float(g_scale)

    def features(self, images: Tensor) -> Tensor:
        """``[B,3,H,W]`` -> ``[B,h,w,C]``: the chosen layers, each L2-normalised, concatenated."""
        feats = self.backbone._features(images) if torch.jit.is_tracing() else self.backbone(images)
        parts = [feats[name].float() for name in self.layers]
        if self.normalize:
            parts = [F.normalize(p, dim=-1) for p in parts]
        return torch.cat(parts, dim=-1)

    def patch_distance(self, feats: Tensor) -> Tensor:
        b, h, w, c = feats.shape
        return nn_distance(feats.reshape(-1, c), self.memory, bank_sqnorm=self.memory_sqnorm).reshape(-1, h, w)

    def head_logits(self, feats: Tensor, dist: Tensor) -> Tensor:
        """Graph head on ``[B,h,w,C]`` features and ``[B,h,w]`` bank distances -> ``[B,h,w]`` logits."""
        b, h, w, c = feats.shape
        nodes = feats.reshape(-1, h * w, c)
        rel = dist.reshape(-1, h * w)
        rel = rel / rel.mean(1, keepdim=True).clamp_min(1e-6)
        knn = neighbors_to_edge_index(knn_neighbors(nodes, self.neighbors))
        grid = grid_neighbors(h, w, feats.device).unsqueeze(0).expand(nodes.shape[0], -1, -1)
        logits = self.head(nodes.reshape(-1, c), rel.reshape(-1), knn, neighbors_to_edge_index(grid))
        return logits.reshape(-1, h, w)

    def reduce_map(self, patch: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Patch scores ``[B,h,w]`` -> pixel maps ``[B,H,W]`` (upsampled, smoothed) and their image
        score ``[B]`` (``reduce``), before the global branch's term."""
        maps = patch_to_pixel(patch, size, self.sigma)
        flat = maps.flatten(1)
        if self.reduce == "max":
            return maps, flat.amax(1)
        k = max(1, int(round(int(size[0]) * int(size[1]) * self.top_fraction)))
        return maps, flat.topk(k, dim=1).values.mean(1)

    def score_features(self, feats: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        dist = self.patch_distance(feats)
        patch = dist / self.d_scale
        if self.head is not None and self.head_weight:
            patch = patch + self.head_weight * torch.sigmoid(self.head_logits(feats, dist))
        maps, scores = self.reduce_map(patch, size)
        if self.descriptors is not None and self.global_weight:
            g = nn_distance(image_descriptor(feats), self.descriptors)
            scores = scores + self.global_weight * g / self.g_scale
        return maps, scores

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.score_features(self.features(images), (int(images.shape[-2]), int(images.shape[-1])))



__all__ = [
    "GraphCoreScorer",
    "GraphHead",
    "grid_neighbors",
    "image_descriptor",
    "knn_edge_index",
    "knn_neighbors",
    "neighbors_to_edge_index",
    "nn_distance",
]
