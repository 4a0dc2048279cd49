"""Backbone throughput: ms/image per backbone, resolution and batch size.

    .venv/bin/python bench/backbone.py [--device cuda] [--sizes 128 256] [--batches 1 8] [--all]

Prints a table. Backbones whose weights are absent are listed with the reason instead of a time
(random tiny configs are included only with --all, and labelled as such).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from inspector.backbones.registry import PRODUCTION, TEST_ONLY, MissingWeightsError, load_backbone
from inspector.eval.measure import sync


def time_backbone(bb, size: int, batch: int, repeats: int) -> float:
    x = torch.randn(batch, 3, size, size)
    bb.embed(x)  # warm-up (cudnn autotune, allocator)
    sync(bb.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        bb.embed(x)
    sync(bb.device)
    return (time.perf_counter() - t0) / (repeats * batch) * 1e3


def random_architecture(name: str):
    """Same architecture as ``name`` with random weights, for timing only (never for scoring)."""
    from inspector.backbones.configs import BACKBONES
    from inspector.backbones.vit import ClipBackbone, Dinov2Backbone

    if name.startswith("clip/"):
        import open_clip

        arch = name.split("/", 1)[1]
        return ClipBackbone(open_clip.create_model(arch, pretrained=None), name=name, is_random=True)
    import timm

    timm_name = BACKBONES[name].arch
    model = timm.create_model(timm_name, pretrained=False, img_size=448, dynamic_img_size=True)
    return Dinov2Backbone(model, name=name, is_random=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="include random tiny test configs")
    ap.add_argument("--arch-timing", action="store_true",
                    help="time absent-weight backbones with random weights (speed does not depend on weights)")
    args = ap.parse_args()

    table = Table(title=f"Backbone ms/image on {args.device} ({torch.get_num_threads()} threads)")
    for col in ("backbone", "resolution", "batch", "patch grid", "ms/image"):
        table.add_column(col, justify="right" if col != "backbone" else "left")
    names = PRODUCTION + (TEST_ONLY if args.all else ())
    for name in names:
        try:
            bb = load_backbone(name, device=args.device)
        except MissingWeightsError:
            if not args.arch_timing:
                table.add_row(name, "-", "-", "-", "weights absent (see models/README.md)")
                continue
            bb = random_architecture(name).to(args.device)
        for size in args.sizes:
            for batch in args.batches:
                ms = time_backbone(bb, size, batch, args.repeats)
                grid = "x".join(map(str, bb.patch_grid(size, size)))
                table.add_row(name + (" (random)" if bb.is_random else ""), str(size), str(batch), grid, f"{ms:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
