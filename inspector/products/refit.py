"""Refit: what a product version learns from its operators' evidence, and how its held-out scores
of that evidence are obtained.

Evidence is a list of :class:`~inspector.products.feedback.evidence.LabeledImage`: confirmed
normals (accepted parts) and confirmed defects (rejected parts, with a mask when one was drawn).
:meth:`inspector.products.registry.ProductRegistry.refit` builds a candidate version from the
product's shots plus the evidence; this module holds the pieces that depend on the detector kind:

* **fit** detectors (GraphCore, PatchCore): the evidence reaches ``fit`` as a
  :class:`~inspector.detectors.base.FitEvidence` (preprocessed like the shots, masks at the input
  size) when the detector declares the ``"evidence"`` fit option; a fit detector without it gets
  the confirmed normals as extra normal images. Held-out scores of the evidence come from the
  detector (``fit_info["evidence_cv"]``, cross-validated under the configuration it chose) or,
  when it gives none, from :func:`cv_folds` refits here (each fold fitted without its items).
* **mutual** detectors (MuSc): the confirmed normals join the reference set (stored with the
  version); a confirmed normal's held-out score is its score against the reference set without it
  (:func:`mutual_scores`); defects are never in the reference set.
* **zero-shot** detectors: nothing is learned; the evidence only re-calibrates the thresholds.

Thresholds (:func:`calibrate_with_evidence`): the normal side is the held-out shot scores (the
shots and their re-shot views, as at registration) plus the confirmed normals' held-out scores.
The defect side is the confirmed defects' held-out scores alone once there are at least
:data:`~inspector.products.feedback.evidence.MIN_DEFECTS` of them: they are what the line really
produces, while generated defects, with severities spread down to 0, were a stand-in for them.
With fewer, the few real defects are pooled with the generated ones (with enough, the refit makes
no generated defects at all). Both go through the one rule, :func:`inspector.verdict.calibrate`.

Cost: the held-out shot scores need folds, each a refit of the bank without some shots (plus every
confirmed normal); a fit-mode refit with confirmed normals holds out half of the shots per fold
(:data:`~inspector.products.registry.REFIT_FOLDS`), since the confirmed normals dominate its bank.
The *before* side of the table reuses the score the station recorded when the active version
made the verdict, and scores only evidence another version decided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch

from inspector.io import to_rgb8
from inspector.products.feedback.evidence import LABELS, MIN_DEFECTS, LabeledImage
from inspector.verdict import Thresholds, calibrate

#: At most this many folds when the registry cross-validates the evidence itself.
EVIDENCE_FOLDS = 5


def validate_evidence(evidence: Sequence[LabeledImage]) -> list[LabeledImage]:
    """Checked evidence: known labels, RGB uint8 images, one item per image (the last one given
    wins: a later decision replaces an earlier one)."""
    out: dict[str, LabeledImage] = {}
    for i, it in enumerate(evidence):
        if it.label not in LABELS:
            raise ValueError(f"evidence {i}: label must be one of {LABELS}, got {it.label!r}")
        img = to_rgb8(it.image, f"evidence {i}")
        mask = None
        if it.mask is not None and it.label == "defect":
            mask = np.asarray(it.mask).astype(bool)
            if mask.ndim != 2:
                raise ValueError(f"evidence {i}: a mask is HxW, got shape {mask.shape}")
        out.pop(it.sha256, None)
        out[it.sha256] = LabeledImage(img, it.label, it.sha256, mask, it.item)
    return list(out.values())


def _resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """HxW bool at the image's size -> ``[size,size]`` {0,1} float at the model's input size (a
    pixel is defective when at least half of what it covers is)."""
    m = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((m >= 0.5).astype(np.float32))


class EvidenceSet:
    """Evidence preprocessed for one backbone: ``x`` ``[N,3,S,S]`` in the order given."""

    def __init__(self, items: list[LabeledImage], preprocess):
        self.items = items
        self.labels = [it.label for it in items]
        self.x = preprocess([it.image for it in items])
        size = int(self.x.shape[-1])
        self.masks = [None if it.mask is None else _resize_mask(it.mask, size) for it in items]

    def __len__(self) -> int:
        return len(self.items)

    def index(self, label: str) -> list[int]:
        return [i for i, lab in enumerate(self.labels) if lab == label]

    def images(self, label: str) -> list[np.ndarray]:
        return [self.items[i].image for i in self.index(label)]

    def counts(self) -> dict[str, int]:
        return {lab: self.labels.count(lab) for lab in LABELS}

    def split(self, scores: Sequence[float]) -> tuple[list[float], list[float]]:
        """Scores in item order -> (normal scores, defect scores)."""
        return ([float(scores[i]) for i in self.index("normal")], [float(scores[i]) for i in self.index("defect")])

    def fit_inputs(self, shots_x: torch.Tensor, evidence_option: bool, keep: Sequence[int] | None = None):
        """``(images, FitEvidence | None)`` for a fit on the shots plus the items ``keep`` (all by
        default): a detector with the ``"evidence"`` fit option gets them as ``FitEvidence``, any
        other fit detector gets the confirmed normals as extra normal images."""
        keep = range(len(self)) if keep is None else keep
        normals = [i for i in keep if self.labels[i] == "normal"]
        defects = [i for i in keep if self.labels[i] == "defect"]
        if not evidence_option:
            return (torch.cat([shots_x, self.x[normals]]) if normals else shots_x), None
        from inspector.detectors.base import FitEvidence

        return shots_x, FitEvidence(normals=self.x[normals], defects=self.x[defects],
                                    masks=[self.masks[i] for i in defects])


def cv_folds(labels: Sequence[str], k: int = EVIDENCE_FOLDS) -> list[list[int]]:
    """Stratified folds over item indices: each label dealt round-robin over ``min(k, n)`` folds."""
    n_folds = min(k, len(labels))
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    dealt = 0
    for lab in LABELS:
        for i, item_label in enumerate(labels):
            if item_label == lab:
                folds[dealt % n_folds].append(i)
                dealt += 1
    return [sorted(f) for f in folds if f]


def fold_scores(ev: EvidenceSet, fold_runtime: Callable[[list[int]], object]) -> list[float]:
    """Held-out scores of every item: ``fold_runtime(keep)`` is a model fitted with the items
    ``keep`` only (a runtime with ``score_tensor``); each fold's items are scored by the model
    fitted without them."""
    scores = [float("nan")] * len(ev)
    for fold in cv_folds(ev.labels):
        held = set(fold)
        rt = fold_runtime([i for i in range(len(ev)) if i not in held])
        for i, s in zip(fold, rt.score_tensor(ev.x[fold]).scores.tolist()):
            scores[i] = float(s)
    return scores


@torch.inference_mode()
def mutual_scores(rt, shots_x: torch.Tensor, ev: EvidenceSet) -> list[float]:
    """Held-out scores under mutual scoring (``rt``: a mutual runtime without reference images):
    each item is scored together with the shots and every confirmed normal but itself (the
    reference set the candidate scores with, less the item). Features are extracted once."""
    fs, gs = rt.extract(shots_x)
    fe, ge = rt.extract(ev.x)
    normals = ev.index("normal")
    out = []
    for i in range(len(ev)):
        refs = [j for j in normals if j != i]
        feats = {k: torch.cat([fs[k], fe[k][refs], fe[k][i:i + 1]]) for k in fs}
        glob = None if gs is None or ge is None else torch.cat([gs, ge[refs], ge[i:i + 1]])
        out.append(float(rt.score_set(feats, glob, with_refs=False).scores[-1]))
    return out


def calibrate_with_evidence(shot_normal: Sequence[float], generated: Sequence[float], ev_normal: Sequence[float],
                            ev_defect: Sequence[float]) -> tuple[Thresholds, dict]:
    """Thresholds from held-out shot scores, generated-defect scores and the evidence's held-out
    scores (see the module docstring for how real and generated defects combine), and a note of
    what was used."""
    real = len(ev_defect) >= MIN_DEFECTS
    normal = [float(v) for v in shot_normal] + [float(v) for v in ev_normal]
    defects = [float(v) for v in ev_defect] if real else [float(v) for v in generated] + [float(v) for v in ev_defect]
    info = {"normal": f"{len(shot_normal)} held-out shot scores + {len(ev_normal)} confirmed normals (held out)",
            "defects": (f"{len(ev_defect)} confirmed defects (held out); generated defects not used"
                        if real else f"{len(generated)} generated + {len(ev_defect)} confirmed defects (held out)")}
    return calibrate(normal, defects), info


__all__ = ["EVIDENCE_FOLDS", "EvidenceSet", "calibrate_with_evidence", "cv_folds", "fold_scores", "mutual_scores",
           "validate_evidence"]
