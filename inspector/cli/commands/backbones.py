"""`inspector backbones`: list backbones, whether their weights are present, layers and dims."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list patch-feature backbones and their weights")
    p.add_argument("--all", action="store_true", help="include the random tiny test configs")
    p.add_argument("--run", metavar="IMAGE", nargs="?", const="coffee",
                   help="run one image (path, or 'coffee' for scikit-image's photo) through the default backbone")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from inspector.backbones.registry import (
        DEFAULT_BACKBONE,
        PRODUCTION,
        TEST_ONLY,
        describe,
        load_backbone,
    )

    console = Console()
    table = Table(title="Patch-feature backbones")
    for col in ("name", "weights", "present", "layers (dims)", "stride", "input"):
        table.add_column(col)
    for name in PRODUCTION + (TEST_ONLY if args.all else ()):
        info = describe(name)
        layers = ", ".join(f"{k} ({v})" for k, v in info.dims.items()) or "-"
        table.add_row(name + (" (default)" if name == DEFAULT_BACKBONE else ""), info.weights,
                      "yes" if info.weights_present else "NO", layers, str(info.stride),
                      str(info.image_size or "-"))
    console.print(table)
    if args.run:
        from inspector.io import read_image

        if args.run == "coffee":
            from skimage import data

            image = data.coffee()
        else:
            image = read_image(args.run)
        bb = load_backbone(DEFAULT_BACKBONE)
        x = bb.preprocess(image)
        t0 = time.perf_counter()
        feats = bb.embed(x)
        ms = (time.perf_counter() - t0) * 1e3
        console.print(f"[bold]{DEFAULT_BACKBONE}[/] on {args.run} ({image.shape[1]}x{image.shape[0]}) "
                      f"-> input {tuple(x.shape)} in {ms:.1f} ms on {bb.device}")
        for k, v in feats.items():
            console.print(f"  {k}: {tuple(v.shape)}  mean {v.mean():.3f}  std {v.std():.3f}")
    return 0
