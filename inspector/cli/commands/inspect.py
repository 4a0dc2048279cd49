"""`inspector inspect IMAGE... --product P[@VERSION]`: score images, record them, write heatmaps."""

from __future__ import annotations

import argparse
import json
import sys

from inspector.cli.commands._common import add_data_dir, add_device, fmt, service_from_args
from inspector.paths import display


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="inspect image(s) with a registered product",
                       description="Score each image, decide OK / UNCERTAIN / NG, save a heatmap and record "
                                   "the inspection. Exit code 1 if any image could not be read.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--product", "-p", required=True, metavar="NAME[@VERSION]",
                   help="registered product; NAME@VERSION scores with that version (see `inspector versions`) "
                        "instead of the active one")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    p.add_argument("--no-heatmap", action="store_true", help="do not write heatmap PNGs")
    p.add_argument("--json", action="store_true", help="one JSON object per image (full-precision score)")
    add_data_dir(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inspector.errors import CommandError
    from inspector.products.product import RuntimeUnavailable

    st = service_from_args(args)
    st.registry.get(args.product)  # unknown product: clear error before anything is recorded
    failed = 0
    for path in args.images:
        shown = display(path)
        try:
            rec = st.inspect(args.product, path, source=path, runtime=args.runtime,
                             save_heatmap_png=not args.no_heatmap)
        except RuntimeUnavailable as exc:
            raise CommandError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - one image's failure: say so, go on with the rest
            failed += 1
            print(f"{shown}: ERROR {type(exc).__name__}: {display(exc)}", file=sys.stderr)
            continue
        failed += rec.error is not None
        if args.json:
            print(json.dumps({"id": rec.id, "image": shown, "product": rec.product, "score": rec.score,
                              "verdict": None if rec.verdict is None else rec.verdict.value,
                              "heatmap": rec.heatmap_path, "latency_ms": rec.latency_ms, "error": rec.error,
                              "model_version": rec.model_version}))
        elif rec.error:
            print(f"{shown}: ERROR {display(rec.error)}")
        else:
            print(f"{shown}: {rec.verdict.value:9s} score {fmt(rec.score)}  ({rec.latency_ms:.0f} ms)"
                  + (f"  heatmap {rec.heatmap_path}" if rec.heatmap_path else ""))
    return 1 if failed else 0
