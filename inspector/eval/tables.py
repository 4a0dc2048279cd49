"""Evaluation results as tables: per-class rows and class means over seeds, rich and markdown.

:func:`summarize` turns the runs of :func:`inspector.eval.runner.evaluate` (``RunRecord``s) into
rows per (detector, shots, class) plus a ``mean`` row per (detector, shots); :func:`rich_table`
and :func:`markdown_table` print them (``inspector eval``, ``bench/run_all.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from inspector.eval.metrics import METRIC_LABELS, METRICS


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    a = np.asarray(v, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None, len(a)


TIMING = ("fit_s", "backbone_ms", "detector_ms", "mem_rise_mb")


def summarize(runs: Sequence) -> list[dict]:
    """Rows per (detector, shots, class) and a ``mean`` row per (detector, shots) from ``runs``
    (``RunRecord``s): metric mean and std over seeds; the mean row averages classes within each
    seed first, then over seeds."""
    by_det: dict[str, list] = {}
    for r in runs:
        by_det.setdefault(r.detector, []).append(r)
    rows: list[dict] = []
    groups: dict[tuple, list] = {}
    for det, rs in by_det.items():
        if all(r.status != "ok" for r in rs) and len({(r.status, r.reason) for r in rs}) == 1:
            groups[(det, "all")] = rs  # never ran, for one reason: one row, not k x classes
            continue
        for r in rs:
            groups.setdefault((det, r.shots), []).append(r)
    for (det, shots), group in groups.items():
        if shots == "all":
            rows.append({**_row(det, None, "all", group), "shots": None})
            continue
        class_names = list(dict.fromkeys(r.cls for r in group))
        for cname in class_names:
            rows.append(_row(det, shots, cname, [r for r in group if r.cls == cname]))
        if len(class_names) > 1:
            ok = [r for r in group if r.status == "ok"]
            seeds = list(dict.fromkeys(r.seed for r in ok))
            row = _row(det, shots, "mean", group)
            for key in METRICS:  # per-seed class means, then over seeds
                per_seed = [_mean_std(r.metrics[key] for r in ok if r.seed == s)[0] for s in seeds]
                row[key], row[key + "_std"], _ = _mean_std(per_seed)
            rows.append(row)
    return rows


def _row(det, shots, cname, group: list) -> dict:
    ok = [r for r in group if r.status == "ok"]
    row: dict[str, Any] = {"detector": det, "shots": shots, "class": cname,
                           "protocol": group[0].protocol, "backbone": group[0].backbone,
                           "device": group[0].device, "n_runs": len(ok)}
    for key in METRICS:
        row[key], row[key + "_std"], _ = _mean_std(r.metrics[key] for r in ok)
    for key in TIMING:
        row[key] = _mean_std(getattr(r, key) for r in ok)[0]
    if not ok:
        row["status"] = group[0].status
        row["reason"] = group[0].reason
    elif len(ok) < len(group):
        bad = [r for r in group if r.status != "ok"]
        row["status"] = "partial"
        row["reason"] = f"{len(bad)} of {len(group)} runs {bad[0].status}: {bad[0].reason}"
    else:
        row["status"] = "ok"
        row["reason"] = None
    return row


def fmt_pm(mean: float | None, std: float | None, pct: bool = True) -> str:
    if mean is None:
        return "-"
    f = 100.0 if pct else 1.0
    return f"{f * mean:.1f}" + (f"±{f * std:.1f}" if std is not None else "")


def _fmt_num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


TABLE_COLUMNS = ("class", "detector", "k", *[METRIC_LABELS[m] for m in METRICS],
                 "fit s", "bb ms/img", "det ms/img", "+MB", "note")


def table_rows(summary: Sequence[dict]) -> list[list[str]]:
    out = []
    for r in summary:
        out.append([
            r["class"], r["detector"],
            "0" if r["protocol"] == "zero-shot" else ("-" if r["shots"] is None else str(r["shots"])),
            *[fmt_pm(r[m], r[m + "_std"]) for m in METRICS],
            _fmt_num(r["fit_s"], 2), _fmt_num(r["backbone_ms"]), _fmt_num(r["detector_ms"]),
            _fmt_num(r["mem_rise_mb"], 0), r.get("reason") or "",
        ])
    return out


def rich_table(summary: Sequence[dict], title: str = "Evaluation"):
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for c in TABLE_COLUMNS:
        t.add_column(c, justify="left" if c in ("class", "detector", "note") else "right",
                     overflow="fold", max_width=60 if c == "note" else None)
    prev = None
    for r, cells in zip(summary, table_rows(summary)):
        key = (r["detector"], r["shots"])
        if prev is not None and key != prev:
            t.add_section()
        prev = key
        style = "bold" if r["class"] == "mean" else ("yellow" if r["status"] != "ok" else None)
        t.add_row(*cells, style=style)
    return t


def markdown_table(summary: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for r, cells in zip(summary, table_rows(summary)):
        if r["class"] == "mean":
            cells = [f"**{c}**" if c not in ("", "-") else c for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
