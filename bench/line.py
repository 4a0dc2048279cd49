"""Line benchmark: trigger-to-verdict latency and sustained parts/s through the whole line path.

    .venv/bin/python bench/line.py [--detector graphcore] [--size 256] [--parts 60] [--seconds 20] [--device cpu]

A real GigE Vision camera (Aravis' fake camera over loopback, 256 x 256 Mono8 ROI, software
trigger) feeds the line pipeline (inspector.line.pipeline) inspecting a product of the sample
"brick" (``--detector``, default GraphCore, on EfficientNet-Lite0 at ``--size`` px, 4 shots;
registered once in ``--data-dir``: fitting is not what this measures).
Latency is measured per part from the software trigger to the published verdict (camera
exposure + GigE Vision transfer + queue + inspection + store write).

Three phases:

1. **latency**: ``--parts`` parts one at a time (next trigger after the verdict): p50/p90/p99.
2. **sustained**: closed loop for ``--seconds``: a new trigger as soon as the camera has
   delivered the last one and fewer than ``queue + 1`` parts are in flight; parts/s = verdicts /
   elapsed (no part may be dropped).
3. **overload**: open loop at 2x the sustained rate for ``--seconds / 2``: shows that what the
   station cannot take is dropped, counted and published (offered = inspected + dropped).

Writes ``bench/out/line.json`` and ``bench/LINE.md`` (the README quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="camera ROI and model input size (px)")
    ap.add_argument("--parts", type=int, default=60, help="parts in the latency phase")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of the sustained phase")
    ap.add_argument("--queue", type=int, default=4, help="pipeline queue size")
    ap.add_argument("--detector", default="graphcore", help="detector of the benchmark product")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "inspector" / "bench-line")
    ap.add_argument("--out", type=Path, default=None, help="default bench/out/line-<detector>.json")
    ap.add_argument("--md", type=Path, default=ROOT / "bench" / "LINE.md",
                    help="written from every bench/out/line-*.json (one section per detector)")
    ap.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                    help="only re-render --md from the JSON of earlier runs (no measurement)")
    args = ap.parse_args()
    if args.render:
        args.md.write_text(render_all([json.loads(p.read_text()) for p in args.render]))
        print(f"wrote {args.md}")
        return 0
    args.out = args.out or ROOT / "bench" / "out" / f"line-{args.detector}.json"

    import numpy as np
    import torch

    from inspector.cameras.camera import Camera
    from inspector.cameras.fakecam import fake_camera
    from inspector.cameras.genicam import GenICamSettings, GenICamSource
    from inspector.io import list_images, read_image
    from inspector.line.pipeline import LinePipeline, VerdictLog, latency_stats
    from inspector.station.service import StationService
    from inspector.synth.samples import build_sample

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    station = StationService(args.data_dir, device=args.device)
    product = f"brick-{args.detector}-{args.size}"
    t = time.perf_counter()
    replace = False
    if station.registry.exists(product):  # saved by an older, incompatible version? register again
        try:
            station.registry.runtime(station.registry.get(product))
        except Exception as exc:  # noqa: BLE001
            print(f"{product} cannot be loaded ({exc}); registering it again", flush=True)
            replace = True
    if replace or not station.registry.exists(product):  # once per data dir (fitting is not what we time)
        shots = list_images(Path(build_sample("brick")) / "train" / "good")[:args.shots]
        print(f"registering {product} ({args.detector}, efficientnet-lite0 @ {args.size} px, {len(shots)} shots)...",
              flush=True)
        station.registry.register(product, [read_image(p) for p in shots], detector=args.detector,
                                  backbone="efficientnet-lite0", image_size=args.size, actor="bench/line.py",
                                  replace=replace)
    print(f"product ready in {time.perf_counter() - t:.1f} s", flush=True)

    result: dict = {"command": " ".join([".venv/bin/python", "bench/line.py", *sys.argv[1:]]), "size": args.size, "device": args.device, "queue": args.queue, "product": product,
                    "detector": args.detector,
                    "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__}
    with fake_camera() as fake:
        settings = GenICamSettings(trigger="software", self_trigger=False, roi=(0, 0, args.size, args.size),
                                   timeout_s=1.0, buffers=args.queue + 4)
        cam = Camera(GenICamSource(fake.device_id, settings), backoff=0.2, max_backoff=1.0)
        got = VerdictLog()
        pipe = LinePipeline(station, product, cam, queue_size=args.queue, listeners=[got]).start()
        try:
            deadline = time.monotonic() + 60
            while not pipe.ready and time.monotonic() < deadline:
                time.sleep(0.05)
            if not pipe.ready:
                raise SystemExit(f"line not ready: {pipe.status()}")
            for _ in range(3):  # warm-up (first inspections allocate)
                pipe.trigger()
                got.wait(len(got) + 1, timeout=120)

            # 1. latency, one part at a time
            start = len(got)
            for i in range(args.parts):
                pipe.trigger()
                got.wait(start + i + 1, timeout=120)
            lat = got.items[start:]
            ids = {v.inspection_id for v in lat}
            rows = [r for r in station.history(limit=args.parts + 50) if r["id"] in ids]
            result["latency"] = latency_stats([v.latency_s for v in lat])
            result["model_ms"] = latency_stats([r["latency_ms"] / 1e3 for r in rows if r["latency_ms"] is not None])
            result["latency"]["dropped"] = sum(v.dropped for v in lat)
            print(f"latency: {result['latency']}", flush=True)

            # 2. sustained, closed loop
            start, sent = len(got), 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                # the line sends the next part once the camera has taken the last one (a camera
                # ignores triggers while busy) and fewer than queue + 1 parts are in flight
                if pipe.pending_triggers == 0 and sent - (len(got) - start) < args.queue + 1:
                    pipe.trigger()
                    sent += 1
                else:
                    time.sleep(0.002)
            got.wait(start + sent, timeout=120)
            elapsed = time.monotonic() - t0
            sus = got.items[start:start + sent]
            result["sustained"] = {"parts": sent, "seconds": elapsed, "parts_per_s": sent / elapsed,
                                   "dropped": sum(v.dropped for v in sus),
                                   "latency": latency_stats([v.latency_s for v in sus])}
            print(f"sustained: {result['sustained']}", flush=True)

            # 3. overload, open loop at 2x
            rate = 2.0 * result["sustained"]["parts_per_s"]
            start, sent = len(got), 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds / 2:
                pipe.trigger()
                sent += 1
                time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
            got.wait(start + sent, timeout=300)
            over = got.items[start:start + sent]
            result["overload"] = {"offered_per_s": rate, "offered": sent, "inspected": sum(not v.dropped for v in over),
                                  "dropped": sum(v.dropped for v in over),
                                  "drop_reasons": sorted({(v.error or "").split(" (")[0] for v in over if v.dropped})}
            print(f"overload: {result['overload']}", flush=True)
        finally:
            pipe.stop()
    result["load_avg_1min"] = [load0, os.getloadavg()[0]]
    result["verdicts"] = {k: int(v) for k, v in zip(*np.unique([v.verdict for v in got.items], return_counts=True))}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    runs = sorted(args.out.parent.glob("line-*.json"))
    args.md.write_text(render_all([json.loads(p.read_text()) for p in runs] if args.out in runs else [result]))
    print(f"wrote {args.out} and {args.md}")
    return 0


def render_all(runs: list[dict]) -> str:
    return "## Line benchmark (bench/line.py)\n\n" + "\n".join(render(r) for r in runs)


def _command(r: dict) -> str:
    """The command of a run, without its output paths."""
    cmd = (r.get("command") or f".venv/bin/python bench/line.py --detector {r['detector']}").split()
    out, skip = [], False
    for tok in cmd:
        if skip:
            skip = False
        elif tok in ("--out", "--md"):
            skip = True
        else:
            out.append(tok)
    return " ".join(out)


def render(r: dict) -> str:
    lat, sus, over, mod = r["latency"], r["sustained"], r["overload"], r["model_ms"]
    return f"""### {r['detector']} @ {r['size']} px

Fake GigE Vision camera over loopback ({r['size']} x {r['size']} Mono8, software trigger) -> line pipeline
(queue {r['queue']}) -> product `{r['product']}` (sample brick, {r['detector']}, EfficientNet-Lite0 @ {r['size']} px) on
`{r['device']}` ({r['cores']} cores, {r['torch_threads']} torch threads, torch {r['torch']}); 1-minute load
average {r['load_avg_1min'][0]:.1f} at the start, {r['load_avg_1min'][1]:.1f} at the end (the build machine is shared).

| measure | value |
|---|---|
| trigger -> verdict p50 (one part at a time, n={lat['n']}) | {lat['p50_ms']:.1f} ms |
| trigger -> verdict p90 / p99 / max | {lat['p90_ms']:.1f} / {lat['p99_ms']:.1f} / {lat['max_ms']:.1f} ms |
| of which the model (`Product.inspect`, as recorded in the store) p50 / p99 | {mod['p50_ms']:.1f} / {mod['p99_ms']:.1f} ms |
| sustained parts/s (closed loop, {sus['seconds']:.0f} s, {sus['parts']} parts) | {sus['parts_per_s']:.1f} |
| trigger -> verdict p50 / p99 while sustained | {sus['latency']['p50_ms']:.1f} / {sus['latency']['p99_ms']:.1f} ms |
| dropped at sustained rate | {sus['dropped']} |
| overload at {over['offered_per_s']:.1f} parts/s offered: inspected / dropped of {over['offered']} | {over['inspected']} / {over['dropped']} |

Reproduce: `{_command(r)}` (needs scripts/install_line.sh). The latency includes
the fake camera's frame period (it answers a software trigger at its next frame tick, 25 frames/s,
so up to 40 ms), which a hardware-triggered real camera does not add. Drop reasons under overload:
{', '.join(over['drop_reasons']) or 'none'}.
"""


if __name__ == "__main__":
    raise SystemExit(main())
