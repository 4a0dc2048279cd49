"""Calibration: the held-out scores a product's two thresholds are set from.

Why held-out: a detector scores the very shots it was fitted on as perfectly normal, so thresholds
set from those scores would flag every re-shot of a good part. Each shot is therefore scored by a
model fitted without it (leave-one-out, up to :data:`MAX_FOLDS` folds), together with
:data:`N_VIEWS` re-shot views of it (:func:`augmented_view`: rotation up to 2 degrees, sub-pixel
shift, +-5% brightness/contrast); with a single shot, only the views are scored, by the full
model. Generated defects (:func:`inspector.synth.generate_defects`, ``n_synthetic`` of them, drawn
from the shots, severities spread over [0, 1]; weight-free or a trained diffusion generator) are
scored by the same held-out models, so normal and defect scores are comparable.

:func:`held_out_scores` does this for any way of building a fold's model (the registry passes
one per detector kind); :func:`inspector.verdict.calibrate` turns the scores into thresholds.
Anything that re-calibrates a product (new shots, operator evidence) goes through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import cv2
import numpy as np

from inspector.products.progress import Progress, report_progress

MAX_FOLDS = 8
N_VIEWS = 3


def augmented_view(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible re-shot of a normal part: rotation up to 2 degrees, a shift of up to 3 pixels
    (sub-pixel, so not GraphCore's integer-shift augmentation) and a +-5% brightness/contrast
    change. No added sensor noise: on smooth parts it alone moves CNN patch features more than
    most real defects do, which would push the OK threshold above the defects."""
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-2, 2)), 1.0)
    m[:, 2] += rng.uniform(-3, 3, size=2)
    out = cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    out = out.astype(np.float32) * float(rng.uniform(0.95, 1.05)) + float(rng.uniform(-6, 6))
    return np.clip(out, 0, 255).astype(np.uint8)


class HeldOut(NamedTuple):
    """Held-out scores: normal shots and views, generated defects (with their severities), and the
    median normal pixel score (``map_low``, the 0 of the heatmap scale)."""

    normal: list[float]
    defects: list[float]
    severities: list[float]
    map_low: float


def held_out_scores(shots: list[np.ndarray], fold_runtime: Callable[[list[np.ndarray]], object], *,
                    n_synthetic: int, seed: int, gen=None, zero_shot: bool = False,
                    progress: Progress | None = None, max_folds: int = MAX_FOLDS) -> HeldOut:
    """Score each shot (fold ``i`` of at most :data:`MAX_FOLDS`), its views and its share of the
    generated defects with ``fold_runtime(others)``: a runtime (``preprocess``/``score_tensor``,
    :class:`~inspector.products.runtime.TorchRuntime`) built from the shots other than ``i`` (all
    shots when there is only one). It is called after the fold's defects are generated.

    ``max_folds`` below the number of folds groups the shots instead: fold ``i`` holds out the
    shots ``j`` with ``j % max_folds == i`` (a refit, whose bank is mostly confirmed normals,
    refits fewer, cheaper folds this way).

    ``zero_shot``: the model never saw the shots, so a single shot's own score is held-out too.
    The defects' severities are stratified over [0, 1] across all folds; ``gen`` is the resolved
    defect generator (None: the weight-free one)."""
    from inspector.synth import _resolve, generate_defects
    from inspector.synth.severity import draw_severities

    gen = _resolve(None) if gen is None else gen
    # separate streams: the held-out normal views do not depend on the generator or on n_synthetic
    rng = np.random.default_rng(seed)
    rng_def = np.random.default_rng([seed, 1])
    all_sev = draw_severities(n_synthetic, rng_def, None)
    k = len(shots)
    n_folds = min(k, MAX_FOLDS)
    if max_folds < n_folds:
        n_folds = max(1, max_folds)
        folds = [[j for j in range(k) if j % n_folds == i] for i in range(n_folds)]
    else:
        folds = [[i] for i in range(n_folds)]
    per_fold = [n_synthetic // len(folds) + (1 if i < n_synthetic % len(folds) else 0) for i in range(len(folds))]
    normal: list[float] = []
    defects: list[float] = []
    severities: list[float] = []
    lows: list[float] = []
    report_progress(progress, "held-out scoring", 0, len(folds))
    made = 0
    for i, (held, n_def) in enumerate(zip(folds, per_fold)):
        others = [s for j, s in enumerate(shots) if j not in held] or [shots[j] for j in held]
        queries_normal = []
        for j in held:
            queries_normal += ([shots[j]] if (k > 1 or zero_shot) else []) + \
                [augmented_view(shots[j], rng) for _ in range(N_VIEWS)]
        sev = all_sev[len(severities):len(severities) + n_def]
        severities += [float(v) for v in sev]
        queries_defect = [img for img, _ in generate_defects([shots[j] for j in held], n_def, rng_def, gen,
                                                             severity=sev)] if n_def else []
        made += n_def
        report_progress(progress, "generated defects", made, n_synthetic)
        rt = fold_runtime(others)
        res = rt.score_tensor(rt.preprocess(queries_normal + queries_defect))
        s = res.scores.tolist()
        normal += s[:len(queries_normal)]
        defects += s[len(queries_normal):]
        lows.append(float(res.maps[:len(queries_normal)].median()))
        report_progress(progress, "held-out scoring", i + 1, len(folds))
    return HeldOut([float(v) for v in normal], [float(v) for v in defects], severities, float(np.median(lows)))


__all__ = ["MAX_FOLDS", "N_VIEWS", "HeldOut", "augmented_view", "held_out_scores"]
