"""Batch reports: ``results.csv`` (one row per file) and a self-contained ``report.html``.

The HTML has no external references: the score histogram (matplotlib, Agg via the
object-oriented API, so it never touches a GUI backend or pyplot state) and the heatmap
thumbnails of the worst images are inline PNGs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from pathlib import Path

import cv2
import numpy as np

from inspector.paths import decode_source
from inspector.verdict import ERROR

CSV_FIELDS = ("relpath", "verdict", "score", "error", "heatmap_path", "image_sha256", "latency_ms",
              "created_at", "model_version", "id", "source")
VERDICT_COLOURS = {"OK": "#2e7d32", "UNCERTAIN": "#f9a825", "NG": "#c62828", ERROR: "#616161"}
N_WORST = 12
THUMB = 256


def _relpath(source: str, folder: str | None) -> str:
    if folder:
        try:
            return str(Path(source).relative_to(folder))
        except ValueError:
            pass
    return source


def write_csv(rows: list[dict], path: str | os.PathLike, folder: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: _relpath(r["source"], folder))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            d = dict(r)
            d["relpath"] = _relpath(r["source"], folder)
            if d.get("created_at") is not None:
                d["created_at"] = d["created_at"].isoformat()
            w.writerow(d)
    os.replace(tmp, path)
    return path


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def histogram_png(scores_by_verdict: dict[str, list[float]], thresholds=None, title: str = "") -> str:
    """Base64 PNG of the score histogram, coloured by verdict, with the thresholds marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    allv = [s for v in scores_by_verdict.values() for s in v]
    if allv:
        lo, hi = float(min(allv)), float(max(allv))
        if thresholds is not None:
            lo, hi = min(lo, thresholds.ok_below), max(hi, thresholds.ng_above)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
        data = [(v, s) for v, s in scores_by_verdict.items() if s]
        ax.hist([s for _, s in data], bins=bins, stacked=True, label=[v for v, _ in data],
                color=[VERDICT_COLOURS.get(v, "#1565c0") for v, _ in data])
    if thresholds is not None:
        ax.axvline(thresholds.ok_below, color=VERDICT_COLOURS["UNCERTAIN"], ls="--", label="ok_below")
        ax.axvline(thresholds.ng_above, color=VERDICT_COLOURS["NG"], ls="--", label="ng_above")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return _png_b64(fig)


def _thumb_b64(path: str | None, source: str) -> str | None:
    """Heatmap PNG (or, failing that, the source image) as a base64 thumbnail."""
    for p in (path, source):
        p = decode_source(p) if p else p  # stored text -> the real name (any bytes)
        if not p or not Path(p).is_file():
            continue
        try:  # not cv2.imread: it crashes on a non-UTF-8 file name
            img = cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_COLOR)
        except (OSError, cv2.error):
            img = None
        if img is None:
            continue
        h, w = img.shape[:2]
        s = THUMB / max(h, w)
        if s < 1:
            img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".png", img)
        if ok:
            return base64.b64encode(buf.tobytes()).decode()
    return None


def write_html(rows: list[dict], path: str | os.PathLike, summary=None, product=None,
               folder: str | None = None, n_worst: int = N_WORST) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    thresholds = getattr(product, "thresholds", None)
    scored = [r for r in rows if r["verdict"] != ERROR and r["score"] is not None]
    errors = sorted((r for r in rows if r["verdict"] == ERROR), key=lambda r: r["source"])
    by_verdict: dict[str, list[float]] = {}
    for r in scored:
        by_verdict.setdefault(r["verdict"], []).append(float(r["score"]))
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("OK", "UNCERTAIN", "NG", ERROR)}
    title = f"Batch report: {esc(getattr(product, 'name', '') or '')}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px}"
             ".v{font-weight:bold;color:#fff;padding:2px 6px;border-radius:3px}"
             ".grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:260px;font-size:12px;word-break:break-all}"
             "</style></head><body>", f"<h1>{title}</h1>"]
    info = []
    if summary is not None:
        info += [("batch id", summary.batch_id), ("folder", summary.folder), ("product version", summary.version),
                 ("files", summary.n_files), ("recorded this run", summary.n_new),
                 ("skipped (already recorded)", summary.n_skipped),
                 ("throughput this run", f"{summary.images_per_s} files/s over {summary.elapsed_s} s")]
    if thresholds is not None:
        info += [("thresholds", f"OK below {thresholds.ok_below:.6g}, NG at or above {thresholds.ng_above:.6g}"),
                 ("detector / backbone", f"{product.detector} / {product.backbone} @ {product.image_size}px")]
    info += [(f"verdict {k}", v) for k, v in counts.items()]
    parts.append("<table>" + "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in info)
                 + "</table>")
    if scored:
        parts.append("<h2>Score histogram</h2>")
        parts.append(f"<img alt='score histogram' src='data:image/png;base64,{histogram_png(by_verdict, thresholds)}'>")
        worst = sorted(scored, key=lambda r: -float(r["score"]))[:n_worst]
        parts.append(f"<h2>Worst {len(worst)} images</h2><div class='grid'>")
        for r in worst:
            b64 = _thumb_b64(r.get("heatmap_path"), r["source"])
            img = f"<img alt='heatmap' src='data:image/png;base64,{b64}'>" if b64 else "<i>no image</i>"
            colour = VERDICT_COLOURS.get(r["verdict"], "#000")
            parts.append(f"<div class='card'>{img}<br><span class='v' style='background:{colour}'>{esc(r['verdict'])}"
                         f"</span> {float(r['score']):.6g}<br>{esc(_relpath(r['source'], folder))}</div>")
        parts.append("</div>")
    if errors:
        parts.append(f"<h2>Files not scored ({len(errors)})</h2><table><tr><th>file</th><th>reason</th></tr>")
        parts += [f"<tr><td>{esc(_relpath(r['source'], folder))}</td><td>{esc(r['error'] or '')}</td></tr>"
                  for r in errors]
        parts.append("</table>")
    parts.append("</body></html>")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_reports(rows: list[dict], out_dir: str | os.PathLike, summary=None, product=None) -> tuple[Path, Path]:
    out = Path(out_dir)
    folder = getattr(summary, "folder", None)
    return (write_csv(rows, out / "results.csv", folder),
            write_html(rows, out / "report.html", summary, product, folder))


__all__ = ["CSV_FIELDS", "histogram_png", "write_csv", "write_html", "write_reports"]
