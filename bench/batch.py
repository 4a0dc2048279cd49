"""Folder batch throughput and peak memory: `inspector batch` end to end.

    .venv/bin/python bench/batch.py [--n 500] [--size 256] [--device cpu|cuda] [--batch-sizes 8 32]
                                    [--detector graphcore] [--backbone efficientnet-lite0] [--heatmaps all]

Builds a folder of ``n`` PNG images (``size`` x ``size`` crops of scikit-image textures), registers
a product on 2 shots, then runs each configuration in a fresh child process (so peak memory is
that run's alone) and prints one table: images/s over the whole batch (decode, model, heatmap
PNGs, database commits, CSV + HTML report; model loading excluded), and the child's peak RSS.
Peak RSS is also measured for a folder a fifth the size: if the batch streams, it barely changes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_folder(folder: Path, n: int, size: int, seed: int = 0) -> None:
    import cv2
    import numpy as np
    from skimage import data

    from inspector.io import write_image

    textures = [data.brick(), data.gravel(), data.grass()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = textures[i % len(textures)]
        c = int(rng.integers(160, 320))
        y, x = rng.integers(0, t.shape[0] - c, 2)
        crop = cv2.resize(np.ascontiguousarray(t[y:y + c, x:x + c]), (size, size), interpolation=cv2.INTER_AREA)
        write_image(folder / f"img{i:05d}.png", np.repeat(crop[..., None], 3, axis=2))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    over exec from the forking parent, so a child would report the bench parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """One batch run in this process; prints a JSON line."""
    import torch

    from inspector.service import Station

    if args.threads:
        torch.set_num_threads(args.threads)
    st = Station(args.data, device=args.device)
    prod = st.registry.get(args.product)
    st.registry.runtime(prod)  # model load is not part of the batch rate
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    s = st.batch(args.folder, args.product, batch_size=args.batch_size, progress=False, resume=False,
                 heatmaps=args.heatmaps, out_dir=Path(args.data) / "bench-out")
    if args.device and args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(json.dumps({"n": s.n_new, "wall_s": wall, "ips": s.n_new / wall, "rss_loaded_mib": rss0,
                      "peak_rss_mib": peak_rss_mib(),
                      "cuda_peak_mib": (torch.cuda.max_memory_allocated() / 2**20
                                        if torch.cuda.is_available() and args.device != "cpu" else None),
                      "threads": torch.get_num_threads()}))


def run_child(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (and model input size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--detector", default="graphcore")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--heatmaps", default="all", choices=("all", "flagged", "none"))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--product", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from rich.console import Console
    from rich.table import Table

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-batch-"))
    data = work / "data"
    big, small = work / f"imgs-{args.n}-{args.size}", work / f"imgs-{max(2, args.n // 5)}-{args.size}"
    t0 = time.perf_counter()
    for folder, n in ((big, args.n), (small, max(2, args.n // 5))):
        if not folder.is_dir():
            make_folder(folder, n, args.size)
    print(f"folders ready in {time.perf_counter() - t0:.1f} s ({work})", file=sys.stderr)

    from inspector.io import read_image
    from inspector.service import Station

    st = Station(data, device=args.device)
    name = f"bench-{args.detector}-{args.backbone.replace('/', '_')}-{args.size}"
    if not st.registry.exists(name):
        shots = [read_image(p) for p in sorted(big.iterdir())[:2]]
        t0 = time.perf_counter()
        st.registry.register(name, shots, detector=args.detector, backbone=args.backbone, image_size=args.size,
                             n_synthetic=4)
        print(f"registered {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    table = Table(title=f"inspector batch: {args.detector} on {args.backbone} @ {args.size}px, "
                        f"heatmaps={args.heatmaps}, device={args.device}")
    for c in ("images", "batch", "threads", "img/s", "wall s", "RSS loaded MiB", "peak RSS MiB", "CUDA peak MiB"):
        table.add_column(c, justify="right")
    base = [sys.executable, __file__, "--child", "--data", str(data), "--product", name, "--device", args.device,
            "--heatmaps", args.heatmaps, "--threads", str(args.threads)]
    for bs in args.batch_sizes:
        for folder in (big, small):
            r = run_child(base + ["--folder", str(folder), "--batch-size", str(bs)])
            table.add_row(str(r["n"]), str(bs), str(r["threads"]), f"{r['ips']:.1f}", f"{r['wall_s']:.1f}",
                          f"{r['rss_loaded_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
                          "-" if r["cuda_peak_mib"] is None else f"{r['cuda_peak_mib']:.0f}")
    Console().print(table)
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.1f} during the run")


if __name__ == "__main__":
    main()
