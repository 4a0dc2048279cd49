"""How close are generated defects to real ones? Fallback vs diffusion, on the sample products.

    .venv/bin/python bench/synth.py                          # both products, CPU defaults
    .venv/bin/python bench/synth.py --products textile --n 48 --train-steps 2000 --device cuda

"Real" defects per product:

* ``textile``: real *local* defects of the simulated textile set (``conformal-clip-data``), with
  masks estimated by :func:`inspector.synth.samples.estimate_local_mask` (the source has none). A few
  (``--train``) train the diffusion generator; the others are the reference set.
* ``brick``: the product's own test defects. They are made by the weight-free generator, so for
  ``fallback`` this is a sanity row (same distribution), and for ``diffusion`` it measures how
  well a few examples are imitated.

Generated defects are made on the product's normal ``train/good`` images. For every set, one
square crop around each defect's mask (twice the mask's bounding box, at least 48 px) is embedded
with the EfficientNet-Lite0 backbone (global-average-pooled features of all its layers); the
table gives the Fréchet distance (on a PCA of the pooled features; small-sample, so compare rows
of one product, not products) and KID (x100, unbiased) to the reference set, plus the mask-area
distribution (median, IQR, as % of the image) and its Kolmogorov-Smirnov distance to the
reference. Rows ``real (half)`` (one half of the reference vs the other: the noise floor) and
``normal crops`` (defect-free crops with reference-sized boxes: the scale) bracket the numbers;
``fallback (area-matched)`` is the weight-free generator told the reference's area range.
Writes ``bench/out/synth.json`` and example grids ``bench/out/synth_<product>.png``.
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

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def region_crop(img: np.ndarray, mask: np.ndarray, out: int = 96) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = int(min(min(h, w), max(48, 2 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    return cv2.resize(img[y0:y0 + side, x0:x0 + side], (out, out), interpolation=cv2.INTER_AREA)


@torch.no_grad()
def embed(bb, crops: list[np.ndarray], batch: int = 32) -> np.ndarray:
    feats = []
    for i in range(0, len(crops), batch):
        x = bb.preprocess(crops[i:i + batch]).to(bb.device)
        out = bb(x)
        feats.append(torch.cat([v.float().mean(dim=(1, 2)) for v in out.values()], dim=1).cpu())
    return torch.cat(feats).numpy().astype(np.float64)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (KID)."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    m, n = len(a), len(b)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def area_stats(masks: list[np.ndarray]) -> dict:
    a = np.array([m.mean() for m in masks]) * 100
    return {"median": float(np.median(a)), "q25": float(np.percentile(a, 25)),
            "q75": float(np.percentile(a, 75)), "areas": a.tolist()}


def load_pairs(root: Path) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    from inspector.data.mvtec import read_mask, read_mvtec
    from inspector.io import read_image

    info = read_mvtec(root)
    normals = [read_image(p) for p in info.train_good]
    pairs = []
    for t in info.masked_types:
        for p, m in zip(info.defects[t], info.masks[t]):
            pairs.append((read_image(p), read_mask(m)))
    return normals, pairs


def get_diffusion(name: str, train_pairs, args, log):
    from inspector.synth.diffusion.generator import DefectGen
    from inspector.synth.diffusion.model import DefectGenConfig

    path = Path(args.model_dir) / name
    cfg = DefectGenConfig.for_device(args.device, train_steps=args.train_steps, seed=args.seed)
    if path.is_dir() and not args.retrain:
        try:
            gen = DefectGen.load(path, device=args.device)
            saved = json.loads((path / "defectgen.json").read_text())
            # trained here, or by bench/synth_value.py / `synth train` on the same real defects
            info = saved.get("bench") or {"n_train": saved.get("training", {}).get("images"),
                                          "train_seconds": saved.get("training", {}).get("seconds")}
            if info.get("n_train") == len(train_pairs) and gen.config.train_steps == cfg.train_steps:
                log(f"  diffusion: reusing {path}")
                return gen, info.get("train_seconds")
        except Exception as exc:  # noqa: BLE001 - retrain on any problem with the cache
            log(f"  diffusion: cache unusable ({exc}); retraining")
    gen = DefectGen(cfg, device=args.device)
    t0 = time.perf_counter()
    gen.fit([p[0] for p in train_pairs], [p[1] for p in train_pairs], progress=True)
    secs = time.perf_counter() - t0
    gen.save(path)
    meta = json.loads((path / "defectgen.json").read_text())
    meta["bench"] = {"n_train": len(train_pairs), "train_seconds": secs}
    (path / "defectgen.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"  diffusion: trained {cfg.train_steps} steps/model on {len(train_pairs)} defects in {secs:.0f} s -> {path}")
    return gen, secs


def grid(rows: dict[str, list[tuple[np.ndarray, np.ndarray]]], k: int = 6) -> np.ndarray:
    out = []
    for _, pairs in rows.items():
        tiles = []
        for img, m in pairs[:k]:
            vis = region_crop(img, m, 128)
            mm = (region_crop(np.repeat(m[..., None].astype(np.uint8) * 255, 3, 2), m, 128) > 127).any(2)
            cnt, _ = cv2.findContours(mm.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            v2 = vis.copy()
            cv2.drawContours(v2, cnt, -1, (255, 0, 0), 1)
            tiles.append(np.concatenate([vis, v2], 0))
        while len(tiles) < k:
            tiles.append(np.zeros_like(tiles[0]))
        out.append(np.concatenate(tiles, 1))
    return np.concatenate(out, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", nargs="+", default=["textile", "brick"], choices=["textile", "brick", "gravel", "grass"])
    ap.add_argument("--n", type=int, default=32, help="generated defects per generator")
    ap.add_argument("--train", type=int, default=8, help="real defects used to train the diffusion model (textile)")
    ap.add_argument("--real", type=int, default=32, help="real reference defects (textile)")
    ap.add_argument("--train-steps", type=int, default=800)
    ap.add_argument("--model-name", action="append", default=None, metavar="PRODUCT=NAME",
                    help="diffusion model folder name per product (default bench-<product>), e.g. textile=textile "
                         "to reuse bench/synth_value.py's model")
    ap.add_argument("--table", default=str(ROOT / "bench" / "SYNTH.md"))
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "synth"))
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--skip-diffusion", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table
    from sklearn.decomposition import PCA

    from inspector.backbones.registry import load_backbone
    from inspector.synth import generate_defects, make_defect
    from inspector.synth.samples import build_sample, textile_local_defects

    console = Console(width=150)
    log = console.print
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bb = load_backbone("efficientnet-lite0", device=args.device, image_size=96)
    results: dict = {"device": args.device, "args": vars(args), "products": {}}
    table = Table(title="Generated vs real defects (region features: EfficientNet-Lite0)")
    for col in ("product", "set", "n", "FD ↓", "KID×100 ↓", "area % median [IQR]", "KS(area) ↓", "s/defect"):
        table.add_column(col, justify="right" if col not in ("product", "set") else "left")

    for product in args.products:
        log(f"[bold]{product}[/]")
        root = build_sample(product)
        normals, product_pairs = load_pairs(root)
        if product == "textile":
            pairs = textile_local_defects(args.train + args.real, seed=args.seed)
            train_pairs, real = pairs[:args.train], pairs[args.train:]
            ref_name = "real local (estimated masks)"
        else:
            real = product_pairs
            train_pairs = product_pairs[: max(5, len(product_pairs) // 2)]
            ref_name = "product test defects (fallback-made)"
        rng = np.random.default_rng(args.seed)
        sets: dict[str, list] = {}
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        sets["fallback"] = generate_defects(normals, args.n, rng)
        timing["fallback"] = (time.perf_counter() - t0) / args.n
        # the same generator told the reference's area range (10th-90th percentile)
        ref_a = np.array([m.mean() for _, m in real])
        lo, hi = float(np.percentile(ref_a, 10)), float(np.percentile(ref_a, 90))
        t0 = time.perf_counter()
        sets["fallback (area-matched)"] = generate_defects(
            normals, args.n, rng, lambda img, r, a=(lo, max(hi, lo * 1.5)): make_defect(img, r, area=a, min_mean_change=8.0))
        timing["fallback (area-matched)"] = (time.perf_counter() - t0) / args.n
        if not args.skip_diffusion:
            names = dict(x.split("=", 1) for x in (args.model_name or []))
            gen, train_s = get_diffusion(names.get(product, f"bench-{product}"), train_pairs, args, log)
            results.setdefault("train_seconds", {})[product] = train_s
            t0 = time.perf_counter()
            sets["diffusion"] = generate_defects(normals, args.n, rng, gen, progress=True)
            timing["diffusion"] = (time.perf_counter() - t0) / args.n
            timing["diffusion_fallback_rate"] = gen.stats["fallback"] / max(1, gen.stats["fallback"] + gen.stats["diffusion"])
        # normal crops with reference-sized boxes: the "no defect" scale
        normal_pairs = [(normals[int(rng.integers(len(normals)))], real[i % len(real)][1]) for i in range(len(real))]

        feats = {k: embed(bb, [region_crop(i, m) for i, m in v]) for k, v in
                 {"real": real, "normal crops": normal_pairs, **sets}.items()}
        allf = np.concatenate(list(feats.values()))
        dim = int(min(16, len(real) // 2 - 1, allf.shape[1]))
        pca = PCA(dim, whiten=True, random_state=0).fit(allf)
        z = {k: pca.transform(v) for k, v in feats.items()}
        half = len(real) // 2
        from scipy.stats import ks_2samp

        ref_areas = np.array([m.mean() for _, m in real])
        rows = {"real (half)": (z["real"][:half], z["real"][half:], real[half:]),
                "normal crops": (z["real"], z["normal crops"], None)}
        for k in sets:
            rows[k] = (z["real"], z[k], sets[k])
        res = {"reference": ref_name, "n_real": len(real), "n_train_diffusion": len(train_pairs),
               "pca_dim": dim, "reference_area": area_stats([m for _, m in real]), "rows": {}}
        for name, (a, b, pairs) in rows.items():
            fd, kd = frechet(a, b), kid(a, b) * 100
            r = {"fd": fd, "kid100": kd, "n": len(b)}
            if pairs is not None:
                st = area_stats([m for _, m in pairs])
                r["area"] = st
                r["ks_area"] = float(ks_2samp(ref_areas, np.array(st["areas"]) / 100).statistic)
            if name in timing:
                r["seconds_per_defect"] = timing[name]
            res["rows"][name] = r
            area = f"{r['area']['median']:.2f} [{r['area']['q25']:.2f}-{r['area']['q75']:.2f}]" if "area" in r else "-"
            table.add_row(product, name, str(len(b)), f"{fd:.2f}", f"{kd:.2f}", area,
                          f"{r['ks_area']:.2f}" if "ks_area" in r else "-",
                          f"{timing[name]:.3f}" if name in timing else "-")
        ra = res["reference_area"]
        table.add_row(product, f"[dim]reference: {ref_name}[/]", str(len(real)), "", "",
                      f"{ra['median']:.2f} [{ra['q25']:.2f}-{ra['q75']:.2f}]", "", "")
        if "diffusion_fallback_rate" in timing:
            res["diffusion_fallback_rate"] = timing["diffusion_fallback_rate"]
        results["products"][product] = res
        img = grid({"real": real, **sets})
        cv2.imwrite(str(out_dir / f"synth_{product}.png"), img[..., ::-1])
        table.add_section()

    console.print(table)
    results["wall_s"] = time.perf_counter() - t_start
    (out_dir / "synth.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    md = render(results)
    Path(args.table).write_text(md)
    from bench._markdown import splice

    splice(ROOT / "inspector" / "synth" / "README.md", "synth", md)
    log(f"wrote {args.table} (and the table in inspector/synth/README.md)")
    log(f"wrote {out_dir / 'synth.json'} and example grids {out_dir}/synth_<product>.png (rows: real, then generators)")
    return 0


def render(r: dict) -> str:
    """Markdown of a ``synth.json`` (what inspector/synth/README.md quotes)."""
    a = r["args"]
    lines = [f"KID×100 and FD (↓) on EfficientNet-Lite0 features of square crops around each defect, against the "
             f"reference defects; {r['device']}, {a['train_steps']} diffusion training steps per model, {a['n']} "
             f"generated defects per row, seed {a['seed']}. Reproduce: `.venv/bin/python bench/synth.py`.", "",
             "| product | set | n | FD | KID×100 | area % median [IQR] | KS(area) | s/defect |",
             "|---|---|---|---|---|---|---|---|"]
    for p, res in r["products"].items():
        for name, row in res["rows"].items():
            ar = row.get("area")
            area = f"{ar['median']:.2f} [{ar['q25']:.2f}-{ar['q75']:.2f}]" if ar else "-"
            ks = f"{row['ks_area']:.2f}" if "ks_area" in row else "-"
            sec = f"{row['seconds_per_defect']:.3f}" if "seconds_per_defect" in row else "-"
            lines.append(f"| {p} | {name} | {row['n']} | {row['fd']:.2f} | {row['kid100']:.1f} | {area} | {ks} | {sec} |")
        ra = res["reference_area"]
        lines.append(f"| {p} | reference: {res['reference']} | {res['n_real']} | | | "
                     f"{ra['median']:.2f} [{ra['q25']:.2f}-{ra['q75']:.2f}] | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
