"""`inspector synth`: train the diffusion defect generator, generate defects, build sample products.

    inspector synth train --defects DIR [--masks DIR] --out models/synth/NAME [--fresh]
    inspector synth generate --normal DIR --n 100 --out DIR [--model PATH | --fallback] [--severity S] [--seed S]
    inspector synth product brick|gravel|grass|textile [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="synthetic defects: train the generator, generate, build sample products")
    ss = p.add_subparsers(dest="synth_command", metavar="SUBCOMMAND")
    ss.required = True

    t = ss.add_parser("train", help="train the two-stage diffusion defect generator on a few defect images")
    t.add_argument("--defects", required=True,
                   help="5-20 real defect images: a plain folder, or an MVTec-layout folder (its test/<type> defects)")
    t.add_argument("--masks", help="mask folder (<stem>_mask.png or <stem>.png); images without a mask get an "
                                   "estimated one")
    t.add_argument("--types", nargs="+", help="MVTec folder: only these defect types")
    t.add_argument("--out", required=True, help="output model folder, e.g. models/synth/brick")
    t.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out and start over")
    t.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    t.add_argument("--steps", type=int, help="training steps per model (default: 800 on CPU, 4000 on CUDA)")
    t.add_argument("--patch", type=int, help="patch side (default 64)")
    t.add_argument("--image-size", type=int, help="resize defect images to this short side (default 256; 0 = as-is)")
    t.add_argument("--switch-t", type=int, help="timestep where the small-receptive-field model takes over (default 400)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--device", help="cuda / cpu (default: cuda when present)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--tiny", action="store_true", help="tiny models, seconds (tests, smoke runs)")
    t.set_defaults(func=run_train)

    g = ss.add_parser("generate", help="generate defects on normal images into an MVTec-layout folder")
    g.add_argument("--normal", required=True, help="folder of normal images (or an MVTec folder: its train/good)")
    g.add_argument("--n", type=int, default=100, help="number of defective images")
    g.add_argument("--out", required=True, help="output MVTec-layout folder")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="trained generator folder (from `synth train`)")
    src.add_argument("--fallback", action="store_true", help="weight-free generator (default without --model)")
    g.add_argument("--kind", default="any", choices=("any", "perlin", "cutpaste", "scar"),
                   help="fallback defect kind")
    g.add_argument("--type", default="synthetic", help="defect type name (test/<type>)")
    g.add_argument("--severity", type=float, help="0 (barely visible) .. 1 (obvious); default: spread over 0-1")
    g.add_argument("--holdout", type=float, default=0.25, help="fraction of normal images kept for test/good")
    g.add_argument("--switch-t", type=int, help="override the model's switch timestep")
    g.add_argument("--device", help="cuda / cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.set_defaults(func=run_generate)

    s = ss.add_parser("product", help="build a bundled sample product (deterministic, cached)")
    s.add_argument("name", nargs="*", default=["brick"], help="brick, gravel, grass, textile or all")
    s.add_argument("--root", help="output root (default datasets/generated)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--force", action="store_true", help="rebuild even if cached")
    s.set_defaults(func=run_product)


def run_train(args: argparse.Namespace) -> int:
    from inspector.backbones.base import default_device
    from inspector.errors import CommandError
    from inspector.synth.diffusion.data import load_defect_pairs
    from inspector.synth.diffusion.generator import DefectGen
    from inspector.synth.diffusion.model import DefectGenConfig

    device = args.device or default_device()
    report: dict = {}
    try:
        pairs = load_defect_pairs(args.defects, args.masks, types=args.types, report=report)
    except FileNotFoundError as exc:
        raise CommandError(str(exc), 2) from exc
    print(f"defect images: {report['given']} with masks, {report['estimated']} with estimated masks"
          + (f", {report['dropped_empty']} dropped (no defect found)" if report["dropped_empty"] else ""))
    if not 5 <= len(pairs) <= 20:
        print(f"note: {len(pairs)} defect images; the generator is designed for 5-20 "
              f"({'fewer give little variety' if len(pairs) < 5 else 'more are fine but slower to use'})")
    kw = {k: v for k, v in dict(train_steps=args.steps, patch=args.patch, switch_t=args.switch_t,
                                batch_size=args.batch_size, seed=args.seed).items() if v is not None}
    if args.image_size is not None:
        kw["image_size"] = args.image_size or None
    cfg = DefectGenConfig.tiny(**kw) if args.tiny else DefectGenConfig.for_device(device, **kw)
    if not 0 < cfg.switch_t < cfg.num_train_timesteps:
        raise CommandError(f"--switch-t must be in (0, {cfg.num_train_timesteps})", 2)
    print(f"training on {len(pairs)} defect images, patch {cfg.patch}, switch t={cfg.switch_t}, "
          f"{cfg.train_steps} steps per model, device {device}")
    gen = DefectGen(cfg, device=device)
    ckpt = Path(args.out) / "checkpoint.pt"
    if args.fresh:
        ckpt.unlink(missing_ok=True)
    elif ckpt.is_file():
        print(f"resuming from {ckpt} (when it matches this config and data; --fresh to start over)")
    t0 = time.perf_counter()
    hist = gen.fit([p[0] for p in pairs], [p[1] for p in pairs], progress=True, checkpoint=ckpt,
                   checkpoint_every=max(1, args.checkpoint_every))
    out = gen.save(args.out)
    secs = time.perf_counter() - t0
    meta_file = out / "defectgen.json"
    meta = json.loads(meta_file.read_text())
    meta["training"] = {"seconds": round(secs, 1), "device": str(device), "images": len(pairs), **report}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    for name, losses in hist.items():
        k = max(1, len(losses) // 10)
        print(f"  {name:5s} ({gen.parameters_count[name]:,} params): loss {sum(losses[:k]) / k:.4f} -> "
              f"{sum(losses[-k:]) / k:.4f}")
    print(f"saved {out} (version {gen.version}) in {secs:.1f} s")
    return 0


def _normal_paths(folder: str) -> list[Path]:
    from inspector.io import is_image_file

    root = Path(folder)
    if (root / "train" / "good").is_dir():
        root = root / "train" / "good"
    if not root.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    paths = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    if not paths:
        raise FileNotFoundError(f"{root}: no images")
    return paths


def run_generate(args: argparse.Namespace) -> int:
    import shutil

    import numpy as np

    from inspector.errors import CommandError
    from inspector.synth import build_synthetic_product

    if args.n < 1:
        raise CommandError("--n must be at least 1", 2)
    if args.severity is not None and not 0 <= args.severity <= 1:
        raise CommandError("--severity must be in [0, 1]", 2)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise CommandError(f"{out} exists and is not empty (use --overwrite)", 2)
        shutil.rmtree(out)
    paths = _normal_paths(args.normal)
    if args.model:
        from inspector.synth.diffusion.generator import DefectGen

        generator = DefectGen.load(args.model, device=args.device)
        if args.switch_t is not None:
            generator.config.switch_t = args.switch_t
        name = f"diffusion ({args.model})"
    else:
        generator = None if args.kind == "any" else args.kind
        name = f"fallback ({args.kind})"
    t0 = time.perf_counter()
    summary = build_synthetic_product(paths, out, args.n, np.random.default_rng(args.seed), generator,
                                      defect_type=args.type, holdout=args.holdout, progress=True,
                                      severity=args.severity)
    secs = time.perf_counter() - t0
    print(f"{name}: {args.n} defects from {len(paths)} normal images -> {out} in {secs:.1f} s")
    print(json.dumps(summary, indent=2))
    return 0


def run_product(args: argparse.Namespace) -> int:
    from inspector.synth.samples import PRODUCTS, build_sample

    names = list(PRODUCTS) if "all" in args.name else args.name
    for n in names:
        t0 = time.perf_counter()
        p = build_sample(n, root=args.root, seed=args.seed, size=args.size, force=args.force)
        print(f"{n}: {p} ({time.perf_counter() - t0:.1f} s)")
    return 0
