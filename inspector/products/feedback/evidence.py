"""Operator decisions as evidence: what a decided inspection tells the next product version.

The station records every operator decision in an append-only trail
(:mod:`inspector.station.store`); this module is the one rule that turns the latest decision on an
inspection into a piece of evidence (:func:`evidence_label`), and the records the registry and the
detector read (:class:`EvidenceItem` as the store knows it, :class:`LabeledImage` loaded for a
refit).

The rule, whatever the verdict the model gave:

* **reject** -> a confirmed **defect** (the operator saw the defect; an OK that is rejected is a
  defect the model missed);
* **accept** of an NG or UNCERTAIN part -> a confirmed **normal** (a false alarm: the most
  valuable kind of normal, as it lies where the model was wrong);
* **accept** of an OK part -> a confirmed **normal**.

Only the latest decision on an inspection counts (a later decision replaces an earlier one; the
store keeps the whole trail). An inspection that could not be scored (verdict ERROR) or whose image
hash is unknown is no evidence: there is no image to learn from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

from inspector.detectors.graphcore.selection import MIN_DEFECTS  # noqa: F401 - re-exported: the one threshold

#: Evidence labels, in the order counts are shown.
LABELS = ("normal", "defect")


@dataclass(frozen=True)
class EvidenceItem:
    """One piece of evidence as the store knows it (the latest decision on one inspection)."""

    sha256: str
    label: str  # "normal" | "defect"
    source: str
    inspection_id: int | None = None
    decision_id: int | None = None
    version: str | None = None  # product version that made the verdict
    verdict: str | None = None
    score: float | None = None
    operator: str | None = None
    reason: str | None = None
    mask_sha256: str | None = None
    decided_at: str | None = None


@dataclass
class LabeledImage:
    """Evidence loaded for fitting."""

    image: np.ndarray  # RGB uint8
    label: str  # "normal" | "defect"
    sha256: str
    mask: np.ndarray | None = None  # HxW bool at the image's size (defects only)
    item: EvidenceItem | None = None


def evidence_label(verdict: str | None, decision: str | None) -> str | None:
    """The label a decision gives its inspection: ``"defect"``, ``"normal"``, or None (no evidence:
    no decision, or an inspection that was never scored)."""
    verdict = None if verdict is None else str(getattr(verdict, "value", verdict)).upper()
    decision = None if decision is None else str(decision).lower()
    if verdict not in ("OK", "UNCERTAIN", "NG") or decision not in ("accept", "reject"):
        return None
    return "defect" if decision == "reject" else "normal"


def item_from_row(row: dict) -> EvidenceItem | None:
    """The evidence of one row of :meth:`inspector.station.store.Store.evidence` (the latest
    decision joined with its inspection), or None when the row is no evidence."""
    label = evidence_label(row.get("verdict"), row.get("decision"))
    if label is None or not row.get("image_sha256"):
        return None
    decided = row.get("decided_at")
    if isinstance(decided, datetime):
        decided = decided.isoformat()
    return EvidenceItem(sha256=row["image_sha256"], label=label, source=str(row.get("source") or ""),
                        inspection_id=_int(row.get("inspection_id")), decision_id=_int(row.get("decision_id")),
                        version=row.get("model_version"), verdict=row.get("verdict"),
                        score=None if row.get("score") is None else float(row["score"]),
                        operator=row.get("operator"), reason=row.get("reason"),
                        mask_sha256=row.get("mask_sha256"), decided_at=decided)


def latest_per_image(items: list[EvidenceItem]) -> list[EvidenceItem]:
    """One item per image (sha256): the same part inspected twice (at the station, then again by a
    feedback import) is one piece of evidence, labelled by the most recent decision on any of its
    inspections. Ordered by that decision."""
    best: dict[str, EvidenceItem] = {}
    for it in items:
        cur = best.get(it.sha256)
        if cur is None or (it.decision_id or 0) >= (cur.decision_id or 0):
            best[it.sha256] = it
    return sorted(best.values(), key=lambda it: it.decision_id or 0)


def _int(v) -> int | None:
    return None if v is None else int(v)


__all__ = ["LABELS", "MIN_DEFECTS", "EvidenceItem", "LabeledImage", "evidence_label", "item_from_row",
           "latest_per_image"]
