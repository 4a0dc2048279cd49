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
"""

_VERDICTS = ("OK", "UNCERTAIN", "NG", "ERROR")


def _fmt(x: float | None, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{nd}g}"


def verdict_html(verdict: str | None = None, *, score: float | None = None, thresholds=None,
                 latency_ms: float | None = None, inspection_id: int | None = None,
                 error: str | None = None, product: str | None = None, placeholder: str | None = None) -> str:
    """The large OK / UNCERTAIN / NG badge with score, thresholds and latency below it."""
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


def counts_html(counts: dict) -> str:
    cells = (("c-ok", "OK", counts.get("OK", 0)), ("c-unc", "UNCERTAIN", counts.get("UNCERTAIN", 0)),
             ("c-ng", "NG", counts.get("NG", 0)), ("c-err", "ERRORS", counts.get("ERROR", 0)))
    return '<div class="counts">' + "".join(
        f'<div class="{c}" data-count="{n}"><b>{v}</b>{n}</div>' for c, n, v in cells) + "</div>"


def calibration_figure(normal: Sequence[float], defects: Sequence[float], ok_below: float, ng_above: float,
                       title: str = ""):
    """Histogram of held-out normal scores and generated-defect scores with the two thresholds
    and the OK / UNCERTAIN / NG zones."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
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
    return fig


def _when(dt) -> str:
    if dt is None:
        return ""
    if isinstance(dt, datetime):
        return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(dt)


HISTORY_COLUMNS = ["id", "time (UTC)", "product", "source", "score", "verdict", "decision", "operator",
                   "latency ms", "batch", "error"]


def history_frame(rows: Iterable[dict]) -> pd.DataFrame:
    data = []
    for r in rows:
        data.append([r.get("id"), _when(r.get("created_at")), r.get("product"), _short(r.get("source")),
                     None if r.get("score") is None else round(float(r["score"]), 5), r.get("verdict"),
                     r.get("decision") or "", r.get("operator") or "",
                     None if r.get("latency_ms") is None else round(float(r["latency_ms"]), 1),
                     r.get("batch_id") or "", r.get("error") or ""])
    return pd.DataFrame(data, columns=HISTORY_COLUMNS)


def batch_frame(rows: Iterable[dict], root: str | None = None) -> pd.DataFrame:
    """Batch results: one row per file, path relative to the batch folder, worst first."""
    prefix = (str(root).rstrip("/") + "/") if root else ""
    data = []
    for r in rows:
        src = str(r.get("source") or "")
        if prefix and src.startswith(prefix):
            src = src[len(prefix):]
        data.append([src, None if r.get("score") is None else round(float(r["score"]), 5), r.get("verdict"),
                     r.get("error") or "", r.get("id")])
    df = pd.DataFrame(data, columns=["file", "score", "verdict", "error", "id"])
    if len(df):
        df = df.sort_values("score", ascending=False, na_position="first", kind="stable").reset_index(drop=True)
    return df


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
