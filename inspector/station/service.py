"""The station service: registry + store + data directory in one object, used by the CLI, the
line and the web app (:class:`StationService`).

Data directory (``StationService(data_dir)``, else ``$INSPECTOR_DATA``, else ``./data``:
:func:`inspector.paths.data_dir`)::

    inspector.db        SQLite store (or ``$INSPECTOR_DB_URL``, any SQLAlchemy URL)
    products/<name>/    registered products (see inspector.products.product)
    heatmaps/           heatmap PNGs of inspections (and heatmaps/batches/<batch id>/,
                        heatmaps/<product>/shadow/<version>/ for a shadow candidate's disagreements)
    batches/<batch id>/ batch reports (results.csv, report.html)
    evidence/           every inspected image, content-addressed, within ``evidence_max_gb``
                        (inspector.products.feedback.images)

The learning loop runs through this object: operator decisions (:meth:`StationService.decide`)
and labels made elsewhere (:meth:`StationService.import_feedback`) become evidence
(:mod:`inspector.products.feedback.evidence`), :meth:`StationService.refit` builds a candidate
version from it, and a candidate may run in shadow (:mod:`inspector.station.shadow`) before it is
promoted. Shadow mode costs one extra scoring per part, done on a background worker with a
bounded queue: a part it has no room for is dropped (counted), the caller never waits for it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from inspector import paths
from inspector.batch.common import error_row
from inspector.io import ImageError, read_file_bytes, read_image
from inspector.products.feedback.evidence import (
    LABELS,
    MIN_DEFECTS,
    EvidenceItem,
    LabeledImage,
    item_from_row,
    latest_per_image,
)
from inspector.products.feedback.images import EvidenceImages, gb_to_bytes
from inspector.products.heatmap import MAX_SIDE, overlay, save_png
from inspector.products.registry import ProductRegistry, default_actor
from inspector.state import array_sha256, bytes_sha256
from inspector.station.shadow import DEFAULT_QUEUE, ShadowJob, ShadowWorker
from inspector.station.store import _ANY, DECISIONS, Store, check_reason
from inspector.verdict import ERROR, Thresholds, Verdict

log = logging.getLogger(__name__)

#: Columns of a feedback CSV (``path`` and ``label`` required) and its labels -> decisions.
FEEDBACK_COLUMNS = ("path", "label", "operator", "reason", "mask")
FEEDBACK_LABELS = {"good": "accept", "defect": "reject"}


@dataclass
class InspectionRecord:
    """What an operator sees for one inspection. ``score``/``verdict``/``map`` are None on error."""

    id: int
    product: str
    source: str
    score: float | None
    verdict: Verdict | None
    map: np.ndarray | None  # float32 HxW at the original image size, raw score units
    overlay: np.ndarray | None  # RGB uint8 heatmap overlay with defect outline (at most heatmap.MAX_SIDE px)
    heatmap_path: str | None
    latency_ms: float | None
    error: str | None
    model_version: str
    thresholds: Thresholds | None = None
    image: np.ndarray | None = None  # the RGB image that was scored

    @property
    def ok(self) -> bool:
        return self.error is None


class StationService:
    """Registry + store over one data directory; ``store_url`` (else ``$INSPECTOR_DB_URL``, else
    SQLite in the data directory) names the database. A Ray batch's scoring actors open the same
    two the same way (:class:`inspector.batch.ray.Scorer`).

    ``shadow_queue``: parts the shadow worker may hold (:mod:`inspector.station.shadow`); call
    :meth:`close` to stop that worker."""

    def __init__(self, data_dir: str | os.PathLike | None = None, device=None, store_url: str | None = None,
                 *, shadow_queue: int = DEFAULT_QUEUE, evidence_max_gb: float | None = None):
        self.data_dir = paths.data_dir(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = store_url or os.environ.get("INSPECTOR_DB_URL") or f"sqlite:///{(self.data_dir / 'inspector.db').resolve()}"
        self.store = Store(url)
        self.registry = ProductRegistry(self.data_dir / "products", store=self.store, device=device)
        self.heatmap_dir = self.data_dir / "heatmaps"
        # every inspected image, kept within evidence_max_gb (None: the default budget; 0: off)
        self.evidence_images = EvidenceImages(self.data_dir / "evidence", gb_to_bytes(evidence_max_gb))
        self.shadow = ShadowWorker(self._score_shadow, self.store, queue_size=shadow_queue)

    def inspect(self, product: str, image_or_path, source: str | None = None, operator: str | None = None,
                runtime: str = "torch", save_heatmap_png: bool = True,
                keep_image: bool | Callable[[Verdict], bool] = True) -> InspectionRecord:
        """Score one image (path, bytes or RGB array) and record it. A bad image is recorded with
        verdict ERROR and returned with ``error`` set; an unknown product raises.

        ``keep_image``: keep the image in the evidence store (:attr:`evidence_images`), or a policy
        called with the verdict (the line keeps a sample of OK parts). It is written before the row
        commits, so a crash never leaves a row without its image; its key is the row's
        ``image_sha256`` (of the bytes given, stored as they are; of an array's content, stored as
        a PNG of the image scored)."""
        prod = self.registry.get(product)
        if source is None:
            source = str(image_or_path) if isinstance(image_or_path, (str, os.PathLike)) else "upload"
        sha = None
        try:
            data = image_or_path
            if isinstance(data, (str, os.PathLike)):  # read once: the bytes hashed are the bytes decoded
                data = read_file_bytes(image_or_path, str(image_or_path))
            sha = _content_sha256(data)
            rgb = read_image(data, name=str(image_or_path) if data is not image_or_path else None)
        except ImageError as exc:
            rid = self.store.record_inspection(**error_row(prod.name, prod.version, source, exc.reason,
                                                           image_sha256=sha))
            return InspectionRecord(rid, prod.name, source, None, None, None, None, None, None, exc.reason,
                                    prod.version, prod.thresholds)
        if sha is None:
            sha = array_sha256(rgb)
        self.registry.runtime(prod, runtime)  # load the model first: latency measures the inspection only
        t0 = time.perf_counter()
        ins = prod.inspect([rgb], runtime=runtime)[0]
        latency = (time.perf_counter() - t0) * 1e3
        ov = overlay(rgb, ins.map, prod.thresholds, low=prod.map_low, max_side=MAX_SIDE, peak=ins.score)
        hp = None
        if save_heatmap_png:
            day = datetime.now(UTC).strftime("%Y%m%d")
            hp = self.heatmap_dir / prod.name / day / f"{sha[:12]}-{uuid.uuid4().hex[:8]}.png"
            save_png(hp, ov)
        if keep_image is True or (callable(keep_image) and keep_image(ins.verdict)):
            self._keep_image(data if isinstance(data, (bytes, bytearray, memoryview)) else rgb, sha)
        try:  # the heatmap exists only with its row: no orphan PNG if recording fails
            rid = self.store.record_inspection(product=prod.name, source=source, image_sha256=sha,
                                               score=ins.score, verdict=ins.verdict,
                                               heatmap_path=None if hp is None else str(hp),
                                               model_version=prod.version, latency_ms=latency)
        except BaseException:
            if hp is not None:
                hp.unlink(missing_ok=True)
            raise
        self._shadow_submit(prod, rid, rgb, sha, ins.verdict)
        return InspectionRecord(rid, prod.name, source, ins.score, ins.verdict, ins.map, ov,
                                None if hp is None else str(hp), latency, None, prod.version, prod.thresholds, rgb)

    def _keep_image(self, data, sha: str) -> bool:
        """Put one inspected image in the evidence store; a failure (disk error) is logged, never
        raised: evidence must not stop an inspection."""
        try:
            return self.evidence_images.put(data, sha)
        except Exception:  # noqa: BLE001
            log.exception("evidence: could not keep image %s", sha[:12])
            return False

    def decide(self, inspection_id: int, decision: str, operator: str | None = None, *, reason: str | None = None,
               note: str | None = None, mask=None, expect_latest=_ANY) -> dict:
        """Append an operator decision (see :meth:`inspector.station.store.Store.record_decision`):
        the decided inspection becomes evidence (:mod:`inspector.products.feedback.evidence`).

        Accepting an NG part needs a ``reason`` code (ValueError otherwise). ``mask``: the defect
        the operator painted (HxW, bool or 0/255, any size: it is resized to the image when loaded
        for a refit), only with a rejection; an empty mask counts as none. The mask and the decided
        image are made permanent in the evidence image store *before* the decision row commits, so
        a decision never points at an image that has rolled over."""
        decision = str(decision).lower()
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        row = self.store.get(inspection_id)
        check_reason(row["verdict"], decision, reason)
        mask_sha = None
        if mask is not None:
            m = np.asarray(mask)
            if m.ndim == 3 and m.shape[2] in (1, 3, 4):
                m = m[..., 0]
            if m.ndim != 2 or m.size == 0:
                raise ValueError(f"a defect mask is an HxW array, got shape {np.asarray(mask).shape}")
            if m.any():
                if decision != "reject":
                    raise ValueError("a defect mask goes with a rejection (the part is a defect)")
                mask_sha = self.evidence_images.put_mask(m > 0)
        if row.get("image_sha256"):
            self.evidence_images.keep(row["image_sha256"])  # False when it was never kept or rolled over
        return self.store.record_decision(inspection_id, decision, operator, reason=reason, note=note,
                                          expect_latest=expect_latest, mask_sha256=mask_sha)

    def batch(self, folder, product: str, *, engine: str = "local", **kwargs):
        """A folder batch on this machine (``engine="local"``) or on a Ray cluster (``"ray"``, with
        ``address=``, ``workers=``..., see :func:`inspector.batch.ray.run_batch_ray`). A local batch
        of a product with a shadow version feeds the shadow worker as its rows commit (a Ray batch
        does not: its rows commit on the cluster's side). Either keeps the images it scores in
        :attr:`evidence_images`."""
        kwargs.setdefault("evidence", self.evidence_images)
        if engine == "ray":
            from inspector.batch.ray import run_batch_ray

            return run_batch_ray(folder, product, self.registry, self.store, data_dir=self.data_dir, **kwargs)
        if engine != "local":
            raise ValueError(f"unknown batch engine {engine!r}; choose local or ray")
        from inspector.batch.local import run_batch

        hook = self._shadow_batch_hook(product)
        if hook is not None and "on_recorded" not in kwargs:
            kwargs["on_recorded"] = hook
        return run_batch(folder, product, self.registry, self.store, data_dir=self.data_dir, **kwargs)

    def history(self, **kwargs) -> list[dict]:
        return self.store.history(**kwargs)

    # -- evidence -------------------------------------------------------------------------------
    def evidence(self, product: str) -> list[EvidenceItem]:
        """The product's evidence: the latest decision of every decided inspection, one item per
        image (:func:`~inspector.products.feedback.evidence.latest_per_image`), oldest first."""
        name = _name(product)
        items = [it for it in map(item_from_row, self.store.evidence(name)) if it is not None]
        return latest_per_image(items)

    def feedback_summary(self, product: str) -> dict:
        """Evidence counts: ``labels`` (per label), ``by_version`` (per product version that made the
        verdict), ``since_active`` (decided after the active version was made: what a refit would
        add), ``with_mask``, ``images_missing`` (evidence whose image is not in the store: a refit
        skips it), the active version and ``min_defects``."""
        prod = self.registry.get(_name(product))
        items = self.evidence(prod.name)
        since = _parse_time(self._version_created(prod))
        out = {"product": prod.name, "active_version": prod.version, "active_created": since and since.isoformat(),
               "total": len(items), "labels": dict.fromkeys(LABELS, 0), "by_version": {},
               "since_active": dict.fromkeys(LABELS, 0), "with_mask": 0, "images_missing": 0,
               "min_defects": MIN_DEFECTS}
        for it in items:
            out["labels"][it.label] += 1
            out["by_version"].setdefault(it.version or "?", dict.fromkeys(LABELS, 0))[it.label] += 1
            decided = _parse_time(it.decided_at)
            if since is None or (decided is not None and decided >= since):
                out["since_active"][it.label] += 1
            out["with_mask"] += bool(it.mask_sha256)
            out["images_missing"] += not self.evidence_images.has(it.sha256)
        return out

    def _version_created(self, prod) -> str | None:
        """When the active version was made (its entry in the version history, else the product's
        last change)."""
        try:
            for v in self.registry.versions(prod.name):
                if v.get("version") == prod.version and v.get("created"):
                    return v["created"]
        except Exception:  # noqa: BLE001 - a product without a version history
            log.debug("no version history for %s", prod.name, exc_info=True)
        return prod.updated or prod.created or None

    def import_feedback(self, product: str, csv_path: str | os.PathLike, actor: str | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
        """Import labels made elsewhere (a QA lab's re-inspection) as evidence.

        The CSV has a header with ``path`` and ``label`` (``good`` or ``defect``) and optionally
        ``operator``, ``reason`` and ``mask`` (a defect mask image, white = defect, the size of its
        image); relative paths are relative to the CSV's folder. The whole file is validated first
        (columns, labels, every image and mask readable, masks only on defects and the size of
        their image, no path twice): a malformed CSV raises ValueError naming its line and imports
        nothing. Then each file is inspected with the active version (source ``import:<path>``),
        which keeps its image as evidence, and decided: ``good`` accepted, ``defect`` rejected, by
        the row's operator (else ``actor``). A good part the model called NG needs a reason; without
        one it gets ``false-alarm`` (the QA label is the reason). ``progress(done, total)``."""
        prod = self.registry.get(_name(product))
        actor = (actor or "").strip() or default_actor()
        csv_path = Path(csv_path)
        rows = _read_feedback_csv(csv_path)
        total = len(rows)
        out = {"product": prod.name, "version": prod.version, "csv": str(csv_path), "rows": total, "imported": 0,
               "labels": dict.fromkeys(LABELS, 0), "verdicts": {}, "model_agreed": 0, "inspection_ids": []}
        _report(progress, 0, total)
        for i, r in enumerate(rows, 1):
            rec = self.inspect(prod.name, r["path"], source=f"import:{r['path']}", operator=r["operator"] or actor)
            if rec.error is not None:  # validated a moment ago: the file changed since
                raise ValueError(f"{csv_path}: line {r['line']}: {r['path']}: {rec.error} (rows before it were imported)")
            verdict = str(rec.verdict)
            decision = FEEDBACK_LABELS[r["label"]]
            reason = r["reason"] or ("false-alarm" if decision == "accept" and verdict == "NG" else None)
            self.decide(rec.id, decision, r["operator"] or actor, reason=reason,
                        note=f"imported from {csv_path.name} line {r['line']}", mask=r["mask"], expect_latest=None)
            label = "normal" if decision == "accept" else "defect"
            out["imported"] += 1
            out["labels"][label] += 1
            out["verdicts"][verdict] = out["verdicts"].get(verdict, 0) + 1
            out["model_agreed"] += (verdict == "OK") == (label == "normal")
            out["inspection_ids"].append(rec.id)
            _report(progress, i, total)
        self.store.audit(actor=actor, action="feedback-import", product=prod.name,
                         details={k: out[k] for k in ("version", "csv", "rows", "imported", "labels", "verdicts")})
        return out

    def refit(self, product: str, actor: str | None = None, progress=None, promote: bool = False) -> dict:
        """Build a candidate version from the shots plus the evidence
        (:meth:`inspector.products.registry.ProductRegistry.refit`): the evidence images are loaded
        (with their masks, resized to the image); evidence whose image is gone is skipped and
        counted (``skipped_missing``)."""
        import cv2

        name = _name(product)
        labeled, missing = [], 0
        for it in self.evidence(name):
            if not self.evidence_images.has(it.sha256):
                missing += 1
                continue
            img = self.evidence_images.read(it.sha256)
            mask = None
            if it.label == "defect" and it.mask_sha256 and self.evidence_images.has(it.mask_sha256):
                m = self.evidence_images.read_mask(it.mask_sha256)
                if m.shape != img.shape[:2]:
                    m = cv2.resize(m.astype(np.uint8), (img.shape[1], img.shape[0]),
                                   interpolation=cv2.INTER_NEAREST) > 0
                mask = m
            labeled.append(LabeledImage(img, it.label, it.sha256, mask, it))
        result = self.registry.refit(name, labeled, actor=actor, progress=progress, promote=promote)
        return {**result, "skipped_missing": missing}

    def versions(self, product: str) -> list[dict]:
        return self.registry.versions(_name(product))

    def promote(self, product: str, version: str, actor: str | None = None):
        return self.registry.promote(_name(product), version, actor=actor)

    def rollback(self, product: str, actor: str | None = None):
        return self.registry.rollback(_name(product), actor=actor)

    def set_shadow(self, product: str, version: str | None, actor: str | None = None):
        return self.registry.set_shadow(_name(product), version, actor=actor)

    # -- shadow mode ----------------------------------------------------------------------------
    def _shadow_version(self, name: str) -> str | None:
        try:
            return self.registry.shadow_version(name)
        except Exception:  # noqa: BLE001 - shadow mode never fails an inspection
            log.debug("shadow version of %s unknown", name, exc_info=True)
            return None

    def _shadow_submit(self, prod, inspection_id: int, rgb: np.ndarray, sha: str | None, verdict) -> None:
        """Hand a recorded part to the shadow worker (never blocks; see :mod:`inspector.station.shadow`)."""
        version = self._shadow_version(prod.name)
        if not version or version == prod.version:
            return
        job = ShadowJob(prod.name, version, inspection_id=inspection_id, sha256=sha, verdict=str(verdict))
        if self.shadow.has_room():
            job.rgb = rgb.copy()  # the worker's own copy: the caller may do what it likes with its array
        self.shadow.submit(job)

    def _shadow_batch_hook(self, product) -> Callable[[list[dict]], None] | None:
        name = product.name if hasattr(product, "name") else _name(product)
        version = self._shadow_version(name)
        if not version:
            return None

        def on_recorded(rows: list[dict]) -> None:
            for r in rows:
                verdict = str(getattr(r.get("verdict"), "value", r.get("verdict")))
                if verdict == ERROR or not r.get("image_sha256") or r.get("model_version") == version:
                    continue
                self.shadow.submit(ShadowJob(name, version, sha256=r["image_sha256"], batch_id=r.get("batch_id"),
                                             source=str(r["source"]), verdict=verdict))

        return on_recorded

    def _score_shadow(self, job: ShadowJob) -> dict:
        """The shadow worker's scoring: the candidate version on the part's image; a heatmap PNG is
        written only when the candidate disagrees with the active verdict."""
        prod = self.registry.get(f"{job.product}@{job.version}")
        rgb = job.rgb if job.rgb is not None else self._evidence_rgb(job)
        ins = prod.inspect([rgb])[0]
        verdict = str(ins.verdict)
        hp = None
        if job.verdict is not None and verdict != job.verdict:
            ov = overlay(rgb, ins.map, prod.thresholds, low=prod.map_low, max_side=MAX_SIDE, peak=ins.score)
            day = datetime.now(UTC).strftime("%Y%m%d")
            hp = (self.heatmap_dir / prod.name / "shadow" / prod.version / day
                  / f"{(job.sha256 or 'x')[:12]}-{uuid.uuid4().hex[:8]}.png")
            save_png(hp, ov)
        return {"score": float(ins.score), "verdict": verdict, "heatmap_path": None if hp is None else str(hp)}

    def _evidence_rgb(self, job: ShadowJob) -> np.ndarray:
        """A part's image for the shadow worker: from the evidence store, else its source file
        (only if its bytes still hash to what was scored)."""
        if job.sha256 and self.evidence_images.has(job.sha256):
            return self.evidence_images.read(job.sha256)
        if job.source and os.path.isfile(job.source):
            data = read_file_bytes(job.source, job.source)
            if job.sha256 is None or bytes_sha256(data) == job.sha256:
                return read_image(data, name=job.source)
            raise ValueError(f"{job.source} changed since it was inspected")
        raise FileNotFoundError(f"the image of inspection {job.inspection_id} is not kept")

    def shadow_tally(self, product: str, version: str | None = None) -> dict:
        """How the shadow candidate (``version``, default: the current one) is doing; see
        :meth:`inspector.station.store.Store.shadow_tally`. Adds ``pending`` (parts waiting on the
        worker) and ``queue`` (its size)."""
        name = _name(product)
        version = version or self._shadow_version(name)
        self.shadow.flush_drops()
        tally = self.store.shadow_tally(name, version)
        return {**tally, "pending": self.shadow.pending, "queue": self.shadow.queue_size}

    def disagreements(self, product: str, limit: int = 50, version: str | None = None) -> list[dict]:
        """Parts the shadow candidate judged differently from the active version, newest first, with
        both verdicts, scores and heatmap paths and the operator's decision if any."""
        name = _name(product)
        version = version or self._shadow_version(name)
        return [] if version is None else self.store.disagreements(name, version, limit)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the shadow worker (the part it is scoring finishes; queued parts count as dropped)."""
        self.shadow.close(timeout)


def _name(product) -> str:
    """A product name from ``name`` or ``name@version``."""
    return str(product).split("@", 1)[0]


def _parse_time(v) -> datetime | None:
    if v is None or v == "":
        return None
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    try:
        t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _report(progress, done: int, total: int) -> None:
    if progress is not None:
        try:
            progress(done, total)
        except Exception:  # noqa: BLE001 - a progress display never stops an import
            log.debug("progress callback failed", exc_info=True)


def _read_feedback_csv(csv_path: Path) -> list[dict]:
    """Parse and validate a whole feedback CSV (see :meth:`StationService.import_feedback`);
    ValueError naming the line of the first problem."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"no such feedback file: {csv_path}")
    base = csv_path.resolve().parent

    def bad(line: int, msg: str) -> ValueError:
        return ValueError(f"{csv_path}: line {line}: {msg}; nothing was imported")

    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{csv_path}: not UTF-8 text ({exc}); nothing was imported") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise bad(1, "empty file (expected a header with path,label)")
    header = [h.strip().lower() for h in header]
    unknown = [h for h in header if h not in FEEDBACK_COLUMNS]
    if unknown or "path" not in header or "label" not in header or len(set(header)) != len(header):
        raise bad(1, f"header must name path and label, optionally {', '.join(FEEDBACK_COLUMNS[2:])}, each once; "
                     f"got {','.join(header)}")
    rows, seen = [], {}
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # a blank line
        if len(cells) != len(header):
            raise bad(line, f"{len(cells)} field(s), the header has {len(header)}")
        r = {k: v.strip() for k, v in zip(header, cells)}
        if not r["path"]:
            raise bad(line, "empty path")
        label = r["label"].lower()
        if label not in FEEDBACK_LABELS:
            raise bad(line, f"label must be good or defect, got {r['label']!r}")
        path = (base / r["path"]).resolve()
        if str(path) in seen:
            raise bad(line, f"{r['path']} is listed twice (first on line {seen[str(path)]})")
        seen[str(path)] = line
        try:
            img = read_image(path)
        except ImageError as exc:
            raise bad(line, f"{r['path']}: {exc.reason}") from None
        mask = None
        if r.get("mask"):
            if label != "defect":
                raise bad(line, "a mask is only for a defect")
            try:
                m = read_image(base / r["mask"])
            except ImageError as exc:
                raise bad(line, f"mask {r['mask']}: {exc.reason}") from None
            if m.shape[:2] != img.shape[:2]:
                raise bad(line, f"mask {r['mask']} is {m.shape[1]}x{m.shape[0]}, its image {img.shape[1]}x{img.shape[0]}")
            mask = m[..., 0] > 127
        rows.append({"line": line, "path": str(path), "label": label, "operator": r.get("operator") or None,
                     "reason": r.get("reason") or None, "mask": mask})
    if not rows:
        raise ValueError(f"{csv_path}: no rows after the header; nothing was imported")
    return rows


def _content_sha256(data) -> str | None:
    """The sha256 recorded for what :meth:`StationService.inspect` was given: of the bytes (a file's
    bytes, read once), or of an array's content (:func:`inspector.state.array_sha256`)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes_sha256(data)
    if isinstance(data, np.ndarray):
        return array_sha256(data)
    return None


__all__ = ["InspectionRecord", "StationService"]
