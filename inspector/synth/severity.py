"""Defect severity: one number in [0, 1] that sets size, contrast and blend of a generated defect.

Why: a calibration set of only obvious defects says nothing about where the OK threshold lets
faint ones through. With a severity axis the calibration histogram spans barely visible (0) to
obvious (1), and registration reports, per severity band, the fraction the thresholds would pass.

* :func:`severity_params` -- the knobs both generators read: target area (log-interpolated inside
  the generator's area range), ``strength`` (blend weight / colour shift multiplier) and the mean
  change a draw must reach before it is accepted.
* :func:`draw_severities` -- ``None`` -> ``n`` values stratified over [0, 1] (each of ``n`` equal
  bins gets one, shuffled), a float -> that value ``n`` times, a sequence -> itself (checked).
* :func:`severity_bands` -- per band, the fraction of defects scoring below the OK threshold
  (passed as OK) and below the NG threshold (not rejected).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from inspector.synth.masks import DEFAULT_AREA

#: Band edges for reports (faint, medium, obvious).
BANDS = (0.0, 1 / 3, 2 / 3, 1.0)
BAND_NAMES = ("faint", "medium", "obvious")


def check_severity(s: float) -> float:
    s = float(s)
    if not 0.0 <= s <= 1.0 or not math.isfinite(s):
        raise ValueError(f"severity must be in [0, 1], got {s}")
    return s


def severity_params(s: float, area: tuple[float, float] = DEFAULT_AREA) -> dict:
    """Knobs for severity ``s``: ``area`` (a narrow range around ``lo*(hi/lo)**s``), ``strength``
    (0.2 at s=0 .. 1.6 at s=1; 1.0 is the unconditioned generator's base) and ``min_mean_change``
    (mean absolute change in the mask a draw must reach: 2 .. 16 grey levels)."""
    s = check_severity(s)
    lo, hi = area
    centre = lo * (hi / lo) ** s
    width = (hi / lo) ** 0.08  # +-8 % of the log-range: neighbouring severities overlap a little
    return {"area": (max(lo, centre / width), min(hi, centre * width)),
            "strength": 0.2 + 1.4 * s,
            "min_mean_change": 2.0 + 14.0 * s}


def draw_severities(n: int, rng: np.random.Generator, severity: float | Sequence[float] | None = None) -> np.ndarray:
    """``n`` severities: stratified across [0, 1] for ``None``, constant for a float, or the given
    sequence (length ``n``). Values are validated."""
    n = int(n)
    if severity is None:
        v = (np.arange(n) + rng.random(n)) / max(n, 1)
        return rng.permutation(v)
    if np.ndim(severity) == 0:
        return np.full(n, check_severity(float(severity)))
    v = np.asarray(severity, dtype=float)
    if v.shape != (n,):
        raise ValueError(f"need one severity per defect ({n}), got {v.shape}")
    for s in v:
        check_severity(s)
    return v


def band_of(s: float) -> int:
    return min(len(BAND_NAMES) - 1, int(np.searchsorted(BANDS, s, side="right") - 1))


def severity_bands(severities: Sequence[float], scores: Sequence[float], ok_below: float,
                   ng_above: float) -> list[dict]:
    """Per band: ``{"band", "range", "n", "passed_ok", "not_ng"}`` where ``passed_ok`` is the fraction
    of generated defects with score below ``ok_below`` (a miss) and ``not_ng`` below ``ng_above``."""
    sev = np.asarray(list(severities), dtype=float)
    sc = np.asarray(list(scores), dtype=float)
    if sev.shape != sc.shape:
        raise ValueError("one severity per defect score")
    bands = np.array([band_of(s) for s in sev], dtype=int) if sev.size else np.zeros(0, int)
    out = []
    for b, name in enumerate(BAND_NAMES):
        sel = sc[bands == b]
        out.append({"band": name, "range": [round(BANDS[b], 3), round(BANDS[b + 1], 3)], "n": int(sel.size),
                    "passed_ok": float(np.mean(sel < ok_below)) if sel.size else None,
                    "not_ng": float(np.mean(sel < ng_above)) if sel.size else None})
    return out




def severity_markdown(calibration: dict, ok_below: float, ng_above: float) -> str:
    """Markdown table for the Register tab: per severity band, the share of the calibration's
    generated defects that the thresholds ``(ok_below, ng_above)`` would pass as OK / not reject."""
    sev, scores = calibration.get("defect_severity"), calibration.get("defect_scores")
    if not sev or not scores or len(sev) != len(scores):
        return ""
    rows = ["| generated defects | n | passed as OK | not NG |", "|---|---|---|---|"]
    for b in severity_bands(sev, scores, ok_below, ng_above):
        if b["n"]:
            rows.append(f"| {b['band']} (severity {b['range'][0]:.2f}-{b['range'][1]:.2f}) | {b['n']} | "
                        f"{100 * b['passed_ok']:.0f}% | {100 * b['not_ng']:.0f}% |")
    return "\n".join(rows)


__all__ = ["BANDS", "BAND_NAMES", "band_of", "check_severity", "draw_severities", "severity_bands",
           "severity_markdown", "severity_params"]
