"""Evaluation figures as PNG (matplotlib, Agg backend: no display needed).

* ``<tag>_curves.png``: image ROC, image precision-recall and, with masks, pixel ROC.
* ``<tag>_examples.png``: a few test images with their anomaly map overlaid and the ground-truth
  outline: the highest-scored defects, the lowest-scored defect (the hardest miss) and the
  highest-scored good image (the worst false alarm). Maps share one colour scale per figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_curves(path: str | Path, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray | None = None,
                masks: np.ndarray | None = None, title: str = "", max_pixels: int = 2_000_000) -> Path | None:
    """ROC / PR curves. Returns ``None`` when the labels hold one class only."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    from inspector.eval.metrics import auroc

    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        return None
    plt = _plt()
    panels = 3 if masks is not None and masks.any() and not masks.all() else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.0 * panels, 3.8), dpi=90)
    fpr, tpr, _ = roc_curve(labels, scores)
    ax = axes[0]
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {auroc(scores, labels):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    prec, rec, _ = precision_recall_curve(labels, scores)
    ax = axes[1]
    ax.step(rec, prec, where="post", lw=2, label=f"AP {-np.sum(np.diff(rec) * prec[:-1]):.3f}")
    ax.axhline(labels.mean(), ls="--", color="grey", lw=1)
    ax.set(xlabel="recall", ylabel="precision", title="image precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")
    if panels == 3:
        m, y = np.asarray(maps, np.float32).ravel(), np.asarray(masks, bool).ravel()
        if m.size > max_pixels:  # a seeded subsample is plenty for drawing the curve
            idx = np.random.default_rng(0).choice(m.size, max_pixels, replace=False)
            m, y = m[idx], y[idx]
        pf, pt, _ = roc_curve(y, m)
        ax = axes[2]
        pa = auroc(m, y)  # None when the subsample missed every defect pixel
        ax.plot(pf, pt, lw=2, color="tab:orange", label="AUROC -" if pa is None else f"AUROC {pa:.3f}")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.axvline(0.3, ls=":", color="grey", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="pixel ROC", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def pick_examples(scores: np.ndarray, labels: np.ndarray, n: int = 6) -> list[int]:
    """Indices to show: top defects, the lowest-scored defect, the highest-scored good image."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    return [i for i, _ in pick_examples_with_roles(scores, labels, n)]


def pick_examples_with_roles(scores: np.ndarray, labels: np.ndarray, n: int = 6) -> list[tuple[int, str]]:
    scores, labels = np.asarray(scores), np.asarray(labels)
    order = np.argsort(-scores, kind="stable")
    bad = [int(i) for i in order if labels[i] == 1]
    good = [int(i) for i in order if labels[i] == 0]
    picks: list[tuple[int, str]] = []
    if good:
        picks.append((good[0], "highest good"))    # worst false alarm
    if bad:
        picks.append((bad[-1], "lowest defect"))   # hardest miss
    for i in bad + good:                            # then the most confident detections
        if len(picks) >= n:
            break
        if all(i != j for j, _ in picks):
            picks.append((i, "top defect" if labels[i] else "good"))
    return picks[:n]


def save_examples(path: str | Path, rgb: Sequence[np.ndarray], maps: np.ndarray, scores: np.ndarray,
                  labels: np.ndarray, types: Sequence[str], masks: np.ndarray | None = None,
                  n: int = 6, title: str = "") -> Path:
    """Image / map overlay pairs with the ground-truth outline (green) where masks are known."""
    import cv2

    plt = _plt()
    roles = pick_examples_with_roles(scores, labels, n)
    idx = [i for i, _ in roles]
    lo, hi = float(np.min(maps[idx])), float(np.max(maps[idx]))
    fig, axes = plt.subplots(2, len(idx), figsize=(2.2 * len(idx), 4.8), dpi=90, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86, wspace=0.04, hspace=0.04)
    for col, i in enumerate(idx):
        img = rgb[i]
        m = maps[i]
        if m.shape != img.shape[:2]:
            m = cv2.resize(m.astype(np.float32), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
        for row in (0, 1):
            ax = axes[row, col]
            ax.imshow(img)
            if row == 1:
                ax.imshow(m, cmap="jet", alpha=0.5, vmin=lo, vmax=hi if hi > lo else lo + 1)
            if masks is not None and masks[i].any():
                mk = masks[i].astype(float)
                if mk.shape != img.shape[:2]:
                    mk = cv2.resize(mk, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
                ax.contour(mk, levels=[0.5], colors="lime", linewidths=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"{roles[col][1]}: {types[i]}\nscore {scores[i]:.3g}", fontsize=8,
                               color="tab:red" if labels[i] else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_run_plots(out_dir: str | Path, tag: str, title: str, scores: np.ndarray, labels: np.ndarray,
                   maps: np.ndarray, masks: np.ndarray | None, pixel_known: np.ndarray | None,
                   rgb: Sequence[np.ndarray], types: Sequence[str], n_examples: int = 6) -> list[Path]:
    """Curves and examples for one run; pixel curves use the images with known masks."""
    out = Path(out_dir)
    written = []
    pm = pk = None
    if masks is not None:
        keep = np.ones(len(masks), bool) if pixel_known is None else np.asarray(pixel_known, bool)
        pm, pk = maps[keep], masks[keep]
    p = save_curves(out / f"{tag}_curves.png", scores, labels, pm, pk, title)
    if p is not None:
        written.append(p)
    shown_masks = None
    if masks is not None:
        shown_masks = masks.copy()
        if pixel_known is not None:
            shown_masks[~np.asarray(pixel_known, bool)] = False
    written.append(save_examples(out / f"{tag}_examples.png", rgb, maps, scores, labels, types,
                                 shown_masks, n_examples, title))
    return written
