"""GraphCore ablation: what each part buys, on every sample product, k = 1/2/4/8, seeds 0-2.

    .venv/bin/python bench/graphcore_ablation.py                       # CPU defaults below
    .venv/bin/python bench/graphcore_ablation.py --size 256 --device cuda

Rows (image AUROC %, mean ± std over seeds):

* ``patchcore``: PatchCore kNN on the shots (same backbone and layers as GraphCore);
* ``patchcore-aug``: the same memory bank of augmented views GraphCore uses (per orientation),
  distance only; it is GraphCore's fit with the head and global branch switched off, which is
  the same ranking as fitting :class:`AugmentedPatchCore` (d is divided by one constant);
* ``anomalib-patchcore``: anomalib's own PatchCore on the same Lite0 weights (blocks.2 + blocks.4
  in timm naming = inspector's blocks.4 + blocks.10);
* ``graphcore[...]``: one fit per orientation, scored with and without the learned head and the
  global branch (``-head``, ``-global``).

Columns: ``brick``, ``gravel``, ``grass`` (generated defects), ``textile local`` and ``textile
global`` (real defects, image labels only), ``textile`` (good vs both real kinds), ``mean`` (the
three textures and textile, per seed then over seeds). Timing in the same run: ms/image of
``score`` (one backbone pass included) for patchcore and graphcore on the first product's test
images, and graphcore fit seconds. Writes ``bench/out/graphcore_ablation.json`` and
``bench/GRAPHCORE.md`` (quoted by the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._markdown import splice  # noqa: E402

COLUMNS = ("brick", "gravel", "grass", "textile local", "textile global", "textile", "mean")


def groups(product: str, types: np.ndarray) -> dict[str, np.ndarray]:
    """Column name -> boolean mask of the test images it uses (good + its defect kinds)."""
    good = types == "good"
    if product != "textile":
        return {product: np.ones_like(good)}
    return {"textile local": good | (types == "local"), "textile global": good | (types == "global"),
            "textile": good | (types == "local") | (types == "global")}


def auroc(scores: torch.Tensor, labels: np.ndarray, keep: np.ndarray) -> float:
    from inspector.eval.metrics import auroc as image_auroc

    return float(image_auroc(scores[torch.from_numpy(keep)], labels[keep]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", nargs="+", default=["brick", "gravel", "grass", "textile"])
    p.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--orientations", nargs="+", default=["free", "fixed"])
    p.add_argument("--no-anomalib", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="GraphCore config overrides")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "graphcore_ablation.json"))
    p.add_argument("--md", default=str(ROOT / "bench" / "GRAPHCORE.md"))
    p.add_argument("--render", action="store_true",
                   help="no compute: rewrite the markdown and the README section from the --out JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.render:
        saved = json.loads(Path(args.out).read_text())
        write_tables(saved["table"], saved["meta"], args.md)
        return 0
    from inspector.backbones.registry import load_backbone
    from inspector.detectors.graphcore.detector import GraphCore, PatchCoreKNN
    from inspector.eval.data import draw_shots, find_classes, load_test_set
    from inspector.io import read_image
    from inspector.synth.samples import build_sample

    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    bb = load_backbone("efficientnet-lite0", device=args.device, image_size=args.size)
    results: dict[str, dict[str, list]] = {}  # variant -> "k|seed|column" -> value
    timing: dict[str, float] = {}
    t_all = time.perf_counter()

    def put(variant: str, k: int, seed: int, col: str, value: float) -> None:
        results.setdefault(variant, {}).setdefault(f"{k}|{seed}|{col}", value)

    for product in args.products:
        cdata = find_classes(build_sample(product))[0]
        ts = load_test_set(cdata, bb.preprocess)
        types = np.asarray(ts.types)
        cols = groups(product, types)
        embedder = GraphCore(bb, **overrides)
        t0 = time.perf_counter()
        feats = embedder.embed(ts.x)
        embed_ms = (time.perf_counter() - t0) * 1e3 / len(ts)
        train = [read_image(pth) for pth in cdata.train]
        anomalib = None
        if not args.no_anomalib:
            from inspector.detectors.baselines import AnomalibPatchcore

            anomalib = AnomalibPatchcore(bb)
        for k in args.shots:
            for seed in args.seeds:
                shots = bb.preprocess([train[i] for i in draw_shots(len(train), k, seed)])
                scored: dict[str, torch.Tensor] = {}
                pc = PatchCoreKNN(bb, **{kk: v for kk, v in overrides.items() if kk in ("layers", "normalize")})
                pc.fit(shots)
                t0 = time.perf_counter()
                scored["patchcore"] = pc.score_embeddings(feats, (args.size, args.size)).scores
                timing.setdefault("patchcore_knn_ms", (time.perf_counter() - t0) * 1e3 / len(ts) + embed_ms)
                if anomalib is not None:
                    anomalib.fit(shots)
                    scored["anomalib-patchcore"] = torch.cat([anomalib.score(ts.x[i:i + 16]).scores
                                                              for i in range(0, len(ts), 16)])
                for orient in args.orientations:
                    det = GraphCore(bb, orientation=orient, seed=seed, **overrides)
                    t0 = time.perf_counter()
                    det.fit(shots)
                    timing.setdefault(f"graphcore_{orient}_fit_s_k{k}", time.perf_counter() - t0)
                    sc = det.scorer
                    hw, gw = sc.head_weight, sc.global_weight
                    for tag, (h, g) in {"": (hw, gw), "-head": (0.0, gw), "-global": (hw, 0.0)}.items():
                        sc.head_weight, sc.global_weight = h, g
                        t0 = time.perf_counter()
                        scored[f"graphcore[{orient}]{tag}"] = det.score_embeddings(feats, (args.size, args.size)).scores
                        if not tag:
                            timing.setdefault(f"graphcore_{orient}_ms", (time.perf_counter() - t0) * 1e3 / len(ts)
                                              + embed_ms)
                    sc.head_weight, sc.global_weight = 0.0, 0.0
                    scored[f"patchcore-aug[{orient}]"] = det.score_embeddings(feats, (args.size, args.size)).scores
                    sc.head_weight, sc.global_weight = hw, gw
                for variant, s in scored.items():
                    for col, keep in cols.items():
                        put(variant, k, seed, col, auroc(s, ts.labels, keep))
                line = "  ".join(f"{v}={100 * auroc(s, ts.labels, list(cols.values())[-1]):.1f}"
                                 for v, s in scored.items())
                print(f"{product} k={k} seed={seed}: {line}", flush=True)
    table = summarize(results, args.shots, args.seeds)
    meta = {"command": "python bench/graphcore_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "size": args.size, "shots": args.shots, "seeds": args.seeds, "products": args.products,
            "overrides": overrides, "timing": timing, "wall_s": round(time.perf_counter() - t_all, 1),
            "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "threads": args.threads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "table": table, "runs": results}, indent=1) + "\n")
    print(write_tables(table, meta, args.md))
    return 0


def write_tables(table: list[dict], meta: dict, md_path: str) -> str:
    """``bench/GRAPHCORE.md`` and the README's section, from one run's table; returns the markdown."""
    md = markdown(table, meta)
    Path(md_path).write_text(md)
    splice(ROOT / "README.md", "graphcore_ablation", readme_summary(table, meta))
    return md


BASELINES = ("patchcore", "patchcore-aug[fixed]", "anomalib-patchcore")
SUMMARY = (("PatchCore", "patchcore"), ("PatchCore, augmented bank", "patchcore-aug[fixed]"),
           ("anomalib PatchCore", "anomalib-patchcore"), ("GraphCore (default: fixed)", "graphcore[fixed]"),
           ("without head", "graphcore[fixed]-head"), ("without global", "graphcore[fixed]-global"),
           ("GraphCore free", "graphcore[free]"))
PRODUCT_COLUMNS = ("brick", "gravel", "grass", "textile local", "textile global")


def readme_summary(table: list[dict], meta: dict) -> str:
    """The README's view of the ablation: mean per variant and k, then every product column where
    the default GraphCore is below the best baseline (generated, so it is never stale)."""
    by = {(r["variant"], r["k"]): r for r in table}

    def cell(v, k, col="mean"):
        r = by.get((v, k))
        return None if r is None or r[col] is None else r[col]

    lines = [f"`{meta['command'].strip()}`: seeds {meta['seeds']}, {meta['size']} px, image AUROC % "
             "(mean ± std over seeds; `mean` = brick, gravel, grass and textile local + global):", "",
             "| k | " + " | ".join(n for n, _ in SUMMARY) + " | margin over best baseline |",
             "|---|" + "---|" * (len(SUMMARY) + 1)]
    losses = []
    for k in meta["shots"]:
        cells = []
        for _, v in SUMMARY:
            c = cell(v, k)
            cells.append("-" if c is None else f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}")
        base = [cell(b, k) for b in BASELINES if cell(b, k) is not None]
        gc = cell("graphcore[fixed]", k)
        margin = "-" if gc is None or not base else f"{100 * (gc[0] - max(b[0] for b in base)):+.1f}"
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {margin} |")
        for col in PRODUCT_COLUMNS:
            g = cell("graphcore[fixed]", k, col)
            bs = [(cell(b, k, col), b) for b in BASELINES if cell(b, k, col) is not None]
            if g is None or not bs:
                continue
            (best, _), name = max(bs, key=lambda x: x[0][0])
            if g[0] < best:
                losses.append(f"{col} at k = {k}: {100 * g[0]:.1f} against {100 * best:.1f} ({name})")
    lines += ["", "Where the default GraphCore is below the best baseline: "
              + ("; ".join(losses) if losses else "nowhere") + "."]
    return "\n".join(lines) + "\n"


def summarize(results: dict[str, dict[str, float]], shots, seeds) -> list[dict]:
    rows = []
    for variant, runs in results.items():
        for k in shots:
            row = {"variant": variant, "k": k}
            per_seed_mean = []
            for col in COLUMNS[:-1]:
                vals = [runs.get(f"{k}|{s}|{col}") for s in seeds]
                vals = [v for v in vals if v is not None]
                row[col] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0) if vals else None
            for s in seeds:
                parts = [runs.get(f"{k}|{s}|{c}") for c in ("brick", "gravel", "grass", "textile")]
                parts = [v for v in parts if v is not None]
                if parts:
                    per_seed_mean.append(float(np.mean(parts)))
            row["mean"] = ((float(np.mean(per_seed_mean)), float(np.std(per_seed_mean, ddof=1))
                            if len(per_seed_mean) > 1 else 0.0) if per_seed_mean else None)
            rows.append(row)
    rows.sort(key=lambda r: (r["k"], r["variant"]))
    return rows


def markdown(table: list[dict], meta: dict) -> str:
    t = meta["timing"]
    lines = [
        "## GraphCore ablation",
        "",
        f"`{meta['command'].strip()}`: EfficientNet-Lite0 at {meta['size']} px, CPU ({meta['threads']} threads, "
        f"1-min load average {meta['load_avg_1m']:.1f} at the end: timings are upper bounds), torch {meta['torch']}, "
        f"seeds {meta['seeds']}, whole run {meta['wall_s']:.0f} s. Image AUROC %, mean ± std over seeds. "
        "Config overrides: " + (json.dumps(meta["overrides"]) if meta["overrides"] else "none") + ".",
        "",
        "| k | variant | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in table:
        cells = ["-" if r[c] is None else f"{100 * r[c][0]:.1f}±{100 * r[c][1]:.1f}" for c in COLUMNS]
        lines.append(f"| {r['k']} | {r['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "Cost in the same run (first product's test set, ms per image of `score` including the one "
              "backbone pass; fit seconds per shot count):", ""]
    lines += [f"- `{k}`: {v:.1f}" for k, v in sorted(t.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
