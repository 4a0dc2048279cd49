"""GraphCore / PatchCore speed and the cost targets of issue #23, item 4.

    .venv/bin/python bench/graphcore.py --threads 2            # the reference run (CPU, 256 px)
    .venv/bin/python bench/graphcore.py --quick --threads 2    # smoke run: k = 4 only, README untouched
    .venv/bin/python bench/graphcore.py --device cuda
    .venv/bin/python bench/graphcore.py --render               # markdown again from the saved JSON

Table: fit seconds, memory rows and ms/image of ``score`` (one backbone pass per image included)
per shot count for ``patchcore`` (the shots only), ``patchcore-aug`` (bank of augmented views)
and ``graphcore`` with its defaults, all in the same run; ``x patchcore`` is ms/image over
PatchCore's at the same shot count. ms/image is the median of ``--repeats`` passes over the
``--images`` test images (a shared CPU makes single passes noisy).

Targets (each needs ``--size 256``; the fit budget is stated for 2 CPU cores, ``--threads 2``):

1. default GraphCore ms/image at most 1.3x plain ``patchcore`` at k = 4, same run;
2. GraphCore fitted on 4 shots + 64 confirmed normals (``FitEvidence``, no defects) scores in at
   most 2x the ms/image of the 4-shot fit (the bank stays bounded by the coreset);
3. refit of a 4-shot product with 22 pieces of evidence (12 confirmed normals, 10 confirmed
   defects, half of them with a mask) in at most 60 s: the whole ``fit``, selection rule and
   its cross-validation included.

Images are crops of scikit-image's brick photograph resized to ``--size`` (real normal surface,
offline); the confirmed defects are generated on further crops by the weight-free generator (they
only have to cost what real ones cost: their accuracy is ``bench/graphcore_ablation.py``'s
business). The backbone is the offline EfficientNet-Lite0. The first fit of each detector is a
warm-up and is not timed.

Writes ``bench/out/graphcore_speed.json`` and ``bench/GRAPHCORE_SPEED.md``; a full run (not
``--quick``) also splices the table into ``README.md`` between its ``graphcore_speed`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._markdown import splice  # noqa: E402
from inspector.backbones.registry import load_backbone  # noqa: E402
from inspector.detectors.graphcore.detector import AugmentedPatchCore, GraphCore, PatchCoreKNN  # noqa: E402
from inspector.eval.measure import sync  # noqa: E402

#: target -> (limit, what it compares)
TARGETS = {"default_vs_patchcore": 1.3, "normals64_vs_shots4": 2.0, "refit_s": 60.0}


def brick_crops(n: int, size: int, seed: int) -> list[np.ndarray]:
    import cv2
    from skimage import data

    brick = np.repeat(data.brick()[..., None], 3, axis=2)
    rng = np.random.default_rng(seed)
    side = 192
    out = []
    for y, x in zip(rng.integers(0, 512 - side, n), rng.integers(0, 512 - side, n)):
        out.append(cv2.resize(brick[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_LINEAR))
    return out


def timed_score(det, tests: torch.Tensor, device, repeats: int) -> float:
    """Median ms/image of ``det.score(tests)`` over ``repeats`` passes."""
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        det.score(tests)
        sync(device)
        times.append((time.perf_counter() - t0) / len(tests) * 1e3)
    return float(np.median(times))


def paired_ms(first, second, tests: torch.Tensor, device, repeats: int) -> dict:
    """ms/image of two fitted detectors scored in alternation, ``repeats`` pairs: the medians and
    the median of the per-pair ratio second/first (a load that drifts hits both alike)."""
    a, b = [], []
    for _ in range(max(3, repeats)):
        a.append(timed_score(first, tests, device, 1))
        b.append(timed_score(second, tests, device, 1))
    return {"first_ms": float(np.median(a)), "second_ms": float(np.median(b)),
            "ratio": float(np.median(np.array(b) / np.array(a))), "pairs": len(a)}


def evidence_of(bb, normals: list[np.ndarray], defects: list[tuple[np.ndarray, np.ndarray | None]]):
    from inspector.detectors.base import FitEvidence

    size = bb.preprocess.size
    d = bb.preprocess([img for img, _ in defects]) if defects else torch.zeros(0, 3, size, size)
    return FitEvidence(normals=bb.preprocess(normals) if normals else torch.zeros(0, 3, size, size), defects=d,
                       masks=[None if m is None else torch.from_numpy(m.astype(np.float32)) for _, m in defects])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shots", type=int, nargs="+", default=None, help="default 1 4 8 (--quick: 4)")
    ap.add_argument("--images", type=int, default=None, help="test images scored per timing (default 16, --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="scoring passes, median kept (default 3, --quick 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--quick", action="store_true", help="smoke run: k = 4, fewer images, README untouched")
    ap.add_argument("--no-targets", action="store_true", help="the table only")
    ap.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                    help="run only these rows (patchcore, patchcore-aug, graphcore)")
    ap.add_argument("--render", action="store_true", help="no compute: the markdown again from --out's JSON")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--table", default=str(ROOT / "bench" / "GRAPHCORE_SPEED.md"))
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads((Path(args.out) / "graphcore_speed.json").read_text())
        Path(args.table).write_text(render(saved))
        if not saved["args"].get("quick"):
            splice(ROOT / "README.md", "graphcore_speed", render(saved))
        return
    shots_k = args.shots or ([4] if args.quick else [1, 4, 8])
    n_images = args.images or (8 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    bb = load_backbone("efficientnet-lite0", device=args.device, image_size=args.size)
    device = bb.device
    shots = bb.preprocess(brick_crops(max(shots_k + [4]), args.size, seed=0))
    tests = bb.preprocess(brick_crops(n_images, args.size, seed=1))
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                f" ({torch.get_num_threads()} threads)")
    table = Table(title=f"GraphCore vs PatchCore, efficientnet-lite0 at {args.size} px on {where}")
    for col in ("detector", "shots", "fit s", "memory rows", "ms/image", "x patchcore"):
        table.add_column(col, justify="left" if col == "detector" else "right")
    variants = [("patchcore", PatchCoreKNN), ("patchcore-aug", AugmentedPatchCore), ("graphcore", GraphCore)]
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
    base_ms: dict[int, float] = {}
    rows: list[dict] = []
    t_start = time.perf_counter()
    for label, cls in variants:
        cls(bb).fit(shots[:1]).score(tests[:2])  # warm-up: allocator, kernels, lazy imports
        for k in shots_k:
            sync(device)
            t0 = time.perf_counter()
            det = cls(bb).fit(shots[:k])
            sync(device)
            fit_s = time.perf_counter() - t0
            ms = timed_score(det, tests, device, repeats)
            if label == "patchcore":
                base_ms[k] = ms
            ratio = ms / base_ms[k] if k in base_ms else None
            table.add_row(label, str(k), f"{fit_s:.2f}", str(det.memory.shape[0]), f"{ms:.1f}",
                          "-" if ratio is None else f"{ratio:.2f}")
            rows.append({"detector": label, "shots": k, "fit_s": fit_s, "memory_rows": int(det.memory.shape[0]),
                         "ms_per_image": ms, "x_patchcore": ratio})
    Console().print(table)
    targets = {} if args.no_targets else measure_targets(bb, shots, tests, args, repeats)
    result = {"args": {**vars(args), "shots": shots_k, "images": n_images, "repeats": repeats}, "device": where,
              "torch": torch.__version__, "rows": rows, "targets": targets,
              "wall_s": time.perf_counter() - t_start, "cpu_count": os.cpu_count(),
              "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graphcore_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    Path(args.table).write_text(md)
    if not args.quick:
        splice(ROOT / "README.md", "graphcore_speed", md)
    print(md)
    print(f"wrote {out / 'graphcore_speed.json'} and {args.table}")


def measure_targets(bb, shots: torch.Tensor, tests: torch.Tensor, args, repeats: int) -> dict:
    """The three cost targets of issue #23 item 4 (see the module docstring), measured in this run."""
    from inspector.synth.fallback import make_defect

    device = bb.device
    out: dict[str, dict] = {}
    four = shots[:4]
    # 1: the default GraphCore against plain PatchCore on the same 4 shots, scored in alternation
    pc, base = PatchCoreKNN(bb).fit(four), GraphCore(bb).fit(four)
    t = paired_ms(pc, base, tests, device, repeats)
    out["default_vs_patchcore"] = {"value": t["ratio"], "patchcore_ms": t["first_ms"], "graphcore_ms": t["second_ms"],
                                   "pairs": t["pairs"]}
    # 2: 64 confirmed normals (other crops than shots and tests) against the 4-shot fit
    ev64 = evidence_of(bb, brick_crops(64, args.size, seed=2), [])
    t0 = time.perf_counter()
    big = GraphCore(bb).fit(four, evidence=ev64)
    fit64 = time.perf_counter() - t0
    t = paired_ms(base, big, tests, device, repeats)
    out["normals64_vs_shots4"] = {"value": t["ratio"], "shots4_ms": t["first_ms"], "normals64_ms": t["second_ms"],
                                  "pairs": t["pairs"], "shots4_memory_rows": int(base.memory.shape[0]),
                                  "normals64_memory_rows": int(big.memory.shape[0]), "fit_s": fit64}
    # 3: refit with 12 confirmed normals + 10 confirmed defects (half with masks)
    rng = np.random.default_rng(3)
    defects = []
    for i, img in enumerate(brick_crops(10, args.size, seed=4)):
        d, m = make_defect(img, rng)
        defects.append((d, m.astype(bool) if i % 2 == 0 else None))
    ev22 = evidence_of(bb, brick_crops(12, args.size, seed=5), defects)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    det = GraphCore(bb).fit(four, evidence=ev22)
    sync(device)
    refit, cpu = time.perf_counter() - t0, time.process_time() - c0
    sel = det.fit_info.get("selection") or {}
    out["refit_s"] = {"value": refit, "cpu_s": cpu, "threads": torch.get_num_threads(), "enabled": sel.get("enabled"),
                      "reason": sel.get("reason"), "candidates": len(sel.get("candidates") or []),
                      "memory_rows": int(det.memory.shape[0]), "ms_per_image": timed_score(det, tests, device, repeats)}
    for name, limit in TARGETS.items():
        if name in out:
            out[name]["limit"] = limit
            out[name]["met"] = bool(out[name]["value"] <= limit)
    return out


def render(r: dict) -> str:
    a = r["args"]
    load = r["load_avg"]
    busy = load is not None and "cpu" in r["device"] and load > 0.75 * (r.get("cpu_count") or 1)
    lines = []
    if a.get("quick"):
        lines += ["**Smoke run (`--quick`): not the reference figures: those come from `.venv/bin/python "
                  "bench/graphcore.py --threads 2` on an idle machine.**", ""]
    lines += [f"`python bench/graphcore.py --size {a['size']}" + (" --quick" if a.get("quick") else "")
              + (f" --threads {a['threads']}" if a.get("threads") else "")
              + f"`: EfficientNet-Lite0 at {a['size']} px on {r['device']}, brick crops, {a['images']} test images "
              f"(median of {a['repeats']} scoring passes), torch {r['torch']}, 1-min load average "
              + ("?" if load is None else f"{load:.1f}") + " at the end"
              + (" (**other jobs shared the CPU: timings are upper bounds**)" if busy else "")
              + f", whole run {r['wall_s']:.0f} s.",
              "", "| detector | shots | fit s | memory rows | ms/image | x patchcore |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        ratio = "-" if x["x_patchcore"] is None else f"{x['x_patchcore']:.2f}"
        lines.append(f"| {x['detector']} | {x['shots']} | {x['fit_s']:.1f} | {x['memory_rows']} | "
                     f"{x['ms_per_image']:.1f} | {ratio} |")
    t = r.get("targets") or {}
    if t:
        at256 = a["size"] == 256
        lines += ["", "Cost targets (issue #23 item 4)" + ("" if at256 else f": **measured at {a['size']} px, the "
                  "targets are stated at 256 px**") + ":", "", "| target | measured | limit | met |", "|---|---|---|---|"]

        def row(name: str, text: str, unit: str) -> None:
            x = t.get(name)
            if x:
                lines.append(f"| {text} | {x['value']:.2f}{unit} | {x['limit']:g}{unit} | "
                             + ("yes" if x["met"] else "**no**") + " |")

        row("default_vs_patchcore", "default GraphCore ms/image over PatchCore's, k = 4, scored in alternation", "x")
        row("normals64_vs_shots4", "ms/image with 64 confirmed normals over the 4-shot fit", "x")
        row("refit_s", "refit of 4 shots + 12 confirmed normals + 10 confirmed defects", " s")
        lines.append("")
        d = t.get("default_vs_patchcore")
        if d:
            lines.append(f"- k = 4: PatchCore {d['patchcore_ms']:.1f} ms/image, default GraphCore "
                         f"{d['graphcore_ms']:.1f} ms/image (medians of {d['pairs']} alternating passes; the ratio is "
                         "the median per-pair ratio).")
        d = t.get("normals64_vs_shots4")
        if d:
            lines.append(f"- 4 shots: {d['shots4_ms']:.1f} ms/image, {d['shots4_memory_rows']} memory rows; with 64 "
                         f"confirmed normals: {d['normals64_ms']:.1f} ms/image, {d['normals64_memory_rows']} rows "
                         f"(fit {d['fit_s']:.1f} s; alternating passes as above).")
        f = t.get("refit_s")
        if f:
            lines.append(f"- Refit: {f['value']:.1f} s wall, {f['cpu_s']:.1f} s CPU time on {f['threads']} threads"
                         + (" (the budget is stated for 2 CPU cores)" if "cpu" in r["device"] else "")
                         + f"; the rule enabled {json.dumps(f['enabled'])} after {f['candidates']} candidates "
                         f"({f['reason']}); the refitted model scores {f['ms_per_image']:.1f} ms/image.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
