"""`inspector batch FOLDER --product P`: score a folder, resumable, with CSV + HTML report."""

from __future__ import annotations

import argparse
import sys

from ._common import add_data_dir, add_device, station


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="score every file in a folder (resumable; CSV + HTML report)",
        description="Stream every file under FOLDER through the product's detector in batches and record each "
                    "one (unreadable files with their reason). Interrupted, the same command resumes where it "
                    "stopped: no file is scored twice.")
    p.add_argument("folder")
    p.add_argument("--product", "-p", required=True)
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: DATA/batches/<batch id>)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    p.add_argument("--heatmaps", choices=("all", "flagged", "none"), default="all",
                   help="heatmap PNGs for all images, only UNCERTAIN/NG, or none (default all)")
    p.add_argument("--musc-subset", type=int, default=64, help="MuSc products: images per mutual subset")
    p.add_argument("--no-resume", action="store_true", help="start a new batch instead of resuming this one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads")
    add_data_dir(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import EXIT_USAGE, CommandError
    from ..products import RuntimeUnavailable

    if args.batch_size < 1:
        raise CommandError("--batch-size must be >= 1", EXIT_USAGE)
    st = station(args)
    st.registry.get(args.product)
    try:
        s = st.batch(args.folder, args.product, out_dir=args.out, batch_size=args.batch_size,
                     progress=not args.no_progress and sys.stderr.isatty(), resume=not args.no_resume,
                     runtime=args.runtime, heatmaps=args.heatmaps, workers=args.workers,
                     musc_subset=args.musc_subset)
    except RuntimeUnavailable as exc:
        raise CommandError(str(exc)) from exc
    except KeyboardInterrupt:
        print("interrupted: rows recorded so far are kept; rerun the same command to resume", file=sys.stderr)
        raise
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items())) or "nothing"
    print(f"batch {s.batch_id}: {s.n_files} files ({counts}); {s.n_new} recorded now, "
          f"{s.n_skipped} already recorded; {s.images_per_s} files/s")
    print(f"  CSV  {s.csv_path}\n  HTML {s.html_path}")
    return 0
