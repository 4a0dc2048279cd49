"""`inspector weights import FILE --as clip/ARCH | anomalyclip/NAME` and `inspector weights list`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="import CLIP weights / AnomalyCLIP checkpoints into models/ (safetensors)",
                       description="Convert a weights file once into the safetensors the station loads, with its "
                                   "sha256 recorded in models/manifest.json.")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    wsub.required = True
    imp = wsub.add_parser("import", help="import a weights file",
                          description="clip/ARCH: an OpenAI release .pt (TorchScript, read without executing it), "
                                      "an open_clip / Hugging Face state dict or .safetensors. anomalyclip/NAME: an "
                                      "official AnomalyCLIP prompt checkpoint (epoch_15.pth).")
    imp.add_argument("file", help="the file to import")
    imp.add_argument("--as", dest="target", required=True, metavar="KIND/NAME",
                     help="clip/ViT-L-14-336, clip/ViT-B-16, ... or anomalyclip/NAME")
    imp.add_argument("--activation", choices=("quickgelu", "gelu"), default=None,
                     help="CLIP MLP activation the weights were trained with (default: QuickGELU for OpenAI archs)")
    imp.add_argument("--backbone", default="clip/ViT-L-14-336",
                     help="anomalyclip only: the CLIP the prompts were trained on (default clip/ViT-L-14-336)")
    imp.add_argument("--models-dir", default=None, help="weights folder (default: $INSPECTOR_MODELS or models/)")
    imp.set_defaults(func=run_import)
    ls = wsub.add_parser("list", help="show the manifest")
    ls.add_argument("--models-dir", default=None)
    ls.set_defaults(func=run_list)


def _models_dir(args):
    from pathlib import Path

    from inspector.paths import models_dir

    return Path(args.models_dir) if args.models_dir else models_dir()


def run_import(args: argparse.Namespace) -> int:
    from inspector.errors import EXIT_USAGE, CommandError

    kind, _, name = args.target.partition("/")
    if not name or kind not in ("clip", "anomalyclip"):
        raise CommandError(f"--as must be clip/ARCH or anomalyclip/NAME, got {args.target!r}", EXIT_USAGE)
    mdir = _models_dir(args)
    if kind == "clip":
        from inspector.backbones.weights import import_clip

        quick = None if args.activation is None else args.activation == "quickgelu"
        entry = import_clip(args.file, name, mdir, quick_gelu=quick)
        print(f"imported {args.file} ({entry['source_format']}, {entry['tensors']} tensors, "
              f"{'QuickGELU' if entry['quick_gelu'] else 'GELU'}) -> {mdir / entry['file']}")
        print(f"  sha256 {entry['sha256']} recorded in {mdir / 'manifest.json'}")
        return 0
    from inspector.detectors.anomalyclip.checkpoint import import_official_checkpoint

    out = import_official_checkpoint(args.file, name, mdir, backbone=args.backbone)
    print(f"imported {args.file} -> {out} (+ .json, official preset, backbone {args.backbone})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    import json

    from inspector.backbones.weights import read_manifest

    print(json.dumps(read_manifest(_models_dir(args)), indent=2))
    return 0
