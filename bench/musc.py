"""MuSc speed and memory versus set size N and resolution, with the FLOPs of the distance work.

    .venv/bin/python bench/musc.py                       # CPU: N = 16, 64 at 128 and 256 px
    .venv/bin/python bench/musc.py --full                # adds N = 200 (slow on a small CPU)
    .venv/bin/python bench/musc.py --device cuda --full  # GPU (TF32 distance matmuls by default)
    # the papers' backbone: ViT-L-14-336 at 518 px, N = 200, official preset (needs imported weights)
    .venv/bin/python bench/musc.py --device cuda --backbone clip/ViT-L-14-336 --sizes 518 --n 200 --preset official
    # CPU timing of the same architecture at a smaller size, random weights (speed only, no accuracy)
    .venv/bin/python bench/musc.py --backbone clip/ViT-L-14-336 --random-weights --sizes 224 --n 16 --preset official

For each (resolution, N): N crops of scikit-image's brick go through the backbone once (its time
is reported apart), then :meth:`MuSc.score_features` runs the default pipeline (LNAMD r = 1,3,5 on
every backbone layer, MSM, RsCIN). Columns:

* ``backbone`` / ``musc`` / ``total``: milliseconds per image (musc = LNAMD + MSM + RsCIN + maps;
  MuSc's work per image grows linearly with N, so ms/image is the number to watch);
* ``peak MiB``: measured peak working memory of the scoring call above what was allocated before
  it (CPU: resident-set size sampled every 1 ms by a thread, large blocks served by mmap so that freed
  tensors leave the RSS; CUDA: ``max_memory_allocated``), and
  ``model MiB``: the peak predicted by :func:`inspector.detectors.musc.budget.msm_memory`;
* ``GFLOP``: matmul FLOPs issued for the distances (``2 * rows * cols * (C + 2)`` per block, the
  symmetric schedule computing each image pair once); ``GFLOP/s``: that over the musc time;
  ``% gemm``: against a large square GEMM measured on the same device in the same precision, i.e.
  the gap to what the hardware's matmul units deliver here.

``--aligned`` adds the aligned-parts mode (radius 1: 3x3 window) beside each row.
The table is also written to ``bench/out/musc.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# CPU peak memory is read from the resident-set size. glibc keeps freed blocks of up to 32 MiB in
# its heap once its mmap threshold has adapted, so RSS would hide a second allocation that reuses
# them (and show a first one that is gone). A fixed threshold serves every large tensor by mmap
# and returns it on free, so RSS follows live tensors. It must be set before the process starts.
if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and __name__ == "__main__":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inspector.eval.measure import PeakMemory, sync  # noqa: E402


def gemm_peak(device: torch.device, precision: str) -> float:
    """GFLOP/s of a large square matmul in the precision MuSc uses."""
    n = 4096 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    from inspector.detectors.musc.torch_model import _matmul_precision

    with _matmul_precision(precision, device):
        a @ a
        sync(device)
        reps = 20 if device.type == "cuda" else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        sync(device)
    return reps * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def brick_crops(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    import cv2
    from skimage import data

    g = data.brick()
    rgb = np.repeat(g[..., None], 3, axis=2)
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        c = int(rng.integers(128, 320))
        y, x = rng.integers(0, 512 - c, 2)
        crops.append(cv2.resize(rgb[y:y + c, x:x + c], (size, size), interpolation=cv2.INTER_AREA))
    return crops


def timing_backbone(name: str, size: int, device: torch.device):
    """``clip/<arch>`` built with random weights: the real architecture (QuickGELU, depth, width)
    for timing where the weights are not on this machine. Never used for accuracy."""
    import open_clip

    from inspector.backbones.vit import ClipBackbone
    from inspector.backbones.weights import clip_arch

    arch = name.split("/", 1)[1]
    torch.manual_seed(0)
    model = clip_arch(arch).build("cpu")
    bb = ClipBackbone(model, name=f"{name} (random weights)", image_size=size, is_random=True,
                      tokenizer=open_clip.get_tokenizer(arch))
    return bb.to(device)


def run_one(bb, n: int, size: int, device: torch.device, aligned: bool, precision: str | None,
            chunk: int | None, preset: str = "project") -> dict:
    from inspector.detectors.musc.detector import MuSc

    x = bb.preprocess(brick_crops(n, size))
    m = MuSc(bb, aligned=aligned, align_radius=1, precision=precision, chunk_size=chunk, preset=preset)
    sync(device)
    t0 = time.perf_counter()
    feats, glob = m.extract(x)
    sync(device)
    t_bb = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device, interval=0.001) as mem:
        t0 = time.perf_counter()
        m.score_features(feats, (size, size), image_features=glob)
        sync(device)
        t_musc = time.perf_counter() - t0
    info = m.last_info
    h, w = next(iter(feats.values())).shape[1:3]
    return {
        "size": size, "n": n, "grid": f"{h}x{w}", "mode": "aligned r1" if aligned else "full",
        "chunk": info["chunk"], "symmetric": info["symmetric"], "precision": info["precision"],
        "backbone_ms_per_image": t_bb * 1e3 / n, "musc_ms_per_image": t_musc * 1e3 / n,
        "total_ms_per_image": (t_bb + t_musc) * 1e3 / n,
        "peak_mib": mem.rise_mb, "model_mib": info["predicted_peak_bytes"] / 2**20,
        "gflop": info["flops"] / 1e9, "gflops_per_s": info["flops"] / t_musc / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--n", nargs="+", type=int, default=[16, 64])
    p.add_argument("--full", action="store_true", help="also N = 200")
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--precision", default=None, help="fp32 | tf32 | bf16 (default: tf32 on CUDA, fp32 on CPU)")
    p.add_argument("--chunk", type=int, default=None, help="images per distance block (default: auto)")
    p.add_argument("--aligned", action="store_true", help="add aligned-parts rows (radius 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--preset", default="project", choices=("project", "official"), help="MuSc preset")
    p.add_argument("--random-weights", action="store_true",
                   help="clip/<arch> only: the architecture with random weights (timing only, no accuracy)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "musc.json"))
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from inspector.backbones.registry import load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    ns = sorted(set(args.n + ([200] if args.full else [])))
    prec = args.precision or ("tf32" if device.type == "cuda" else "fp32")
    console = Console(width=200)
    peak = gemm_peak(device, prec)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(f"[bold]MuSc bench[/] on {where} ({args.backbone}); square {prec} GEMM measured at "
                  f"{peak:.0f} GFLOP/s; 1-min load average {load:.1f} on {os.cpu_count()} CPUs")

    rows = []
    for size in args.sizes:
        if args.random_weights:
            bb = timing_backbone(args.backbone, size, device)
        else:
            bb = load_backbone(args.backbone, device=str(device), image_size=size)
        run_one(bb, 2, size, device, False, args.precision, args.chunk, args.preset)  # warm-up
        for n in ns:
            for aligned in ([False, True] if args.aligned else [False]):
                r = run_one(bb, n, size, device, aligned, args.precision, args.chunk, args.preset)
                r["gemm_pct"] = 100 * r["gflops_per_s"] / peak
                rows.append(r)
                console.print(f"  {size}px N={n} {r['mode']}: {r['total_ms_per_image']:.1f} ms/img", highlight=False)

    wlabel = " random weights: timing only" if args.random_weights else ""
    table = Table(title=f"MuSc ({args.backbone}{wlabel}, preset {args.preset}, r=1,3,5, all layers, RsCIN) on {where}")
    cols = ["px", "N", "grid", "mode", "chunk", "backbone ms/img", "musc ms/img", "total ms/img",
            "peak MiB", "model MiB", "GFLOP", "GFLOP/s", "% gemm"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["size"]), str(r["n"]), r["grid"], r["mode"],
                      f"{r['chunk']}{' sym' if r['symmetric'] else ''}",
                      f"{r['backbone_ms_per_image']:.1f}", f"{r['musc_ms_per_image']:.1f}",
                      f"{r['total_ms_per_image']:.1f}", f"{r['peak_mib']:.0f}", f"{r['model_mib']:.0f}",
                      f"{r['gflop']:.1f}", f"{r['gflops_per_s']:.1f}", f"{r['gemm_pct']:.0f}")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": where, "precision": prec, "gemm_gflops": peak, "load_average": load,
                               "backbone": args.backbone, "random_weights": args.random_weights,
                               "preset": args.preset, "rows": rows}, indent=2))
    console.print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
