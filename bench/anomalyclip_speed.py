"""Zero-shot CLIP speed: AnomalyCLIP and MuSc (official presets) alone, and both from one shared pass.

    # the papers' setting on a GPU (needs `inspector weights import` of the CLIP and the prompts)
    .venv/bin/python bench/anomalyclip_speed.py --device cuda --size 518 --n 200 --prompts NAME
    # CPU, smaller size, the ViT-L-14-336 architecture with random weights (timing only)
    .venv/bin/python bench/anomalyclip_speed.py --random-weights --size 224 --n 8

Rows (milliseconds per image, wall clock, after one warm-up batch):

* ``anomalyclip``: :meth:`AnomalyCLIP.score` (one visual pass with the DPAM V-V path, text cached);
* ``musc``: :meth:`MuSc.score` (one visual pass + LNAMD/MSM/RsCIN over the N images);
* ``separate``: the two above one after the other (two forwards per image);
* ``shared``: :func:`inspector.detectors.shared_pass.score_shared` (one forward per image for both);
  ``forwards/img`` counts images through the patch embedding.

Wall time and process CPU time (all threads) are both reported: on a loaded machine the CPU time
is the steadier number.

Random weights change no FLOP: the timings are the architecture's; they say nothing about accuracy.
Writes ``bench/out/clip_speed.json`` and ``bench/CLIP_SPEED.md`` (the table the README quotes).
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

import torch  # noqa: E402

from inspector.eval.measure import sync  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="clip/ViT-L-14-336")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n", type=int, default=8, help="images (MuSc scores them against each other)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--random-weights", action="store_true", help="architecture with random weights (timing only)")
    p.add_argument("--prompts", default=None, help="AnomalyCLIP prompt checkpoint name/path (real weights)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "clip_speed.json"))
    p.add_argument("--md", default=str(ROOT / "bench" / "CLIP_SPEED.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from bench.musc import brick_crops, timing_backbone
    from inspector.backbones.registry import load_backbone
    from inspector.detectors.anomalyclip.detector import AnomalyCLIP
    from inspector.detectors.musc.detector import MuSc
    from inspector.detectors.shared_pass import score_shared

    t0 = time.perf_counter()
    if args.random_weights:
        bb = timing_backbone(args.backbone, args.size, device)
    else:
        bb = load_backbone(args.backbone, device=str(device), image_size=args.size)
    t_load = time.perf_counter() - t0
    acl = (AnomalyCLIP(bb, checkpoint=args.prompts) if args.prompts
           else AnomalyCLIP(bb, random_prompts=True))
    # the shared pass needs one position interpolation: AnomalyCLIP's official bilinear
    musc = MuSc(bb, preset="official", pos_interp=acl.config.pos_interp, batch_size=args.batch_size)
    acl.chunk = args.batch_size
    x = bb.preprocess(brick_crops(args.n, args.size))
    count = {"images": 0}
    hook = bb.visual.conv1.register_forward_hook(lambda m, i, o: count.__setitem__("images", count["images"] + i[0].shape[0]))

    def timed(fn):
        sync(device)
        count["images"] = 0
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        return wall * 1e3 / args.n, cpu * 1e3 / args.n, count["images"] / args.n

    acl.score(x[:2])  # warm-up (text features cached, kernels)
    rows = {}
    rows["anomalyclip"] = timed(lambda: acl.score(x))
    rows["musc"] = timed(lambda: musc.score(x))
    rows["separate"] = timed(lambda: (acl.score(x), musc.score(x)))
    rows["shared"] = timed(lambda: score_shared(x, [musc, acl], batch_size=args.batch_size))
    hook.remove()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    grid = bb.patch_grid(args.size, args.size)
    wlabel = "random weights (timing only)" if args.random_weights else "imported weights"
    result = {"device": where, "load_average": load, "backbone": args.backbone, "weights": wlabel,
              "size": args.size, "grid": list(grid), "n": args.n, "batch_size": args.batch_size,
              "backbone_load_s": t_load,
              "rows": {k: {"ms_per_image": v[0], "cpu_ms_per_image": v[1], "forwards_per_image": v[2]}
                       for k, v in rows.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [
        f"# Zero-shot CLIP speed ({args.backbone}, {wlabel})",
        "",
        f"Written by `bench/anomalyclip_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}` on {where} "
        f"(1-min load average {load:.1f} on {os.cpu_count()} CPUs): {args.size} px ({grid[0]}x{grid[1]} patches), "
        f"N = {args.n}, batch {args.batch_size}, official presets of both detectors.",
        "",
        "| run | wall ms / image | process CPU ms / image | backbone forwards / image |",
        "|---|---:|---:|---:|",
    ]
    for k, (ms, cpu, fw) in rows.items():
        lines.append(f"| {k} | {ms:.0f} | {cpu:.0f} | {fw:g} |")
    if device.type == "cpu":
        lines += ["", "On a shared CPU the wall time depends on the other load; the process CPU time (all threads) "
                  "is the steadier measure of the work."]
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written {out} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
