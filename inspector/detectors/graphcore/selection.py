"""Which optional parts of GraphCore a product gets, decided on the product's own real evidence.

GraphCore's optional parts (augmented bank views, the learned graph head, the global branch)
were all tuned on generated defects; on real defects each one can cost more than it gives
(``bench/GRAPHCORE.md``). So none is on by default, and with real evidence (operator-confirmed
normals and defects, :class:`~inspector.detectors.base.FitEvidence`) each is kept only if it
raises the separation of that evidence, measured held out:

* **Held out, never generated.** A confirmed normal is scored against the bank without its own
  rows (leave-one-out); a confirmed defect is never in the bank, so it is scored against all of
  it; the head is trained in ``cv_folds`` folds (defects and normals split round-robin) and each
  piece of evidence is scored by the head of the fold that did not see it. Generated defects
  train the head but are never scored for the decision.
* **Each image is embedded once.** Per candidate bank (with or without augmented views) one
  coreset and one table of nearest distances from every evidence image's patches to the bank
  rows of each source (the shots, each confirmed normal): leaving a normal out is a min over the
  other sources, so no candidate and no fold re-embeds or re-searches anything. Where the coreset
  dropped rows, the rows a held-out normal contributed are replaced by their nearest rows of the
  other sources (what a coreset fitted without it would have kept there), so held-out normals
  are not scored against holes the bank would not have.
* **Greedy, cheapest first.** Starting from the bank of the shots (plus the confirmed normals):
  augmented views, then the head (each weight of ``weight_grid``), then the global branch (each
  weight), each kept only if it beats the configuration so far by :func:`raises`: neither image
  AUROC nor :func:`separation` lower, and AUROC up by at least one normal/defect pair or
  separation up by ``SEP_MARGIN``. ``select_parts`` limits which parts are tried.
* **Enough evidence or nothing.** Below ``MIN_DEFECTS`` confirmed defects (or ``MIN_NORMALS``
  confirmed normals) nothing is switched on: a held-out AUROC over two defects says nothing.

The held-out scores of the chosen configuration are in the final model's units
(``fit_info["evidence_cv"]``): the product registry calibrates thresholds and reports the
before/after table from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from inspector.detectors.graphcore.torch_model import grid_neighbors, image_descriptor
from inspector.detectors.graphcore.training import (
    HeadData,
    ProgressFn,
    head_logits,
    mask_targets,
    one_thread,
    train_head,
)

#: Below this many confirmed defects no optional part is switched on.
MIN_DEFECTS = 3
#: Below this many confirmed normals no optional part is switched on (no held-out normal scores).
MIN_NORMALS = 2
#: Separation gain (pooled standard deviations of log scores) that counts when AUROC ties.
SEP_MARGIN = 0.2
RULE = ("greedy forward selection (views, head, global branch) on held-out AUROC, then log-score "
        "separation, of the product's confirmed normals (left out of the bank) and defects (head folds)")


# --------------------------------------------------------------------------------------------
# Separation of two score sets.
# --------------------------------------------------------------------------------------------
def auroc(normal: Tensor, defect: Tensor) -> float:
    """P(defect score > normal score) + 0.5 P(tie): the Mann-Whitney image AUROC."""
    n, d = torch.as_tensor(normal).double().reshape(-1), torch.as_tensor(defect).double().reshape(-1)
    if not len(n) or not len(d):
        return float("nan")
    diff = d[:, None] - n[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def separation(normal: Tensor, defect: Tensor) -> float:
    """Difference of the mean log scores in pooled standard deviations (scale-free, so candidates
    whose scores are in different units compare; logs, so one huge defect score does not decide)."""
    n = torch.as_tensor(normal).double().reshape(-1).clamp_min(1e-12).log()
    d = torch.as_tensor(defect).double().reshape(-1).clamp_min(1e-12).log()
    if len(n) < 2 or len(d) < 2:
        return float("nan")
    pooled = math.sqrt(max((float(n.var()) + float(d.var())) / 2, 1e-12))
    return (float(d.mean()) - float(n.mean())) / pooled


def measure(name: str, normal: Tensor, defect: Tensor, **settings: Any) -> dict[str, Any]:
    return {"name": name, "auroc": round(auroc(normal, defect), 6), "separation": round(separation(normal, defect), 6),
            **settings}


def raises(cand: dict, cur: dict, pairs: int) -> bool:
    """Does ``cand`` separate the evidence better than ``cur``? Neither measure lower, and AUROC
    up by at least one normal/defect pair out of ``pairs`` or separation up by ``SEP_MARGIN``."""
    if cand["auroc"] < cur["auroc"] - 1e-9 or cand["separation"] < cur["separation"]:
        return False
    step = 1.0 / max(pairs, 1)
    return cand["auroc"] >= cur["auroc"] + step - 1e-9 or cand["separation"] >= cur["separation"] + SEP_MARGIN


def _best(cands: list[dict]) -> dict:
    return max(cands, key=lambda c: (c["auroc"], c["separation"]))


# --------------------------------------------------------------------------------------------
# A candidate bank and nearest distances by source.
# --------------------------------------------------------------------------------------------
@dataclass
class Bank:
    """One candidate memory bank: all patch ``rows [R,C]`` of the bank images with their source
    (``-1`` the shots and their views, ``n`` confirmed normal n), the coreset ``core`` the model
    keeps, and the image descriptors of the bank images (global branch)."""

    rows: Tensor
    src: Tensor
    core: Tensor
    core_src: Tensor
    desc: Tensor
    desc_src: Tensor
    view_images: int

    @classmethod
    def build(cls, view_feats: Tensor, normal_feats: Tensor, cap: int, coreset: Callable[[Tensor, int], Tensor]) -> Bank:
        c = view_feats.shape[-1]
        n = normal_feats.shape[0]
        per = view_feats.shape[1] * view_feats.shape[2]
        rows = torch.cat([view_feats.reshape(-1, c), normal_feats.reshape(-1, c)])
        dev = rows.device
        src = torch.cat([torch.full((view_feats.shape[0] * per,), -1, dtype=torch.long, device=dev),
                         torch.arange(n, device=dev).repeat_interleave(per)])
        with one_thread(rows.device):
            idx = coreset(rows, min(cap, rows.shape[0]))
        desc = torch.cat([image_descriptor(view_feats), image_descriptor(normal_feats)]) if n else image_descriptor(view_feats)
        desc_src = torch.cat([torch.full((view_feats.shape[0],), -1, dtype=torch.long, device=dev),
                              torch.arange(n, device=dev)])
        return cls(rows, src, rows[idx].contiguous(), src[idx], desc, desc_src, int(view_feats.shape[0]))

    @property
    def sources(self) -> int:
        """How many confirmed normals the bank holds (sources 0..n-1)."""
        return int(self.desc_src.max()) + 1 if len(self.desc_src) else 0

    @property
    def reduced(self) -> bool:
        return self.core.shape[0] < self.rows.shape[0]


def source_min(queries: Tensor, rows: Tensor, src: Tensor, sources: int, chunk: int = 4096) -> Tensor:
    """``[Q,1+sources,P]``: for each query image's patch (``queries [Q,P,C]``) the distance to the
    nearest of ``rows [B,C]`` of each source (slot 0: source -1, the shots; slot 1+n: normal n;
    inf where a source has no row). One matmul per chunk, then a min per source segment."""
    q_n, p, c = queries.shape
    order = torch.argsort(src, stable=True)
    rows, src = rows[order], src[order]
    counts = torch.bincount(src + 1, minlength=1 + sources).tolist()
    bounds = [0]
    for k in counts:
        bounds.append(bounds[-1] + k)
    r2 = (rows * rows).sum(1)
    flat = queries.reshape(-1, c)
    out = torch.full((flat.shape[0], 1 + sources), math.inf, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        q = flat[start:start + chunk]
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ rows.T) + r2[None]
        for s in range(1 + sources):
            if bounds[s + 1] > bounds[s]:
                out[start:start + chunk, s] = d2[:, bounds[s]:bounds[s + 1]].amin(1)
    out = out.clamp_min(0.0).sqrt()
    return out.reshape(q_n, p, 1 + sources).permute(0, 2, 1).contiguous()


def stand_in_distance(bank: Bank, normal_feats: Tensor, chunk: int = 512) -> Tensor | None:
    """``[N,P]``: distance of each confirmed normal's patches to the stand-ins of its own coreset
    rows (each row's nearest row of another source): what a coreset fitted without that normal
    would likely hold where it held the normal's rows. None when the coreset kept every row."""
    n = normal_feats.shape[0]
    if not n or not bank.reduced:
        return None
    own = torch.nonzero(bank.core_src >= 0).flatten()
    out = torch.full((n, normal_feats.shape[1] * normal_feats.shape[2]), math.inf, device=normal_feats.device)
    if not len(own):
        return out
    r2 = (bank.rows * bank.rows).sum(1)
    stand = torch.empty(len(own), dtype=torch.long, device=own.device)
    for start in range(0, len(own), chunk):
        sel = own[start:start + chunk]
        q = bank.core[sel]
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ bank.rows.T) + r2[None]
        d2 = d2.masked_fill(bank.src[None, :] == bank.core_src[sel][:, None], math.inf)
        stand[start:start + chunk] = d2.argmin(1)
    c = normal_feats.shape[-1]
    for i in range(n):
        mine = stand[bank.core_src[own] == i]
        if len(mine):
            out[i] = source_min(normal_feats[i].reshape(1, -1, c), bank.rows[mine],
                                torch.full((len(mine),), -1, dtype=torch.long, device=mine.device), 0)[0, 0]
    return out


@dataclass
class Distances:
    """Bank distances of every evidence image under one candidate bank: confirmed normals left
    out (``[N,P]``), defects, probes (held-out views of the shots), generated defects (``[.,P]``),
    the same for the global descriptor (``g_*``), and the scales both terms are divided by."""

    normal: Tensor
    defect: Tensor
    probe: Tensor
    generated: Tensor | None
    g_normal: Tensor
    g_defect: Tensor
    g_probe: Tensor
    d_scale: float
    g_scale: float


def bank_distances(bank: Bank, normals: Tensor, others: list[Tensor]) -> tuple[Tensor, list[Tensor], Tensor, list[Tensor]]:
    """Patch and descriptor distances: ``normals`` (the bank's own confirmed normals, in source
    order, or none) each left out of ``bank``; each of ``others`` against all of it."""
    n = normals.shape[0]
    if n not in (0, bank.sources):
        raise ValueError(f"{n} normals for a bank of {bank.sources}")
    c = bank.rows.shape[1]
    sizes = [len(o) for o in others]
    dev = bank.rows.device
    queries = torch.cat([normals, *others]).flatten(1, 2) if n + sum(sizes) else torch.zeros(0, 1, c, device=dev)
    table = source_min(queries, bank.core, bank.core_src, bank.sources)
    descs = (image_descriptor(torch.cat([normals, *others])) if n + sum(sizes)
             else torch.zeros(0, bank.desc.shape[1], device=dev))
    g_table = source_min(descs[:, None], bank.desc, bank.desc_src, bank.sources)[:, :, 0]
    if n:
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        loo = table[:n].clone()
        loo[:, 1:][eye] = math.inf  # a normal's own rows are out of its bank
        normal = loo.amin(1)
        stand = stand_in_distance(bank, normals)
        if stand is not None:
            normal = torch.minimum(normal, stand)
        g_loo = g_table[:n].clone()
        g_loo[:, 1:][eye] = math.inf
        g_normal = g_loo.amin(1)
    else:
        normal, g_normal = table[:0, 0], g_table[:0, 0]
    full = table[n:].amin(1)
    g_full = g_table[n:].amin(1)
    return normal, list(full.split(sizes)), g_normal, list(g_full.split(sizes))


# --------------------------------------------------------------------------------------------
# Cross-validation over the evidence and the rule.
# --------------------------------------------------------------------------------------------
@dataclass
class EvidenceCV:
    """The evidence of one fit, embedded once, and everything the rule and the final model need
    from it: candidate banks by number of views, distances, the head's training graphs, held-out
    head logits per fold, held-out image scores of any configuration.

    ``reduce(patch [B,h,w]) -> [B]`` is the scorer's map + image reduction; ``cfg`` the detector's
    configuration (head training, folds, weight grid)."""

    cfg: Any
    banks: dict[int, Bank]
    normals: Tensor
    defects: Tensor
    masks: list[Tensor | None]
    probes: Tensor
    generated: Tensor
    generated_masks: Tensor
    reduce: Callable[[Tensor], Tensor]
    report: ProgressFn = lambda stage, done, total: None
    _dist: dict[int, Distances] = field(default_factory=dict)
    _logits: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _knn: dict[str, Tensor] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        any_feats = next(t for t in (self.normals, self.defects, self.probes, self.generated) if len(t))
        return int(any_feats.shape[1]), int(any_feats.shape[2])

    @property
    def counts(self) -> dict[str, int]:
        return {"normals": int(len(self.normals)), "defects": int(len(self.defects))}

    # ---- distances and scales --------------------------------------------------------------
    def distances(self, views: int) -> Distances:
        if views not in self._dist:
            bank = self.banks[views]
            normal, (defect, probe), g_normal, (g_defect, g_probe) = bank_distances(
                bank, self.normals, [self.defects, self.probes])
            d_scale = float(probe.mean().clamp_min(1e-6)) if len(probe) else 1.0
            g_scale = float(g_probe.mean().clamp_min(1e-6)) if len(g_probe) else 1.0
            self._dist[views] = Distances(normal, defect, probe, None, g_normal, g_defect, g_probe, d_scale, g_scale)
        return self._dist[views]

    def generated_distance(self, views: int) -> Tensor:
        """Bank distances of the generated defects (only the head needs them: computed on demand)."""
        d = self.distances(views)
        if d.generated is None:
            d.generated = bank_distances(self.banks[views], self.normals[:0], [self.generated])[1][0]
        return d.generated

    # ---- the head's training graphs --------------------------------------------------------
    def _graphs(self, name: str, feats: Tensor, dist: Tensor, target: Tensor | None = None,
                weight: Tensor | None = None, bag: Tensor | None = None) -> HeadData:
        data = HeadData.build(feats, dist, self.cfg.neighbors, target, weight, knn=self._knn.get(name), bag=bag)
        self._knn[name] = data.knn  # the graphs depend on the features only: built once per fit
        return data

    def _defect_targets(self, dist: Tensor) -> tuple[Tensor, Tensor]:
        """Per confirmed defect: ``(target [M,P], bag [M])``: the pooled mask where one was drawn,
        else an image-level positive (a bag: :mod:`.training`)."""
        target = torch.zeros_like(dist)
        bag = torch.ones(len(dist), dtype=torch.bool, device=dist.device)
        for i, m in enumerate(self.masks):
            if m is not None:
                target[i] = mask_targets(m[None].to(dist.device), self.grid)[0]
                bag[i] = False
        return target, bag

    def head_sets(self, views: int) -> dict[str, HeadData]:
        """The head's graphs under bank ``views``: generated defects, probes, confirmed defects,
        confirmed normals (distances of a normal: without its own rows, as a new part sees the bank)."""
        d = self.distances(views)
        gen_target = mask_targets(self.generated_masks, self.grid) if len(self.generated) else None
        target, bag = self._defect_targets(d.defect) if len(self.defects) else (None, None)
        return {"generated": self._graphs("generated", self.generated, self.generated_distance(views), gen_target),
                "probes": self._graphs("probes", self.probes, d.probe),
                "defects": self._graphs("defects", self.defects, d.defect, target, bag=bag),
                "normals": self._graphs("normals", self.normals, d.normal)}

    def train(self, data: HeadData, steps: int, *, report: ProgressFn | None = None, show: bool = True):
        cfg = self.cfg
        return train_head(data, self.grid, hidden=cfg.hidden, steps=steps, lr=cfg.lr, seed=cfg.seed,
                          train_nodes=cfg.train_nodes, mil_top=cfg.mil_top, report=report, show=show)

    def folds(self) -> int:
        return max(1, min(self.cfg.cv_folds, max(len(self.defects), len(self.normals))))

    def fold_logits(self, views: int) -> tuple[Tensor, Tensor]:
        """Held-out head logits ``([N,P], [M,P])``: each piece of evidence scored by the head of
        the fold that did not train on it (``cv_steps`` steps each)."""
        if views not in self._logits:
            sets = self.head_sets(views)
            k = self.folds()
            fold_d = torch.arange(len(self.defects)) % k
            fold_n = torch.arange(len(self.normals)) % k
            grid = grid_neighbors(*self.grid)
            dev = self.banks[views].core.device
            grid = grid.to(dev)
            ln = torch.zeros(len(self.normals), self.grid[0] * self.grid[1], device=dev)
            ld = torch.zeros(len(self.defects), self.grid[0] * self.grid[1], device=dev)
            for f in range(k):
                self.report("select", f, k)
                train = HeadData.cat([sets["generated"], sets["probes"],
                                      sets["defects"].take(torch.nonzero(fold_d != f).flatten()),
                                      sets["normals"].take(torch.nonzero(fold_n != f).flatten())])
                if not len(train):
                    continue
                head, _ = self.train(train, self.cfg.cv_steps, show=False)
                out_d, out_n = torch.nonzero(fold_d == f).flatten(), torch.nonzero(fold_n == f).flatten()
                if len(out_d):
                    ld[out_d] = head_logits(head, sets["defects"].take(out_d), grid)
                if len(out_n):
                    ln[out_n] = head_logits(head, sets["normals"].take(out_n), grid)
            self.report("select", k, k)
            self._logits[views] = (ln, ld)
        return self._logits[views]

    # ---- held-out image scores -------------------------------------------------------------
    def scores(self, views: int, head_weight: float = 0.0, global_weight: float = 0.0) -> tuple[Tensor, Tensor]:
        """Held-out image scores ``(normals [N], defects [M])`` of a configuration, in the units
        the final model with that configuration scores in."""
        d = self.distances(views)
        scale = d.d_scale if (head_weight or global_weight) else 1.0
        h, w = self.grid
        pn, pd = d.normal / scale, d.defect / scale
        if head_weight:
            ln, ld = self.fold_logits(views)
            pn, pd = pn + head_weight * torch.sigmoid(ln), pd + head_weight * torch.sigmoid(ld)
        sn = self.reduce(pn.reshape(-1, h, w)) if len(pn) else pn[:, 0]
        sd = self.reduce(pd.reshape(-1, h, w)) if len(pd) else pd[:, 0]
        if global_weight:
            sn = sn + global_weight * d.g_normal / d.g_scale
            sd = sd + global_weight * d.g_defect / d.g_scale
        return sn, sd

    # ---- the rule ----------------------------------------------------------------------------
    def choose(self, candidate_views: int, parts: tuple[str, ...] = ("views", "head", "global_branch")
               ) -> tuple[dict[str, Any], list[dict]]:
        """Greedy forward selection over ``parts``: ``({"views", "head_weight", "global_weight"},
        candidates)``, a weight of 0 meaning the part is off."""
        pairs = len(self.normals) * len(self.defects)
        chosen = {"views": 1, "head_weight": 0.0, "global_weight": 0.0}
        cur = measure("bank", *self.scores(1), **chosen)
        cands = [cur]
        if "views" in parts and candidate_views > 1 and candidate_views in self.banks:
            c = measure(f"views={candidate_views}", *self.scores(candidate_views), **{**chosen, "views": candidate_views})
            cands.append(c)
            if raises(c, cur, pairs):
                chosen, cur = {**chosen, "views": candidate_views}, c
        for part, key in (("head", "head_weight"), ("global", "global_weight")):
            if {"head": "head", "global": "global_branch"}[part] not in parts:
                continue
            tried = []
            for w in self.cfg.weight_grid:
                setting = {**chosen, key: float(w)}
                tried.append(measure(f"{part}@{w:g}", *self.scores(setting["views"], setting["head_weight"],
                                                                    setting["global_weight"]), **setting))
            cands += tried
            best = _best(tried)
            if raises(best, cur, pairs):
                chosen, cur = {**chosen, key: best[key]}, best
        return chosen, cands


def reason(chosen: dict, cands: list[dict], counts: dict[str, int]) -> str:
    """One sentence per part: kept or not, with the held-out numbers it was decided on."""
    base = cands[0]
    parts = []
    for label, prefix, on in (("augmented views", "views=", chosen["views"] > 1),
                              ("head", "head@", chosen["head_weight"] > 0),
                              ("global branch", "global@", chosen["global_weight"] > 0)):
        tried = [c for c in cands if c["name"].startswith(prefix)]
        if not tried:
            continue
        best = _best(tried)
        verb = "kept" if on else "off"
        parts.append(f"{label} {verb} (best {best['name']}: AUROC {best['auroc']:.3f}, separation "
                     f"{best['separation']:.2f})")
    return (f"held out over {counts['normals']} confirmed normals and {counts['defects']} confirmed defects; bank "
            f"of the shots: AUROC {base['auroc']:.3f}, separation {base['separation']:.2f}; " + "; ".join(parts))


__all__ = ["MIN_DEFECTS", "MIN_NORMALS", "RULE", "SEP_MARGIN", "Bank", "Distances", "EvidenceCV", "auroc",
           "bank_distances", "measure", "raises", "reason", "separation", "source_min", "stand_in_distance"]
