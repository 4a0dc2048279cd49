"""Do generated defects make the product better? Calibration error, training value, generator cost.

    .venv/bin/python bench/synth_value.py                      # textile + brick/gravel/grass, CPU
    .venv/bin/python bench/synth_value.py --products textile --device cuda

For each product, a GraphCore detector is fitted on ``--shots`` normal images (as registration
does) and the real test images are scored once. Then:

* **Calibration quality.** Thresholds from :func:`inspector.verdict.calibrate` on the product's
  held-out calibration scores (``ProductRegistry._calibration_scores``: leave-one-out folds +
  augmented views, the same code as registration) with *no*, *weight-free* or *diffusion*
  generated defects (severities spread over [0, 1]). Reported on real images never used for
  fitting, calibration or generator training: false-reject rate of real normals at the OK
  threshold (normal not passed as OK) and at the NG threshold (normal rejected), miss rate of
  real defects at the OK threshold (defect passed as OK) and at the NG threshold (defect not
  rejected).

  - ``textile``: real ``local`` and ``global`` defects of the simulated textile set; the
    diffusion model is trained on ``--train`` *other* real local defects (estimated masks).
  - texture products (``brick``, ``gravel``, ``grass``): test defects are stain / misplaced /
    scratch, made by the weight-free kinds perlin / cutpaste / scar. The weight-free row is
    *held out by type*: for each test type the generator draws only the two other kinds, and the
    miss rate is on that type; rates are averaged over the three types. The diffusion row is
    absent: these products have no real defects to train it on (training it on the weight-free
    generator's own output would measure nothing).

* **Training value.** When the detector's ``fit`` takes ``generator`` (GraphCore's learned
  parts), it is fitted with weight-free, diffusion and both generators, and image AUROC and
  AUPRO@30 % on the real defects are compared with the plain fit. Otherwise only the plain fit
  is reported and the table says so.
* **Cost.** Diffusion training time (measured when this script trains it; the saved model's
  own record otherwise) and ms per generated defect for both generators, plus the diffusion
  sampler's rejection counts.

Writes ``bench/out/synth_value.json`` and ``bench/SYNTH_VALUE.md``, and splices that table into
``README.md`` and ``inspector/synth/README.md`` between their ``synth_value`` markers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._markdown import splice  # noqa: E402

TEXTURES = ("brick", "gravel", "grass")
#: generator=None: the detector's own default (GraphCore's head trains on weight-free defects then)
DEFAULT_FIT = "default fit (generator=None)"
KIND_OF = {"stain": "perlin", "misplaced": "cutpaste", "scratch": "scar"}
NO_HEAD = "no generated defects (head off)"
WEIGHT_FREE = "weight-free (the default fit)"


def sampler_counts(diffusion) -> dict:
    return dict(diffusion.stats) if diffusion is not None else {}


def counts_since(diffusion, before: dict) -> dict:
    """What the diffusion sampler did since ``before``: defects it made, fallbacks, rejections."""
    return {k: v - before.get(k, 0) for k, v in diffusion.stats.items()}


def _sampler_note(st: dict | None) -> str:
    if not st:
        return ""
    return (f"{st.get('diffusion', 0)} diffusion / {st.get('fallback', 0)} fallback; rejected: "
            f"{st.get('rejected_empty', 0)} empty mask, {st.get('rejected_iou', 0)} mask-vs-change IoU")


def rates(normal: np.ndarray, defect: np.ndarray, t) -> dict:
    """False-reject / miss rates (fractions) of real images under thresholds ``t``, by the station's
    own rule (:meth:`inspector.verdict.Thresholds.decide`, so a NaN score never passes as OK)."""
    from inspector.verdict import Verdict

    vn = [t.decide(float(x)) for x in np.ravel(normal)]
    vd = [t.decide(float(x)) for x in np.ravel(defect)]
    return {"frr_ok": float(np.mean([v != Verdict.OK for v in vn])), "frr_ng": float(np.mean([v == Verdict.NG for v in vn])),
            "miss_ok": float(np.mean([v == Verdict.OK for v in vd])), "miss_ng": float(np.mean([v != Verdict.NG for v in vd]))}


class HeldOutKinds:
    """Weight-free generator restricted to some kinds (a test type's own kind held out)."""

    def __init__(self, kinds):
        self.kinds = tuple(kinds)

    def __call__(self, img, rng, severity=None):
        from inspector.synth import make_defect

        return make_defect(img, rng, kind=self.kinds[int(rng.integers(len(self.kinds)))], severity=severity)


class Both:
    """Half diffusion, half weight-free (batched: ``make_defects``)."""

    def __init__(self, diffusion):
        self.diffusion = diffusion

    def make_defects(self, images, rng, severity=None):
        from inspector.synth import make_defect
        from inspector.synth.severity import draw_severities

        sev = draw_severities(len(images), rng, severity)
        half = len(images) // 2
        out = self.diffusion.make_defects(images[:half], rng, severity=sev[:half]) if half else []
        return out + [make_defect(im, rng, severity=float(s)) for im, s in zip(images[half:], sev[half:])]


def load_product(name: str, shots: int):
    """Shots, real test normals, real defects ``{type: [(img, mask or None)]}``."""
    from inspector.data.mvtec import read_mask, read_mvtec
    from inspector.io import read_image
    from inspector.synth.samples import build_sample, estimate_local_mask

    info = read_mvtec(build_sample(name))
    train = [read_image(p) for p in info.train_good]
    normals = train[shots:] + [read_image(p) for p in info.test_good]
    types = ("local", "global") if name == "textile" else tuple(KIND_OF)
    defects = {}
    for t in types:
        imgs = [read_image(p) for p in info.defects[t]]
        if info.masks.get(t) and all(m is not None for m in info.masks[t]):
            masks = [read_mask(m) for m in info.masks[t]]
        elif t == "local":  # estimated masks for AUPRO (the source has none); never used for training
            masks = [estimate_local_mask(i) for i in imgs]
        else:
            masks = [None] * len(imgs)
        defects[t] = list(zip(imgs, masks))
    return train[:shots], normals, defects


def get_diffusion(args, log):
    """The textile generator in ``models/synth/<name>``: reused when it matches, else trained
    (same code path as ``inspector synth train``; resumable checkpoint)."""
    from inspector.synth.diffusion.generator import DefectGen
    from inspector.synth.diffusion.model import DefectGenConfig
    from inspector.synth.samples import textile_local_defects

    path = Path(args.model_dir) / args.model_name
    pairs = textile_local_defects(args.train, seed=args.seed)
    cfg = DefectGenConfig.for_device(args.device, seed=args.seed,
                                     **({"train_steps": args.train_steps} if args.train_steps else {}))
    meta_file = path / "defectgen.json"
    if meta_file.is_file() and not args.retrain:
        meta = json.loads(meta_file.read_text())
        tr = meta.get("training", {})
        if tr.get("images") == len(pairs) and meta["config"]["train_steps"] == cfg.train_steps \
                and tr.get("source") == "textile_local_defects":
            log(f"  diffusion: reusing {path} (trained in {tr.get('seconds')} s on {tr.get('device')})")
            return DefectGen.load(path, device=args.device), tr
    gen = DefectGen(cfg, device=args.device)
    t0 = time.perf_counter()
    gen.fit([p[0] for p in pairs], [p[1] for p in pairs], progress=True, checkpoint=path / "checkpoint.pt")
    secs = time.perf_counter() - t0
    gen.save(path)
    meta = json.loads(meta_file.read_text())
    meta["training"] = {"seconds": round(secs, 1), "device": args.device, "images": len(pairs),
                        "source": "textile_local_defects", "estimated": len(pairs), "given": 0}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"  diffusion: trained {cfg.train_steps} steps/model on {len(pairs)} real local defects in {secs:.0f} s")
    return gen, meta["training"]


def per_defect_ms(gen, normals, n, seed) -> float:
    from inspector.synth import generate_defects

    t0 = time.perf_counter()
    generate_defects(normals, n, np.random.default_rng(seed), gen)
    return (time.perf_counter() - t0) * 1e3 / n


def run_product(product, args, bb, cls, reg, diffusion, takes_generator, log) -> dict:
    """Calibration quality and training value on one product (see the module docstring)."""
    from inspector.eval.metrics import compute_metrics
    from inspector.synth import _resolve
    from inspector.verdict import calibrate

    shots, normals, defects = load_product(product, args.shots)
    t0 = time.perf_counter()
    det = cls(bb).fit(bb.preprocess(shots))
    res = det.score(bb.preprocess(normals + [i for v in defects.values() for i, _ in v]))
    scores = res.scores.numpy()
    n_norm = len(normals)
    s_norm = scores[:n_norm]
    s_def, k = {}, n_norm
    for t, v in defects.items():
        s_def[t] = scores[k:k + len(v)]
        k += len(v)
    log(f"  fit + score {len(scores)} real images: {time.perf_counter() - t0:.1f} s")

    def cal(gen, n=args.n_synthetic, shots=shots):
        normal, dscores, _, _ = reg._calibration_scores(cls, bb, {}, shots, "fit", n, args.seed,
                                                        None if gen is None else _resolve(gen))
        return calibrate(normal, dscores if n else None), normal, dscores

    rows: dict[str, dict] = {}
    t_none, normal_cal, _ = cal(None, 0)
    rows["none"] = {"thresholds": t_none.to_dict(),
                    **{t: rates(s_norm, s_def[t], t_none) for t in defects}}
    if product == "textile":
        for name, gen in (("weight-free", "fallback"), ("diffusion", diffusion)):
            t0 = time.perf_counter()
            before = sampler_counts(diffusion)
            th, _, dsc = cal(gen)
            rows[name] = {"thresholds": th.to_dict(), "defect_scores": dsc,
                          "seconds": time.perf_counter() - t0,
                          **({"sampler": counts_since(diffusion, before)} if name == "diffusion" else {}),
                          **{t: rates(s_norm, s_def[t], th) for t in defects}}
            log(f"  calibrated with {name} defects: {time.perf_counter() - t0:.1f} s")
    else:
        held = {}
        for t in defects:
            others = [KIND_OF[o] for o in defects if o != t]
            th, _, _ = cal(HeldOutKinds(others))
            held[t] = {"thresholds": th.to_dict(), **rates(s_norm, s_def[t], th)}
        rows["weight-free (type held out)"] = {t: held[t] for t in defects}
    # ---- training value
    tv: dict[str, dict] = {}
    all_def = [p for v in defects.values() for p in v]
    labels = np.r_[np.zeros(n_norm), np.ones(len(all_def))]
    pix = np.array([False] * n_norm + [m is not None for _, m in all_def])
    size = (args.image_size, args.image_size)
    masks = np.stack([np.zeros(size, bool)] * n_norm + [
        np.zeros(size, bool) if m is None else
        (torch.nn.functional.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=size,
                                         mode="nearest")[0, 0].numpy() > 0.5) for _, m in all_def])

    def metrics(detector, normals=normals, all_def=all_def, labels=labels, masks=masks, pix=pix):
        r = detector.score(bb.preprocess(normals + [i for i, _ in all_def]))
        m = compute_metrics(r.scores.numpy(), labels, r.maps, masks, pixel_known=pix | (labels == 0))
        return {"image_auroc": m["image_auroc"], "pixel_aupro": m["pixel_aupro"]}

    def fitted(name, seeds, generator=None, **cfg):
        """Fit over ``seeds`` (head init, training draws and generated defects change with the seed)."""
        per, secs = [], []
        before = sampler_counts(diffusion)
        for seed in seeds:
            t0 = time.perf_counter()
            d = cls(bb, seed=seed, **cfg).fit(bb.preprocess(shots), generator=generator)
            secs.append(time.perf_counter() - t0)
            per.append(metrics(d))
        row = {k: float(np.mean([m[k] for m in per])) for k in ("image_auroc", "pixel_aupro")}
        row.update({f"{k}_std": float(np.std([m[k] for m in per])) for k in ("image_auroc", "pixel_aupro")})
        row.update(per_seed=per, seeds=list(seeds), fit_s=float(np.mean(secs)))
        if diffusion is not None and name in ("diffusion", "both"):  # only these fits draw from the sampler
            row["sampler"] = counts_since(diffusion, before)
        log(f"  fit with {name}: AUROC {100 * row['image_auroc']:.1f} ± {100 * row['image_auroc_std']:.1f}, "
            f"{row['fit_s']:.1f} s/fit")
        return row

    seeds = list(range(args.fit_seeds))
    if not takes_generator:
        tv[DEFAULT_FIT] = {**metrics(det), "fit_s": None}
    else:
        # the same detector without its learned head: what training on generated defects adds
        tv[NO_HEAD] = fitted(NO_HEAD, seeds, head=False)
        gens = {WEIGHT_FREE: "fallback"}
        if diffusion is not None and product == "textile" and not args.no_diffusion_training:
            gens.update({"diffusion": diffusion, "both": Both(diffusion)})
        for name, g in gens.items():
            tv[name] = fitted(name, seeds, _resolve(g))
    return {"n_normals": n_norm, "defects": {t: len(v) for t, v in defects.items()},
            "calibration": rows, "training_value": tv, "normal_calibration_scores": normal_cal}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", nargs="+", default=["textile", *TEXTURES], choices=["textile", *TEXTURES])
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--n-synthetic", type=int, default=24, help="generated defects per calibration")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--train", type=int, default=8, help="real textile local defects that train the diffusion model")
    ap.add_argument("--train-steps", type=int, default=None, help="diffusion steps per model (config default)")
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "synth"))
    ap.add_argument("--model-name", default="textile")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--cost-n", type=int, default=16, help="defects generated to time each generator")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared machine OpenMP spin-waiting makes 2 threads far slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--table", default=str(ROOT / "bench" / "SYNTH_VALUE.md"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the products (and diffusion cost) of an earlier synth_value.json that this run does "
                         "not measure (run the products in several sessions)")
    ap.add_argument("--fit-seeds", type=int, default=3,
                    help="training value: fits per row (seeds 0..N-1); one fit's head training moves textile AUROC "
                         "by several points")
    ap.add_argument("--no-diffusion-training", action="store_true",
                    help="training value: skip the diffusion / both fits (each generates 24 diffusion defects)")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="no compute: merge the products of these synth_value.json files (later ones win; summed "
                         "wall time) and write the table, the JSON and the README sections")
    args = ap.parse_args()
    if args.render:
        return render_files([Path(f) for f in args.render], Path(args.out), Path(args.table))

    from rich.console import Console

    from inspector.backbones.registry import load_backbone
    from inspector.detectors.registry import detector_class
    from inspector.products.registry import ProductRegistry

    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    console = Console(width=150)
    log = console.print
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bb = load_backbone("efficientnet-lite0", device=args.device, image_size=args.image_size)
    cls = detector_class("graphcore")
    takes_generator = "generator" in inspect.signature(cls.fit).parameters
    reg = ProductRegistry(tempfile.mkdtemp(prefix="synth-value-"))
    results: dict = {"args": vars(args), "detector": "graphcore", "fit_takes_generator": takes_generator,
                     "products": {}}
    diffusion, training = None, None
    if "textile" in args.products:
        diffusion, training = get_diffusion(args, log)
        results["diffusion_training"] = training

    for product in args.products:
        log(f"[bold]{product}[/]")
        results["products"][product] = run_product(product, args, bb, cls, reg, diffusion, takes_generator, log)

    # ---- cost
    cost = {}
    ref_normals = load_product(args.products[0], args.shots)[1][:4]
    cost["weight-free"] = {"ms_per_defect": per_defect_ms("fallback", ref_normals, args.cost_n, args.seed)}
    if diffusion is not None:
        before = sampler_counts(diffusion)
        ms = per_defect_ms(diffusion, ref_normals, args.cost_n, args.seed)
        after = counts_since(diffusion, before)
        cost["diffusion"] = {"ms_per_defect": ms, "train_s": training.get("seconds"),
                             "train_device": training.get("device"), "stats": after,
                             "parameters": sum(diffusion.parameters_count.values())}
    results["cost"] = cost
    results["wall_s"] = time.perf_counter() - t_start
    old_file = out_dir / "synth_value.json"
    if args.merge and old_file.is_file():
        old = json.loads(old_file.read_text())
        results["products"] = {**{k: v for k, v in old.get("products", {}).items() if k not in results["products"]},
                               **results["products"]}
        for k, v in old.get("cost", {}).items():
            results["cost"].setdefault(k, v)
        results.setdefault("diffusion_training", old.get("diffusion_training"))
        results["wall_s"] += old.get("wall_s", 0.0)
    results["cpu_s"] = time.process_time() - cpu_start
    results["environment"] = {"device": args.device, "cpu": platform.processor() or platform.machine(),
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    (out_dir / "synth_value.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    md = render(results)
    Path(args.table).write_text(md)
    for readme in (ROOT / "README.md", ROOT / "inspector" / "synth" / "README.md"):
        splice(readme, "synth_value", md)
    console.print(md)
    log(f"wrote {out_dir / 'synth_value.json'}, {args.table} (and the README sections)")
    return 0


def render_files(files: list[Path], out_dir: Path, table: Path) -> int:
    merged: dict = {}
    for f in files:
        r = json.loads(f.read_text())
        if not merged:
            merged = r
            continue
        merged["products"].update(r["products"])
        for k, v in r.get("cost", {}).items():
            merged["cost"].setdefault(k, v)
        merged["diffusion_training"] = merged.get("diffusion_training") or r.get("diffusion_training")
        merged["wall_s"] += r["wall_s"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "synth_value.json").write_text(json.dumps(merged, indent=2, default=float) + "\n")
    md = render(merged)
    table.write_text(md)
    for readme in (ROOT / "README.md", ROOT / "inspector" / "synth" / "README.md"):
        splice(readme, "synth_value", md)
    print(md)
    return 0


def _deltas(r: dict) -> list[str]:
    """Diffusion minus weight-free on the textile, in percentage points (negative = fewer errors)."""
    t = r["products"].get("textile")
    if not t or "diffusion" not in t["calibration"]:
        return []
    cal = t["calibration"]
    parts = []
    for d in t["defects"]:
        dw, dd = cal["weight-free"][d], cal["diffusion"][d]
        parts.append(f"{d}: miss@OK {100 * (dd['miss_ok'] - dw['miss_ok']):+.0f}, miss@NG "
                     f"{100 * (dd['miss_ng'] - dw['miss_ng']):+.0f}")
    d0 = next(iter(t["defects"]))
    fr = cal["diffusion"][d0]["frr_ok"] - cal["weight-free"][d0]["frr_ok"]
    frg = cal["diffusion"][d0]["frr_ng"] - cal["weight-free"][d0]["frr_ng"]
    out = ["", f"Diffusion minus weight-free calibration on textile (points): {'; '.join(parts)}; "
               f"FRR@OK {100 * fr:+.0f}, FRR@NG {100 * frg:+.0f}."]
    tv = t["training_value"]
    wf = next((k for k in tv if k.startswith("weight-free")), None)
    if "diffusion" in tv and wf:
        a, b = tv["diffusion"], tv[wf]
        au = "-" if a["image_auroc"] is None or b["image_auroc"] is None else f"{100 * (a['image_auroc'] - b['image_auroc']):+.1f}"
        ap = "-" if a["pixel_aupro"] is None or b["pixel_aupro"] is None else f"{100 * (a['pixel_aupro'] - b['pixel_aupro']):+.1f}"
        out[-1] += f" Training the head on diffusion instead of weight-free defects: image AUROC {au}, AUPRO {ap}."
    return out


def _pm(v: dict, key: str) -> str:
    """Mean ± std over fit seeds (or the single value of an older run)."""
    if v.get(key) is None:
        return "-"
    std = v.get(f"{key}_std")
    return f"{100 * v[key]:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * v[key]:.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def render(r: dict) -> str:
    """The markdown the READMEs quote (also re-renderable from the JSON: ``render(json.load(...))``)."""
    a = r["args"]
    env = r["environment"]
    lines = [f"GraphCore, {a['shots']} shots, EfficientNet-Lite0 at {a['image_size']} px, "
             f"{a['n_synthetic']} generated calibration defects (severities spread 0-1), seed {a['seed']}, "
             f"{env['device']} ({env['threads']} threads, load average {env['load_avg']:.1f} at the end). "
             f"Run: {r['wall_s'] / 60:.1f} min wall clock. Reproduce: `.venv/bin/python bench/synth_value.py`.", "",
             "**Calibration quality** on real images (%; FRR = real normals not passed as OK / rejected as NG, "
             "miss = real defects passed as OK / not rejected as NG; lower is better):", "",
             "| product | defects | calibrated with | FRR@OK | FRR@NG | miss@OK | miss@NG |",
             "|---|---|---|---|---|---|---|"]
    for p, pr in r["products"].items():
        for row, v in pr["calibration"].items():
            for t, n in pr["defects"].items():
                x = v[t]
                lines.append(f"| {p} | {t} (n={n}) | {row} | {_pct(x['frr_ok'])} | {_pct(x['frr_ng'])} | "
                             f"{_pct(x['miss_ok'])} | {_pct(x['miss_ng'])} |")
    t = r["products"].get("textile", {}).get("calibration", {}).get("diffusion", {})
    if t.get("sampler"):
        lines += ["", f"The textile 'diffusion' calibration set: {_sampler_note(t['sampler'])} (a rejected draw is "
                      "redrawn up to 3 times, then replaced by a weight-free defect)."]
    lines += ["", "Real normals per product: " + ", ".join(f"{p} {pr['n_normals']}" for p, pr in r["products"].items())
              + ". Texture products: the weight-free generator draws only the kinds *other* than the test type "
              "(stain=perlin, misplaced=cutpaste, scratch=scar).", ""]
    lines += ["**Training value** (the detector's learned parts trained on generated defects; real defects, %):", "",
              "| product | fit | image AUROC | AUPRO@30 | fit s | diffusion sampler |", "|---|---|---|---|---|---|"]
    for p, pr in r["products"].items():
        for name, v in pr["training_value"].items():
            name = DEFAULT_FIT if name.startswith("plain fit") else name
            lines.append(f"| {p} | {name} | {_pm(v, 'image_auroc')} | {_pm(v, 'pixel_aupro')} | "
                         + ("-" if v.get("fit_s") is None else f"{v['fit_s']:.1f}") + " | "
                         + (_sampler_note(v.get("sampler")) or "-") + " |")
    if r["fit_takes_generator"]:
        n = r["args"].get("fit_seeds", 1)
        lines += ["", f"Mean ± std over {n} fits (seeds 0-{n - 1}: head initialisation, training draws and generated "
                      "defects). With generator=None GraphCore trains its head on weight-free defects: that row is the "
                      "product's default fit. 'head off' is the same detector (bank distance + global branch) with no "
                      "generated defect at all."]
    if r["args"].get("no_diffusion_training"):
        lines += ["", "The diffusion / both training rows were not run (`--no-diffusion-training`): on this shared CPU "
                      "each fit's 24 diffusion defects cost minutes (see the cost table)."]
    if not r["fit_takes_generator"]:
        lines += ["", "GraphCore's `fit` on this main takes no `generator` (its learned parts are not there yet): "
                      "only the plain fit is measured; the generator rows are missing, not zero."]
    lines += _deltas(r)
    c = r["cost"]
    lines += ["", "**Generator cost** (CPU unless stated):", "", "| generator | train | ms / defect | notes |",
              "|---|---|---|---|", f"| weight-free | none | {c['weight-free']['ms_per_defect']:.0f} | |"]
    if "diffusion" in c:
        d = c["diffusion"]
        st = d["stats"]
        lines.append(f"| diffusion ({d['parameters'] / 1e6:.1f} M params) | {d['train_s']:.0f} s on {d['train_device']} "
                     f"({a['train']} real local defects, estimated masks) | {d['ms_per_defect']:.0f} | "
                     f"{_sampler_note(st)} |")
        every = [st] + [x.get("sampler") or {} for pr in r["products"].values()
                        for x in [*pr["calibration"].values(), *pr["training_value"].values()]]
        made = sum(x.get("diffusion", 0) for x in every)
        fell = sum(x.get("fallback", 0) for x in every)
        if fell > made:
            lines += ["", f"Over the whole run the diffusion sampler made {made} defects and fell back to the weight-free "
                          f"generator {fell} times: most of its draws fail the mask checks, so the 'diffusion' rows "
                          "above are mostly weight-free defects and this model is not worth its cost on this CPU."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
