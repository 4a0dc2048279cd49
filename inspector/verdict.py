"""Verdicts from image scores: two thresholds per product give OK / UNCERTAIN / NG.

``score < ok_below`` -> OK, ``score >= ng_above`` -> NG, anything in between -> UNCERTAIN (send to
an operator). :func:`calibrate` derives both thresholds from held-out normal scores and the
scores of generated defects; the rule is written out in its docstring so an engineer can predict
(and override) what registration picks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np


class Verdict(StrEnum):
    """A str: ``Verdict.NG == "NG"``, and it prints as ``NG``."""

    OK = "OK"
    UNCERTAIN = "UNCERTAIN"
    NG = "NG"


#: What the store writes in the verdict column for a file that could not be scored.
ERROR = "ERROR"


@dataclass(frozen=True)
class Thresholds:
    """``score < ok_below`` is OK; ``score >= ng_above`` is NG; between them UNCERTAIN."""

    ok_below: float
    ng_above: float

    def __post_init__(self):
        for field in ("ok_below", "ng_above"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"threshold {field} must be a finite number, got {v!r}")
            object.__setattr__(self, field, float(v))
        if self.ok_below > self.ng_above:
            raise ValueError(f"ok_below ({self.ok_below:.6g}) must not exceed ng_above ({self.ng_above:.6g})")

    def decide(self, score: float) -> Verdict:
        if not math.isfinite(score):  # a NaN score must never pass as OK
            return Verdict.UNCERTAIN
        if score >= self.ng_above:
            return Verdict.NG
        if score < self.ok_below:
            return Verdict.OK
        return Verdict.UNCERTAIN

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Thresholds:
        return cls(float(d["ok_below"]), float(d["ng_above"]))


def calibrate(
    normal_scores: Iterable[float],
    defect_scores: Iterable[float] | None = None,
    *,
    margin: float = 1.0,
    ng_margin: float = 3.0,
    defect_quantile: float = 0.1,
) -> Thresholds:
    """Two thresholds from held-out normal scores and (optionally) generated-defect scores.

    Let ``n_hi`` be the highest normal score, ``s`` the normal spread (standard deviation, at
    least 5% of ``|n_hi|`` so one or two shots still get a margin) and ``d_lo`` the
    ``defect_quantile`` quantile of the defect scores (the weak end of the generated defects).

    * no defect scores: ``ok_below = n_hi + margin*s``, ``ng_above = n_hi + ng_margin*s``.
    * defects above every normal (``d_lo > n_hi``, separable): ``ok_below`` as above but at most
      the midpoint of ``n_hi`` and ``d_lo``; ``ng_above = min(d_lo, n_hi + ng_margin*s)`` (an
      image is NG once it scores like a typical generated defect or far beyond normal variation),
      and never below ``ok_below``.
    * overlap (``d_lo <= n_hi``): the overlapping range is UNCERTAIN: ``ok_below = d_lo``,
      ``ng_above = n_hi + margin*s``.

    Normal scores must be held out (leave-one-out fits or augmented views): scores of the very
    images a memory bank was built from are ~0 and would make every real image NG.
    """
    normal = np.asarray(list(normal_scores), dtype=np.float64)
    if normal.size == 0:
        raise ValueError("calibrate needs at least one normal score")
    if not np.isfinite(normal).all():
        raise ValueError("normal scores contain NaN or inf")
    n_hi = float(normal.max())
    spread = max(float(normal.std()), 0.05 * abs(n_hi), 1e-6)
    ok = n_hi + margin * spread
    ng = n_hi + ng_margin * spread
    defects = np.asarray(list(defect_scores or ()), dtype=np.float64)
    defects = defects[np.isfinite(defects)]
    if defects.size:
        d_lo = float(np.quantile(defects, defect_quantile))
        if d_lo > n_hi:
            ok = min(ok, 0.5 * (n_hi + d_lo))
            ng = max(ok, min(d_lo, ng))
        else:
            ok, ng = d_lo, n_hi + margin * spread
    return Thresholds(ok_below=ok, ng_above=max(ok, ng))


__all__ = ["ERROR", "Thresholds", "Verdict", "calibrate"]
