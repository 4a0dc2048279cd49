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

Writes ``bench/out/graphcore_speed.json`` and ``bench/GRAPHCORE_SPEED.md`` and splices the table into
``README.md`` between its ``graphcore_speed`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._markdown import splice  # noqa: E402
from inspector.backbones.registry import load_backbone  # noqa: E402
from inspector.detectors.graphcore.detector import AugmentedPatchCore, GraphCore, PatchCoreKNN  # noqa: E402
from inspector.eval.measure import sync  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--images", type=int, default=16, help="test images scored per timing")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                    help="run only these rows (patchcore, patchcore-aug, graphcore-free, graphcore-fixed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--table", default=str(ROOT / "bench" / "GRAPHCORE_SPEED.md"))
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
    rows: list[dict] = []
    t_start = time.perf_counter()
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
            rows.append({"detector": label, "shots": k, "fit_s": fit_s, "memory_rows": int(det.memory.shape[0]),
                         "ms_per_image": ms, "x_patchcore": ms / base_ms[k]})
    Console().print(table)
    result = {"args": vars(args), "device": where, "torch": torch.__version__, "rows": rows,
              "wall_s": time.perf_counter() - t_start,
              "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graphcore_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    Path(args.table).write_text(md)
    splice(ROOT / "README.md", "graphcore_speed", md)
    print(f"wrote {out / 'graphcore_speed.json'} and {args.table}")


def render(r: dict) -> str:
    a = r["args"]
    lines = [f"`python bench/graphcore.py --size {a['size']} --shots {' '.join(map(str, a['shots']))}`: "
             f"EfficientNet-Lite0 at {a['size']} px on {r['device']}, brick crops, {a['images']} test images, "
             f"torch {r['torch']}, 1-min load average {r['load_avg']:.1f} at the end, whole run {r['wall_s']:.0f} s.",
             "", "| detector | shots | fit s | memory rows | ms/image | x patchcore |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['detector']} | {x['shots']} | {x['fit_s']:.1f} | {x['memory_rows']} | "
                     f"{x['ms_per_image']:.1f} | {x['x_patchcore']:.2f} |")
    budget = [x for x in r["rows"] if x["detector"].startswith("graphcore") and x["shots"] == 4]
    if budget and a["size"] == 256 and "cpu" in r["device"]:
        worst = max(x["fit_s"] for x in budget)
        lines += ["", f"Fit budget (4 shots at 256 px within 60 s on the CPU): slowest GraphCore fit {worst:.1f} s, "
                      + ("met." if worst <= 60 else "**missed**.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
