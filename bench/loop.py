"""The learning loop on the sample products: a simulated shift, operator decisions, refits.

    .venv/bin/python bench/loop.py             # defaults below; bench/LOOP.md says how long the last run took
    .venv/bin/python bench/loop.py --quick     # smoke run (brick, short stream): writes bench/out/loop_quick.*
    .venv/bin/python bench/loop.py --render    # no compute: bench/LOOP.md + bench/loop.png from bench/out/loop.json

On a busy machine add ``--threads 1``: two torch threads competing with other processes for two
cores make every backbone pass many times slower than one thread does.

For each sample product (``brick``, ``gravel``, ``grass``: generated defects on crops of real
textures; ``textile``: simulated textile images with the source's own local/global defect images
and generated ones) and each detector (GraphCore, PatchCore), in a fresh data directory:

1. register the product from ``--shots`` normal images (``train/good`` of the seed-0 build);
2. stream the *stream split* through :meth:`StationService.inspect` in a seeded shuffled order
   (every image of the builds ``--stream-seeds`` but the shots, at most ``--max-stream``);
3. an oracle operator decides every NG and UNCERTAIN part and a ``--ok-sample`` fraction of the OK
   ones: it accepts a good part (an accepted NG or UNCERTAIN with the reason code
   ``false-alarm``: a plant's rule, which the station enforces for NG) and rejects a defect with a
   reason code from its defect type, painting the ground-truth mask when the sample has one
   (``--no-masks`` to leave masks out);
4. every ``--every`` decisions (and once at the end of the stream if decisions are pending)
   :meth:`StationService.refit` builds a version from the shots and the evidence and promotes
   it; the rest of the stream is inspected with it;
5. at the start and after each refit the active version is scored on the *evaluation split*
   (builds of other seeds, ``--eval-seeds``; images equal to a shot or a stream image dropped),
   which the loop never inspects: image AUROC, false-alarm rate (normals not OK), missed-defect
   rate (defects not NG) and escape rate (defects passed as OK).

"No loop" is the registered product without refits: its numbers are those of step 5 at zero
decisions, a flat line. The data are generated or simulated: the curves show what the loop does
with evidence, not how accurate it is on real parts. Writes ``bench/out/loop.json``,
``bench/LOOP.md`` and ``bench/loop.png`` (and splices the summary into the README between
``<!-- bench:loop -->`` markers when the README has them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench._markdown import splice  # noqa: E402

OPERATOR = "oracle"
#: the sample products' image size (their default build, the one the station ships); the backbone
#: input size is ``--size``
SAMPLE_PX = 256
#: reason code (inspector.station.store.REASON_CODES) the oracle gives per defect type
REASONS = {"stain": "stain", "scratch": "scratch", "misplaced": "missing-part", "local": "contamination",
           "global": "other", "synthetic": "other"}
METRICS = (("auroc", "image AUROC %", True), ("false_alarm_rate", "false alarms % (normals not OK)", False),
           ("missed_rate", "missed % (defects not NG)", False), ("escape_rate", "escaped % (defects OK)", False))
DATA_NOTE = ("The data are the bundled sample products: `brick`, `gravel`, `grass` are crops of scikit-image's "
             "real texture photographs with *generated* defects (Perlin stain, CutPaste, scar), and the stream "
             "and evaluation crops come from the same 512x512 photograph; `textile` is a *simulated* textile "
             "(conformal-clip-data) with its local/global defect images and generated ones. The operator is an "
             "oracle that never errs. These curves show what the loop does with evidence; they are not evidence "
             "of accuracy on real parts.")


@dataclass
class Part:
    """One image of a split, with what the oracle knows about it."""

    image: np.ndarray  # RGB uint8
    label: str  # "normal" | "defect"
    kind: str  # "good" or the defect type
    mask: np.ndarray | None  # HxW bool for defects with ground truth
    name: str
    sha: str


def _parts_of(folder: Path, *, skip_train: int = 0) -> list[Part]:
    """Every image of one sample build: train/good (after the first ``skip_train``), test/good, defects."""
    from inspector.data.mvtec import read_mask, read_mvtec
    from inspector.io import read_image
    from inspector.state import array_sha256

    f = read_mvtec(folder)
    out = []
    for p in f.train_good[skip_train:]:
        img = read_image(p)
        out.append(Part(img, "normal", "good", None, f"{folder.name}/train/{p.name}", array_sha256(img)))
    for p, label, mpath, kind in f.test_items():
        img = read_image(p)
        mask = read_mask(mpath, img.shape[:2]) if mpath is not None else None
        out.append(Part(img, "defect" if label else "normal", kind, mask, f"{folder.name}/test/{kind}/{p.name}",
                        array_sha256(img)))
    return out


def load_splits(product: str, shots: int, stream_seeds, eval_seeds, *, max_stream: int | None = None,
                max_eval: int | None = None, seed: int = 0) -> dict:
    """Shots, stream and evaluation split of one sample product (disjoint by image content)."""
    from inspector.data.mvtec import read_mvtec
    from inspector.io import read_image
    from inspector.state import array_sha256
    from inspector.synth.samples import build_sample

    base = build_sample(product, seed=0, size=SAMPLE_PX)
    shot_imgs = [read_image(p) for p in read_mvtec(base).train_good[:shots]]
    rng = np.random.default_rng([seed, 7])
    stream: list[Part] = []
    for s in stream_seeds:
        stream += _parts_of(build_sample(product, seed=s, size=SAMPLE_PX), skip_train=shots if s == 0 else 0)
    stream = _dedup(stream, set())
    seen = {array_sha256(im) for im in shot_imgs} | {p.sha for p in stream}
    evals: list[Part] = []
    for s in eval_seeds:
        evals += _parts_of(build_sample(product, seed=s, size=SAMPLE_PX))
    evals = _dedup(evals, seen)
    stream = [stream[i] for i in rng.permutation(len(stream))]
    evals = [evals[i] for i in rng.permutation(len(evals))]  # a cap keeps every kind
    if max_stream:
        stream = _balanced(stream, max_stream)
    if max_eval:
        evals = _balanced(evals, max_eval)
    return {"shots": shot_imgs, "stream": stream, "eval": evals}


def _dedup(parts: list[Part], seen: set[str]) -> list[Part]:
    out = []
    for p in parts:
        if p.sha not in seen:
            seen.add(p.sha)
            out.append(p)
    return out


def _balanced(parts: list[Part], n: int) -> list[Part]:
    """The first ``n`` parts keeping the normal/defect ratio (order kept)."""
    if len(parts) <= n:
        return parts
    nd = sum(p.label == "defect" for p in parts)
    want_d = max(1, round(n * nd / len(parts))) if nd else 0
    want = {"defect": want_d, "normal": n - want_d}
    out = []
    for p in parts:
        if want[p.label] > 0:
            want[p.label] -= 1
            out.append(p)
    return out


def evaluate(service, product: str, parts: list[Part], batch: int = 16) -> dict:
    """The active version on the evaluation split (scored directly: nothing is recorded)."""
    from inspector.eval.metrics import auroc

    prod = service.registry.get(product)
    scores, verdicts = [], []
    for i in range(0, len(parts), batch):
        for ins in prod.inspect([p.image for p in parts[i:i + batch]]):
            scores.append(float(ins.score))
            verdicts.append(str(ins.verdict))
    y = np.array([p.label == "defect" for p in parts])
    v = np.array(verdicts)
    a = auroc(np.array(scores, np.float32), y.astype(np.int64))
    return {"version": prod.version, "auroc": None if a is None else float(a),
            "false_alarm_rate": float(np.mean(v[~y] != "OK")) if (~y).any() else None,
            "missed_rate": float(np.mean(v[y] != "NG")) if y.any() else None,
            "escape_rate": float(np.mean(v[y] == "OK")) if y.any() else None,
            "uncertain_rate": float(np.mean(v == "UNCERTAIN")),
            "thresholds": prod.thresholds.to_dict()}


def run_one(product: str, detector: str, splits: dict, args, log=print) -> dict:
    """One simulated shift of one product and detector in a fresh data directory."""
    from inspector.station.service import StationService

    rng = np.random.default_rng([args.seed, 11])
    with tempfile.TemporaryDirectory(prefix=f"loop-{product}-{detector}-") as d, \
            contextlib.closing(StationService(d, device=args.device)) as service:  # close(): the shadow worker
        t0, c0 = time.perf_counter(), time.process_time()
        service.registry.register(product, splits["shots"], detector=detector, image_size=args.size,
                                  actor="bench/loop.py", seed=args.seed)
        register_s, register_cpu = time.perf_counter() - t0, time.process_time() - c0
        start = evaluate(service, product, splits["eval"])
        points = [{"decisions": 0, "inspected": 0, **start}]
        log(f"{product}/{detector}: registered in {register_s:.1f} s; {_fmt(start)}")
        decisions, pending, inspected = 0, 0, 0
        stream_log, refits = [], []
        inspect_s = 0.0

        def refit() -> None:
            nonlocal pending
            t, c = time.perf_counter(), time.process_time()
            try:
                r = service.refit(product, actor="bench/loop.py", promote=True)
            except Exception as exc:  # noqa: BLE001 - recorded: a refit that fails is a finding
                refits.append({"decisions": decisions, "error": f"{type(exc).__name__}: {exc}"})
                log(f"  refit at {decisions} decisions FAILED: {type(exc).__name__}: {exc}")
                pending = 0
                return
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            pending = 0
            ev = evaluate(service, product, splits["eval"])
            refits.append({"decisions": decisions, "inspected": inspected, "wall_s": round(wall, 2),
                           "cpu_s": round(cpu, 1),
                           "seconds": r.get("seconds"), "version": r.get("version"), "parent": r.get("parent"),
                           "promoted": r.get("promoted"), "evidence": r.get("evidence"), "table": r.get("table"),
                           "selection": r.get("selection")})
            points.append({"decisions": decisions, "inspected": inspected, "refit_s": round(wall, 2), **ev})
            log(f"  refit at {decisions} decisions ({r.get('evidence')}) in {wall:.1f} s -> {_fmt(ev)}")

        for part in splits["stream"]:
            t = time.perf_counter()
            rec = service.inspect(product, part.image, source=part.name, operator=OPERATOR)
            inspect_s += time.perf_counter() - t
            inspected += 1
            if rec.error:
                raise RuntimeError(f"{part.name}: {rec.error}")
            verdict = str(rec.verdict)
            draw = rng.random()  # drawn for every part: the OK sample does not depend on earlier verdicts
            decide = verdict != "OK" or draw < args.ok_sample
            entry = {"name": part.name, "label": part.label, "verdict": verdict, "score": rec.score,
                     "version": rec.model_version, "decision": None}
            if decide:
                if part.label == "normal":
                    service.decide(rec.id, "accept", OPERATOR, reason=None if verdict == "OK" else "false-alarm")
                    entry["decision"] = "accept"
                else:
                    kw = {"mask": part.mask} if part.mask is not None and not args.no_masks else {}
                    service.decide(rec.id, "reject", OPERATOR, reason=REASONS.get(part.kind, "other"), **kw)
                    entry["decision"] = "reject"
                decisions += 1
                pending += 1
            stream_log.append(entry)
            if pending >= args.every:
                refit()
        if pending:
            refit()
        summary = service.feedback_summary(product)
        versions = service.versions(product)
        kinds: dict[str, int] = {}
        for e in stream_log:
            if e["decision"]:
                k = f"{e['decision']} {e['verdict']}"
                kinds[k] = kinds.get(k, 0) + 1
        return {"decided": kinds, "product": product, "detector": detector, "register_s": round(register_s, 2),
                "register_cpu_s": round(register_cpu, 1),
                "inspect_ms": round(1e3 * inspect_s / max(1, inspected), 1), "decisions": decisions,
                "inspected": inspected, "points": points, "refits": refits, "stream": stream_log,
                "feedback_summary": _jsonable(summary), "versions": len(versions)}


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _fmt(m: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    return (f"AUROC {pct(m['auroc'])}, false alarms {pct(m['false_alarm_rate'])} %, missed {pct(m['missed_rate'])} %, "
            f"escaped {pct(m['escape_rate'])} %")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", nargs="+", default=["brick", "gravel", "grass", "textile"])
    p.add_argument("--detectors", nargs="+", default=["graphcore", "patchcore"])
    p.add_argument("--shots", type=int, default=4, help="normal shots the product is registered from")
    p.add_argument("--every", type=int, default=8, help="refit (and promote) after this many new decisions")
    p.add_argument("--ok-sample", type=float, default=0.25, help="fraction of OK parts the operator also decides")
    p.add_argument("--size", type=int, default=128, help="backbone input size (the sample images are 256 px)")
    p.add_argument("--stream-seeds", nargs="+", type=int, default=[0, 3, 4], help="sample builds streamed through the station")
    p.add_argument("--eval-seeds", nargs="+", type=int, default=[1, 2], help="sample builds held out for evaluation")
    p.add_argument("--max-stream", type=int, default=96, help="at most this many stream images per product "
                   "(normal/defect ratio kept)")
    p.add_argument("--max-eval", type=int, default=None, help="at most this many evaluation images per product")
    p.add_argument("--no-masks", action="store_true", help="the oracle paints no defect masks")
    p.add_argument("--seed", type=int, default=0, help="stream order, OK sampling and registration seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: brick only, 12 stream and 12 evaluation images, refit every 4 decisions; "
                        "writes bench/out/loop_quick.{json,md,png}")
    p.add_argument("--out", default=None, help="JSON (default bench/out/loop.json)")
    p.add_argument("--md", default=None, help="markdown (default bench/LOOP.md)")
    p.add_argument("--png", default=None, help="plot (default bench/loop.png)")
    p.add_argument("--render", action="store_true", help="no compute: markdown and plot from the --out JSON")
    args = p.parse_args(argv)
    out_dir = ROOT / "bench" / "out"
    if args.quick:
        args.products = ["brick"] if args.products == p.get_default("products") else args.products
        args.max_stream = 12 if args.max_stream == p.get_default("max_stream") else args.max_stream
        args.max_eval = args.max_eval or 12
        args.every = 4 if args.every == p.get_default("every") else args.every
    tag = "loop_quick" if args.quick else "loop"
    out = Path(args.out or out_dir / f"{tag}.json")
    md_path = Path(args.md or (out_dir / f"{tag}.md" if args.quick else ROOT / "bench" / "LOOP.md"))
    png_path = Path(args.png or (out_dir / f"{tag}.png" if args.quick else ROOT / "bench" / "loop.png"))
    if args.render:
        result = json.loads(out.read_text())
        write_outputs(result, md_path, png_path, readme=md_path == ROOT / "bench" / "LOOP.md")
        return 0

    import torch

    torch.set_num_threads(args.threads)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()[0]
    runs, data = [], {}
    for product in args.products:
        splits = load_splits(product, args.shots, args.stream_seeds, args.eval_seeds,
                             max_stream=args.max_stream, max_eval=args.max_eval, seed=args.seed)
        data[product] = {k: _split_counts(splits[k]) for k in ("stream", "eval")}
        data[product]["shots"] = len(splits["shots"])
        print(f"{product}: {len(splits['shots'])} shots, stream {data[product]['stream']}, "
              f"eval {data[product]['eval']}", flush=True)
        for det in args.detectors:
            runs.append(run_one(product, det, splits, args, log=lambda m: print(m, flush=True)))
    cmd = "python bench/loop.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "products": args.products, "detectors": args.detectors, "shots": args.shots,
            "every": args.every, "ok_sample": args.ok_sample, "size": args.size, "stream_seeds": args.stream_seeds,
            "eval_seeds": args.eval_seeds, "masks": not args.no_masks, "seed": args.seed, "device": args.device,
            "threads": args.threads, "wall_s": round(time.perf_counter() - t_all, 1),
            "cpu_s": round(time.process_time() - cpu_all, 1), "load_avg_1m_start": round(load_start, 2),
            "load_avg_1m_end": round(os.getloadavg()[0], 2), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "data": data}
    result = {"meta": meta, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    write_outputs(result, md_path, png_path, readme=md_path == ROOT / "bench" / "LOOP.md")
    print(f"wrote {out}, {md_path} and {png_path} ({meta['wall_s']:.0f} s wall, {meta['cpu_s']:.0f} s CPU)")
    return 0


def _split_counts(parts: list[Part]) -> dict:
    kinds: dict[str, int] = {}
    for p in parts:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return {"normal": sum(p.label == "normal" for p in parts), "defect": sum(p.label == "defect" for p in parts),
            "kinds": kinds}


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def write_outputs(result: dict, md_path: Path, png_path: Path, *, readme: bool) -> None:
    plot(result, png_path)
    md = markdown(result, png_path, md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    if readme:
        splice(ROOT / "README.md", "loop", readme_summary(result))
    print(md)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def plot(result: dict, path: Path) -> None:
    """Metric vs decisions: a row per metric, a column per product, a colour per detector; solid =
    loop, dashed = no loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    products = result["meta"]["products"]
    dets = result["meta"]["detectors"]
    fig, axes = plt.subplots(len(METRICS), len(products), figsize=(3.6 * len(products) + 1, 2.6 * len(METRICS)),
                             squeeze=False, sharex="col")
    colours = {d: f"C{i}" for i, d in enumerate(dets)}
    for j, prod in enumerate(products):
        for run in (r for r in result["runs"] if r["product"] == prod):
            pts = run["points"]
            xs = [q["decisions"] for q in pts]
            x_end = max(run["decisions"], xs[-1], 1)
            for i, (key, label, _) in enumerate(METRICS):
                ax = axes[i][j]
                ys = [np.nan if q[key] is None else 100 * q[key] for q in pts]
                c = colours[run["detector"]]
                ax.plot(xs, ys, "-o", color=c, ms=3.5, label=f"{run['detector']} loop")
                ax.plot([0, x_end], [ys[0], ys[0]], "--", color=c, alpha=0.7, label=f"{run['detector']} no loop")
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
                if i == 0:
                    ax.set_title(prod)
                if i == len(METRICS) - 1:
                    ax.set_xlabel("operator decisions")
                if key != "auroc":
                    ax.set_ylim(-4, 104)
                ax.grid(alpha=0.3)
                ax.tick_params(labelsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(labels), 2 * len(products)) or 1
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    m = result["meta"]
    fig.suptitle(f"Learning loop, sample products (generated/simulated defects)\nk = {m['shots']} shots, refit "
                 f"every {m['every']} decisions, {m['size']} px; held-out split", fontsize=9)
    fig.tight_layout(rect=(0, 0.025 * rows + 0.01, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _final(run: dict) -> dict:
    return run["points"][-1]


def losses(result: dict) -> list[str]:
    """Where the loop ends worse than no loop, or dips below it on the way (per product, detector, metric)."""
    out = []
    for run in result["runs"]:
        pts = run["points"]
        base, last = pts[0], pts[-1]
        tag = f"{run['product']}/{run['detector']}"
        if len(pts) == 1:
            out.append(f"{tag}: no refit happened ({run['decisions']} decisions)")
            continue
        for key, label, higher_better in METRICS:
            if base[key] is None or last[key] is None:
                continue
            worse = last[key] < base[key] if higher_better else last[key] > base[key]
            if worse:
                out.append(f"{tag}: {label.split(' (')[0]} ends at {_pct(last[key])} against {_pct(base[key])} "
                           f"without the loop")
                continue
            dips = [q for q in pts[1:-1] if q[key] is not None
                    and (q[key] < base[key] if higher_better else q[key] > base[key])]
            if dips:
                q = dips[0]
                out.append(f"{tag}: {label.split(' (')[0]} at {q['decisions']} decisions is {_pct(q[key])} against "
                           f"{_pct(base[key])} without the loop (recovers by the end)")
        failed = [r for r in run["refits"] if r.get("error")]
        if failed:
            out.append(f"{tag}: {len(failed)} refit(s) failed: {failed[0]['error']}")
    return out


def markdown(result: dict, png_path: Path, md_path: Path) -> str:
    m = result["meta"]
    try:
        img = os.path.relpath(png_path, md_path.parent)
    except ValueError:
        img = str(png_path)
    where = (f"{m['device']}, {m['threads']} torch threads, {m.get('cpu_count')} CPUs on the machine, 1-min load "
             f"average {m['load_avg_1m_start']} at the start and {m['load_avg_1m_end']} at the end")
    lines = [
        "## Learning loop (bench/loop.py)",
        "",
        f"`{m['command']}`: {where}; torch {m['torch']}; whole run {m['wall_s']:.0f} s wall, {m['cpu_s']:.0f} s "
        "CPU. Timings on a loaded machine are upper bounds.",
        "",
        f"**What the data is.** {DATA_NOTE}",
        "",
        f"**Setup.** EfficientNet-Lite0 at {m['size']} px (sample images {SAMPLE_PX} px); each product registered from k = {m['shots']} normal "
        f"shots; stream = sample builds {m['stream_seeds']} (less the shots), inspected through "
        "`StationService.inspect` in a seeded shuffled order; the oracle decides every NG and UNCERTAIN part and "
        f"{100 * m['ok_sample']:.0f} % of the OK ones (accept good parts, an accepted NG/UNCERTAIN with reason "
        "`false-alarm`; reject defects with a reason code" + (", painting the ground-truth mask where the sample "
                                                             "has one" if m["masks"] else "") + "); "
        f"`StationService.refit(promote=True)` every {m['every']} decisions and once at the end of the stream. "
        f"Evaluation split = sample builds {m['eval_seeds']}, images equal to a shot or stream image removed; "
        "never inspected by the loop. False alarms = normals not OK; missed = defects not NG (UNCERTAIN "
        "counts as missed); escaped = defects passed as OK. No loop = the registered product at 0 decisions.",
        "",
        "| product | stream normal / defect | evaluation normal / defect |",
        "|---|---|---|",
    ]
    for prod, d in m["data"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(d["eval"]["kinds"].items()) if k != "good")
        lines.append(f"| {prod} | {d['stream']['normal']} / {d['stream']['defect']} | "
                     f"{d['eval']['normal']} / {d['eval']['defect']} ({kinds}) |")
    lines += ["", f"![learning loop]({img})", "",
              "Image AUROC, false-alarm, missed and escape rates in % on the evaluation split: no loop -> "
              "after the last refit. Refit s = wall seconds of each `refit` call (build, cross-validation, "
              "save; mean / max; in brackets the mean CPU seconds of the process, which a busy machine "
              "inflates less); evidence = confirmed normals / defects the last refit used.", "",
              "| product | detector | decisions | refits | AUROC | false alarms | missed | escaped | refit s | "
              "evidence | register s | inspect ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        base, last = run["points"][0], _final(run)
        ok = [r for r in run["refits"] if not r.get("error")]
        secs = [r["wall_s"] for r in ok]
        cpus = [r["cpu_s"] for r in ok if r.get("cpu_s") is not None]
        ev = ok[-1].get("evidence") if ok else None
        evs = "-" if not ev else f"{ev.get('normal', '-')} / {ev.get('defect', '-')}"
        cells = [f"{_pct(base[k])} -> {_pct(last[k])}" for k, _, _ in METRICS]
        lines.append(f"| {run['product']} | {run['detector']} | {run['decisions']} | {len(ok)}"
                     + (f" ({len(run['refits']) - len(ok)} failed)" if len(ok) < len(run["refits"]) else "")
                     + " | " + " | ".join(cells)
                     + f" | {'-' if not secs else f'{np.mean(secs):.1f} / {max(secs):.1f}'}"
                     + (f" ({np.mean(cpus):.0f})" if cpus else "") + f" | {evs} | "
                       f"{run['register_s']:.1f} | {run['inspect_ms']:.0f} |")
    lines += ["", "Per refit (decisions so far: AUROC / false alarms / missed / escaped %, refit seconds):", ""]
    for run in result["runs"]:
        steps = [f"{q['decisions']}: {_pct(q['auroc'])} / {_pct(q['false_alarm_rate'])} / {_pct(q['missed_rate'])}"
                 f" / {_pct(q['escape_rate'])}" + (f" ({q['refit_s']:.1f} s)" if "refit_s" in q else "")
                 for q in run["points"]]
        dec = ", ".join(f"{k} {v}" for k, v in sorted(run.get("decided", {}).items()))
        lines.append(f"- {run['product']}/{run['detector']}: " + "; ".join(steps)
                     + (f". Decisions (decision, verdict shown): {dec}" if dec else ""))
    same = []
    for prod in m["products"]:
        starts = [r for r in result["runs"] if r["product"] == prod]
        keys = [tuple(r["points"][0][k] for k, _, _ in METRICS) for r in starts]
        if len(starts) > 1 and len(set(keys)) == 1:
            same.append(prod)
    if same:
        lines += ["", f"At registration all detectors score the same on {', '.join(same)} (their no-loop lines "
                  "overlap): with no confirmed defects nothing optional of GraphCore is switched on "
                  "(`fit_info['selection']`), so it starts as its plain memory bank."]
    lost = losses(result)
    lines += ["", "**Where the loop loses** (against the same product without refits, on the evaluation split):", ""]
    lines += [f"- {x}" for x in lost] if lost else ["- nowhere in this run."]
    return "\n".join(lines) + "\n"


def readme_summary(result: dict) -> str:
    m = result["meta"]
    rows = ["![learning loop](bench/loop.png)", "",
            f"`{m['command']}` ({m['wall_s']:.0f} s): k = {m['shots']} shots, refit every {m['every']} operator "
            "decisions; image AUROC % on a held-out split, no loop -> loop (sample products: generated / simulated "
            "defects, see [bench/LOOP.md](bench/LOOP.md)):", "",
            "| product | " + " | ".join(m["detectors"]) + " |", "|---|" + "---|" * len(m["detectors"])]
    for prod in m["products"]:
        cells = []
        for det in m["detectors"]:
            run = next((r for r in result["runs"] if r["product"] == prod and r["detector"] == det), None)
            cells.append("-" if run is None else
                         f"{_pct(run['points'][0]['auroc'])} -> {_pct(_final(run)['auroc'])}")
        rows.append(f"| {prod} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
