"""`inspector train <model>`: train the learnable parts of a detector.

    inspector train anomalyclip --data DIR --backbone clip/ViT-L-14-336 \\
        --out models/anomalyclip/NAME.safetensors [--epochs 15 --lr 1e-3 --batch-size 8 \\
        --image-size 336 --resume]

``--data`` is any MVTec-layout folder (``train/good``, ``test/good``, ``test/<type>``,
``ground_truth/<type>/<stem>_mask.png``) or a folder of such category folders; the output of
``inspector synth generate`` is one. Without ``ground_truth`` the prompts learn from image labels
only. Only the prompt parameters are trained and saved (safetensors + JSON config); the
optimizer state and epoch counter sit beside them (``NAME.train.safetensors/.json``) so
``--resume`` continues an interrupted run.

Other trainable components register here by adding a sub-parser in :data:`TRAINERS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

# Paper defaults, repeated here so that building the CLI parser does not import torch
# (tests/test_anomalyclip.py checks they equal the detector module's constants).
DEFAULT_BACKBONE, N_CTX, T_N_CTX = "clip/ViT-L-14-336", 12, 4


def _add_anomalyclip(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "anomalyclip",
        help="learn AnomalyCLIP's object-agnostic normal/abnormal prompts on annotated (or generated) data",
        description="Train AnomalyCLIP prompts (CLIP frozen) on an MVTec-layout folder.",
    )
    p.add_argument("--data", required=True, help="MVTec-layout folder (or a folder of them)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"clip/<arch> backbone (default {DEFAULT_BACKBONE})")
    p.add_argument("--out", default=None,
                   help="prompt checkpoint to write (default models/anomalyclip/<arch>.safetensors)")
    p.add_argument("--epochs", type=int, default=15, help="total epochs (default 15, as the paper)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="default 8")
    p.add_argument("--image-size", type=int, default=None,
                   help="training resolution (default: the preset's, 518 for official ViT-L-14-336, else native)")
    p.add_argument("--resume", action="store_true", help="continue from --out and its saved optimizer state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-ctx", type=int, default=N_CTX, help="learnable context tokens per prompt (12)")
    p.add_argument("--depth", type=int, default=None,
                   help="deep text-prompt depth incl. the input layer (default 9 of 12 text blocks, scaled)")
    p.add_argument("--t-n-ctx", type=int, default=T_N_CTX, help="deep tokens per layer (4)")
    p.add_argument("--dpam-start", type=int, default=None,
                   help="1-based visual block where the V-V path starts (default: the preset's; 0 = off)")
    p.add_argument("--preset", default="official", choices=("official", "project"),
                   help="official (zqhang/AnomalyCLIP: layer 24, 518 px for ViT-L-14-336, test split) or project")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help="folder splits to train on (default: the preset's; official: test)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--no-cache", action="store_true", help="do not cache the frozen image features in memory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_anomalyclip)


def _run_anomalyclip(args: argparse.Namespace) -> int:
    from pathlib import Path

    from inspector.backbones.registry import load_backbone
    from inspector.detectors.anomalyclip.train import train_prompts
    from inspector.errors import EXIT_USAGE, CommandError
    from inspector.paths import models_dir

    if not args.backbone.startswith("clip/"):
        raise CommandError(f"AnomalyCLIP needs a clip/<arch> backbone, got {args.backbone!r}", EXIT_USAGE)
    if args.epochs < 0 or args.batch_size < 1 or args.lr <= 0:
        raise CommandError("--epochs must be >= 0, --batch-size >= 1 and --lr > 0", EXIT_USAGE)
    data = Path(args.data)
    if not data.is_dir():
        raise CommandError(f"--data {data}: not a folder", EXIT_USAGE)
    out = Path(args.out) if args.out else models_dir() / "anomalyclip" / f"{args.backbone.split('/', 1)[1]}.safetensors"
    if out.suffix != ".safetensors":
        raise CommandError(f"--out must end in .safetensors, got {out}", EXIT_USAGE)
    if out.exists() and not args.resume:
        print(f"note: {out} exists and will be overwritten (use --resume to continue it)")
    if args.dpam_start is None:
        dpam: int | str | None = "preset"
    elif args.dpam_start == 0:
        dpam = None
    else:
        dpam = args.dpam_start - 1

    bb = load_backbone(args.backbone, device=args.device)  # MissingWeightsError -> exit 3 with its message
    result = train_prompts(
        data, out, backbone=bb, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        image_size=args.image_size, resume=args.resume, seed=args.seed, n_ctx=args.n_ctx, depth=args.depth,
        t_n_ctx=args.t_n_ctx, dpam_start=dpam, cache_features=False if args.no_cache else None,
        workers=args.workers, progress=not args.quiet, preset=args.preset, splits=args.splits,
    )
    last = result.history[-1] if result.history else None
    msg = f"prompts: {result.path} ({result.epochs_done} epochs, {result.samples} images)"
    if last:
        msg += f"; last epoch loss {last['loss']:.4f}"
    print(msg)
    return 0


TRAINERS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "anomalyclip": _add_anomalyclip,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a detector's learnable parts (AnomalyCLIP prompts)")
    models = p.add_subparsers(dest="model", metavar="MODEL")
    models.required = True
    for add in TRAINERS.values():
        add(models)
