"""`inspector eval`: accuracy and speed of detectors on an MVTec-layout folder.

Examples::

    inspector eval --data datasets/generated/brick --detector graphcore patchcore --shots 1 2 4
    inspector eval --data sample:textile --detector musc --json out/textile.json
    inspector eval --data /data/mvtec --classes bottle screw --detector graphcore --device cuda

Prints one table (per class and the class mean; mean ± std over seeds), writes ROC/PR curves
and example heatmaps under ``--out`` and, with ``--json``, every run and the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ALL = ("graphcore", "patchcore", "musc", "anomalyclip", "anomalib-patchcore",
       "anomalib-patchcore-wrn50", "anomalib-winclip")


def _kv(text: str) -> tuple[str, str, object]:
    """``detector.key=value`` (value parsed as JSON when it parses, else kept as a string)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected DETECTOR.KEY=VALUE, got {text!r}")
    lhs, value = text.split("=", 1)
    det, key = lhs.split(".", 1)
    try:
        parsed: object = json.loads(value)
    except ValueError:
        parsed = value
    return det, key, parsed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate detectors on an MVTec-layout folder (metrics, curves, timing)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="MVTec-layout folder (dataset root with class folders, or one class), "
                        "or sample:NAME to build/reuse a bundled sample product (brick, textile, ...)")
    p.add_argument("--detector", nargs="+", default=["graphcore"], metavar="D",
                   help=f"detector name(s), or 'all' ({', '.join(ALL)})")
    p.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4], metavar="K",
                   help="few-shot k values (normal images drawn from train/good); default 1 2 4")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S",
                   help="seeds for drawing the shots (mean ± std over them); default 0 1 2")
    p.add_argument("--backbone", default=None, help="backbone name (default: efficientnet-lite0)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)")
    p.add_argument("--image-size", type=int, default=None, help="backbone input size in pixels")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--classes", nargs="+", default=None, help="only these classes of a dataset root")
    p.add_argument("--max-test", type=int, default=None, help="evenly spaced subset of at most N test images per class")
    p.add_argument("--fpr-limit", type=float, default=0.3, help="AUPRO false-positive-rate limit (default 0.3)")
    p.add_argument("--set", dest="overrides", action="append", type=_kv, default=[], metavar="D.KEY=VALUE",
                   help="detector option, e.g. --set musc.r_list=[1,3]; repeatable")
    p.add_argument("--out", default="eval_out", help="folder for curves and example heatmaps (default eval_out)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--json", default=None, metavar="FILE", help="write runs + summary as JSON")
    p.set_defaults(func=run)


def resolve_data(spec: str) -> Path:
    if spec.startswith("sample:"):
        from inspector.synth.samples import build_sample

        return build_sample(spec.split(":", 1)[1])
    return Path(spec)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from inspector.errors import EXIT_USAGE, CommandError
    from inspector.eval.runner import EvalConfig, evaluate
    from inspector.eval.tables import rich_table

    console = Console(width=None if sys.stdout.isatty() else 240)
    dets = list(ALL) if args.detector == ["all"] else args.detector
    if any(k < 1 for k in args.shots):
        raise CommandError("--shots values must be >= 1", EXIT_USAGE)
    det_cfg: dict[str, dict] = {}
    for det, key, value in args.overrides:
        det_cfg.setdefault(det, {})[key] = value
    data = resolve_data(args.data)
    cfg = EvalConfig(detectors=dets, shots=tuple(args.shots), seeds=tuple(args.seeds), backbone=args.backbone,
                     device=args.device, image_size=args.image_size, batch_size=args.batch_size,
                     classes=args.classes, max_test=args.max_test, fpr_limit=args.fpr_limit,
                     plots=not args.no_plots, detector_config=det_cfg)
    report = evaluate(data, cfg, out_dir=None if args.no_plots else args.out, log=console.print)
    summary = report.summary()
    console.print(rich_table(summary, title=f"inspector eval: {data}"))
    console.print("metrics in %, mean±std over seeds; k=0: zero-shot; bb/det ms per image; "
                  "+MB: peak memory rise during fit+score "
                  f"({'CUDA allocated' if report.environment['device'].startswith('cuda') else 'CPU RSS'})")
    if not args.no_plots:
        console.print(f"curves and example heatmaps: {Path(args.out).resolve()}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(f"JSON: {path}")
    ok = any(r.status == "ok" for r in report.runs)
    return 0 if ok else 1
