"""Product registry: a few normal shots -> a fitted, calibrated detector saved on disk.

The folder layout and the version rule are in :mod:`inspector.products.product`. Files are
written under new names first and ``product.json`` is replaced atomically (write-then-rename) at
the end, so a crash at any moment leaves either the old product or the new one, never a mix.
Nothing a version refers to is removed; what no version refers to (a crash's leftovers) is
removed when a registry opens.

Registration (:meth:`ProductRegistry.register`):

1. fit the detector on the normal shots (GraphCore by default);
2. calibrate the two thresholds (:func:`inspector.verdict.calibrate`) from *held-out* scores
   (:mod:`inspector.products.calibration`); the fraction of generated defects passed as OK per
   severity band is recorded;
3. save.

Detectors by kind:

* fitted (GraphCore, PatchCore): as above;
* zero-shot (AnomalyCLIP): no fit; shots, views and defects are scored by the one model;
* batch-wise (MuSc): the shots are kept as a *reference set*; an incoming image is scored together
  with them (mutual scoring). Held-out scores score each shot against the others.

Versions (:mod:`inspector.products.versions`): every change makes an immutable version file;
``product.json`` is the active one. :meth:`ProductRegistry.refit` builds a candidate version from
the shots plus operator evidence (:mod:`inspector.products.refit`), active only when promoted;
:meth:`~ProductRegistry.promote`, :meth:`~ProductRegistry.rollback` and
:meth:`~ProductRegistry.set_shadow` only rewrite ``product.json`` (no refit: instant). State files,
shots and reference images are kept while any version refers to them; what a crash leaves that
none refers to is removed when a registry opens (:meth:`ProductRegistry._clean_stale`).
``get("name@version")`` serves any version.

The models serving a product are cached here, the most recently used
:data:`RUNTIMES_PER_PRODUCT` per product and runtime kind (the active version and a shadow
candidate side by side), keyed by model hash (:mod:`inspector.products.runtime`).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspector.detectors.base import AnomalyResult, capabilities_of
from inspector.detectors.registry import detector_class, product_detector_class
from inspector.inspection import Inspection, as_rgb8_list, inspections_from
from inspector.io import read_image, to_rgb8
from inspector.paths import NAME_RE
from inspector.products import versions as V
from inspector.products.calibration import MAX_FOLDS, held_out_scores
from inspector.products.feedback.evidence import MIN_DEFECTS, LabeledImage
from inspector.products.product import (
    Product,
    ProductExists,
    ProductNotFound,
    RuntimeUnavailable,
    canonical_json,
    product_version,
)
from inspector.products.progress import Progress, report_progress
from inspector.products.refit import (
    EvidenceSet,
    calibrate_with_evidence,
    fold_scores,
    mutual_scores,
    validate_evidence,
)
from inspector.products.runtime import OnnxAdapter, TorchRuntime
from inspector.state import (
    array_sha256,
    atomic_write_bytes,
    atomic_write_json,
    bytes_sha256,
    safetensors_bytes,
)
from inspector.verdict import Thresholds, calibrate

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "graphcore"
MAX_SHOTS = 32
#: Held-out folds over the shots of a fit-mode refit with confirmed normals (each fold refits the
#: bank of the other shots plus every confirmed normal: the dominant cost of a refit).
REFIT_FOLDS = 2
#: Loaded models kept per product and runtime kind (active + shadow candidate).
RUNTIMES_PER_PRODUCT = 2
#: Files of a product folder the registry writes (anything else in a folder without product.json
#: means the folder is not an interrupted registration, and it is left alone).
_OWN = ("state-", "shots", "refs", "versions")


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return os.environ.get("USER", "unknown")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
@dataclass
class _Built:
    """A fitted, calibrated version not yet on disk."""

    prod: Product
    blob: bytes  # detector state (safetensors)
    config: dict  # detector state (JSON)
    refs: list[np.ndarray]  # confirmed normals in a mutual version's reference set
    evidence_scores: tuple[list[float], list[float]] | None = None  # held-out (normal, defect)


def split_ref(ref: str, version: str | None = None) -> tuple[str, str | None]:
    """``"name@version"`` -> ``(name, version)``; a plain name keeps ``version``."""
    if isinstance(ref, str) and "@" in ref:
        name, _, v = ref.partition("@")
        if version is not None and version != v:
            raise ValueError(f"{ref!r} names version {v!r} but version={version!r} was given")
        if not v:
            raise ValueError(f"{ref!r}: give a version after '@' (see `inspector versions {name}`)")
        return name, v
    return ref, version


class ProductRegistry:
    """Products under ``root`` (normally ``<data_dir>/products``). Changes go to ``store``'s audit."""

    def __init__(self, root: str | os.PathLike, store=None, device: str | torch.device | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.device = device
        self._runtimes: OrderedDict[tuple, Any] = OrderedDict()
        self._rt_lock = threading.Lock()
        self.cleaned = self._clean_stale()

    #: temporary files elsewhere (e.g. an ONNX export beside the product) are written outside the
    #: registry lock: they are removed only once this old
    STALE_TMP_S = 3600.0

    def _clean_stale(self) -> list[Path]:
        """Remove what a crash (``kill -9`` during register, add_shots, set_thresholds, refit,
        promote or delete) left behind: temporary files, half-deleted trash folders, state files,
        shots and reference images that no version refers to, and the folder of a first
        registration that never reached its ``product.json``. All of those are written only
        under the registry lock, which is held here, so no live writer loses a file; other
        temporary files are removed only when older than :attr:`STALE_TMP_S`. Returns what was
        removed."""
        removed: list[Path] = []
        now = time.time()
        with self._locked():
            for d in self.root.iterdir():
                try:
                    if d.name.startswith(".deleted-") and d.is_dir():
                        shutil.rmtree(d, ignore_errors=True)
                        removed.append(d)
                        continue
                    if d.name.startswith(".") or not d.is_dir() or d.is_symlink():
                        continue
                    locked_dirs = {d, d / "shots", d / "refs", d / V.VERSIONS_DIR}
                    for f in d.rglob(".*"):
                        if not (f.name.endswith(".tmp") or f.name.startswith(".tmp-")) or not f.is_file():
                            continue
                        if f.parent in locked_dirs or now - f.stat().st_mtime > self.STALE_TMP_S:
                            f.unlink(missing_ok=True)
                            removed.append(f)
                    removed += self._clean_unreferenced(d)
                except OSError as exc:
                    log.warning("could not clean %s: %s", d, exc)
        if removed:
            log.info("removed %d stale file(s) left by an interrupted write", len(removed))
        return removed

    @staticmethod
    def _clean_unreferenced(d: Path) -> list[Path]:
        """State files, shots and reference images of ``d`` that no version refers to."""
        if not (d / "product.json").is_file():
            entries = list(d.iterdir())
            if entries and all(p.name.startswith(_OWN) for p in entries):  # a first registration cut short
                shutil.rmtree(d, ignore_errors=True)
                return [d]
            return []
        ref = V.referenced(d)
        if ref is None:
            return []
        stems, files = ref
        out = []
        for p in d.glob("state-*"):
            if p.is_file() and p.name.split(".", 1)[0] not in stems:
                p.unlink(missing_ok=True)
                out.append(p)
        for sub in ("shots", "refs"):
            if (d / sub).is_dir():
                for p in (d / sub).iterdir():
                    if p.is_file() and not p.name.startswith(".") and f"{sub}/{p.name}" not in files:
                        p.unlink(missing_ok=True)
                        out.append(p)
        return out

    # -- locking & paths ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """Serialise registry changes across threads and processes."""
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _dir(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"invalid product name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        return self.root / name

    def _audit(self, actor, action, product, details) -> None:
        if self.store is not None:
            self.store.audit(actor=actor or default_actor(), action=action, product=product, details=details)

    # -- read -----------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        name, _ = split_ref(name)
        return (self._dir(name) / "product.json").is_file()

    def get(self, name: str, version: str | None = None) -> Product:
        """The active version of product ``name``, or the given version (``version=`` or
        ``"name@version"``; a unique prefix of a version id is enough). A version other than the
        active one scores with its own state: it is served beside the active one."""
        name, version = split_ref(name, version)
        d = self._dir(name)
        path = d / "product.json"
        if not path.is_file():
            known = ", ".join(p.name for p in self.list()) or "none"
            raise ProductNotFound(f"unknown product {name!r} (registered: {known})")
        raw = json.loads(path.read_text())
        if version is not None and version != raw["version"]:
            raw = V.load_version(d, self._resolve_version(d, name, version, raw))
        prod = Product.from_json(raw, path=d)
        prod._registry = self
        return prod

    def _resolve_version(self, d: Path, name: str, version: str, raw: dict) -> str:
        if V.version_file(d, version).is_file() or version == raw["version"]:
            return version
        known = [r["version"] for r in V.records(d)]
        found = [v for v in known if v.startswith(version)] if len(version) >= 4 else []
        if len(found) == 1:
            return found[0]
        why = "is ambiguous" if found else "does not exist"
        raise ProductNotFound(f"version {version!r} of product {name!r} {why} (versions: {', '.join(known)})")

    def list(self) -> list[Product]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "product.json").is_file():
                try:
                    out.append(self.get(d.name))
                except Exception as exc:  # a damaged product must not hide the others
                    log.warning("skipping unreadable product %s: %s", d.name, exc)
        return out

    # -- versions -------------------------------------------------------------------------------
    def versions(self, name: str) -> list[dict]:
        """Every version of ``name``, newest first: ``version``, ``parent``, ``created``, ``actor``,
        ``action``, ``active``, ``shadow``, ``evidence`` (counts), ``table`` (a refit's
        before/after on its evidence), plus ``thresholds`` and ``selection``."""
        self.get(name)  # unknown product: ProductNotFound
        d = self._dir(name)
        raw = V.read_product_json(d)
        out = []
        for rec in V.records(d):
            o = rec.get("origin") or {}
            ev = o.get("evidence") or {}
            out.append({"version": rec["version"], "parent": rec.get("parent"), "created": V.made_at(rec),
                        "actor": o.get("actor"), "action": o.get("action") or "register",
                        "active": rec["version"] == raw["version"], "shadow": rec["version"] == raw.get("shadow"),
                        "evidence": {k: v for k, v in ev.items() if k != "items"}, "table": o.get("table"),
                        "thresholds": rec.get("thresholds"), "model_hash": rec.get("model_hash"),
                        "selection": (rec.get("registration") or {}).get("selection")})
        return out

    def history(self, name: str) -> list[dict]:
        """The activations of ``name``, oldest first (see :mod:`inspector.products.versions`)."""
        self.get(name)
        return V.history_of(V.read_product_json(self._dir(name)))

    def shadow_version(self, name: str) -> str | None:
        """The candidate version scored in shadow beside the active one, or None. Asked on every
        inspection the station records, so it reads ``product.json`` once (an unknown product still
        raises :class:`ProductNotFound` with the list of registered ones)."""
        d = self._dir(name)
        if not (d / "product.json").is_file():
            self.get(name)
        return V.read_product_json(d).get("shadow")

    def promote(self, name: str, version: str, actor: str | None = None) -> Product:
        """Make ``version`` the active version (no refit: its state is on disk). Promoting the
        shadow candidate ends the shadow run. Already active: nothing changes."""
        with self._locked():
            target = self.get(name, version)
            raw = V.read_product_json(target.path)
            if target.version == raw["version"]:
                return self.get(name)
            self._activate(target.path, target.to_json(), "promote", actor)
            self._audit(actor, "promote", name, {"version": target.version, "previous_version": raw["version"]})
        return self.get(name)

    def rollback(self, name: str, actor: str | None = None) -> Product:
        """Make the previously active version active again, instantly (no refit). It undoes the
        last activation; a second rollback redoes it (see :func:`~inspector.products.versions.previous_active`)."""
        with self._locked():
            d = self._dir(name)
            self.get(name)
            raw = V.read_product_json(d)
            prev = V.previous_active(V.history_of(raw))
            if prev is None:
                raise ValueError(f"product {name!r} has no previous active version to roll back to")
            target = self.get(name, prev)
            self._activate(d, target.to_json(), "rollback", actor)
            self._audit(actor, "rollback", name, {"version": prev, "previous_version": raw["version"]})
        return self.get(name)

    def set_shadow(self, name: str, version: str | None, actor: str | None = None) -> str | None:
        """Score ``version`` in shadow beside the active version (None: stop). Returns the full id."""
        with self._locked():
            d = self._dir(name)
            self.get(name)
            raw = V.read_product_json(d)
            full = None
            if version is not None:
                full = self.get(name, version).version
                if full == raw["version"]:
                    raise ValueError(f"version {full} is the active version of {name!r}; a shadow is another one")
            if full == raw.get("shadow"):
                return full
            self._ensure_versioned(d, raw)
            atomic_write_json(d / "product.json", {**raw, "history": V.history_of(raw), "shadow": full})
            self._audit(actor, "set_shadow", name, {"version": full, "previous": raw.get("shadow"),
                                                    "active": raw["version"]})
        return full

    def _ensure_versioned(self, d: Path, raw: dict) -> None:
        """A product.json from before versions: write its record as a version file."""
        V.write_version(d, V.version_record(raw))

    def _activate(self, d: Path, record: dict, action: str, actor: str | None) -> None:
        """Write ``record`` (a version already on disk, or about to be) as the active one: the
        commit point. The shadow ends when it becomes active."""
        raw = V.read_product_json(d) if (d / "product.json").is_file() else None
        history = V.history_of(raw) if raw else []
        shadow = raw.get("shadow") if raw else None
        if raw is not None:
            self._ensure_versioned(d, raw)
        rec = V.version_record(record)
        atomic_write_json(d / "product.json", {**rec, "history": history + [V.activation(
            rec["version"], action, actor or default_actor())], "shadow": None if shadow == rec["version"] else shadow})

    # -- register / update ----------------------------------------------------------------------
    def register(self, name: str, images: list[np.ndarray], detector: str = DEFAULT_DETECTOR,
                 backbone: str = "efficientnet-lite0", actor: str | None = None, n_synthetic: int = 16,
                 seed: int = 0, *, image_size: int | None = None, detector_config: dict | None = None,
                 replace: bool = False, generator: Any = None, progress: Progress | None = None) -> Product:
        """Fit, calibrate and save a product from 1..MAX_SHOTS normal images (RGB uint8 arrays or paths).

        ``generator`` (None = weight-free, or a trained diffusion generator / its folder / its name
        under ``models/synth``) makes the calibration defects, and is passed to the detector's
        ``fit`` when that accepts ``generator``; the product records its name and version.

        ``progress(stage, done, total)`` is called as registration advances, with the stages
        :data:`~inspector.products.progress.REGISTER_STAGES` ("held-out scoring" once per fold,
        "generated defects" per defect made, "fit", "save"), so a caller can show where it is and
        estimate the time left. With ``replace`` the new registration is a new version of the
        product (its versions and history stay)."""
        d = self._dir(name)
        shots = self._validate_shots(images)
        if (d / "product.json").is_file() and not replace:  # fail before minutes of fitting
            raise ProductExists(f"product {name!r} already exists; delete it, add shots, or register with replace")
        built = self._build(name, shots, detector, backbone, n_synthetic, seed, image_size,
                            detector_config or {}, generator, progress=progress)
        prod = built.prod
        report_progress(progress, "save", 0, 1)
        with self._locked():  # fitted outside the lock; only the existence check + commit inside
            old = self.get(name) if (d / "product.json").is_file() else None
            if old is not None and not replace:
                raise ProductExists(f"product {name!r} was registered meanwhile by someone else")
            action = "register" if old is None else "re-register"
            if old is not None:
                prod.created, prod.parent = old.created, old.version
            self._commit(built, shots, action=action, actor=actor)
            self._audit(actor, action, name,
                        {"detector": detector, "backbone": backbone, "shots": len(shots),
                         "version": prod.version, "thresholds": prod.thresholds.to_dict(),
                         "previous_version": old.version if old else None})
        report_progress(progress, "save", 1, 1)
        return self.get(name)

    def add_shots(self, name: str, images: list[np.ndarray], actor: str | None = None) -> Product:
        """Add normal shots and refit; thresholds are recalibrated (the audit keeps the old ones).
        The new version is made from the shots alone: evidence reaches a version through
        :meth:`refit`."""
        new = self._validate_shots(images, allow_more=True)
        with self._locked():
            old = self.get(name)
            shots = old.shot_images()
            have = {array_sha256(s) for s in shots}
            added = [s for s in new if array_sha256(s) not in have]
            if not added:
                raise ValueError("all given shots are already registered for this product")
            shots = shots + added
            if len(shots) > MAX_SHOTS:
                raise ValueError(f"a product takes at most {MAX_SHOTS} shots ({len(shots)} given)")
            reg = old.registration
            built = self._build(name, shots, old.detector, old.backbone, int(reg.get("n_synthetic", 16)),
                                int(reg.get("seed", 0)), old.image_size, old.detector_config,
                                (reg.get("generator") or {}).get("path"))
            prod = built.prod
            prod.created, prod.parent = old.created, old.version
            self._commit(built, shots, action="add_shots", actor=actor)
            self._audit(actor, "add_shots", name, {"added": len(added), "shots": len(shots),
                                                   "previous_version": old.version, "version": prod.version,
                                                   "previous_thresholds": old.thresholds.to_dict(),
                                                   "thresholds": prod.thresholds.to_dict()})
        return self.get(name)

    def set_thresholds(self, name: str, thresholds: Thresholds | dict | tuple, actor: str | None = None) -> Product:
        """New thresholds without refitting (the version changes: verdicts may change)."""
        if isinstance(thresholds, dict):
            thresholds = Thresholds.from_dict(thresholds)
        elif isinstance(thresholds, (tuple, list)):
            thresholds = Thresholds(*thresholds)
        with self._locked():
            old = self.get(name)
            prod = dc_replace(old, thresholds=thresholds, updated=_now(), parent=old.version,
                              origin={"action": "set_thresholds", "actor": actor or default_actor(),
                                      "at": V.now_precise()},
                              version=product_version(old.model_hash, old.detector, old.backbone, old.image_size,
                                                      thresholds))
            V.write_version(old.path, prod.to_json())
            self._activate(old.path, prod.to_json(), "set_thresholds", actor)
            self._audit(actor, "set_thresholds", name, {"previous": old.thresholds.to_dict(),
                                                        "thresholds": thresholds.to_dict(),
                                                        "previous_version": old.version, "version": prod.version})
        return self.get(name)

    def refit(self, name: str, evidence: list[LabeledImage], *, actor: str | None = None,
              progress: Progress | None = None, promote: bool = False) -> dict:
        """A candidate version from the active version's shots plus operator ``evidence``
        (confirmed normals and defects, :mod:`inspector.products.refit` says what each detector
        kind learns from them), saved as a new immutable version; it becomes active only with
        ``promote``. Crash-safe: everything is computed in memory, then written under the lock,
        each file under a temporary name renamed into place, the version file last (and
        ``product.json`` after it when promoting); a crash leaves the active version as it was,
        and the next registry open removes any file no version refers to.

        Returns ``{"version", "parent", "promoted", "evidence": {"normal", "defect"}, "table":
        {"before", "after"}, "selection", "seconds"}``. The table scores the evidence: *before* with
        the active version (its thresholds), *after* with the candidate's held-out
        (cross-validated) scores and thresholds; each side gives ``auroc``, ``false_alarm_rate``
        (confirmed normals not OK at the OK threshold), ``missed_rate`` (confirmed defects not NG
        at the NG threshold), ``n_normal`` and ``n_defect``. The *before* scores of evidence an
        earlier refit of the active version already learned from are in-sample.

        ``progress(stage, done, total)``: stages :data:`~inspector.products.progress.REFIT_STAGES`."""
        t0 = time.perf_counter()
        name, pinned = split_ref(name)
        if pinned is not None:
            raise ValueError("refit starts from the active version: give the product name without '@version'")
        active = self.get(name)
        items = validate_evidence(evidence)
        if not items:
            raise ValueError(f"refit of {name!r} needs evidence (confirmed normals or defects); none given")
        report_progress(progress, "before", 0, len(items))
        before = self._before_scores(active, items)
        report_progress(progress, "before", len(items), len(items))
        reg = active.registration
        shots = active.shot_images()
        built = self._build(name, shots, active.detector, active.backbone, int(reg.get("n_synthetic", 16)),
                            int(reg.get("seed", 0)), active.image_size, active.detector_config,
                            (reg.get("generator") or {}).get("path"), progress=progress, evidence=items)
        prod = built.prod
        counts = {lab: sum(it.label == lab for it in items) for lab in ("normal", "defect")}
        b_normal = [s for s, it in zip(before, items) if it.label == "normal"]
        b_defect = [s for s, it in zip(before, items) if it.label == "defect"]
        table = {"before": V.evidence_table(b_normal, b_defect, active.thresholds),
                 "after": V.evidence_table(*built.evidence_scores, prod.thresholds)}
        prod.created, prod.parent = active.created, active.version
        prod.origin = {**prod.origin, "action": "refit", "table": table,
                       "evidence": {**counts, "items": [{"sha256": it.sha256, "label": it.label,
                                                         **({"mask": True} if it.mask is not None else {})}
                                                        for it in items]},
                       "before_scores": {"normal": b_normal, "defect": b_defect}}
        with self._locked():
            self._commit(built, shots, action="refit", actor=actor, activate=promote, progress=progress)
            self._audit(actor, "refit", name, {"version": prod.version, "parent": active.version,
                                               "promoted": promote, "evidence": counts,
                                               "thresholds": prod.thresholds.to_dict(), "table": table})
        return {"version": prod.version, "parent": active.version, "promoted": bool(promote), "evidence": counts,
                "table": table, "selection": prod.registration.get("selection"),
                "seconds": round(time.perf_counter() - t0, 3)}

    def delete(self, name: str, actor: str | None = None) -> None:
        with self._locked():
            prod = self.get(name)
            trash = self.root / f".deleted-{name}-{int(time.time() * 1000)}"
            os.replace(prod.path, trash)  # atomic: the product is gone at once
            shutil.rmtree(trash, ignore_errors=True)
            with self._rt_lock:
                for key in [k for k in self._runtimes if k[0] == name]:
                    del self._runtimes[key]
            self._audit(actor, "delete", name, {"version": prod.version, "detector": prod.detector,
                                                "shots": prod.shots})

    # -- internals ------------------------------------------------------------------------------
    @staticmethod
    def _validate_shots(images, allow_more: bool = False) -> list[np.ndarray]:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        shots = [read_image(im) if not isinstance(im, np.ndarray) else to_rgb8(im, f"shot {i}")
                 for i, im in enumerate(images)]
        if not shots:
            raise ValueError("registration needs at least one normal image")
        if len(shots) > MAX_SHOTS and not allow_more:
            raise ValueError(f"a product takes at most {MAX_SHOTS} shots ({len(shots)} given)")
        return shots

    def _load_backbone(self, name: str, image_size: int | None):
        from inspector.backbones.registry import load_backbone

        return load_backbone(name, device=self.device, image_size=image_size or None)

    def _before_scores(self, active: Product, items: list[LabeledImage]) -> list[float]:
        """The active version's scores of the evidence: the score the station recorded when that
        very version made the verdict (no second scoring), else scored now."""
        out: list[float | None] = []
        for it in items:
            rec = it.item
            known = rec is not None and rec.version == active.version and rec.score is not None \
                and np.isfinite(rec.score)
            out.append(float(rec.score) if known else None)
        todo = [i for i, v in enumerate(out) if v is None]
        for i, v in zip(todo, self._score_items(active, [items[i].image for i in todo]) if todo else []):
            out[i] = v
        return [float(v) for v in out]

    def _score_items(self, prod: Product, images: list[np.ndarray], chunk: int = 8) -> list[float]:
        out: list[float] = []
        for i in range(0, len(images), chunk):
            out += self.score(prod, images[i:i + chunk])[0].scores.tolist()
        return [float(v) for v in out]

    def _build(self, name, shots, detector, backbone, n_synthetic, seed, image_size, cfg, generator=None,
               progress=None, evidence: list[LabeledImage] | None = None) -> _Built:
        """Fit + calibrate, no disk writes. With ``evidence``: fitted on the shots plus the
        evidence, with the evidence's held-out scores (see :mod:`inspector.products.refit`)."""
        from inspector.synth import _resolve, describe_generator

        cls = product_detector_class(detector)
        if not image_size and capabilities_of(cls).default_image_size:
            image_size = cls.default_image_size(backbone, cfg)  # official presets: 518 px on ViT-L-14-336
        bb = self._load_backbone(backbone, image_size)
        size = bb.preprocess.size
        t0 = time.perf_counter()
        mode = _mode(cls)
        gen_info = describe_generator(generator)
        gen = _resolve(generator)
        fit_gen = None if generator is None else gen  # None: the detector's own default
        ev = EvidenceSet(evidence, bb.preprocess) if evidence else None
        ev_option = "evidence" in capabilities_of(cls).fit_options
        refs = ev.images("normal") if ev is not None and mode == "mutual" else []
        # the final model first: detectors with learned weights lend them to the held-out folds
        det = cls(bb, **cfg)
        report_progress(progress, "fit", 0, 1)
        shots_x = bb.preprocess(shots)
        if mode == "fit":
            x, fe = ev.fit_inputs(shots_x, ev_option) if ev is not None else (shots_x, None)
            _fit(det, x, fit_gen, evidence=fe)
        report_progress(progress, "fit", 1, 1)
        ev_scores = None
        if ev is not None:
            report_progress(progress, "evidence", 0, 1)
            ev_scores = ev.split(self._evidence_scores(det, cls, bb, cfg, mode, shots_x, ev, ev_option, fit_gen))
            report_progress(progress, "evidence", 1, 1)
        # a refit's bank is mostly confirmed normals: holding out half of the shots per fold moves
        # it little, and the confirmed normals' own held-out scores join the normal side
        folds = REFIT_FOLDS if ev is not None and mode == "fit" and ev.index("normal") else MAX_FOLDS
        # with enough confirmed defects the thresholds come from them alone: no generated ones
        real = ev is not None and len(ev.index("defect")) >= MIN_DEFECTS
        normal, defects, severities, map_low = held_out_scores(
            shots, self._fold_runtimes(cls, bb, cfg, mode, fit_gen, final=det, evidence=ev, ev_option=ev_option),
            n_synthetic=0 if real else n_synthetic, seed=seed, gen=gen, zero_shot=mode == "zero",
            progress=progress, max_folds=folds)
        tensors, config = det.state()
        blob = safetensors_bytes(tensors)
        inputs = [array_sha256(s) for s in shots] + ([{"refs": [array_sha256(r) for r in refs]}] if refs else [])
        model_hash = bytes_sha256(blob + canonical_json(config) + canonical_json(inputs))[:16]
        cal_extra = {}
        if ev_scores is not None:
            auto, used = calibrate_with_evidence(normal, defects, *ev_scores)
            cal_extra = {"evidence_normal_scores": ev_scores[0], "evidence_defect_scores": ev_scores[1],
                         "evidence_used": used}
        else:
            auto = calibrate(normal, defects)
        from inspector.synth.severity import severity_bands

        now = _now()
        fit_info = getattr(det, "fit_info", None) or {}
        registration = {"n_synthetic": n_synthetic, "seed": seed, "seconds": round(time.perf_counter() - t0, 3),
                        "mode": mode, "device": str(bb.device), "generator": gen_info}
        if fit_info.get("selection") is not None:
            registration["selection"] = fit_info["selection"]
        prod = Product(
            name=name, detector=detector, backbone=backbone, thresholds=auto,
            version=product_version(model_hash, detector, backbone, size, auto),
            calibration={"normal_scores": normal, "defect_scores": defects, "defect_severity": severities,
                         "severity_bands": severity_bands(severities, defects, auto.ok_below, auto.ng_above),
                         "map_low": map_low, "auto_thresholds": auto.to_dict(),
                         "method": ("held-out: leave-one-out folds + augmented views" if mode != "zero"
                                    else "zero-shot: shots + augmented views")
                         + (f"; defects: {len(ev.index('defect'))} confirmed, held out" if real else
                            f"; defects: {gen_info['kind']} generator ({gen_info['name']}), severities spread 0-1")
                         + ("; with operator evidence, held out by cross-validation" if ev is not None else ""),
                         **cal_extra},
            shots=len(shots), created=now, updated=now, image_size=size, detector_config=cfg,
            model_hash=model_hash, shot_files=[], registration=registration,
            origin={"at": V.now_precise()},
        )
        return _Built(prod, blob, config, refs, ev_scores)

    @staticmethod
    def _evidence_scores(det, cls, bb, cfg, mode, shots_x, ev: EvidenceSet, ev_option: bool, fit_gen) -> list[float]:
        """Held-out scores of every evidence item, in item order, in the final model's units."""
        if mode == "zero":  # nothing learned from the evidence: the model's own scores are held out
            return TorchRuntime(bb, det, "zero").score_tensor(ev.x).scores.tolist()
        if mode == "mutual":
            return mutual_scores(TorchRuntime(bb, det, "mutual"), shots_x, ev)
        cv = (getattr(det, "fit_info", None) or {}).get("evidence_cv") if ev_option else None
        if cv is not None and len(cv.get("normal", [])) == len(ev.index("normal")) \
                and len(cv.get("defect", [])) == len(ev.index("defect")):
            scores = [0.0] * len(ev)
            for lab in ("normal", "defect"):
                for i, s in zip(ev.index(lab), cv[lab]):
                    scores[i] = float(s)
            return scores

        def fold(keep: list[int]) -> TorchRuntime:  # no head reuse: the final one saw the held-out items
            x, fe = ev.fit_inputs(shots_x, ev_option, keep)
            return TorchRuntime(bb, _fit(cls(bb, **cfg), x, fit_gen, evidence=fe), "fit")

        return fold_scores(ev, fold)

    @staticmethod
    def _fold_runtimes(cls, bb, cfg, mode, fit_gen=None, final=None, evidence: EvidenceSet | None = None,
                       ev_option: bool = False):
        """``fold_runtime(others)`` for :func:`~inspector.products.calibration.held_out_scores`: the
        model of one calibration fold, built from the shots other than the held-out one (plus the
        evidence, as the final model).

        Each fold refits what depends on the shots (memory bank, scales) without the held-out shot.
        Learned weights (GraphCore's head) are taken from ``final`` when the detector can reuse them:
        the head saw generated defects on every shot, so a fold's defect scores can be slightly
        optimistic; its normal views are still scored against a bank without them. Zero-shot
        detectors share one model; batch-wise ones take the other shots (and a refit's confirmed
        normals) as their reference set."""
        shared = cls(bb, **cfg) if mode == "zero" else None
        refs = evidence.images("normal") if evidence is not None and mode == "mutual" else []
        # a fold that reuses the final model's learned parts needs only the normals (they join
        # its bank); the defects taught the final model, which lends what they taught
        keep = None
        if evidence is not None and final is not None and "reuse_head_of" in capabilities_of(cls).fit_options:
            keep = evidence.index("normal")

        def fold_runtime(others: list[np.ndarray]) -> TorchRuntime:
            if mode == "fit":
                x = bb.preprocess(others)
                fe = None
                if evidence is not None:
                    x, fe = evidence.fit_inputs(x, ev_option, keep)
                return TorchRuntime(bb, _fit(cls(bb, **cfg), x, fit_gen, reuse=final, evidence=fe), "fit")
            if mode == "zero":
                return TorchRuntime(bb, shared, "zero")
            return TorchRuntime(bb, cls(bb, **cfg), "mutual", ref_images=others + refs)

        return fold_runtime

    def _commit(self, built: _Built, shots: list[np.ndarray], *, action: str, actor: str | None,
                activate: bool = True, progress: Progress | None = None) -> None:
        """Write shots, reference images and state (each under a temporary name, then renamed),
        then the version file, then (``activate``) product.json: the commit point. Old state files
        stay (other versions use them). Call with the lock held."""
        from inspector.io import write_image

        prod = built.prod
        d = self._dir(prod.name)
        prod.origin = {**prod.origin, "action": action, "actor": actor or default_actor()}

        def put(sub: str, images: list[np.ndarray]) -> list[str]:
            (d / sub).mkdir(parents=True, exist_ok=True)
            files = []
            for s in images:
                rel = f"{sub}/{array_sha256(s)[:16]}.png"
                if not (d / rel).is_file():
                    tmp = d / sub / f".tmp-{os.getpid()}-{threading.get_ident()}.png"
                    write_image(tmp, s)
                    os.replace(tmp, d / rel)
                files.append(rel)
            return files

        report_progress(progress, "save", 0, 3)
        prod.shot_files = put("shots", shots)
        prod.reference_files = put("refs", built.refs) if built.refs else []
        stem = d / f"state-{prod.model_hash}"
        if not stem.with_suffix(".json").is_file():  # the same model hash is the same state
            atomic_write_bytes(stem.with_suffix(".safetensors"), built.blob)
            atomic_write_json(stem.with_suffix(".json"), built.config)
        report_progress(progress, "save", 1, 3)
        if (d / "product.json").is_file():
            self._ensure_versioned(d, V.read_product_json(d))
        V.write_version(d, prod.to_json())
        report_progress(progress, "save", 2, 3)
        if activate:
            self._activate(d, prod.to_json(), action, actor)
        report_progress(progress, "save", 3, 3)

    # -- inference ------------------------------------------------------------------------------
    def runtime(self, prod: Product, kind: str = "torch"):
        """The loaded model serving ``prod`` (cached per model hash and runtime kind, the
        :data:`RUNTIMES_PER_PRODUCT` most recently used per product: two versions of a product,
        e.g. the active one and its shadow, are served side by side)."""
        key = (prod.name, prod.model_hash, kind)
        with self._rt_lock:
            rt = self._runtimes.get(key)
            if rt is None:
                rt = self._load_runtime(prod, kind)
                self._runtimes[key] = rt
                same = [k for k in self._runtimes if k[0] == prod.name and k[2] == kind]
                for k in same[:-RUNTIMES_PER_PRODUCT]:
                    del self._runtimes[k]  # least recently used models of this product
            self._runtimes.move_to_end(key)
        return rt

    def _load_runtime(self, prod: Product, kind: str):
        if kind == "onnx":
            if _mode(detector_class(prod.detector)) == "mutual":
                raise RuntimeUnavailable(f"product {prod.name!r} uses {prod.detector}, which scores images against "
                                         "each other and cannot run as an ONNX graph; use --runtime torch")
            return OnnxAdapter.load(prod, self)
        if kind != "torch":
            raise ValueError(f"unknown runtime {kind!r}; choose torch or onnx")
        from inspector.state import load_state

        cls = detector_class(prod.detector)
        bb = self._load_backbone(prod.backbone, prod.image_size)
        tensors, config = load_state(prod.path / f"state-{prod.model_hash}", device=str(bb.device))
        det = cls.from_state(bb, tensors, config)
        mode = _mode(cls)
        return TorchRuntime(bb, det, mode, ref_images=prod.reference_images() if mode == "mutual" else None)

    def score(self, prod: Product, images: list[np.ndarray], runtime: str = "torch") -> tuple[AnomalyResult, float]:
        """Raw result at the model's input resolution for validated RGB images, and ms per image."""
        rt = self.runtime(prod, runtime)
        t0 = time.perf_counter()
        res = rt.score_tensor(rt.preprocess(images))
        return res, (time.perf_counter() - t0) * 1e3 / max(1, len(images))

    def inspect(self, prod: Product, images, runtime: str = "torch") -> list[Inspection]:
        images = as_rgb8_list(images)
        if not images:
            return []
        res, ms = self.score(prod, images, runtime)
        return inspections_from(images, res.maps.numpy(), res.scores.tolist(), prod.thresholds, ms)


def _fit(det, x: torch.Tensor, generator=None, reuse=None, evidence=None):
    """``det.fit(x)``, passing the defect generator, a fitted detector whose learned weights to
    reuse and the operator evidence (a ``FitEvidence``), each only when the detector declares it
    (``capabilities.fit_options``)."""
    options = capabilities_of(det).fit_options
    kwargs = {}
    if generator is not None and "generator" in options:
        kwargs["generator"] = generator
    if reuse is not None and "reuse_head_of" in options:
        kwargs["reuse_head_of"] = reuse
    if evidence is not None and "evidence" in options:
        kwargs["evidence"] = evidence
    return det.fit(x, **kwargs)


def _mode(cls) -> str:
    return capabilities_of(cls).mode


__all__ = ["DEFAULT_DETECTOR", "MAX_SHOTS", "RUNTIMES_PER_PRODUCT", "ProductRegistry", "default_actor", "split_ref"]
