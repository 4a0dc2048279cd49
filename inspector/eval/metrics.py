"""The one set of anomaly metrics: anomalib's metric classes, for eval, training checks and benches.

image AUROC, image AP (anomalib ``AUPR``: the step-wise average precision, equal to sklearn's
``average_precision_score``), image F1-max, pixel AUROC, pixel AUPRO up to a FPR limit (normalised
by the limit, as in MVTec AD), pixel F1-max. :func:`auroc` and :func:`pixel_auroc` are the single
AUROCs for callers that need only that number (AnomalyCLIP's training check, benches).

Scores are min-max rescaled to [0, 1] (float64) before the metrics see them (:func:`unit_scale`).
This changes no ranking, and it is needed: torchmetrics' ROC, under anomalib's ``AUROC``, passes
any input outside [0, 1] through a sigmoid, and in float32 the sigmoid of kNN distances such as 20
and 30 is 1.0 for both, so raw distances give wrong AUROCs (0.5 instead of 1.0 on a perfectly
separated example; see ``tests/test_evaluate.py``).

A leaf module: it imports nothing from ``inspector`` (detectors' training code uses it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_aupro", "pixel_f1max")
METRICS = IMAGE_METRICS + PIXEL_METRICS
METRIC_LABELS = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC", "pixel_aupro": "AUPRO@30", "pixel_f1max": "P-F1max",
}


class _Fields:
    """The minimal batch object anomalib's ``AnomalibMetric.update`` reads its fields from."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def unit_scale(x: Tensor | np.ndarray) -> Tensor:
    """Min-max rescale to [0, 1] in float64 (rank-preserving; see module docstring)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu().double()
    lo, hi = t.min(), t.max()
    if not torch.isfinite(lo) or not torch.isfinite(hi):
        raise ValueError("scores contain NaN or inf")
    return (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)


def _anomalib(metric_cls, preds: Tensor, target: Tensor, fields=("pred_score", "gt_label"), **kw) -> float:
    m = metric_cls(fields=list(fields), **kw)
    m.update(_Fields(**{fields[0]: preds, fields[1]: target}))
    return float(m.compute())


def _image_inputs(scores, labels) -> tuple[Tensor, Tensor]:
    y = torch.as_tensor(np.asarray(labels)).long().flatten()
    s = unit_scale(scores).flatten()
    if s.shape != y.shape:
        raise ValueError(f"{s.numel()} scores for {y.numel()} labels")
    return s, y


def _pixel_inputs(maps, masks) -> tuple[Tensor, Tensor]:
    m = torch.as_tensor(np.asarray(masks)).bool()
    p = unit_scale(maps).float()  # float32 is exact enough for ranks of [0,1] maps, halves memory
    if p.shape != m.shape or p.ndim != 3:
        raise ValueError(f"maps {tuple(p.shape)} and masks {tuple(m.shape)} must both be [N,H,W]")
    return p, m


_PIXEL_FIELDS = ("anomaly_map", "gt_mask")


def _auroc(preds: Tensor, target: Tensor, fields=("pred_score", "gt_label")) -> float:
    from anomalib.metrics import AUROC

    return _anomalib(AUROC, preds, target, fields)


def auroc(scores, labels) -> float | None:
    """Image AUROC (anomalib ``AUROC``) of ``scores`` against 0/1 ``labels``; ``None`` when the
    labels hold one class only (undefined)."""
    s, y = _image_inputs(scores, labels)
    return None if y.min() == y.max() else _auroc(s, y)


def pixel_auroc(maps, masks) -> float | None:
    """Pixel AUROC (anomalib ``AUROC``) of ``maps`` against bool ``masks``, both ``[N,H,W]``;
    ``None`` without defect or without normal pixels."""
    p, m = _pixel_inputs(maps, masks)
    return None if not m.any() or m.all() else _auroc(p, m.long(), _PIXEL_FIELDS)


def image_metrics(scores, labels) -> dict[str, float | None]:
    """Image AUROC, AP, F1-max with anomalib's ``AUROC``, ``AUPR``, ``F1Max``. ``None`` when the
    labels hold one class only (the metrics are undefined)."""
    from anomalib.metrics import AUPR, F1Max

    s, y = _image_inputs(scores, labels)
    if y.min() == y.max():
        return dict.fromkeys(IMAGE_METRICS)
    return {
        "image_auroc": _auroc(s, y),
        "image_ap": _anomalib(AUPR, s, y),
        "image_f1max": _anomalib(F1Max, s, y),
    }


def pixel_metrics(maps, masks, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Pixel AUROC, AUPRO (FPR up to ``fpr_limit``), F1-max with anomalib's ``AUROC``, ``AUPRO``,
    ``F1Max`` over ``maps`` / ``masks`` ``[N,H,W]``. ``None`` without defect or normal pixels."""
    from anomalib.metrics import AUPRO, F1Max

    p, m = _pixel_inputs(maps, masks)
    if not m.any() or m.all():
        return dict.fromkeys(PIXEL_METRICS)
    f = _PIXEL_FIELDS
    return {
        "pixel_auroc": _auroc(p, m.long(), f),
        "pixel_aupro": _anomalib(AUPRO, p, m.to(torch.uint8), f, fpr_limit=fpr_limit),
        "pixel_f1max": _anomalib(F1Max, p, m.long(), f),
    }


def compute_metrics(scores, labels, maps=None, masks=None, pixel_known=None,
                    fpr_limit: float = 0.3) -> dict[str, float | None]:
    """All metrics. Pixel metrics only when ``maps`` and ``masks`` are given, over the images
    with ``pixel_known`` (default: all)."""
    out = image_metrics(scores, labels)
    if maps is None or masks is None:
        return {**out, **dict.fromkeys(PIXEL_METRICS)}
    maps = torch.as_tensor(np.asarray(maps)) if not isinstance(maps, Tensor) else maps
    masks = np.asarray(masks)
    if pixel_known is not None:
        keep = np.asarray(pixel_known, bool)
        maps, masks = maps[torch.from_numpy(keep)], masks[keep]
    if len(masks) == 0:
        return {**out, **dict.fromkeys(PIXEL_METRICS)}
    return {**out, **pixel_metrics(maps, masks, fpr_limit)}
