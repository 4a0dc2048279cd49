"""Product versions: the immutable version files, the activation history, and the numbers a
refit is judged by.

Every change to a product (register, add_shots, set_thresholds, refit) makes a *version*: the full
:class:`~inspector.products.product.Product` record, written once to
``<product>/versions/<version>.json`` and never changed, with its ``parent`` and its ``origin``
(action, actor, time, the evidence used, the before/after table of a refit). ``product.json`` is
the *active* version's record plus two registry fields:

* ``history``: the activations, oldest first: ``{"version", "action", "actor", "at"}`` with
  ``action`` one of :data:`ACTIVATIONS`. A refit that is not promoted makes a version but no
  activation. Rollback (:func:`previous_active`) goes to the version active just before the
  current activation: it undoes the last activation, and a second rollback redoes it.
* ``shadow``: the candidate version scored beside the active one, or None.

A ``product.json`` written before versions existed has neither field and no ``versions/``
folder; it reads as a product whose only version is the active one (:func:`records`), and the
registry writes that record as a version at its first change.

The table (:func:`evidence_table`) scores a version on evidence (confirmed normals and defects):
image AUROC, the false-alarm rate (confirmed normals not OK at the OK threshold) and the
missed-defect rate (confirmed defects not NG at the NG threshold).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from inspector.detectors.graphcore.selection import auroc as mann_whitney_auroc
from inspector.state import atomic_write_json
from inspector.verdict import Thresholds

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
#: Fields of product.json that belong to the product, not to the active version's record.
REGISTRY_FIELDS = ("history", "shadow")
#: What can make a version active.
ACTIVATIONS = ("register", "re-register", "add_shots", "set_thresholds", "refit", "promote", "rollback")


def now_precise() -> str:
    """ISO time with microseconds: orders versions made within the same second."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def version_file(d: Path, version: str) -> Path:
    return Path(d) / VERSIONS_DIR / f"{version}.json"


def read_product_json(d: Path) -> dict:
    return json.loads((Path(d) / "product.json").read_text())


def version_record(raw: dict) -> dict:
    """The version's own record from a product.json (without the registry fields)."""
    return {k: v for k, v in raw.items() if k not in REGISTRY_FIELDS}


def write_version(d: Path, record: dict) -> bool:
    """Write ``record`` as its version file unless one exists (versions are immutable; the same
    content hash is the same version). True when written."""
    path = version_file(d, record["version"])
    if path.is_file():
        return False
    atomic_write_json(path, version_record(record))
    return True


def load_version(d: Path, version: str) -> dict | None:
    """A version's record: its file, or the active record of a product.json that has no file for
    it yet (written before versions existed). None when there is no such version."""
    path = version_file(d, version)
    if path.is_file():
        return json.loads(path.read_text())
    raw = read_product_json(d)
    return version_record(raw) if raw.get("version") == version else None


def records(d: Path) -> list[dict]:
    """Every version record of the product in ``d`` (the active one included even when it has no
    file yet), newest first. Unreadable version files are skipped with a warning."""
    out: dict[str, dict] = {}
    vdir = Path(d) / VERSIONS_DIR
    if vdir.is_dir():
        for p in vdir.glob("*.json"):
            try:
                rec = json.loads(p.read_text())
                out[rec["version"]] = rec
            except (OSError, ValueError, KeyError) as exc:
                log.warning("skipping unreadable version file %s: %s", p, exc)
    raw = read_product_json(d)
    out.setdefault(raw["version"], version_record(raw))
    return sorted(out.values(), key=made_at, reverse=True)


def made_at(rec: dict) -> str:
    return (rec.get("origin") or {}).get("at") or rec.get("updated") or rec.get("created") or ""


def activation(version: str, action: str, actor: str | None, at: str | None = None) -> dict:
    if action not in ACTIVATIONS:
        raise ValueError(f"unknown activation {action!r}")
    return {"version": version, "action": action, "actor": actor, "at": at or now_precise()}


def history_of(raw: dict) -> list[dict]:
    """The activation history of a product.json; a product from before versions gets one entry
    for its version (its registration)."""
    hist = raw.get("history")
    if hist:
        return list(hist)
    return [{"version": raw["version"], "action": "register", "actor": None,
             "at": raw.get("updated") or raw.get("created")}]


def previous_active(history: list[dict]) -> str | None:
    """The version active just before the current activation (the last entry), or None."""
    if not history:
        return None
    current = history[-1]["version"]
    for entry in reversed(history[:-1]):
        if entry["version"] != current:
            return entry["version"]
    return None


def referenced(d: Path) -> tuple[set[str], set[str]] | None:
    """What the versions of the product in ``d`` refer to: (state stems ``state-<hash>``, shot and
    reference files relative to ``d``). None when a record cannot be read: then nothing may be
    removed, as an unreadable record may refer to anything."""
    stems: set[str] = set()
    files: set[str] = set()
    try:
        recs = [read_product_json(d)]
        vdir = Path(d) / VERSIONS_DIR
        if vdir.is_dir():
            recs += [json.loads(p.read_text()) for p in vdir.glob("*.json")]
    except (OSError, ValueError) as exc:
        log.warning("not cleaning %s: a record is unreadable (%s)", d, exc)
        return None
    for r in recs:
        if r.get("model_hash"):
            stems.add(f"state-{r['model_hash']}")
        files.update(r.get("shot_files") or [])
        files.update(r.get("reference_files") or [])
    return stems, files


# ----------------------------------------------------------------------------------------------
# The numbers a version is judged by on evidence
# ----------------------------------------------------------------------------------------------
def auroc(normal: list[float], defect: list[float]) -> float | None:
    """Image AUROC of one version's evidence scores (the detectors' one Mann-Whitney statement,
    :func:`inspector.detectors.graphcore.selection.auroc`); None without both classes."""
    if not len(normal) or not len(defect):
        return None
    return mann_whitney_auroc(torch.as_tensor(normal), torch.as_tensor(defect))


def evidence_table(normal: list[float], defect: list[float], thresholds: Thresholds) -> dict:
    """AUROC, false-alarm rate (normals not OK: score >= ``ok_below``) and missed-defect rate
    (defects not NG: score < ``ng_above``) of one version's scores of the evidence."""
    n = np.asarray(normal, np.float64)
    d = np.asarray(defect, np.float64)
    return {
        "auroc": auroc(normal, defect),
        "false_alarm_rate": float((n >= thresholds.ok_below).mean()) if n.size else None,
        "missed_rate": float((d < thresholds.ng_above).mean()) if d.size else None,
        "n_normal": int(n.size), "n_defect": int(d.size),
    }


__all__ = ["ACTIVATIONS", "REGISTRY_FIELDS", "VERSIONS_DIR", "activation", "auroc", "evidence_table",
           "history_of", "load_version", "made_at", "now_precise", "previous_active", "read_product_json",
           "records", "referenced", "version_file", "version_record", "write_version"]
