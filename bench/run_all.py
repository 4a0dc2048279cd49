"""Every detector on the bundled sample products: one table, accuracy + speed.

    .venv/bin/python bench/run_all.py                     # CPU defaults (see below), ~3-5 min on 2 cores
    .venv/bin/python bench/run_all.py --device cuda --image-size 256 --seeds 0 1 2 3 4

Runs, on the sample products ``brick`` (texture, pixel masks) and ``textile`` (image-labelled
local/global defects + masked synthetic ones), with the default backbone (EfficientNet-Lite0):

* ``graphcore``, the in-run baseline ``patchcore`` (PatchCore kNN, same backbone, layers and
  shots) and ``patchcore-aug`` (PatchCore on GraphCore's bank of augmented views): few-shot,
  k = 1, 2, 4 normal images drawn from ``train/good`` with each seed;
* ``musc``: zero-shot, all test images of a product as the mutual set;
* ``anomalyclip``: zero-shot with a prompt checkpoint and CLIP weights from ``models/``; without
  them its row says what is missing;
* ``anomalib-patchcore``: anomalib's own PatchCore model on the same Lite0 ImageNet weights
  (9 neighbours; coreset off for few-shot banks), and ``anomalib-patchcore-wrn50``: anomalib's
  stock wide_resnet50_2 configuration, and ``anomalib-winclip`` (zero-shot WinCLIP), which both need
  a weight download (a row says so offline).

``--graphcore-ablation [ARGS]`` runs ``bench/graphcore_ablation.py`` instead (what each optional
GraphCore part buys on brick/gravel/grass/textile when confirmed evidence of one defect family
meets test defects of another; writes ``bench/GRAPHCORE.md``).

Prints one table, writes ``bench/out/results.json`` (every run, the summary, the machine),
``bench/out/plots/`` (ROC/PR curves and example heatmaps) and ``bench/RESULTS.md`` (the table and
the command that reproduced it). Metrics in percent, mean ± sample std over seeds; the ``mean``
rows average the two products per seed first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DETECTORS = ("graphcore", "patchcore", "patchcore-aug", "musc", "anomalyclip", "anomalib-patchcore",
             "anomalib-patchcore-wrn50", "anomalib-winclip")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", nargs="+", default=["brick", "textile"])
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    p.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--image-size", type=int, default=None,
                   help="backbone input size; default 256 on CUDA, 128 on CPU (keeps the run to minutes on 2 cores)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: CUDA when present)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--graphcore-ablation", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="instead of the table: run bench/graphcore_ablation.py with ARGS (PatchCore with and "
                        "without confirmed normals, augmented PatchCore, anomalib PatchCore, GraphCore's defaults, "
                        "its selection rule on confirmed evidence, each optional part forced on; writes "
                        "bench/GRAPHCORE.md)")
    p.add_argument("--from-json", metavar="FILE", default=None,
                   help="re-render the table and RESULTS.md from a results.json of an earlier run (no compute)")
    args = p.parse_args(argv)
    if args.graphcore_ablation is not None:
        sys.path.insert(0, str(ROOT / "bench"))
        import graphcore_ablation

        return graphcore_ablation.main(args.graphcore_ablation)
    if args.from_json:
        return rerender(Path(args.from_json), Path(args.results_md))

    import torch
    from rich.console import Console

    from inspector.eval.data import find_classes
    from inspector.eval.runner import EvalConfig, evaluate, resolve_device
    from inspector.eval.tables import rich_table
    from inspector.synth.samples import build_sample

    console = Console(width=None if sys.stdout.isatty() else 240)
    device = resolve_device(args.device)
    size = args.image_size or (256 if device.type == "cuda" else 128)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    classes = []
    for name in args.products:
        classes += find_classes(build_sample(name))
    cfg = EvalConfig(detectors=args.detectors, shots=tuple(args.shots), seeds=tuple(args.seeds),
                     backbone=args.backbone, device=str(device), image_size=size, plots=not args.no_plots)
    out = Path(args.out)
    report = evaluate(classes, cfg, out_dir=None if args.no_plots else out / "plots", log=console.print)
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    summary = report.summary()
    env = report.environment
    where = env.get("gpu") or f"{env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    title = f"inspector bench/run_all.py: {', '.join(args.products)} | {args.backbone} @ {size}px | {device} | {where}"
    console.print(rich_table(summary, title=title))
    console.print(f"metrics %, mean±std over seeds {list(args.seeds)}; k=0: zero-shot; fit s; bb/det ms per image "
                  f"(det includes its backbone passes); +MB: peak {'CUDA allocated' if device.type == 'cuda' else 'RSS'} "
                  f"rise during fit+score. Total {wall:.0f} s wall, {cpu:.0f} s CPU.")

    out.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python bench/run_all.py", *(argv if argv is not None else sys.argv[1:])]).strip()
    js = report.to_json()
    js.update({"command": cmd, "image_size": size, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "products": {n: {"path": str(build_sample(n)), "recipe": _recipe(build_sample(n))}
                            for n in args.products}})
    (out / "results.json").write_text(json.dumps(js, indent=2) + "\n")
    md = results_markdown(summary, report, cmd, size, str(device), wall, cpu, torch.__version__)
    Path(args.results_md).write_text(md)
    console.print(f"wrote {out / 'results.json'} and {args.results_md}")
    return 0


def _recipe(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("recipe")
    except (OSError, ValueError):
        return None


def rerender(path: Path, results_md: Path) -> int:
    """Table + RESULTS.md from a saved results.json (same numbers, current formatting)."""
    from types import SimpleNamespace

    import torch
    from rich.console import Console

    from inspector.eval.runner import EvalConfig, RunRecord
    from inspector.eval.tables import rich_table, summarize

    js = json.loads(path.read_text())
    runs = [RunRecord(**r) for r in js["runs"]]
    cfg = js["config"]
    report = SimpleNamespace(environment=js["environment"], classes=js["classes"],
                             config=EvalConfig(backbone=cfg["backbone"], seeds=tuple(cfg["seeds"])))
    summary = summarize(runs)
    Console(width=None if sys.stdout.isatty() else 240).print(rich_table(summary, title=f"{path} (re-rendered)"))
    md = results_markdown(summary, report, js["command"], js["image_size"], js["environment"]["device"],
                          js["wall_s"], js.get("cpu_s") or 0.0, js["environment"].get("torch", torch.__version__))
    results_md.write_text(md)
    print(f"wrote {results_md}")
    return 0


def results_markdown(summary, report, cmd: str, size: int, device: str, wall: float, cpu: float,
                     torch_version: str) -> str:
    from inspector.eval.tables import markdown_table

    cuda = device.startswith("cuda")
    env = report.environment
    machine = env.get("gpu") or f"{env['cpu']}, {env['cpu_count']} cores ({env['torch_threads']} torch threads)"
    skipped = {}
    rows = []
    for r in summary:
        r = dict(r)
        if r["reason"]:
            r["reason"] = r["reason"].replace(str(ROOT) + os.sep, "")
        if r["status"] in ("skipped", "failed") and r["reason"]:
            skipped.setdefault(r["detector"], f"{r['status']}: {r['reason']}")
            r["reason"] = "not run, see below"
        rows.append(r)
    counts = ", ".join(f"{c['name']}: {c['train_good']} train/good, {c['test_good']} good + {c['test_defect']} "
                       f"defective test images ({', '.join(c['masked_types']) or 'no'} with masks"
                       + (f"; {', '.join(c['unmasked_types'])} image labels only" if c["unmasked_types"] else "")
                       + ")" for c in report.classes)
    lines = [
        "## Results",
        "",
        f"Sample products ({counts}), backbone `{report.config.backbone}` at {size} px, device `{device}` "
        f"({machine}), torch {torch_version}, anomalib {env.get('anomalib', '?')}. "
        f"Whole run: {wall:.0f} s wall clock, {cpu:.0f} s CPU time; 1-minute load average {env.get('load_avg_1m_start')} at the start and "
        f"{env.get('load_avg_1m')} at the end"
        + (" (other jobs shared the CPU: timings are upper bounds)." if (env.get("load_avg_1m") or 0)
           > 1.5 * (env.get("cpu_count") or 1) else "."),
        "",
        "Reproduce (writes this table, `bench/out/results.json` and curves/heatmaps in `bench/out/plots/`):",
        "",
        "```bash",
        f"make setup && .venv/bin/{cmd}",
        "```",
        "",
        markdown_table(rows),
        "",
        "Columns: I- image-level, P- pixel-level metrics in %; AUPRO@30 = area under the per-region-overlap "
        "curve up to 30 % FPR, normalised; F1max = best F1 over thresholds (anomalib 2.7 metric classes). "
        f"Few-shot rows: mean ± sample std over seeds {list(report.config.seeds)} (k normal images drawn from "
        "`train/good` per seed); k=0: zero-shot (MuSc scores all test images of a product against each "
        "other). `mean` rows average the products within each seed, then over seeds. Pixel metrics use the "
        "test images whose masks are known (textile `local`/`global` carry image labels only). "
        "Timing in the same run: `bb ms/img` = backbone forward alone, `det ms/img` = the detector's "
        "`score` wall time per image (includes its one backbone pass), "
        "`fit s` = fit on the k shots, `+MB` = peak memory rise during fit + score "
        f"({'CUDA max allocated' if cuda else 'process RSS sampled every 2 ms; freed memory is reused, so later runs in one process can show less than their own need'}).",
        "",
        "`anomalib-patchcore` is anomalib's own `PatchcoreModel` (9 neighbours, its score re-weighting and "
        "map smoothing; coreset off, since k shots give only k x h x w patches) on timm "
        "`tf_efficientnet_lite0` carrying the same Lite0 ImageNet weights as the other detectors (keys "
        "renamed, strict load; classifier logits identical to inspector's Lite0), layers `blocks.2` + "
        "`blocks.4` (stride 8 + 16, PatchCore's layer2 + layer3 recipe).",
    ]
    if skipped:
        lines += ["", "Not run here:", ""]
        lines += [f"- `{d}`: {why}" for d, why in skipped.items()]
    lines += [
        "",
        "The same harness on any MVTec-layout folder (MVTec AD, VisA converted, generated sets; one class "
        "folder or a root of classes), with JSON output and ROC/PR curves + example heatmaps as PNG:",
        "",
        "```bash",
        ".venv/bin/inspector eval --data /path/to/mvtec_ad --detector graphcore patchcore musc \\",
        "    --shots 1 2 4 8 --seeds 0 1 2 --device cuda --json eval.json --out eval_plots",
        "```",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
