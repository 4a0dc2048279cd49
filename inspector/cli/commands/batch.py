"""`inspector batch FOLDER --product P[@VERSION] [--engine ray]`: score a folder, resumable, with CSV + HTML report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from inspector.cli.commands._common import add_data_dir, add_device, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="score every file in a folder (resumable; CSV + HTML report)",
        description="Stream every file under FOLDER through the product's detector in batches and record each "
                    "one (unreadable files with their reason). Interrupted, the same command resumes where it "
                    "stopped: no file is scored twice.")
    p.add_argument("folder", metavar="FOLDER|GLOB|MANIFEST",
                   help="a folder; with --engine ray also a glob or a CSV/Parquet manifest (column 'path')")
    p.add_argument("--product", "-p", required=True, metavar="NAME[@VERSION]",
                   help="registered product; NAME@VERSION scores with that version (see `inspector versions`) "
                        "instead of the active one")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: DATA/batches/<batch id>)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    p.add_argument("--heatmaps", choices=("all", "flagged", "none"), default="all",
                   help="heatmap PNGs for all images, only UNCERTAIN/NG, or none (default all)")
    p.add_argument("--musc-subset", type=int, default=64, help="MuSc products: images per mutual subset")
    p.add_argument("--no-resume", action="store_true", help="start a new batch instead of resuming this one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None,
                   help="local engine: image decoding threads; ray: scoring actors (default: one per GPU, "
                        "else CPUs - 1)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data over a Ray cluster")
    p.add_argument("--address", default=None, metavar="auto|ray://HOST:PORT",
                   help="ray: the cluster to join (default $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="F",
                   help="ray: GPUs per scoring actor (default 1 when the cluster has GPUs, else 0)")
    add_data_dir(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inspector.errors import EXIT_USAGE, CommandError
    from inspector.products.product import RuntimeUnavailable

    if args.batch_size < 1:
        raise CommandError("--batch-size must be >= 1", EXIT_USAGE)
    st = service_from_args(args)
    st.registry.get(args.product)
    common = dict(out_dir=args.out, batch_size=args.batch_size, progress=not args.no_progress and sys.stderr.isatty(),
                  resume=not args.no_resume, runtime=args.runtime, heatmaps=args.heatmaps, workers=args.workers)
    try:
        if args.engine == "ray":
            from inspector.batch.ray import RayUnavailable, run_batch_ray

            try:
                s = run_batch_ray(args.folder, args.product, st.registry, st.store, data_dir=st.data_dir,
                                  address=args.address or os.environ.get("RAY_ADDRESS"),
                                  gpus_per_worker=args.gpus_per_worker, **common)
            except RayUnavailable as exc:
                raise CommandError(str(exc)) from exc
        else:
            if not Path(args.folder).is_dir() and (any(c in args.folder for c in "*?[")
                                                   or Path(args.folder).suffix.lower() in (".csv", ".parquet")):
                raise CommandError(f"{args.folder}: a glob or a manifest runs with --engine ray", EXIT_USAGE)
            s = st.batch(args.folder, args.product, musc_subset=args.musc_subset, **common)
    except RuntimeUnavailable as exc:
        raise CommandError(str(exc)) from exc
    except KeyboardInterrupt:
        print("interrupted: rows recorded so far are kept; rerun the same command to resume", file=sys.stderr)
        raise
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items())) or "nothing"
    print(f"batch {s.batch_id}: {s.n_files} files ({counts}); {s.n_new} recorded now, "
          f"{s.n_skipped} already recorded; {s.images_per_s} files/s")
    print(f"  CSV  {s.csv_path}\n  HTML {s.html_path}")
    if args.engine == "ray":
        print(f"  Parquet {s.out_dir}/results")
    return 0
