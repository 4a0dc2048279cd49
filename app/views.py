"""Presentation helpers for the station: HTML badges, the calibration plot, tables.

Pure functions of values the library already computed; nothing here scores or decides.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import numpy as np
import pandas as pd

CSS = """
.gradio-container {width: 100% !important; max-width: 1440px !important; margin: 0 auto !important}
#station-header h1 {margin-bottom: 0}
#station-header p {margin-top: 2px; color: var(--body-text-color-subdued)}
.verdict-box {border-radius: 14px; padding: 22px 8px; text-align: center; color: #fff;
  font-weight: 800; letter-spacing: .03em; line-height: 1; font-size: clamp(1.6rem, 2.6vw, 3.4rem);
  box-shadow: 0 2px 6px rgba(0,0,0,.12); overflow-wrap: anywhere}
.verdict-OK {background: #15803d}
.verdict-UNCERTAIN {background: #f59e0b; color: #1f2937}
.verdict-NG {background: #dc2626}
.verdict-ERROR {background: #475569}
.verdict-NONE {background: var(--block-background-fill); color: var(--body-text-color-subdued);
  border: 2px dashed var(--border-color-primary); font-size: 1.4rem; font-weight: 600;
  box-shadow: none; letter-spacing: 0}
.verdict-meta {display: flex; justify-content: space-between; flex-wrap: wrap; gap: 6px 14px;
  margin-top: 10px; font-size: .95rem; color: var(--body-text-color)}
.verdict-meta b {font-variant-numeric: tabular-nums}
.verdict-error {margin-top: 8px; color: #b91c1c; font-size: .9rem; word-break: break-word}
.cam-state {display: inline-block; padding: 4px 12px; border-radius: 999px; font-weight: 700;
  font-size: .9rem; color: #fff}
.cam-live {background: #15803d} .cam-error {background: #dc2626}
.cam-reconnecting {background: #f59e0b; color: #1f2937} .cam-idle, .cam-closed {background: #64748b}
.cam-detail {margin-top: 6px; font-size: .88rem; color: var(--body-text-color-subdued); word-break: break-word}
.counts {display: grid; grid-template-columns: repeat(4, 1fr); gap: 8px}
.counts div {border-radius: 10px; padding: 10px 4px; text-align: center; font-size: .8rem;
  font-weight: 600; color: #fff}
.counts b {display: block; font-size: 1.9rem; font-variant-numeric: tabular-nums}
.counts .c-ok {background: #15803d} .counts .c-unc {background: #f59e0b; color: #1f2937}
.counts .c-ng {background: #dc2626} .counts .c-err {background: #475569}
#inspect-overlay img, #live-image img {width: 100%; height: 100%; object-fit: contain}
.note {font-size: .9rem; color: var(--body-text-color-subdued)}
.verdict-STALE {background: #94a3b8; color: #f8fafc; font-size: clamp(1.2rem, 2vw, 2.2rem)}
.verdict-stale-why {margin-top: 8px; padding: 8px 10px; border-radius: 8px; background: #fef3c7;
  color: #78350f; font-weight: 600; font-size: .95rem; word-break: break-word}
.verdict-stale-last {margin-top: 6px; font-size: .9rem; color: var(--body-text-color-subdued)}
.cam-box {border-radius: 14px; padding: 16px 8px; text-align: center; color: #fff; font-weight: 800;
  font-size: clamp(1.3rem, 2.2vw, 2.6rem); line-height: 1; letter-spacing: .03em}
.cam-box.cam-live {background: #15803d} .cam-box.cam-error {background: #b45309}
.cam-box.cam-reconnecting, .cam-box.cam-lost {background: #dc2626} .cam-box.cam-failed {background: #7f1d1d}
.cam-box.cam-idle, .cam-box.cam-closed {background: #64748b}
.cam-box small {display: block; font-size: .8rem; font-weight: 600; margin-top: 6px; letter-spacing: 0;
  color: #fff !important; overflow-wrap: anywhere}
.colorbar {margin-top: 4px; font-size: .8rem}
.colorbar .bar {position: relative; height: 14px; border-radius: 4px; border: 1px solid var(--border-color-primary)}
.colorbar .tick {position: absolute; top: -3px; bottom: -3px; width: 2px}
.colorbar .labels {position: relative; height: 1.4em}
.colorbar .labels span {position: absolute; transform: translateX(-50%); white-space: nowrap}
.decision-trail {font-size: .9rem} .decision-trail td, .decision-trail th {padding: 2px 6px}
.decision-pending {padding: 8px 10px; border-radius: 8px; background: #fef3c7; color: #78350f; font-weight: 600}
.startup {padding: 10px 14px; border-radius: 10px; background: #dbeafe; color: #1e3a8a; font-weight: 600}
.startup.done {display: none}
.startup.failed {background: #fee2e2; color: #7f1d1d}
.evidence-counts, .shadow-tally .tally {display: grid; grid-template-columns: repeat(2, 1fr); gap: 8px}
.shadow-tally .tally {grid-template-columns: repeat(4, 1fr)}
.evidence-counts div, .shadow-tally .tally div {border-radius: 10px; padding: 10px 4px; text-align: center;
  font-size: .85rem; font-weight: 600}
.evidence-counts .c-ok {background: #dcfce7; color: #14532d} .evidence-counts .c-ng {background: #fee2e2; color: #7f1d1d}
.shadow-tally .tally div {background: var(--block-background-fill); border: 1px solid var(--border-color-primary)}
.evidence-counts b, .shadow-tally .tally b {display: block; font-size: 1.7rem; font-variant-numeric: tabular-nums}
.evidence-per-version {font-size: .9rem} .evidence-per-version td, .evidence-per-version th {padding: 2px 8px}
#learning-status {min-height: 110px; font-size: 1rem}
#learning-status .progress-bar-wrap {width: 92% !important; height: 18px !important; border-radius: 6px}
#learning-status .progress-level-inner {font-size: .95rem !important; font-family: inherit !important;
  font-weight: 600}
#learning-confirm {border: 2px solid #b45309; border-radius: 10px; padding: 8px; background: #fffbeb}
#learning-active {padding: 8px 12px; border-radius: 8px; background: #dbeafe; color: #1e3a8a; font-weight: 600}
.reason-required {padding: 8px 10px; border-radius: 8px; background: #fee2e2; color: #7f1d1d; font-weight: 600}
"""

#: Keyboard shortcuts (A accept, R reject, N next, Esc cancel): they click the visible button with
#: the matching class, never while typing in a field. A mouse click on a button drops its focus, so a
#: later Enter cannot re-run it (an accidental second inspection).
SHORTCUTS_JS = """
<script>
(() => {
  if (window.__inspectorKeys) return; window.__inspectorKeys = true;
  const visible = (el) => el && el.offsetParent !== null && !el.disabled;
  const press = (cls) => { const b = [...document.querySelectorAll('.' + cls + ' , button.' + cls)]
      .find(visible); if (b) { b.click(); return true; } return false; };
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target, tag = (t && t.tagName || '').toLowerCase();
    if (tag === 'input' || tag === 'textarea' || tag === 'select' || (t && t.isContentEditable)) return;
    const map = {a: 'kbd-accept', r: 'kbd-reject', n: 'kbd-next', escape: 'kbd-cancel'};
    const cls = map[e.key.toLowerCase()];
    if (cls && press(cls)) { e.preventDefault(); }
  }, true);
  document.addEventListener('click', (e) => {
    const b = e.target && e.target.closest && e.target.closest('button');
    if (b && e.detail > 0) b.blur();  // a real mouse click (detail > 0), not Enter/Space
  }, true);
})();
</script>
"""

_VERDICTS = ("OK", "UNCERTAIN", "NG", "ERROR")


def _fmt(x: float | None, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{nd}g}"


def verdict_html(verdict: str | None = None, *, score: float | None = None, thresholds=None,
                 latency_ms: float | None = None, inspection_id: int | None = None,
                 error: str | None = None, product: str | None = None, placeholder: str | None = None,
                 stale: str | None = None) -> str:
    """The large OK / UNCERTAIN / NG badge with score, thresholds and latency below it.

    ``stale`` (a reason: camera lost, stopped...) greys the area out: the last verdict is named
    only as history under a "no current verdict" box, never in its colour."""
    if stale:
        out = ('<div class="verdict-box verdict-STALE" data-verdict="" data-stale="1">NO CURRENT VERDICT</div>'
               f'<div class="verdict-stale-why">{html.escape(stale)}</div>')
        if verdict is not None or error:
            last = "ERROR" if error and verdict is None else str(getattr(verdict, "value", verdict))
            bits = [f"last result {html.escape(last)}"]
            if score is not None:
                bits.append(f"score {_fmt(score)}")
            if inspection_id is not None:
                bits.append(f"#{int(inspection_id)}")
            if product:
                bits.append(html.escape(product))
            out += '<div class="verdict-stale-last">' + " · ".join(bits) + " (not current)</div>"
        return out
    if verdict is None and error is None:
        text = html.escape(placeholder or "No inspection yet")
        return f'<div class="verdict-box verdict-NONE" data-verdict="">{text}</div>'
    v = "ERROR" if error and verdict not in _VERDICTS[:3] else str(getattr(verdict, "value", verdict) or "ERROR")
    meta = []
    if score is not None:
        meta.append(f"score <b>{_fmt(score)}</b>")
    if thresholds is not None:
        meta.append(f"OK &lt; <b>{_fmt(thresholds.ok_below)}</b> · NG ≥ <b>{_fmt(thresholds.ng_above)}</b>")
    if latency_ms is not None:
        meta.append(f"<b>{latency_ms:.0f}</b> ms")
    if inspection_id is not None:
        meta.append(f"#{int(inspection_id)}")
    if product:
        meta.insert(0, html.escape(product))
    out = f'<div class="verdict-box verdict-{v}" data-verdict="{v}">{v}</div>'
    if meta:
        out += '<div class="verdict-meta">' + "".join(f"<span>{m}</span>" for m in meta) + "</div>"
    if error:
        out += f'<div class="verdict-error">{html.escape(str(error))}</div>'
    return out


def camera_html(status: dict | None, extra: str | None = None) -> str:
    if not status:
        return '<span class="cam-state cam-idle" data-state="idle">STOPPED</span>'
    state = status.get("state", "idle")
    label = {"live": "LIVE", "error": "FRAME ERROR", "reconnecting": "RECONNECTING", "idle": "IDLE",
             "closed": "STOPPED"}.get(state, state.upper())
    detail = (f"{html.escape(str(status.get('source', '')))} · frames {status.get('frames', 0)} · "
              f"errors {status.get('errors', 0)} · reconnects {status.get('reconnects', 0)}")
    out = f'<span class="cam-state cam-{state}" data-state="{state}">{label}</span>'
    out += f'<div class="cam-detail">{detail}</div>'
    err = status.get("last_error") or extra
    if err:
        out += f'<div class="cam-detail verdict-error">{html.escape(str(err))}</div>'
    return out


CAMERA_LABELS = {"live": "CAMERA LIVE", "error": "FRAME ERROR", "reconnecting": "CAMERA LOST",
                 "idle": "CAMERA IDLE", "closed": "CAMERA STOPPED", "failed": "SETUP ERROR",
                 "starting": "STARTING"}


def camera_box(state: str | None, detail: str | None = None, status: dict | None = None) -> str:
    """The camera state as large as the verdict badge (an operator must see a dead camera first)."""
    state = state or "closed"
    label = CAMERA_LABELS.get(state, state.upper())
    lines = []
    if detail:
        lines.append(html.escape(detail))
    if status:
        lines.append(f"frames {status.get('frames', 0)} · errors {status.get('errors', 0)} · "
                     f"reconnects {status.get('reconnects', 0)}")
    small = "".join(f"<small>{x}</small>" for x in lines)
    return f'<div class="cam-box cam-{html.escape(state)}" data-state="{html.escape(state)}">{label}{small}</div>'


def stale_frame(rgb: np.ndarray | None, text: str = "NOT CURRENT") -> np.ndarray | None:
    """The last frame greyed out and labelled, so it cannot be taken for the current part."""
    import cv2

    if rgb is None:
        return None
    g = cv2.cvtColor(np.asarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    out = np.repeat((g.astype(np.float32) * 0.45 + 90).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    h, w = out.shape[:2]
    scale = max(0.5, w / 420)
    thick = max(1, round(2 * scale))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    org = (max(0, (w - tw) // 2), (h + th) // 2)
    pad = max(4, th // 2)
    cv2.rectangle(out, (org[0] - pad, org[1] - th - pad), (org[0] + tw + pad, org[1] + pad), (30, 41, 59), -1)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return np.ascontiguousarray(out)


def colorbar_html(thresholds, low: float | None = None) -> str:
    """The heatmap's colour scale with the two thresholds marked: JET from the product's normal
    level (``low``) to NG; no tint (grey) below the OK threshold, exactly as the overlay draws it."""
    import cv2

    if thresholds is None:
        return ""
    lo, hi = float(low or 0.0), float(thresholds.ng_above)
    hi = hi if hi > lo else lo + 1e-6
    ok_pos = float(np.clip((thresholds.ok_below - lo) / (hi - lo), 0.0, 1.0))
    # the bar spans [lo, hi + 10% headroom]: NG and above is the top (red) colour
    top = 1.1
    stops = []
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    for k in range(0, 12):
        v = k / 10  # normalised level 0..1.1
        pos = 100 * v / top
        if v < ok_pos:
            continue
        r, g, b = jet[int(min(v, 1.0) * 255)]
        stops.append(f"rgb({r},{g},{b}) {pos:.1f}%")
    okp, ngp = 100 * ok_pos / top, 100 / top
    grad = f"linear-gradient(90deg, #e5e7eb 0%, #e5e7eb {okp:.1f}%, " + (", ".join(stops) or "red 100%") + ")"
    return (f'<div class="colorbar" data-ok="{thresholds.ok_below:.6g}" data-ng="{thresholds.ng_above:.6g}">'
            f'<div class="bar" style="background: {grad}">'
            f'<div class="tick" style="left: {okp:.1f}%; background: #b45309"></div>'
            f'<div class="tick" style="left: {ngp:.1f}%; background: #991b1b"></div></div>'
            f'<div class="labels"><span style="left: 0%; transform: none">heatmap: no tint below OK</span>'
            f'<span style="left: {okp:.1f}%; transform: translateX(-100%)">OK &lt; {_fmt(thresholds.ok_below)} |</span>'
            f'<span style="left: {ngp:.1f}%; transform: translateX(-50%)">| NG ≥ {_fmt(thresholds.ng_above)}</span>'
            '</div></div>')


def decisions_html(trail: Sequence[dict], pending: str | None = None) -> str:
    """The decision trail of one inspection, oldest first (nothing is ever overwritten)."""
    out = ""
    if pending:
        out += f'<div class="decision-pending" data-pending="1">{html.escape(pending)}</div>'
    if not trail:
        return out + '<div class="decision-trail note" data-n="0">No decision yet.</div>'
    rows = []
    for d in trail:
        what = html.escape(d["decision"].upper())
        if d.get("previous"):
            what += f" <span class='note'>(replaces {html.escape(d['previous'])})</span>"
        extra = " · ".join(html.escape(x) for x in (d.get("reason"), d.get("note")) if x)
        rows.append(f"<tr><td>{_when(d.get('created_at'))}</td><td>{html.escape(d.get('operator') or '')}</td>"
                    f"<td>{what}</td><td>{extra}</td></tr>")
    return out + (f'<table class="decision-trail" data-n="{len(trail)}"><tr><th>when (UTC)</th><th>who</th>'
                  "<th>decision</th><th>reason / note</th></tr>" + "".join(rows) + "</table>")


def thumbnail_uri(path: str | None, side: int = 56) -> str | None:
    """A small inline JPEG (data URI) of a stored heatmap for table rows; None when missing."""
    import base64

    import cv2

    if not path:
        return None
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    s = side / max(h, w)
    img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None


def _thumb_md(path: str | None) -> str:
    uri = thumbnail_uri(path)
    return f"![heatmap]({uri})" if uri else ""


def slider_spec(lo: float, hi: float, target_steps: int = 200) -> tuple[float, int]:
    """A slider step for the range [lo, hi] (a 1-2-5 value giving about ``target_steps`` steps) and
    the number of decimals that shows it exactly."""
    import math

    span = abs(hi - lo) or max(abs(hi), 1.0)
    raw = span / target_steps
    e = math.floor(math.log10(raw))
    step = next(m * 10**e for m in (1, 2, 5, 10) if m * 10**e >= raw)
    decimals = max(0, -math.floor(math.log10(step)))
    return float(round(step, decimals)), decimals


def slider_thresholds(ok: float | None, ng: float | None):
    """The one rule the preview and the save both apply: the sliders' values as thresholds, or a
    ValueError saying why they are not valid (OK above NG is refused, never silently changed)."""
    from inspector.verdict import Thresholds

    if ok is None or ng is None:
        raise ValueError("set both thresholds")
    if float(ok) > float(ng):
        raise ValueError(f"the OK threshold ({float(ok):.6g}) is above the NG threshold ({float(ng):.6g}); "
                         "move one of them")
    return Thresholds(float(ok), float(ng))


def counts_html(counts: dict) -> str:
    cells = (("c-ok", "OK", counts.get("OK", 0)), ("c-unc", "UNCERTAIN", counts.get("UNCERTAIN", 0)),
             ("c-ng", "NG", counts.get("NG", 0)), ("c-err", "ERRORS", counts.get("ERROR", 0)))
    return '<div class="counts">' + "".join(
        f'<div class="{c}" data-count="{n}"><b>{v}</b>{n}</div>' for c, n, v in cells) + "</div>"


def calibration_figure(normal: Sequence[float], defects: Sequence[float], ok_below: float, ng_above: float,
                       title: str = ""):
    """Left: histogram of held-out normal scores and generated-defect scores with the two thresholds
    and the OK / UNCERTAIN / NG zones. Right: separability, the ROC curve of normal vs generated
    defects with AUROC, and where each threshold sits on it (the engineer sees what moving a
    threshold trades: normal parts flagged vs defects caught)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 3.3), dpi=100, layout="constrained")
    ax, axr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.1, 1]})
    normal = np.asarray([s for s in normal if np.isfinite(s)], dtype=float)
    defects = np.asarray([s for s in defects if np.isfinite(s)], dtype=float)
    allv = np.concatenate([normal, defects, [ok_below, ng_above]])
    lo, hi = float(allv.min()), float(allv.max())
    pad = 0.08 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    bins = np.linspace(lo, hi, 32)
    ax.axvspan(lo, ok_below, color="#15803d", alpha=0.08, lw=0)
    ax.axvspan(ok_below, ng_above, color="#f59e0b", alpha=0.14, lw=0)
    ax.axvspan(ng_above, hi, color="#dc2626", alpha=0.08, lw=0)
    if normal.size:
        ax.hist(normal, bins=bins, color="#2563eb", alpha=0.75, label=f"normal shots (held out, n={normal.size})")
    if defects.size:
        ax.hist(defects, bins=bins, color="#dc2626", alpha=0.6, label=f"generated defects (n={defects.size})")
    ax.axvline(ok_below, color="#b45309", lw=2, ls="--", label=f"OK below {ok_below:.4g}")
    ax.axvline(ng_above, color="#991b1b", lw=2, label=f"NG from {ng_above:.4g}")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    if title:
        ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.spines[["top", "right"]].set_visible(False)
    _separability(axr, normal, defects, ok_below, ng_above)
    return fig


def separability(normal: np.ndarray, defects: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(false-positive rates, true-positive rates, AUROC) of normal (negative) vs defect scores, or
    None without both kinds."""
    if not (len(normal) and len(defects)):
        return None
    from sklearn.metrics import roc_curve

    from inspector.eval.metrics import auroc

    y = np.r_[np.zeros(len(normal)), np.ones(len(defects))]
    s = np.r_[normal, defects]
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr, float(auroc(s, y))


def _separability(ax, normal, defects, ok_below, ng_above) -> None:
    sep = separability(normal, defects)
    ax.plot([0, 1], [0, 1], color="#94a3b8", lw=1, ls=":")
    if sep is None:
        ax.set_title("separability: needs normal and defect scores", fontsize=10)
    else:
        fpr, tpr, auc = sep
        ax.plot(fpr, tpr, color="#1d4ed8", lw=2, drawstyle="steps-post")
        for t, col, name in ((ok_below, "#b45309", "OK thr."), (ng_above, "#991b1b", "NG thr.")):
            x, y = float(np.mean(normal >= t)), float(np.mean(defects >= t))
            ax.plot([x], [y], "o", color=col, ms=7, label=f"{name}: {100 * y:.0f}% defects, {100 * x:.0f}% normal")
        ax.set_title(f"separability: AUROC {auc:.3f}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("normal flagged (≥ threshold)")
    ax.set_ylabel("defects flagged")
    ax.spines[["top", "right"]].set_visible(False)


def _when(dt) -> str:
    if dt is None:
        return ""
    if isinstance(dt, datetime):
        return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(dt)


HISTORY_COLUMNS = ["heatmap", "id", "time (UTC)", "product", "source", "score", "verdict", "decision", "operator",
                   "latency ms", "batch", "error"]
HISTORY_TYPES = ["markdown", "number", "str", "str", "str", "number", "str", "str", "str", "number", "str", "str"]
BATCH_COLUMNS = ["heatmap", "file", "score", "verdict", "error", "id"]
BATCH_TYPES = ["markdown", "str", "number", "str", "str", "number"]


def history_frame(rows: Iterable[dict], thumbs: bool = True) -> pd.DataFrame:
    data = []
    for r in rows:
        data.append([_thumb_md(r.get("heatmap_path")) if thumbs else "", r.get("id"), _when(r.get("created_at")),
                     r.get("product"), _short(r.get("source")),
                     None if r.get("score") is None else round(float(r["score"]), 5), r.get("verdict"),
                     r.get("decision") or "", r.get("operator") or "",
                     None if r.get("latency_ms") is None else round(float(r["latency_ms"]), 1),
                     r.get("batch_id") or "", r.get("error") or ""])
    return pd.DataFrame(data, columns=HISTORY_COLUMNS)


VERDICT_STYLE = {"OK": "background-color: #dcfce7; color: #14532d; font-weight: 700",
                 "UNCERTAIN": "background-color: #fef3c7; color: #78350f; font-weight: 700",
                 "NG": "background-color: #fee2e2; color: #7f1d1d; font-weight: 700",
                 "ERROR": "background-color: #e2e8f0; color: #1e293b; font-weight: 700"}


def style_verdicts(df: pd.DataFrame):
    """The table with its verdict column coloured like the badges (a pandas Styler, which Gradio renders)."""
    if not len(df) or "verdict" not in df.columns:
        return df
    st = df.style.map(lambda v: VERDICT_STYLE.get(str(v), ""), subset=["verdict"]).format(na_rep="", precision=1)
    return st.format(na_rep="", precision=5, subset=["score"]) if "score" in df.columns else st


def history_csv(rows: Iterable[dict], path) -> str:
    """All columns of the listed inspections (full source, sha256, model version, decision) as CSV."""
    cols = ["id", "created_at", "product", "source", "image_sha256", "score", "verdict", "model_version",
            "latency_ms", "batch_id", "error", "decision", "operator", "decided_at"]
    data = [{c: (_when(r.get(c)) if c in ("created_at", "decided_at") else r.get(c)) for c in cols} for r in rows]
    pd.DataFrame(data, columns=cols).to_csv(path, index=False)
    return str(path)


def batch_frame(rows: Iterable[dict], root: str | None = None, thumbs: bool = True) -> pd.DataFrame:
    """Batch results: one row per file, path relative to the batch folder, worst first."""
    prefix = (str(root).rstrip("/") + "/") if root else ""
    data = []
    for r in rows:
        src = str(r.get("source") or "")
        if prefix and src.startswith(prefix):
            src = src[len(prefix):]
        data.append(["", src, None if r.get("score") is None else round(float(r["score"]), 5), r.get("verdict"),
                     r.get("error") or "", r.get("id"), r.get("heatmap_path")])
    df = pd.DataFrame(data, columns=[*BATCH_COLUMNS, "_hp"])
    if len(df):
        df = df.sort_values("score", ascending=False, na_position="first", kind="stable").reset_index(drop=True)
        if thumbs:  # thumbnails for the worst rows only (the ones an engineer opens)
            df.loc[:49, "heatmap"] = [_thumb_md(p) for p in df["_hp"][:50]]
    return df.drop(columns="_hp")


def reverdict_frame(rows: Iterable[dict], thresholds) -> tuple[pd.DataFrame, str]:
    """Recent inspections with their stored verdict and the verdict under ``thresholds``."""
    data, changed = [], 0
    for r in rows:
        if r.get("score") is None:
            continue
        new = str(thresholds.decide(float(r["score"])))
        old = r.get("verdict") or ""
        flag = "changed" if new != old else ""
        changed += bool(flag)
        data.append([r.get("id"), _when(r.get("created_at"))[11:], _short(r.get("source"), 36),
                     round(float(r["score"]), 4), old, new, flag])
    df = pd.DataFrame(data, columns=["id", "time", "source", "score", "verdict", "new verdict", "changed"])
    note = (f"{len(data)} recent inspections; {changed} would change verdict." if data
            else "No inspections of this product yet.")
    return df, note


def _short(source: str | None, n: int = 60) -> str:
    s = str(source or "")
    return s if len(s) <= n else "…" + s[-(n - 1):]


def mask_outline(rgb: np.ndarray, mask: np.ndarray, colour=(230, 30, 30)) -> np.ndarray:
    """The generated defect's exact mask drawn as an outline (for the Synthesize preview)."""
    import cv2

    out = np.ascontiguousarray(rgb.copy())
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, colour, max(1, round(max(out.shape[:2]) / 250)))
    return out


# ---- the Learning tab: evidence, candidate versions, shadow ------------------------------------------------------

#: names of GraphCore's optional parts as an engineer reads them
OPTIONAL_PARTS = {"head": "learned head", "global_branch": "global branch", "views": "augmented views"}


def _rate(x) -> str:
    return "-" if x is None else f"{100 * float(x):.1f} %"


def _auroc(x) -> str:
    return "-" if x is None or not np.isfinite(float(x)) else f"{float(x):.3f}"


def _label_counts(d: dict | None) -> tuple[int, int]:
    """(normal, defect) from a counts dict (``{"normal": n, "defect": m}``, any missing key 0)."""
    d = d or {}
    return int(d.get("normal", 0) or 0), int(d.get("defect", 0) or 0)


BEFORE_AFTER_COLUMNS = ["measure (cross-validated on the evidence)", "active version (before)", "candidate (after)",
                        "change"]


def before_after_frame(table: dict | None) -> pd.DataFrame:
    """The candidate's before/after table: image AUROC, false alarms at the OK threshold, missed
    defects at the NG threshold, each for the active version and the candidate, with the change in
    words (which way is better differs per row)."""
    if not table:
        return pd.DataFrame([], columns=BEFORE_AFTER_COLUMNS)
    before, after = table.get("before") or {}, table.get("after") or {}
    rows = []
    for name, key, fmt, higher_better in (("image AUROC", "auroc", _auroc, True),
                                          ("false-alarm rate at the OK threshold", "false_alarm_rate", _rate, False),
                                          ("missed defects at the NG threshold", "missed_rate", _rate, False)):
        b, a = before.get(key), after.get(key)
        change = ""
        if b is not None and a is not None and np.isfinite(float(a)) and np.isfinite(float(b)):
            d = float(a) - float(b)
            size = f"{d:+.3f}" if key == "auroc" else f"{100 * d:+.1f} pts"
            better = d > 0 if higher_better else d < 0
            change = "no change" if abs(d) < 1e-9 else f"{size} ({'better' if better else 'worse'})"
        rows.append([name, fmt(b), fmt(a), change])
    for name, key in (("confirmed normals scored", "n_normal"), ("confirmed defects scored", "n_defect")):
        b, a = before.get(key), after.get(key)
        rows.append([name, "-" if b is None else str(int(b)), "-" if a is None else str(int(a)), ""])
    return pd.DataFrame(rows, columns=BEFORE_AFTER_COLUMNS)


def _no_autolink(text: str) -> str:
    """Markdown text in which ``head@0.5`` stays text (an ``@`` between words reads as an e-mail
    address to the Markdown renderer, which would make it a mailto link)."""
    return html.escape(text, quote=False).replace("@", "&#64;")


def selection_markdown(sel: dict | None, detector: str | None = None) -> str:
    """GraphCore's selection decision in words: which optional parts the product's own real
    evidence switched on, on how much evidence, by which rule, and the cross-validated numbers of
    every configuration it compared."""
    if not sel:
        if detector and not str(detector).startswith("graphcore"):
            return f"**Optional parts:** none to choose: the {detector} detector has no optional parts."
        return ("**Optional parts:** no selection decision is recorded for this version (it was built before "
                "the decision was written); it scores with the configuration it was fitted with.")
    enabled = sel.get("enabled") or {}

    def part(k: str) -> str:
        name = OPTIONAL_PARTS.get(k, k)
        return f"{name} ({int(sel['views'])} per shot)" if k == "views" and int(sel.get("views") or 0) > 1 else name

    on = [part(k) for k, v in enabled.items() if v]
    off = [part(k) for k, v in enabled.items() if not v]
    ev = sel.get("evidence") or {}
    n = int(ev.get("normals", ev.get("normal", 0)) or 0)
    m = int(ev.get("defects", ev.get("defect", 0)) or 0)
    need_d, need_n = int(sel.get("min_defects") or 0), int(sel.get("min_normals") or 0)
    lines = []
    if on:
        lines.append(f"**Switched on by this product's real evidence:** {', '.join(on)}.")
    else:
        lines.append("**Nothing optional is switched on:** the memory bank of the shots"
                     + (" and the confirmed normals" if n else "") + " scores alone.")
    if off:
        lines.append(f"Kept off: {', '.join(off)}.")
    text = f"Decided on {n} confirmed normal(s) and {m} confirmed defect(s)"
    if (m < need_d or n < need_n) and not sel.get("reason"):  # the detector's reason says it otherwise
        need = f"{need_d} confirmed defects" + (f" and {need_n} confirmed normals" if need_n else "")
        text += f": fewer than the {need} needed before anything optional is tried"
    lines.append(text + ".")
    if sel.get("reason"):
        lines.append(f"Why: {_no_autolink(str(sel['reason']).rstrip('.'))}.")
    if sel.get("rule"):
        lines.append(f"Rule: {str(sel['rule']).rstrip('.')}.")
    out = "  \n".join(lines)
    cands = sel.get("candidates") or []
    if cands:
        rows = ["| configuration | AUROC | separation |", "|---|---|---|"]
        for c in cands:
            sep = c.get("separation")
            rows.append(f"| {_no_autolink(str(c.get('name', '?')))} | {_auroc(c.get('auroc'))} | "
                        f"{'-' if sep is None else f'{float(sep):.3g}'} |")
        out += ("\n\nCross-validated on the product's evidence (confirmed normals left out of the bank, "
                "confirmed defects in folds):\n\n" + "\n".join(rows))
    weights = {k: v for k, v in (sel.get("weights") or {}).items() if enabled.get(k) and v is not None}
    if weights:
        out += "\n\nWeights: " + ", ".join(
            f"{OPTIONAL_PARTS.get(k, k)} {float(v):.3g}" if isinstance(v, (int, float)) else f"{OPTIONAL_PARTS.get(k, k)} {v}"
            for k, v in weights.items())
    return out


VERSION_COLUMNS = ["version", "state", "created (UTC)", "action", "by", "parent", "evidence", "AUROC after"]


def versions_frame(versions: Iterable[dict]) -> pd.DataFrame:
    """The product's versions, newest first: which is active, which runs in shadow, what built it."""
    data = []
    for v in versions:
        n, m = _label_counts(v.get("evidence"))
        state = "ACTIVE" if v.get("active") else ("shadow" if v.get("shadow") else "")
        after = ((v.get("table") or {}).get("after") or {}).get("auroc")
        data.append([v.get("version"), state, _when(v.get("created"))[:19], v.get("action") or "",
                     v.get("actor") or "", v.get("parent") or "", f"{n} normal / {m} defect" if (n or m) else "",
                     _auroc(after) if after is not None else ""])
    return pd.DataFrame(data, columns=VERSION_COLUMNS)


def evidence_html(summary: dict | None, active: str | None = None) -> str:
    """Evidence counts for the Learning tab: since the active version (what a candidate would add)
    as large figures, then the counts per version that made the verdicts."""
    summary = summary or {}
    tn, tm = _label_counts(summary.get("labels"))
    since = summary.get("since_active")
    n, m = _label_counts(since) if isinstance(since, dict) else (tn, tm)
    active = active or summary.get("active_version")
    out = (f'<div class="evidence-counts" data-normal="{n}" data-defect="{m}">'
           f'<div class="c-ok"><b>{n}</b>confirmed normals</div><div class="c-ng"><b>{m}</b>confirmed defects</div>'
           "</div>")
    what = f"since the active version <code>{html.escape(str(active))}</code>" if active else "so far"
    out += f'<p class="note">Evidence {what}; {tn} normal(s) and {tm} defect(s) in all'
    if summary.get("with_mask"):
        out += f", {int(summary['with_mask'])} defect(s) with a painted mask"
    out += ".</p>"
    if summary.get("images_missing"):
        out += (f'<p class="verdict-error">{int(summary["images_missing"])} decided part(s) have no kept image '
                "(rolled over before the decision): a build skips them.</p>")
    need = int(summary.get("min_defects") or 0)
    if need and tm < need:
        out += (f'<p class="note">Fewer than {need} confirmed defects: a candidate learns from the confirmed '
                "normals only; no optional detector part can be switched on yet.</p>")
    per = summary.get("per_version") or summary.get("by_version") or {}
    if isinstance(per, list):
        per = {str(r.get("version")): r for r in per}
    if per:
        rows = "".join(f"<tr><td><code>{html.escape(str(ver))}</code></td><td>{_label_counts(c)[0]}</td>"
                       f"<td>{_label_counts(c)[1]}</td></tr>" for ver, c in per.items())
        out += ('<table class="evidence-per-version"><tr><th>verdict made by version</th><th>normals</th>'
                f"<th>defects</th></tr>{rows}</table>")
    return out


def shadow_html(tally: dict | None) -> str:
    """The shadow candidate's running tally: what it scored, dropped, and how its verdicts fared
    against the operators' later decisions."""
    if not tally or not tally.get("version"):
        return '<div class="shadow-tally note" data-version="">No version runs in shadow.</div>'
    ver = html.escape(str(tally["version"]))
    cells = [("scored", tally.get("scored", 0)), ("dropped", tally.get("dropped", 0)),
             ("agree", tally.get("agree", 0)), ("disagree", tally.get("disagree", 0)),
             ("false alarms avoided", tally.get("false_alarms_avoided", 0)),
             ("false alarms added", tally.get("false_alarms_added", 0)),
             ("defects missed", tally.get("defects_missed", 0)),
             ("defects caught", tally.get("defects_caught", 0))]
    body = "".join(f'<div data-k="{html.escape(k)}"><b>{int(v or 0)}</b>{html.escape(k)}</div>' for k, v in cells)
    decided = int(tally.get("decided", 0) or 0)
    settled = (f"Settled by the operators' decisions on {decided} part(s): candidate right "
               f"{int(tally.get('candidate_right', 0) or 0)}, active version right "
               f"{int(tally.get('active_right', 0) or 0)}." if decided else
               "No scored part has an operator decision yet: nothing settles who is right.")
    if tally.get("pending"):
        settled += f" {int(tally['pending'])} part(s) wait for the candidate."
    cost = ("Each part is scored twice while a shadow runs; parts the shadow cannot keep up with are dropped "
            "(counted), never slowing the line or changing a verdict.")
    return (f'<div class="shadow-tally" data-version="{ver}"><p>Version <code>{ver}</code> runs in shadow.</p>'
            f'<div class="tally">{body}</div><p>{settled}</p><p class="note">{cost}</p></div>')


DISAGREEMENT_COLUMNS = ["id", "time (UTC)", "source", "active", "candidate", "operator decided"]


def disagreements_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Inspections where the shadow candidate's verdict differs from the active version's."""
    data = []
    for r in rows:
        def _v(verdict, score):
            return f"{verdict or '-'} ({_fmt(score)})" if score is not None else str(verdict or "-")
        data.append([r.get("inspection_id", r.get("id")), _when(r.get("created_at"))[:19],
                     _short(r.get("source"), 40), _v(r.get("verdict"), r.get("score")),
                     _v(r.get("shadow_verdict"), r.get("shadow_score")), r.get("decision") or ""])
    return pd.DataFrame(data, columns=DISAGREEMENT_COLUMNS)
