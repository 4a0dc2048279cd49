"""The station service: registry + store + data directory in one object, used by the CLI, the
line and the web app (:class:`StationService`).

Data directory (``StationService(data_dir)``, else ``$INSPECTOR_DATA``, else ``./data``:
:func:`inspector.paths.data_dir`)::

    inspector.db        SQLite store (or ``$INSPECTOR_DB_URL``, any SQLAlchemy URL)
    products/<name>/    registered products (see inspector.products.product)
    heatmaps/           heatmap PNGs of inspections (and heatmaps/batches/<batch id>/)
    batches/<batch id>/ batch reports (results.csv, report.html)
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from inspector import paths
from inspector.batch.common import error_row
from inspector.io import ImageError, read_file_bytes, read_image
from inspector.products.heatmap import MAX_SIDE, overlay, save_png
from inspector.products.registry import ProductRegistry
from inspector.state import array_sha256, bytes_sha256
from inspector.station.store import Store
from inspector.verdict import Thresholds, Verdict


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
    two the same way (:class:`inspector.batch.ray.Scorer`)."""

    def __init__(self, data_dir: str | os.PathLike | None = None, device=None, store_url: str | None = None):
        self.data_dir = paths.data_dir(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = store_url or os.environ.get("INSPECTOR_DB_URL") or f"sqlite:///{(self.data_dir / 'inspector.db').resolve()}"
        self.store = Store(url)
        self.registry = ProductRegistry(self.data_dir / "products", store=self.store, device=device)
        self.heatmap_dir = self.data_dir / "heatmaps"

    def inspect(self, product: str, image_or_path, source: str | None = None, operator: str | None = None,
                runtime: str = "torch", save_heatmap_png: bool = True) -> InspectionRecord:
        """Score one image (path, bytes or RGB array) and record it. A bad image is recorded with
        verdict ERROR and returned with ``error`` set; an unknown product raises."""
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
            sha = bytes_sha256(rgb.tobytes())
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
        try:  # the heatmap exists only with its row: no orphan PNG if recording fails
            rid = self.store.record_inspection(product=prod.name, source=source, image_sha256=sha,
                                               score=ins.score, verdict=ins.verdict,
                                               heatmap_path=None if hp is None else str(hp),
                                               model_version=prod.version, latency_ms=latency)
        except BaseException:
            if hp is not None:
                hp.unlink(missing_ok=True)
            raise
        return InspectionRecord(rid, prod.name, source, ins.score, ins.verdict, ins.map, ov,
                                None if hp is None else str(hp), latency, None, prod.version, prod.thresholds, rgb)

    def decide(self, inspection_id: int, decision: str, operator: str | None = None, **kw) -> dict:
        """Append an operator decision (see :meth:`inspector.station.store.Store.record_decision`)."""
        return self.store.record_decision(inspection_id, decision, operator, **kw)

    def batch(self, folder, product: str, *, engine: str = "local", **kwargs):
        """A folder batch on this machine (``engine="local"``) or on a Ray cluster (``"ray"``, with
        ``address=``, ``workers=``..., see :func:`inspector.batch.ray.run_batch_ray`)."""
        if engine == "ray":
            from inspector.batch.ray import run_batch_ray

            return run_batch_ray(folder, product, self.registry, self.store, data_dir=self.data_dir, **kwargs)
        if engine != "local":
            raise ValueError(f"unknown batch engine {engine!r}; choose local or ray")
        from inspector.batch.local import run_batch

        return run_batch(folder, product, self.registry, self.store, data_dir=self.data_dir, **kwargs)

    def history(self, **kwargs) -> list[dict]:
        return self.store.history(**kwargs)


def _content_sha256(data) -> str | None:
    """The sha256 recorded for what :meth:`StationService.inspect` was given: of the bytes (a file's
    bytes, read once), or of an array's content (:func:`inspector.state.array_sha256`)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes_sha256(data)
    if isinstance(data, np.ndarray):
        return array_sha256(data)
    return None


__all__ = ["InspectionRecord", "StationService"]
