"""torch vs onnxruntime: ms/image for the backbone alone and backbone + GraphCore scoring.

    .venv/bin/python bench/onnx.py [--device cpu|cuda] [--size 256] [--batches 1 8] [--repeats 5]

Both paths get the same preprocessed fp32 tensors; each row also prints the max |difference|
between the two outputs. On the CPU torch runs fp32; with ``--device cuda`` torch runs the
backbone in bf16 autocast (its production setting) and onnxruntime uses CUDAExecutionProvider
(onnxruntime-gpu) in fp32, so the difference column there is not a parity number.
GraphCore is fitted on 2 brick crops (scikit-image) with its default scoring configuration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the `onnx` package: drop its own folder from the import path (Python puts
# it first when running a script), so `import onnx` finds the real package; add the checkout root.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from inspector.eval.measure import sync  # noqa: E402


def timeit(fn, device: str, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of ``fn()`` after one warm-up call.

    CPU time (all threads of this process) is the number to compare on a shared, loaded machine:
    wall time there measures the other processes too.
    """
    fn()
    sync(device)
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def brick_images(n: int, seed: int = 0) -> list[np.ndarray]:
    from skimage import data

    g = data.brick()
    rgb = np.repeat(g[..., None], 3, axis=2)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, 256, 2)
        out.append(rgb[y:y + 256, x:x + 256].copy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime CPU threads (default: all)")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from inspector.backbones.registry import load_backbone
    from inspector.deploy.export import export_backbone, export_detector
    from inspector.deploy.onnx import OnnxRunner
    from inspector.detectors.graphcore.detector import GraphCore

    bb = load_backbone(args.backbone, device=args.device, image_size=args.size)
    det = GraphCore(bb).fit(bb.preprocess(brick_images(2, seed=1)).to(args.device))
    tmp = Path(tempfile.mkdtemp(prefix="inspector-bench-onnx-"))
    t0 = time.perf_counter()
    bb_onnx = export_backbone(bb, tmp / "backbone.onnx", verify=False)
    t_bb = time.perf_counter() - t0
    t0 = time.perf_counter()
    gc_onnx = export_detector(det, tmp / "graphcore.onnx", verify=False)
    t_gc = time.perf_counter() - t0
    run_bb = OnnxRunner(bb_onnx.onnx_path, device=args.device, threads=args.threads, batch_size=max(args.batches))
    run_gc = OnnxRunner(gc_onnx.onnx_path, device=args.device, threads=args.threads, batch_size=max(args.batches))

    console = Console(width=150)
    title = (f"torch vs onnxruntime, {args.backbone} @ {args.size}px, ms/image on {args.device} "
             f"(torch {torch.__version__}, {torch.get_num_threads()} threads; onnxruntime providers "
             f"{run_gc.providers[0]})")
    table = Table(title=title)
    cols = ["model", "batch", "torch ms/img", "onnxruntime ms/img", "speed-up"]
    if args.device == "cpu":
        cols += ["torch CPU ms/img", "onnxruntime CPU ms/img", "CPU speed-up"]
    for col in cols + ["max |diff|"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    images = brick_images(max(args.batches), seed=2)
    for batch in args.batches:
        x = bb.preprocess(images[:batch])
        xd = x.to(args.device)
        xn = x.numpy()

        def bb_diff(xd=xd, xn=xn) -> float:
            ref, got = bb.embed(xd), run_bb.run(xn)
            return max(float(np.abs(got[k] - ref[k].float().cpu().numpy()).max()) for k in bb.layers)

        def gc_diff(xd=xd, xn=xn) -> float:
            return float(np.abs(run_gc.run(xn)["maps"] - det.score(xd).maps.numpy()).max())

        rows = [
            ("backbone", lambda xd=xd: bb.embed(xd), lambda xn=xn: run_bb.run(xn), bb_diff),
            ("backbone + GraphCore", lambda xd=xd: det.score(xd), lambda xn=xn: run_gc.run(xn), gc_diff),
        ]
        for name, tf, of, diff in rows:
            w_torch, c_torch = (v / batch * 1e3 for v in timeit(tf, args.device, args.repeats))
            w_onnx, c_onnx = (v / batch * 1e3 for v in timeit(of, args.device, args.repeats))
            cells = [name, str(batch), f"{w_torch:.1f}", f"{w_onnx:.1f}", f"{w_torch / w_onnx:.2f}x"]
            if args.device == "cpu":
                cells += [f"{c_torch:.1f}", f"{c_onnx:.1f}", f"{c_torch / c_onnx:.2f}x"]
            table.add_row(*cells, f"{diff():.1e}")
    console.print(table)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} while measuring")
    console.print(f"export time: backbone {t_bb:.1f} s, backbone + GraphCore {t_gc:.1f} s; "
                  f"graph sizes {bb_onnx.onnx_path.stat().st_size / 1e6:.1f} MB / "
                  f"{gc_onnx.onnx_path.stat().st_size / 1e6:.1f} MB; GraphCore memory bank "
                  f"{tuple(det.memory.shape)}")


if __name__ == "__main__":
    main()
