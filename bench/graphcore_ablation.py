"""GraphCore ablation on evidence that plays an operator's: what each optional part buys, per product.

    .venv/bin/python bench/graphcore_ablation.py --quick     # smoke run: brick + textile, seed 0, k = 4, one direction
    .venv/bin/python bench/graphcore_ablation.py             # 4 products, seeds 0-2, k = 1 and 4, both directions
    .venv/bin/python bench/graphcore_ablation.py --size 256 --device cuda
    .venv/bin/python bench/graphcore_ablation.py --render    # markdown again from the saved JSON

**What the data is.** ``brick``, ``gravel``, ``grass``: crops of scikit-image's bundled photographs
of *normal* surfaces (the sample products' recipe), every defect on them *generated* by the
weight-free generator (:mod:`inspector.synth.fallback`). ``textile``: *simulated* textile images
(``conformal-clip-data``) with its simulated ``local`` and ``global`` defects. Nothing here is a
photograph of a real defect, so no number it writes is evidence of accuracy on real parts; the
real-defect figures live outside the repository (issue #23).

**Protocol** (why: every GraphCore choice so far was validated on generated defects of the very
families it was tested on, and none held on real defects). Per product the defects fall into two
disjoint *families*; one plays the operator-confirmed evidence and the other the test defects,
and each direction is run (A -> B and B -> A):

* textures: family ``blend`` = Perlin blobs of a foreign texture, a stain or a smudge
  (``perlin``); family ``moved`` = the image's own content moved and jittered (``cutpaste``,
  ``scar``);
* textile: family ``local`` and family ``global`` (the simulated defects, image labels only).

Evidence = ``--evidence-normals`` confirmed normals (held-out normal images, never in the test
pool) + ``--evidence-defects`` confirmed defects of the evidence family (image labels only unless
``--evidence-masks``). Test = ``--test-normals`` other normal images + ``--test-defects`` defects
of the *other* family. Every fit of a direction that trains a head on generated defects (the head
forced on, or any fit given evidence, where the selection rule may train one) generates them from
the evidence family's kinds (textures) or from the default weight-free mix (textile, whose test
families no generator makes), so the test family is never used for training nor for the choice.
Shots (k normal images) come from the same normal pool; all draws depend on the seed.

Rows (image AUROC %): ``patchcore`` (the shots only), ``patchcore+ev`` (the shots and the
confirmed normals in the bank), ``patchcore-aug`` (bank of augmented views), ``anomalib-patchcore``
(anomalib's PatchCore on the same Lite0 weights), ``graphcore`` (its defaults, no evidence),
``graphcore+ev`` (the selection rule decides from the evidence; what it switched on is recorded
per product, seed and direction), and ``graphcore[+PART]`` / ``graphcore[+PART]+ev`` with each
optional part (``head``, ``global``, ``views``) forced on, without and with evidence.

Writes ``bench/out/graphcore_ablation.json`` and ``bench/GRAPHCORE.md``; a full run (not
``--quick``) also splices its summary into ``README.md`` (``graphcore_ablation`` markers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._markdown import splice  # noqa: E402

PRODUCTS = ("brick", "gravel", "grass", "textile")
#: product kind -> family name -> generator kinds (textures) or simulated defect folder (textile)
FAMILIES = {"texture": {"blend": ("perlin",), "moved": ("cutpaste", "scar")},
            "textile": {"local": ("local",), "global": ("global",)}}
PARTS = ("head", "global", "views")
#: config that forces an optional part on whatever the evidence says (``select="off"``: the rule
#: does not decide); the GraphCore defaults leave each off and let the rule switch them on
FORCE = {"head": {"head": True, "select": "off"}, "global": {"global_branch": True, "select": "off"},
         "views": {"views": 8, "select": "off"}}


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str                      # "patchcore" | "patchcore-aug" | "anomalib" | "graphcore"
    evidence: bool = False
    part: str | None = None        # the optional part forced on

    @property
    def config(self) -> dict:
        return dict(FORCE[self.part]) if self.part else {}

    @property
    def uses_generator(self) -> bool:
        """Its fit may train a head on generated defects: it depends on the direction's family."""
        return self.kind == "graphcore" and (self.evidence or self.part == "head")


VARIANTS = (
    Variant("patchcore", "patchcore"), Variant("patchcore+ev", "patchcore", evidence=True),
    Variant("patchcore-aug", "patchcore-aug"), Variant("anomalib-patchcore", "anomalib"),
    Variant("graphcore", "graphcore"), Variant("graphcore+ev", "graphcore", evidence=True),
    *(Variant(f"graphcore[+{p}]" + ("+ev" if ev else ""), "graphcore", evidence=ev, part=p)
      for p in PARTS for ev in (False, True)),
)


def product_kind(product: str) -> str:
    return "textile" if product == "textile" else "texture"


def directions(product: str, meta: dict | None = None) -> list[tuple[str, str]]:
    """(evidence family, test family) pairs: both ways round (only the first when ``meta`` of a
    run says so)."""
    a, b = FAMILIES[product_kind(product)]
    return [(a, b), (b, a)][: 1 if (meta or {}).get("directions") == "first" else 2]


# ---------------------------------------------------------------------------------------------
# Data: one pool per product and seed.
# ---------------------------------------------------------------------------------------------
@dataclass
class Pool:
    product: str
    shots: list[np.ndarray]                                   # normal images, the first k are the shots
    ev_normals: list[np.ndarray]                              # confirmed normals
    ev_defects: dict[str, list[tuple[np.ndarray, np.ndarray | None]]]  # family -> (image, mask or None)
    test_normals: list[np.ndarray]
    test_defects: dict[str, list[np.ndarray]]                 # family -> images
    source: dict = field(default_factory=dict)


def _family_generator(kinds: tuple[str, ...]):
    """A weight-free generator restricted to ``kinds`` (``generate_defects`` accepts it)."""
    from inspector.synth.fallback import make_defect

    def gen(img: np.ndarray, rng: np.random.Generator, severity: float | None = None):
        return make_defect(img, rng, kind=kinds[int(rng.integers(len(kinds)))], severity=severity)

    gen.__name__ = "fallback[" + "+".join(kinds) + "]"
    return gen


def texture_pool(product: str, seed: int, size: int, n: dict[str, int]) -> Pool:
    """Crops of scikit-image's photograph ``product`` by the sample products' recipe; defects of
    each family generated on crops of their own."""
    from inspector.synth.fallback import make_defect
    from inspector.synth.samples import PRODUCTS as SAMPLE_PRODUCTS
    from inspector.synth.samples import _crop, _texture_source

    src = _texture_source(product)
    rng = np.random.default_rng([seed, SAMPLE_PRODUCTS.index(product), 23])

    def crops(m: int) -> list[np.ndarray]:
        return [_crop(src, rng, size) for _ in range(m)]

    pool = Pool(product, crops(n["shots"]), crops(n["ev_normals"]), {}, crops(n["test_normals"]), {},
                {"normals": f"scikit-image data.{product}() crops (photograph)", "defects": "generated"})
    for fam, kinds in FAMILIES["texture"].items():
        ev = [make_defect(img, rng, kinds[i % len(kinds)]) for i, img in enumerate(crops(n["ev_defects"]))]
        pool.ev_defects[fam] = [(img, mask.astype(bool)) for img, mask in ev]
        pool.test_defects[fam] = [make_defect(img, rng, kinds[i % len(kinds)])[0]
                                  for i, img in enumerate(crops(n["test_defects"]))]
    return pool


def textile_pool(seed: int, size: int, n: dict[str, int]) -> Pool:
    """Simulated textile images (``conformal-clip-data``): disjoint seeded draws of nominal images
    and of each simulated defect folder."""
    from inspector.synth.samples import _load_resized, _textile_files

    files = _textile_files()
    rng = np.random.default_rng([seed, 3, 23])
    nominal = [files["nominal"][i] for i in rng.permutation(len(files["nominal"]))]
    cut = np.cumsum([0, n["shots"], n["ev_normals"], n["test_normals"]])
    load = [_load_resized(p, size) for p in nominal[: cut[-1]]]
    pool = Pool("textile", load[cut[0]:cut[1]], load[cut[1]:cut[2]], {}, load[cut[2]:cut[3]], {},
                {"normals": "conformal-clip-data nominal (simulated)", "defects": "conformal-clip-data local/global "
                 "(simulated, image labels only)"})
    for fam in FAMILIES["textile"]:
        order = [files[fam][i] for i in rng.permutation(len(files[fam]))]
        pool.ev_defects[fam] = [(_load_resized(p, size), None) for p in order[: n["ev_defects"]]]
        pool.test_defects[fam] = [_load_resized(p, size)
                                  for p in order[n["ev_defects"]: n["ev_defects"] + n["test_defects"]]]
    return pool


def make_pool(product: str, seed: int, size: int, n: dict[str, int]) -> Pool:
    return textile_pool(seed, size, n) if product == "textile" else texture_pool(product, seed, size, n)


# ---------------------------------------------------------------------------------------------
# Fitting and scoring.
# ---------------------------------------------------------------------------------------------
def make_evidence(bb, pool: Pool, family: str, masks: bool):
    from inspector.detectors.base import FitEvidence

    defects = pool.ev_defects[family]
    return FitEvidence(
        normals=bb.preprocess(pool.ev_normals), defects=bb.preprocess([img for img, _ in defects]),
        masks=[torch.from_numpy(m.astype(np.float32)) if masks and m is not None else None for _, m in defects])


def fit_variant(v: Variant, bb, shots: torch.Tensor, seed: int, overrides: dict, evidence, generator):
    """A fitted detector for ``v`` and its fit seconds."""
    from inspector.detectors.graphcore.detector import AugmentedPatchCore, GraphCore, PatchCoreKNN

    t0 = time.perf_counter()
    if v.kind == "anomalib":
        from inspector.detectors.baselines import AnomalibPatchcore

        det = AnomalibPatchcore(bb)
        det.fit(shots)
        return det, time.perf_counter() - t0
    cls = {"patchcore": PatchCoreKNN, "patchcore-aug": AugmentedPatchCore, "graphcore": GraphCore}[v.kind]
    keep = ("layers", "normalize") if v.kind == "patchcore" else tuple(overrides)
    det = cls(bb, seed=seed, **{**{k: x for k, x in overrides.items() if k in keep}, **v.config})
    kw = {}
    if v.evidence:
        kw["evidence"] = evidence
    if v.kind == "graphcore" and generator is not None:
        kw["generator"] = generator
    det.fit(shots, **kw)
    return det, time.perf_counter() - t0


def score_pool(det, v: Variant, feats: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    if v.kind == "anomalib":
        return torch.cat([det.score(x[i:i + 16]).scores for i in range(0, len(x), 16)])
    return det.score_embeddings(feats, (size, size)).scores


def auroc(scores: torch.Tensor, labels: np.ndarray, keep: np.ndarray) -> float:
    from inspector.eval.metrics import auroc as image_auroc

    return float(image_auroc(scores[torch.from_numpy(keep)], labels[keep]))


def selection_record(det) -> dict:
    sel = dict(det.fit_info.get("selection") or {})
    return {"enabled": sel.get("enabled"), "weights": sel.get("weights"), "reason": sel.get("reason"),
            "rule": sel.get("rule"), "evidence": sel.get("evidence"), "candidates": sel.get("candidates")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: brick and textile, seed 0, k = 4, one direction, 8 + 8 test images, README untouched")
    p.add_argument("--products", nargs="+", default=None, choices=PRODUCTS,
                   help="default: all (--quick: brick textile)")
    p.add_argument("--directions", choices=("both", "first"), default=None,
                   help="both ways round (default) or only the first family as evidence (--quick)")
    p.add_argument("--shots", nargs="+", type=int, default=None, help="default 1 4 (--quick: 4)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--quick: 0)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="only these rows (default: all): " + ", ".join(v.name for v in VARIANTS))
    p.add_argument("--evidence-normals", type=int, default=12)
    p.add_argument("--evidence-defects", type=int, default=10)
    p.add_argument("--evidence-masks", action="store_true",
                   help="give the confirmed generated defects their masks (default: image labels only)")
    p.add_argument("--test-normals", type=int, default=None, help="default 24 (--quick: 8)")
    p.add_argument("--test-defects", type=int, default=None, help="per family; default 24 (--quick: 8)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--no-anomalib", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="GraphCore config overrides")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "graphcore_ablation.json"))
    p.add_argument("--md", default=str(ROOT / "bench" / "GRAPHCORE.md"))
    p.add_argument("--render", action="store_true",
                   help="no compute: rewrite the markdown (and, for a full run, the README section) from --out")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.out).read_text())
        meta, runs = saved["meta"], saved["runs"]  # summaries again: the current code's view of the runs
        saved.update(table=summarize(runs, meta), effects=effects(runs, meta),
                     rule=rule_summary(saved["selections"], meta))
        write_outputs(saved, args.md, readme=not meta["quick"])
        return 0
    shots = args.shots or ([4] if args.quick else [1, 4])
    products = args.products or (["brick", "textile"] if args.quick else list(PRODUCTS))
    both = (args.directions or ("first" if args.quick else "both")) == "both"
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    n = {"shots": max(shots), "ev_normals": args.evidence_normals, "ev_defects": args.evidence_defects,
         "test_normals": args.test_normals or (8 if args.quick else 24),
         "test_defects": args.test_defects or (8 if args.quick else 24)}
    variants = [v for v in VARIANTS if (args.variants is None or v.name in args.variants)
                and not (v.kind == "anomalib" and args.no_anomalib)]
    torch.set_num_threads(args.threads)

    from inspector.backbones.registry import load_backbone
    from inspector.detectors.graphcore.detector import GraphCore

    overrides = {k: json.loads(x) for k, x in (s.split("=", 1) for s in args.set)}
    bb = load_backbone("efficientnet-lite0", device=args.device, image_size=args.size)
    runs: dict[str, dict[str, float]] = {}   # variant -> "k|seed|product|evfam>testfam" -> AUROC
    selections: dict[str, dict] = {}         # "k|seed|product|evfam>testfam" -> selection record
    fit_s: dict[str, list[float]] = {}
    score_ms: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    t_all = time.perf_counter()
    for product in products:
        for seed in seeds:
            pool = make_pool(product, seed, args.size, n)
            fams = list(FAMILIES[product_kind(product)])
            images = pool.test_normals + [im for f in fams for im in pool.test_defects[f]]
            family = np.array(["good"] * len(pool.test_normals) + [f for f in fams for _ in pool.test_defects[f]])
            labels = (family != "good").astype(np.int64)
            x = bb.preprocess(images)
            t0 = time.perf_counter()
            feats = GraphCore(bb, **overrides).embed(x)
            embed_ms = (time.perf_counter() - t0) * 1e3 / len(x)
            for k in shots:
                shot_x = bb.preprocess(pool.shots[:k])
                cache: dict[tuple[str, str | None], torch.Tensor] = {}
                for ev_fam, test_fam in directions(product)[: 2 if both else 1]:
                    key = f"{k}|{seed}|{product}|{ev_fam}>{test_fam}"
                    keep = (family == "good") | (family == test_fam)
                    evidence = make_evidence(bb, pool, ev_fam, args.evidence_masks)
                    kinds = FAMILIES[product_kind(product)][ev_fam]
                    generator = _family_generator(kinds) if product_kind(product) == "texture" else None
                    for v in variants:
                        if v.name in skipped:
                            continue
                        ck = (v.name, ev_fam if (v.uses_generator or v.evidence) else None)
                        if ck not in cache:
                            try:
                                det, secs = fit_variant(v, bb, shot_x, seed, overrides, evidence, generator)
                            except Exception as exc:  # a row that cannot run here says why, the rest go on
                                if v.kind != "anomalib":
                                    raise
                                skipped[v.name] = f"{type(exc).__name__}: {exc}"
                                continue
                            fit_s.setdefault(v.name, []).append(secs)
                            t0 = time.perf_counter()
                            cache[ck] = score_pool(det, v, feats, x, args.size)
                            ms = (time.perf_counter() - t0) * 1e3 / len(x) + (0 if v.kind == "anomalib" else embed_ms)
                            score_ms.setdefault(v.name, []).append(ms)
                            if v.name == "graphcore+ev":
                                selections[key] = selection_record(det)
                        runs.setdefault(v.name, {})[key] = auroc(cache[ck], labels, keep)
                    line = "  ".join(f"{v.name}={100 * runs[v.name][key]:.1f}" for v in variants
                                     if key in runs.get(v.name, {}))
                    print(f"{key}: {line}  | rule: {(selections.get(key) or {}).get('enabled')}", flush=True)
    meta = {"command": "python bench/graphcore_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "quick": bool(args.quick), "size": args.size, "shots": shots, "seeds": seeds, "products": products,
            "directions": "both" if both else "first",
            "counts": n, "evidence_masks": bool(args.evidence_masks), "overrides": overrides,
            "variants": [v.name for v in variants], "skipped": skipped,
            "fit_s": {k: float(np.mean(v)) for k, v in fit_s.items()},
            "score_ms": {k: float(np.mean(v)) for k, v in score_ms.items()},
            "wall_s": round(time.perf_counter() - t_all, 1), "load_avg_1m": os.getloadavg()[0],
            "torch": torch.__version__, "threads": args.threads, "device": args.device,
            "cpu_count": os.cpu_count()}
    saved = {"meta": meta, "table": summarize(runs, meta), "effects": effects(runs, meta),
             "rule": rule_summary(selections, meta), "selections": selections, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(saved, indent=1) + "\n")
    print(write_outputs(saved, args.md, readme=not args.quick))
    return 0


# ---------------------------------------------------------------------------------------------
# Summaries (from the saved runs only, so --render reproduces them).
# ---------------------------------------------------------------------------------------------
def _keys(meta: dict):
    for product in meta["products"]:
        for ev_fam, test_fam in directions(product, meta):
            yield product, f"{ev_fam}>{test_fam}"


def per_seed(runs: dict[str, float], k: int, seed: int, product: str | None) -> float | None:
    """Mean over both directions of one product (None: mean over products of that) for one seed."""
    if product is None:
        vals = [per_seed(runs, k, seed, p) for p in PRODUCTS]
    else:
        vals = [runs.get(f"{k}|{seed}|{product}|{ev}>{te}") for ev, te in directions(product)]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_std(vals: list[float | None]) -> list[float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return [float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0]


def summarize(runs: dict[str, dict[str, float]], meta: dict) -> list[dict]:
    """One row per variant and k: each product (both directions averaged per seed) and the mean
    over products, mean ± std over seeds; and each direction on its own."""
    rows = []
    for name in meta["variants"]:
        r = runs.get(name, {})
        for k in meta["shots"]:
            row = {"variant": name, "k": k}
            for product in meta["products"]:
                row[product] = _mean_std([per_seed(r, k, s, product) for s in meta["seeds"]])
                for ev, te in directions(product, meta):
                    row[f"{product} {ev}>{te}"] = _mean_std([r.get(f"{k}|{s}|{product}|{ev}>{te}")
                                                            for s in meta["seeds"]])
            row["mean"] = _mean_std([per_seed(r, k, s, None) for s in meta["seeds"]])
            rows.append(row)
    return rows


#: (label, evidence, row, baseline): each optional part alone against the bank alone (the shots;
#: with evidence the shots and the confirmed normals, which is what ``patchcore+ev`` fits), and
#: the rule's choice against the same bank
EFFECTS = (*((p, ev, f"graphcore[+{p}]" + ("+ev" if ev else ""), "patchcore+ev" if ev else "graphcore")
             for p in PARTS for ev in (False, True)),
           ("rule", True, "graphcore+ev", "patchcore+ev"))


def effects(runs: dict[str, dict[str, float]], meta: dict) -> list[dict]:
    """AUROC points each optional part adds when forced on alone, over the bank alone (without
    evidence: ``graphcore``, the bank of the shots; with evidence: ``patchcore+ev``, the bank of the
    shots and confirmed normals), and what the rule's choice adds over the same bank; per product
    and direction (mean over seeds) and the mean over products."""
    out = []
    for part, ev, name, base in EFFECTS:
        if name not in runs or base not in runs:
            continue
        for k in meta["shots"]:
            row = {"part": part, "evidence": ev, "k": k, "row": name, "against": base}
            diffs = {key: runs[name][key] - runs[base][key] for key in runs[name]
                     if key in runs[base] and key.startswith(f"{k}|")}
            for product, d in _keys(meta):
                vals = [v for key, v in diffs.items() if key.endswith(f"|{product}|{d}")]
                row[f"{product} {d}"] = float(np.mean(vals)) if vals else None
            for product in meta["products"]:
                vals = [v for key, v in diffs.items() if f"|{product}|" in key]
                row[product] = float(np.mean(vals)) if vals else None
            prods = [row[p] for p in meta["products"] if row[p] is not None]
            row["mean"] = float(np.mean(prods)) if prods else None
            out.append(row)
    return out


def rule_summary(selections: dict[str, dict], meta: dict) -> list[dict]:
    """What the selection rule switched on, per product and k: how many of the seed x direction
    fits enabled each part."""
    out = []
    for product in meta["products"]:
        for k in meta["shots"]:
            recs = [s for key, s in selections.items() if key.startswith(f"{k}|") and f"|{product}|" in key]
            if not recs:
                continue
            row = {"product": product, "k": k, "fits": len(recs)}
            for part, flag in (("head", "head"), ("global", "global_branch"), ("views", "views")):
                row[part] = sum(bool((r.get("enabled") or {}).get(flag)) for r in recs)
            row["reasons"] = sorted({str(r.get("reason")) for r in recs})
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------------------
DATA_NOTE = (
    "**What the data is.** `brick`, `gravel`, `grass`: crops of scikit-image's photographs of *normal* "
    "surfaces; every defect on them is *generated* (weight-free Perlin blend, CutPaste, scar). `textile`: "
    "*simulated* images (`conformal-clip-data`) with simulated `local` / `global` defects. No image here "
    "shows a real defect: these numbers are not evidence of accuracy on real parts (the real-defect "
    "figures are in issue #23, measured on a set held outside the repository).")

PROTOCOL_NOTE = (
    "**Protocol.** Per product the defects fall into two disjoint families: textures `blend` (Perlin "
    "blob of a foreign texture, stain or smudge) and `moved` (CutPaste, scar: the image's own content "
    "moved); textile `local` and `global`. One family plays the operator-confirmed defects, the other is "
    "the test set, both ways round (`A>B`: evidence A, test B); a fit that trains a head on generated "
    "defects generates them from the evidence family (textile: the weight-free mix), so the test family "
    "is never used for training nor for the rule's choice. Confirmed normals are held-out normal images, "
    "never in the test pool.")

COLUMNS_NOTE = (
    "Rows: `patchcore` = the shots only; `patchcore+ev` = shots + confirmed normals in the bank; "
    "`patchcore-aug` = bank of augmented views; `anomalib-patchcore` = anomalib's PatchCore on the same "
    "weights; `graphcore` = its defaults without evidence; `graphcore+ev` = the selection rule decides "
    "from the evidence; `[+part]` = that optional part forced on (`head`, `global` branch, augmented "
    "`views`; `graphcore[+views]` is the same model as `patchcore-aug`), `+ev` = with the evidence.")


def _cell(c) -> str:
    return "-" if c is None else f"{100 * c[0]:.1f}±{100 * c[1]:.1f}"


def _delta(d) -> str:
    if d is None:
        return "-"
    s = f"{100 * d:+.1f}"
    return f"**{s}**" if d < -0.005 else s


def markdown(saved: dict) -> str:
    meta, table = saved["meta"], saved["table"]
    prods = meta["products"]
    n = meta["counts"]
    load = meta["load_avg_1m"]
    lines = ["## GraphCore ablation on confirmed evidence", ""]
    if meta["quick"]:
        lines += ["**Smoke run (`--quick`): two products, one seed, one direction, few images. Not the reference "
                  "numbers: those come from `.venv/bin/python bench/graphcore_ablation.py` on an idle machine.**", ""]
    lines += [
        DATA_NOTE, "", PROTOCOL_NOTE, "",
        f"`{meta['command'].strip()}`: EfficientNet-Lite0 at {meta['size']} px, {meta['device']} "
        f"({meta['threads']} threads of {meta['cpu_count']} cores, 1-min load average {load:.1f} at the end"
        + (": other jobs shared the CPU, timings are upper bounds" if load > 0.75 * (meta['cpu_count'] or 1) else "")
        + f"), torch {meta['torch']}, seeds {meta['seeds']}, k = {meta['shots']}, whole run {meta['wall_s']:.0f} s. "
        f"Per product, seed and direction: {n['ev_normals']} confirmed normals + {n['ev_defects']} confirmed "
        f"defects ({'with masks' if meta['evidence_masks'] else 'image labels only'}); test "
        f"{n['test_normals']} normals + {n['test_defects']} defects of the other family. Config overrides: "
        + (json.dumps(meta["overrides"]) if meta["overrides"] else "none") + ".",
        "", COLUMNS_NOTE, "",
        "### Image AUROC % (" + ("both directions averaged per seed" if meta.get("directions") != "first"
                                 else "first family as evidence") + "; mean ± std over seeds)", "",
        "| k | variant | " + " | ".join(prods) + " | mean |",
        "|---|---|" + "---|" * (len(prods) + 1),
    ]
    for r in table:
        lines.append(f"| {r['k']} | {r['variant']} | " + " | ".join(_cell(r.get(p)) for p in prods)
                     + f" | {_cell(r['mean'])} |")
    dcols = [f"{p} {d}" for p, d in _keys(meta)]
    lines += ["", "### Each direction (evidence family > test family)", "",
              "| k | variant | " + " | ".join(dcols) + " |", "|---|---|" + "---|" * len(dcols)]
    for r in table:
        lines.append(f"| {r['k']} | {r['variant']} | " + " | ".join(_cell(r.get(c)) for c in dcols) + " |")
    eff = saved["effects"]
    if eff:
        lines += ["", "### What each optional part does (AUROC points over the bank alone; **bold** = it loses)", "",
                  "Each part forced on alone: without evidence against `graphcore` (the bank of the shots), with "
                  "evidence against `patchcore+ev` (the bank of the shots and the confirmed normals; the head then "
                  "also trains on the confirmed defects). `rule`: the selection rule's choice (`graphcore+ev`) "
                  "against the same bank.", "",
                  "| part | evidence | k | " + " | ".join(prods) + " | mean | " + " | ".join(dcols) + " |",
                  "|---|---|---|" + "---|" * (len(prods) + 1 + len(dcols))]
        for e in eff:
            lines.append(f"| {e['part']} | {'yes' if e['evidence'] else 'no'} | {e['k']} | "
                         + " | ".join(_delta(e.get(p)) for p in prods) + f" | {_delta(e['mean'])} | "
                         + " | ".join(_delta(e.get(c)) for c in dcols) + " |")
        losses = [f"{e['part']} ({'with' if e['evidence'] else 'without'} evidence, k = {e['k']}) on {c}: "
                  f"{100 * e[c]:+.1f}" for e in eff for c in dcols if e.get(c) is not None and e[c] < -0.005]
        lines += ["", "Where a part (or the rule's choice) loses against the bank alone (per direction, mean over "
                  "seeds): "
                  + ("; ".join(losses) if losses else "nowhere") + "."]
    gains = _evidence_gains(table, prods)
    if gains:
        lines += ["", "### What the evidence buys (AUROC points, mean over products)", ""] + gains
    rule = saved["rule"]
    if rule:
        lines += ["", "### What the selection rule switched on (`graphcore+ev`: fits that enabled each part, "
                  "of seeds x directions)", "",
                  "| product | k | fits | head | global | views | reasons |", "|---|---|---|---|---|---|---|"]
        for r in rule:
            lines.append(f"| {r['product']} | {r['k']} | {r['fits']} | {r['head']} | {r['global']} | {r['views']} | "
                         + "; ".join(x.replace("|", "/") for x in r["reasons"]) + " |")
    if meta["skipped"]:
        lines += ["", "Not run here: " + "; ".join(f"`{k}`: {v}" for k, v in meta["skipped"].items())]
    lines += ["", "Cost in the same run (mean over fits; ms/image of scoring the test pool, one backbone pass "
              "included except for anomalib's own; the reference cost figures are `bench/GRAPHCORE_SPEED.md`):", "",
              "| variant | fit s | score ms/image |", "|---|---|---|"]
    for name in meta["variants"]:
        if name in meta["fit_s"]:
            lines.append(f"| {name} | {meta['fit_s'][name]:.2f} | {meta['score_ms'].get(name, float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def _evidence_gains(table: list[dict], prods: list[str]) -> list[str]:
    by = {(r["variant"], r["k"]): r for r in table}
    out = []
    for k in sorted({r["k"] for r in table}):
        def m(v, k=k):
            r = by.get((v, k))
            return None if r is None or r["mean"] is None else r["mean"][0]
        pairs = [("confirmed normals in the PatchCore bank", "patchcore+ev", "patchcore"),
                 ("GraphCore with evidence vs its defaults", "graphcore+ev", "graphcore"),
                 ("GraphCore with evidence vs PatchCore on the same normals", "graphcore+ev", "patchcore+ev"),
                 ("GraphCore defaults vs PatchCore", "graphcore", "patchcore")]
        parts = [f"{label} {100 * (m(a) - m(b)):+.1f}" for label, a, b in pairs
                 if m(a) is not None and m(b) is not None]
        if parts:
            out.append(f"- k = {k}: " + "; ".join(parts) + ".")
    return out


README_ROWS = ("patchcore", "patchcore+ev", "anomalib-patchcore", "graphcore", "graphcore+ev")


def readme_summary(saved: dict) -> str:
    """The README's view: the mean column of the main rows per k, and the rule's choices."""
    meta, table = saved["meta"], saved["table"]
    by = {(r["variant"], r["k"]): r for r in table}
    rows = [v for v in README_ROWS if v in meta["variants"]]
    lines = [f"`{meta['command'].strip()}`: seeds {meta['seeds']}, {meta['size']} px, image AUROC % on test defects "
             "of a family never used for training or selection (mean over brick, gravel, grass, textile and "
             + ("both directions" if meta.get("directions") != "first" else "one direction: the first family as evidence")
             + "; the textures' defects are generated, textile is simulated; full table and every part's "
             "effect in `bench/GRAPHCORE.md`):", "",
             "| k | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for k in meta["shots"]:
        lines.append(f"| {k} | " + " | ".join(_cell((by.get((v, k)) or {}).get("mean")) for v in rows) + " |")
    rule = saved["rule"]
    if rule:
        tot = {p: sum(r[p] for r in rule) for p in PARTS}
        fits = sum(r["fits"] for r in rule)
        lines += ["", f"The selection rule switched on, over {fits} fits with evidence: head {tot['head']}, "
                  f"global branch {tot['global']}, views {tot['views']}."]
    return "\n".join(lines) + "\n"


def write_outputs(saved: dict, md_path: str, *, readme: bool) -> str:
    md = markdown(saved)
    Path(md_path).write_text(md)
    if readme:
        splice(ROOT / "README.md", "graphcore_ablation", readme_summary(saved))
    return md


if __name__ == "__main__":
    sys.exit(main())
