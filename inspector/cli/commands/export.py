"""`inspector export`: a product (backbone + detector scoring) or a bare backbone to ONNX + JSON sidecar.

    inspector export --product P --out models/P.onnx
    inspector export --backbone efficientnet-lite0 --image-size 256 --out models/lite0-256.onnx

The sidecar (``models/P.json``) carries preprocessing, thresholds and versions; run the graph with
``inspector batch ... --runtime onnx`` or :func:`inspector.deploy.runtime.load_runtime`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a product or a backbone to ONNX (+ JSON sidecar)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--product", metavar="NAME", help="registered product: backbone + detector scoring")
    what.add_argument("--backbone", metavar="NAME", help="bare feature extractor (e.g. efficientnet-lite0)")
    p.add_argument("--out", metavar="PATH.onnx", help="output file (default models/<name>.onnx); "
                   "the sidecar is written beside it as <stem>.json")
    p.add_argument("--image-size", type=int, metavar="PX", help="input side for --backbone (default: its own)")
    p.add_argument("--data", metavar="DIR", help="station data directory (default $INSPECTOR_DATA or ./data)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the torch-vs-onnxruntime parity check")
    p.set_defaults(func=run)


def _product(name: str, data: str | None):
    from inspector.station.service import StationService

    station = StationService(Path(data) if data else None)
    return station.registry.get(name)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from inspector.deploy.export import OPSET, export_backbone, export_product
    from inspector.paths import models_dir

    console = Console()
    opset = args.opset or OPSET
    verify = not args.no_verify
    if args.product:
        out = Path(args.out) if args.out else models_dir() / f"{args.product}.onnx"
        product = _product(args.product, args.data)
        res = export_product(product, out, opset=opset, verify=verify)
    else:
        if args.image_size is not None and args.image_size < 32:
            raise ValueError("--image-size must be at least 32")
        safe = args.backbone.replace("/", "-")
        out = Path(args.out) if args.out else models_dir() / f"{safe}.onnx"
        res = export_backbone(args.backbone, out, image_size=args.image_size, opset=opset, verify=verify)

    meta = res.sidecar
    table = Table(title=f"exported {res.onnx_path}", show_header=False)
    table.add_row("sidecar", str(res.sidecar_path))
    table.add_row("backbone", meta["backbone"])
    if meta.get("detector"):
        table.add_row("detector", meta["detector"])
        table.add_row("product", f"{meta.get('product')} (version {meta.get('product_version')})")
        th = meta.get("thresholds") or {}
        table.add_row("thresholds", f"OK < {th.get('ok_below')}  NG >= {th.get('ng_above')}" if th else "-")
    table.add_row("input", f"images {meta['input']['shape']} float32 (batch is dynamic)")
    for k, v in meta["outputs"].items():
        table.add_row(f"output {k}", str(v["shape"]))
    table.add_row("opset / size", f"{opset} / {meta['onnx_bytes'] / 1e6:.1f} MB")
    if meta.get("parity"):
        par = meta["parity"]
        names = [k for k in meta["outputs"] if k in par]
        table.add_row("parity (max |onnx - torch|)",
                      ", ".join(f"{k} {par[k]:.2g} (scale {par[k + '_scale']:.3g})" for k in names))
        table.add_row("parity rule", f"{par['rule']}: worst {max(par[k + '_ratio'] for k in names):.2f}x")
    console.print(table)
    return 0
