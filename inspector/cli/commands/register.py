"""`inspector register NAME IMAGES...`: register a product from a few normal images."""

from __future__ import annotations

import argparse
import json

from inspector.cli.commands import _common as common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register", help="register a product from 1-8 normal images (fit + calibrate thresholds)",
        description="Fit a detector on a few normal images of a product, calibrate the OK/NG thresholds "
                    "from held-out normal scores and generated defects, and save the product.")
    p.add_argument("name", help="product name (letters, digits, '.', '_', '-')")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="normal images or folders of them")
    p.add_argument("--detector", default="graphcore", metavar="NAME",
                   help="graphcore (default, few-shot), patchcore (kNN baseline), musc or anomalyclip (zero-shot)")
    p.add_argument("--backbone", default="efficientnet-lite0", help="patch backbone (see `inspector backbones`)")
    p.add_argument("--image-size", type=int, default=None, help="model input size in pixels (backbone default)")
    p.add_argument("--n-synthetic", type=int, default=16, help="generated defects for calibration (default 16)")
    p.add_argument("--generator", default=None, metavar="MODEL",
                   help="defect generator for calibration (and the detector's training when it takes one): "
                        "'fallback' (weight-free, default) or a trained diffusion model, models/synth/NAME or NAME")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, metavar="JSON", help="detector options as JSON, e.g. '{\"views\": 2}'")
    p.add_argument("--replace", action="store_true", help="replace an existing product of this name")
    p.add_argument("--actor", default=None, help="who registers (audit trail; default: the OS user)")
    p.add_argument("--json", action="store_true", help="print the product as JSON")
    common.add_data_dir(p)
    common.add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inspector.errors import EXIT_USAGE, CommandError
    from inspector.io import read_image
    from inspector.products.product import ProductExists

    try:
        cfg = json.loads(args.config) if args.config else {}
    except json.JSONDecodeError as exc:
        raise CommandError(f"--config is not valid JSON: {exc}", EXIT_USAGE) from exc
    if args.n_synthetic < 0:
        raise CommandError("--n-synthetic must be >= 0", EXIT_USAGE)
    images = [read_image(p) for p in common.expand_images(args.images)]
    generator = None
    if args.generator and args.generator != "fallback":
        from inspector.synth import generator_path
        from inspector.synth.diffusion.generator import CONFIG_NAME

        path = generator_path(args.generator)
        if not (path / CONFIG_NAME).is_file():
            raise CommandError(f"--generator {args.generator}: no trained generator at {path} "
                               f"(train one with `inspector synth train`)", EXIT_USAGE)
        generator = str(path)
    st = common.service_from_args(args)
    try:
        prod = st.registry.register(args.name, images, detector=args.detector, backbone=args.backbone,
                                    actor=common.actor(args), n_synthetic=args.n_synthetic, seed=args.seed,
                                    image_size=args.image_size, detector_config=cfg, replace=args.replace,
                                    generator=generator)
    except ProductExists as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps(prod.to_json(), indent=2))
        return 0
    cal = prod.calibration
    print(f"registered {prod.name}: {prod.detector} on {prod.backbone} @ {prod.image_size}px, "
          f"{prod.shots} shot(s), version {prod.version}")
    print(f"  held-out normal scores: {common.fmt(min(cal['normal_scores']))} .. {common.fmt(max(cal['normal_scores']))} "
          f"({len(cal['normal_scores'])})")
    if cal["defect_scores"]:
        print(f"  generated defect scores: {common.fmt(min(cal['defect_scores']))} .. {common.fmt(max(cal['defect_scores']))} "
              f"({len(cal['defect_scores'])})")
    print(f"  thresholds: OK below {common.fmt(prod.thresholds.ok_below)}, NG at or above {common.fmt(prod.thresholds.ng_above)}")
    g = prod.registration.get("generator") or {}
    if g:
        print(f"  defect generator: {g.get('kind')} {g.get('name')} (version {g.get('version')})")
    for b in cal.get("severity_bands", []):
        if b["n"]:
            print(f"  {b['band']:8s} generated defects (severity {b['range'][0]:.2f}-{b['range'][1]:.2f}, n={b['n']}): "
                  f"{100 * b['passed_ok']:.0f}% would pass as OK, {100 * b['not_ng']:.0f}% not NG")
    print(f"  fitted and calibrated in {prod.registration.get('seconds')} s; saved in {prod.path}")
    return 0
