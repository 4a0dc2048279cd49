"""GraphCore / PatchCore speed: fit time per shot count and ms/image scoring.

    .venv/bin/python bench/graphcore.py [--device cuda] [--size 256] [--shots 1 4 8] [--images 16]

Rows: the PatchCore baseline, PatchCore on GraphCore's augmented bank, and GraphCore (bank + trained
graph head + global branch) with ``orientation`` free and fixed; each scores with one backbone
pass per image. The ``x patchcore`` column is ms/image over PatchCore's at the same shot count
(target: at most 2); the fit budget is 4 shots at 256 px in at most 60 s on 2 CPU cores.
Images are crops of scikit-image's brick texture resized to ``--size`` (real data, offline);
the backbone is the offline EfficientNet-Lite0. Fit time covers augmentation, embedding every
view, the graph stage and the greedy coreset; ms/image covers embedding + graph + kNN + maps
(batch of ``--images``). The first fit of each detector is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from inspector.backbone import load_backbone
from inspector.detectors.graphcore import AugmentedPatchCore, GraphCore, PatchCoreKNN


def brick_crops(n: int, size: int, seed: int) -> list[np.ndarray]:
    import cv2
    from skimage import data

    brick = np.repeat(data.brick()[..., None], 3, axis=2)
    rng = np.random.default_rng(seed)
    side = 192
    out = []
    for y, x in zip(rng.integers(0, 512 - side, n), rng.integers(0, 512 - side, n)):
        out.append(cv2.resize(brick[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_LINEAR))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--images", type=int, default=16, help="test images scored per timing")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                    help="run only these rows (patchcore, patchcore-aug, graphcore-free, graphcore-fixed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bb = load_backbone("efficientnet-lite0", device=args.device, image_size=args.size)
    device = bb.device
    shots = bb.preprocess(brick_crops(max(args.shots), args.size, seed=0))
    tests = bb.preprocess(brick_crops(args.images, args.size, seed=1))
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                f" ({torch.get_num_threads()} threads)")
    table = Table(title=f"GraphCore vs PatchCore, efficientnet-lite0 at {args.size} px on {where}")
    for col in ("detector", "shots", "fit s", "memory rows", "ms/image", "x patchcore"):
        table.add_column(col, justify="left" if col == "detector" else "right")
    variants = [
        ("patchcore", PatchCoreKNN, {}),
        ("patchcore-aug", AugmentedPatchCore, {}),
        ("graphcore-free", GraphCore, {"orientation": "free"}),
        ("graphcore-fixed", GraphCore, {"orientation": "fixed"}),
    ]
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
    base_ms: dict[int, float] = {}
    for label, cls, kw in variants:
        cls(bb, **{**kw, "train_steps": 2}).fit(shots[:1]).score(tests[:2])  # warm-up: allocator, kernels, lazy imports
        for k in args.shots:
            sync(device)
            t0 = time.perf_counter()
            det = cls(bb, **kw).fit(shots[:k])
            sync(device)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            det.score(tests)
            sync(device)
            ms = (time.perf_counter() - t0) / len(tests) * 1e3
            base_ms.setdefault(k, ms)
            table.add_row(label, str(k), f"{fit_s:.2f}", str(det.memory.shape[0]), f"{ms:.1f}",
                          f"{ms / base_ms[k]:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
