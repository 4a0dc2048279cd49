"""Training GraphCore's graph head: the training graphs, their per-patch targets, the loop.

The head learns a per-patch defect logit from three kinds of training images, all as patch
graphs (feature-space kNN + grid, as :class:`~inspector.detectors.graphcore.torch_model.GraphCoreScorer`
builds them at scoring time):

* generated defects (exact masks -> soft per-patch targets, every patch weighed);
* real confirmed defects: with a drawn mask, the pooled mask is the target; without one, a
  multiple-instance label (a *bag*): the image says only "somewhere here is a defect", so its top
  patches are positives: the mean logit of its ``mil_top`` fraction of highest-scoring patches
  is pushed up, and no other patch of it carries a loss (they may or may not be the defect).
  The ranking is the head's own, which starts from the bank distance it takes as input and
  moves to what the confirmed defects share and the confirmed normals lack;
* normals (held-out views of the shots, real confirmed normals): every patch a negative.

The loss is a per-patch weighted BCE (positives up-weighted by the weighed negative/positive
ratio, capped) plus the bags' image-level BCE, so mask-level and image-level labels mix in one
objective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from inspector.detectors.graphcore.torch_model import (
    GraphHead,
    grid_neighbors,
    knn_neighbors,
    neighbors_to_edge_index,
)

ProgressFn = Callable[[str, int, int], None]


@contextlib.contextmanager
def one_thread(device: torch.device | str) -> Iterator[None]:
    """Run a loop of tiny kernels on one CPU thread: OpenMP spin-waiting across threads costs
    many times the work itself on a busy CPU (the head's scatter/matmul steps, the coreset's
    matrix-vector steps)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def relative(dist: Tensor) -> Tensor:
    """``[n,P]`` bank distances -> distances relative to each image's own mean (the head's input)."""
    return dist / dist.mean(1, keepdim=True).clamp_min(1e-6)


def mask_targets(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[n,H,W]`` {0,1} masks -> ``[n,h*w]`` soft per-patch targets (area fraction of each patch)."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0].clamp(0, 1).flatten(1)


@dataclass
class HeadData:
    """Training (or held-out) graphs of the head: ``nodes [n,P,C]``, ``rel [n,P]`` (relative
    bank distance), ``knn [n,P,k]`` (feature-space neighbours), ``target`` and ``weight [n,P]``
    (per-patch labels), ``bag [n]`` (an image-level positive: its top patches are the positives)."""

    nodes: Tensor
    rel: Tensor
    knn: Tensor
    target: Tensor
    weight: Tensor
    bag: Tensor

    FIELDS = ("nodes", "rel", "knn", "target", "weight", "bag")

    @classmethod
    def build(cls, feats: Tensor, dist: Tensor, neighbors: int, target: Tensor | None = None,
              weight: Tensor | None = None, knn: Tensor | None = None, bag: Tensor | None = None,
              chunk: int = 16) -> HeadData:
        """From patch features ``[n,h,w,C]`` and bank distances ``[n,h,w]`` (or ``[n,P]``);
        no target = normal (all zero, every patch weighed). ``knn``: the graphs when already
        built for these features (they depend on the features only). ``bag [n]``: image-level
        positives (their ``target``/``weight`` rows are ignored)."""
        n, c = feats.shape[0], feats.shape[-1]
        p = int(np.prod(feats.shape[1:-1]))
        nodes = feats.reshape(n, p, c)
        dist = dist.reshape(n, p)
        target = torch.zeros_like(dist) if target is None else target.reshape(n, p).to(dist)
        weight = torch.ones_like(dist) if weight is None else weight.reshape(n, p).to(dist)
        if knn is None:
            knn = (torch.cat([knn_neighbors(part, neighbors) for part in nodes.split(chunk)]) if n
                   else torch.zeros(0, nodes.shape[1], min(neighbors, max(nodes.shape[1] - 1, 0)), dtype=torch.long))
        bag = torch.zeros(n, dtype=torch.bool, device=dist.device) if bag is None else bag.to(dist.device).bool()
        weight = weight.masked_fill(bag[:, None], 0.0)
        return cls(nodes, relative(dist) if n else dist, knn, target, weight, bag)

    def __len__(self) -> int:
        return int(self.nodes.shape[0])

    def take(self, idx: Tensor | list[int]) -> HeadData:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return HeadData(*(getattr(self, f)[idx.to(self.nodes.device)] for f in self.FIELDS))

    @staticmethod
    def cat(parts: list[HeadData]) -> HeadData:
        parts = [p for p in parts if len(p)]
        return HeadData(*(torch.cat([getattr(p, f) for p in parts]) for f in HeadData.FIELDS))


def head_logits(head: GraphHead, data: HeadData, grid: Tensor, chunk: int = 16) -> Tensor:
    """Per-patch logits ``[n,P]`` of a trained head on ``data`` (``grid``: ``[P,4]`` neighbours)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(data), chunk):
            part = data.take(list(range(start, min(len(data), start + chunk))))
            b, p, c = part.nodes.shape
            grid_ei = neighbors_to_edge_index(grid.unsqueeze(0).expand(b, -1, -1))
            out.append(head(part.nodes.reshape(-1, c), part.rel.reshape(-1), neighbors_to_edge_index(part.knn),
                            grid_ei).reshape(b, p))
    return torch.cat(out) if out else torch.zeros(0, data.nodes.shape[1], device=data.nodes.device)


def train_head(data: HeadData, grid_hw: tuple[int, int], *, hidden: int, steps: int, lr: float, seed: int,
               train_nodes: int, mil_top: float = 0.01, report: ProgressFn | None = None,
               desc: str = "graphcore head", show: bool = True) -> tuple[GraphHead, dict]:
    """A :class:`GraphHead` trained ``steps`` AdamW steps (cosine schedule) on ``data``: each step
    a random batch of whole graphs (``train_nodes`` patch nodes), weighted per-patch BCE plus the
    bags' BCE on the mean of their top ``mil_top`` patch logits. Returns the head (eval, frozen)
    and a summary (losses, positive weight)."""
    from tqdm.auto import tqdm

    # plain tensors: features embedded under inference_mode cannot be saved for backward
    data = HeadData(*(getattr(data, f).clone() for f in HeadData.FIELDS))
    n, p, c = data.nodes.shape
    h, w = grid_hw
    device = data.nodes.device
    grid = grid_neighbors(h, w, device)
    pos = float((data.target * data.weight).sum())
    total = float(data.weight.sum())
    pos_weight = torch.tensor(min(50.0, (total - pos) / max(pos, 1.0)), device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = GraphHead(c, hidden).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    per_step = max(1, min(n, train_nodes // p))
    top = max(1, int(round(p * mil_top)))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0, disable=None if show else True)
    with one_thread(device):
        head.train()
        for step in bar:
            pick = torch.randperm(n, generator=gen)[:per_step].to(device)
            b = len(pick)
            knn_ei = neighbors_to_edge_index(data.knn[pick])
            grid_ei = neighbors_to_edge_index(grid.unsqueeze(0).expand(b, -1, -1))
            logits = head(data.nodes[pick].reshape(-1, c), data.rel[pick].reshape(-1), knn_ei, grid_ei)
            weight = data.weight[pick].reshape(-1)
            loss = F.binary_cross_entropy_with_logits(logits, data.target[pick].reshape(-1), weight=weight,
                                                      pos_weight=pos_weight, reduction="sum")
            loss = loss / weight.sum().clamp_min(1.0)
            bags = data.bag[pick]
            if bags.any():  # image-level positives: the mean of their top patch logits
                pooled = logits.reshape(b, p)[bags].topk(top, dim=1).values.mean(1)
                loss = loss + F.binary_cross_entropy_with_logits(pooled, torch.ones_like(pooled))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if report is not None and (step % 10 == 0 or step == steps - 1):
                report("train", step + 1, steps)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    head.eval().requires_grad_(False)
    info = {"train_images": n, "steps": steps, "graphs_per_step": per_step,
            "loss_first": round(float(np.mean(losses[:10])), 5), "loss_last": round(float(np.mean(losses[-10:])), 5),
            "pos_weight": float(pos_weight), "bags": int(data.bag.sum())}
    return head, info


__all__ = ["HeadData", "head_logits", "mask_targets", "one_thread", "relative", "train_head"]
