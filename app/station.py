"""The station's Gradio Blocks, built over one :class:`inspector.service.Station`.

Tabs: Inspect (operators), Live (camera), Register (engineers, calibration and thresholds),
Batch, Synthesize, History. Every handler is a few lines that call the library and format its
answer; scoring, verdicts, storage and reports all live in :mod:`inspector`.

Concurrency: the queue serves ``config.concurrency`` requests at once, while every interactive
model call (inspect, register, synthetic-defect scoring) holds one station-wide lock, so GPU/CPU
work is serialised and parallel users queue instead of competing for memory. Batches run in
chunks through the product's runtime, whose own lock serialises each chunk, so inspections
interleave with a long batch instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from inspector.camera import CameraPool, FolderSource, make_source
from inspector.config import CAMERA_REFUSED, SourceNotAllowed, StationConfig
from inspector.io import ImageError, is_image_file, read_image

from . import views

log = logging.getLogger("inspector.station")

MAX_SHOTS = 8
RECENT = 25  # inspections re-verdicted live under new thresholds
NG_GALLERY = 8
SINCE = {"last hour": timedelta(hours=1), "last 24 h": timedelta(days=1), "last 7 days": timedelta(days=7),
         "all time": None}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch


def _error(message: str) -> gr.Error:
    """A user-facing error; escaped, since Gradio renders the message as HTML and it may quote file
    or product names."""
    return gr.Error(html.escape(str(message)))


def _user(request: gr.Request | None) -> str | None:
    """The signed-in user (with login configured); None otherwise (the library then records its
    default actor for registry changes and no operator for decisions)."""
    name = getattr(request, "username", None) if request is not None else None
    return name or None


class StationApp:
    """Holds the station, its config, the camera pool and the model lock; builds the Blocks."""

    def __init__(self, station, config: StationConfig | None = None, pool: CameraPool | None = None):
        self.station = station
        self.config = config or StationConfig()
        self.pool = pool or CameraPool()
        self.model_lock = getattr(station, "lock", None) or threading.RLock()
        self._downloads = Path(tempfile.mkdtemp(prefix="inspector-station-"))
        self.demo: gr.Blocks | None = None

    # ---- library access ----------------------------------------------------------------------
    @property
    def registry(self):
        return self.station.registry

    @property
    def store(self):
        return self.station.store

    @property
    def data_dir(self) -> Path:
        return Path(getattr(self.station, "data_dir", None) or self.config.data_dir or "data")

    def product_names(self) -> list[str]:
        return sorted(p.name for p in self.registry.list())

    def _product(self, name: str | None):
        if not name:
            raise _error("Choose a product first (register one in the Register tab).")
        try:
            return self.registry.get(name)
        except KeyError as exc:
            raise _error(f"Unknown product {name!r}.") from exc

    def inspect(self, product: str, image: Any, source: str, operator: str | None):
        """One inspection through the library, model calls serialised. A bad image comes back as a
        record with ``error`` set (the library records it); a failure of the model itself is shown
        to the user as a clear error, not a bare "Error"."""
        with self.model_lock:
            try:
                return self.station.inspect(product, image, source=source, operator=operator)
            except (ImageError, KeyError):
                raise
            except Exception as exc:  # noqa: BLE001
                log.exception("inspection of %s with %s failed", source, product)
                raise _error(f"Inspection failed: {type(exc).__name__}: {exc}") from exc

    # ---- Inspect tab -------------------------------------------------------------------------
    def _record_outputs(self, product: str, rec) -> tuple:
        p = self.registry.get(product)
        t = getattr(rec, "thresholds", None) or p.thresholds  # the ones this inspection was decided with
        verdict = None if getattr(rec, "error", None) else rec.verdict
        badge = views.verdict_html(verdict, score=rec.score, thresholds=t, latency_ms=rec.latency_ms,
                                   inspection_id=rec.id, error=rec.error, product=product)
        details = {"id": rec.id, "product": product, "score": None if rec.score is None else float(rec.score),
                   "verdict": str(verdict) if verdict is not None else "ERROR", "latency_ms": rec.latency_ms,
                   "thresholds": {"ok_below": t.ok_below, "ng_above": t.ng_above},
                   "model_version": getattr(rec, "model_version", None) or p.version, "error": rec.error}
        overlay = getattr(rec, "overlay", None)
        can_decide = rec.id is not None and not rec.error
        return (overlay, badge, details, rec.id, gr.update(interactive=can_decide),
                gr.update(interactive=can_decide), "")

    def on_inspect(self, product: str, image_path: str | None, request: gr.Request):
        self._product(product)
        if not image_path:
            raise _error("Upload an image to inspect.")
        try:
            rec = self.inspect(product, image_path, source=f"upload:{Path(image_path).name}", operator=_user(request))
        except ImageError as exc:
            raise _error(f"Not a usable image: {exc.reason}") from exc
        return (gr.skip(), *self._record_outputs(product, rec))

    def on_camera_frame(self, product: str, source: str, request: gr.Request):
        self._product(product)
        cam = self._camera(source)
        frame = cam.next_frame()
        if not frame.ok:
            raise _error(f"Camera: {frame.error}")
        rec = self.inspect(product, frame.image, source=f"camera:{cam.source.short}/{frame.name or frame.index}",
                           operator=_user(request))
        return (frame.image, *self._record_outputs(product, rec))

    def on_decide(self, inspection_id: int | None, decision: str, request: gr.Request):
        if inspection_id is None:
            raise _error("Inspect an image first.")
        user = _user(request)
        self.station.decide(int(inspection_id), decision, user)
        word = "Accepted" if decision == "accept" else "Rejected"
        return f"**{word}** inspection #{int(inspection_id)} — recorded" + (f" by {user}." if user else ".")

    def on_accept(self, inspection_id: int | None, request: gr.Request):
        return self.on_decide(inspection_id, "accept", request)

    def on_reject(self, inspection_id: int | None, request: gr.Request):
        return self.on_decide(inspection_id, "reject", request)

    # ---- Live tab ----------------------------------------------------------------------------
    def _camera(self, source: str | None):
        """The pooled camera for a requested source, which must be configured or a folder under
        the allowed roots (:meth:`StationConfig.camera_source`); one uniform error otherwise."""
        source = (source or "").strip()
        if not source:
            raise _error("Set a camera source: a configured camera, or a folder under the allowed roots.")
        try:
            spec = self.config.camera_source(source)
        except SourceNotAllowed as exc:
            log.warning("camera source refused: %r", source[:200])
            raise _error(CAMERA_REFUSED) from exc
        try:
            make_source(spec)  # a configured source: its own error may be shown
        except ValueError as exc:
            raise _error(str(exc)) from exc
        cam = self.pool.get(spec)
        if isinstance(cam.source, FolderSource) and cam.source.roots is None and spec != self.config.camera \
                and spec not in self.config.cameras.values():
            cam.source.roots = tuple(self.config.allowed_batch_roots)  # frames too: no link out of the roots
        return cam

    @staticmethod
    def _new_counts() -> dict:
        return {"OK": 0, "UNCERTAIN": 0, "NG": 0, "ERROR": 0}

    def on_live_start(self, product: str, source: str):
        self._product(product)
        cam = self._camera(source)
        return gr.Timer(active=True), views.camera_html(cam.status()), gr.update(interactive=False), \
            gr.update(interactive=True)

    def on_live_stop(self, source: str):
        status = None
        with contextlib.suppress(Exception):
            status = dict(self.pool.get(self.config.camera_source(source)).status(), state="closed") \
                if source else None
        return gr.Timer(active=False), views.camera_html(status), gr.update(interactive=True), \
            gr.update(interactive=False)

    def on_live_tick(self, product: str, source: str, counts: dict, ng_list: list):
        counts = dict(counts or self._new_counts())
        ng_list = list(ng_list or [])
        try:
            cam = self._camera(source)
            self._product(product)
        except gr.Error as exc:
            status = views.camera_html(None, extra=html.unescape(str(exc.message)))
            return (gr.skip(), gr.skip(), status, views.counts_html(counts),
                    counts, gr.skip(), ng_list)
        frame = cam.next_frame()
        if not frame.ok:
            return (gr.skip(), gr.skip(), views.camera_html(cam.status()), views.counts_html(counts), counts,
                    gr.skip(), ng_list)
        try:
            rec = self.inspect(product, frame.image,
                               source=f"camera:{cam.source.short}/{frame.name or frame.index}", operator=None)
        except gr.Error as exc:  # keep the loop alive: count it and show it
            counts["ERROR"] = counts.get("ERROR", 0) + 1
            badge = views.verdict_html(error=html.unescape(str(exc.message)), product=f"{product} · {frame.name or frame.index}")
            return (frame.image, badge, views.camera_html(cam.status()), views.counts_html(counts), counts,
                    gr.skip(), ng_list)
        p = self.registry.get(product)
        key = "ERROR" if rec.error else str(rec.verdict)
        counts[key] = counts.get(key, 0) + 1
        badge = views.verdict_html(None if rec.error else rec.verdict, score=rec.score, thresholds=p.thresholds,
                                   latency_ms=rec.latency_ms, inspection_id=rec.id, error=rec.error,
                                   product=f"{product} · {frame.name or frame.index}")
        if key == "NG":
            ng_list = ([(rec.overlay, f"#{rec.id} · {frame.name or ''} · {rec.score:.4g}")] + ng_list)[:NG_GALLERY]
        shown = rec.overlay if getattr(rec, "overlay", None) is not None else frame.image
        return (shown, badge, views.camera_html(cam.status()), views.counts_html(counts), counts,
                ng_list if key == "NG" else gr.skip(), ng_list)

    def on_live_reset(self):
        counts = self._new_counts()
        return views.counts_html(counts), counts, [], []

    # ---- Register tab ------------------------------------------------------------------------
    def on_register(self, name: str, files: list | None, detector: str, backbone: str, size: int | str,
                    replace: bool, request: gr.Request, generator: str | None = None, progress=gr.Progress()):
        name = (name or "").strip()
        if not _NAME_RE.fullmatch(name):
            raise _error("Product name: letters, digits, '-', '_' or '.', at most 64 characters.")
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
        if not 1 <= len(paths) <= MAX_SHOTS:
            raise _error(f"Upload 1 to {MAX_SHOTS} normal images (got {len(paths)}).")
        images = []
        for p in paths:
            try:
                images.append(read_image(p))
            except ImageError as exc:
                raise _error(f"{Path(p).name}: {exc.reason}") from exc
        progress(0.05, desc=f"Fitting {detector} on {len(images)} shots and calibrating…")
        t0 = time.perf_counter()
        try:
            with self.model_lock:
                product = self.registry.register(name, images, detector=detector, backbone=backbone,
                                                 image_size=int(size), replace=bool(replace), actor=_user(request),
                                                 generator=_generator_choice(generator))
        except (ValueError, KeyError) as exc:  # ProductExists, bad detector/backbone name...
            raise _error(str(exc.args[0] if exc.args else exc)) from exc
        except Exception as exc:  # noqa: BLE001 - e.g. missing weights for the chosen backbone
            log.exception("registration of %s failed", name)
            raise _error(f"Registration failed: {type(exc).__name__}: {exc}") from exc
        secs = time.perf_counter() - t0
        msg = (f"Registered **{product.name}**: {product.detector} on {product.backbone}, {len(images)} shots, "
               f"version `{product.version}` in {secs:.1f} s. Thresholds: OK below "
               f"{product.thresholds.ok_below:.4g}, NG from {product.thresholds.ng_above:.4g}.")
        names = self.product_names()
        return (msg, *self._product_dropdowns(names, product.name), *self._calibration(product.name))

    def _product_dropdowns(self, names: list[str], value: str | None) -> list:
        # order: inspect, live, calibration, batch, synth, history
        upd = [gr.update(choices=names, value=value) for _ in range(5)]
        upd.append(gr.update(choices=["(all)"] + names))
        return upd

    def _calibration(self, name: str | None, ok: float | None = None, ng: float | None = None) -> tuple:
        """(plot, ok slider, ng slider, re-verdict table, note) for product ``name``."""
        if not name:
            return None, gr.update(), gr.update(), None, "Choose a product."
        from inspector.verdict import Thresholds

        p = self._product(name)
        cal = getattr(p, "calibration", None) or {}
        normal = [float(s) for s in cal.get("normal_scores", [])]
        defects = [float(s) for s in cal.get("defect_scores", [])]
        t = p.thresholds if ok is None else Thresholds(float(ok), float(max(ok, ng)))
        vals = normal + defects + [p.thresholds.ok_below, p.thresholds.ng_above]
        lo, hi = min(vals), max(vals)
        span = (hi - lo) or max(abs(hi), 1.0)
        lo, hi = max(0.0, lo - 0.25 * span) if lo >= 0 else lo - 0.25 * span, hi + 0.25 * span
        nd = max(0, 2 - math.floor(math.log10(hi - lo)))
        lo, hi = math.floor(lo * 10**nd) / 10**nd, math.ceil(hi * 10**nd) / 10**nd
        step = 10 ** -(nd + 1)
        fig = views.calibration_figure(normal, defects, t.ok_below, t.ng_above,
                                       title=f"{p.name}: {p.detector} / {p.backbone}, {p.shots} shots")
        rows = self.store.history(product=p.name, limit=RECENT)
        table, note = views.reverdict_frame(rows, t)
        from inspector.synth.severity import severity_markdown

        sev = severity_markdown(cal, t.ok_below, t.ng_above)
        note = f"{note}\n\n{sev}" if sev else note
        if ok is None:
            return (fig, gr.update(minimum=lo, maximum=hi, value=t.ok_below, step=step),
                    gr.update(minimum=lo, maximum=hi, value=t.ng_above, step=step), table, note)
        return fig, gr.skip(), gr.skip(), table, note

    def on_calibration_select(self, name: str):
        return self._calibration(name)

    def on_threshold_preview(self, name: str, ok: float, ng: float):
        if not name:
            return None, gr.skip(), gr.skip(), None, "Choose a product."
        note_extra = ""
        if ok is not None and ng is not None and ok > ng:
            note_extra = " **OK threshold is above the NG threshold: NG is raised to match.**"
        fig, _, _, table, note = self._calibration(name, ok, ng)
        return fig, gr.skip(), gr.skip(), table, note + note_extra

    def on_threshold_save(self, name: str, ok: float, ng: float, request: gr.Request):
        from inspector.verdict import Thresholds

        self._product(name)
        try:
            t = Thresholds(float(ok), float(ng))
        except ValueError as exc:
            raise _error(str(exc)) from exc
        self.registry.set_thresholds(name, t, actor=_user(request))
        who = _user(request)
        return (f"Saved thresholds for **{name}**: OK below {t.ok_below:.4g}, NG from {t.ng_above:.4g}"
                + (f" (by {who})" if who else "") + "; new inspections use them.")

    # ---- Batch tab ---------------------------------------------------------------------------
    def _extract_zip(self, path: str) -> Path:
        cfg = self.config
        dest = self.data_dir / "uploads" / f"batch-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise _error(f"Not a readable zip file: {exc}") from exc
        with zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > cfg.max_zip_members:
                raise _error(f"Zip holds {len(members)} files; the limit is {cfg.max_zip_members}.")
            total = sum(m.file_size for m in members)
            if total > cfg.max_zip_bytes:
                raise _error(f"Zip expands to {total / 1e6:.0f} MB; the limit is {cfg.max_zip_bytes / 1e6:.0f} MB.")
            dest.mkdir(parents=True)
            n = 0
            for m in members:
                rel = Path(m.filename)
                if rel.is_absolute() or ".." in rel.parts or not is_image_file(rel):
                    continue  # zip-slip and non-images are skipped
                target = dest / Path(*[p for p in rel.parts if p not in ("", ".")])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                n += 1
        if n == 0:
            shutil.rmtree(dest, ignore_errors=True)
            raise _error("The zip holds no image files.")
        return dest

    def _drop_upload(self, zip_path: str | None) -> None:
        """Delete the uploaded zip (Gradio's cached copy) once it has been read: an upload must not
        stay on disk after its batch."""
        if zip_path and not self.config.keep_uploads:
            with contextlib.suppress(OSError):
                Path(zip_path).unlink()

    def _download_copy(self, path: str | os.PathLike | None) -> str | None:
        """Reports are copied out of the data dir so that only they, never the database, are served."""
        if not path or not Path(path).is_file():
            return None
        d = self._downloads / uuid.uuid4().hex[:8]
        d.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy2(path, d / Path(path).name))

    def on_batch(self, product: str, folder: str, zip_path: str | None, request: gr.Request,
                 progress=gr.Progress()):
        self._product(product)
        folder = (folder or "").strip()
        if bool(folder) == bool(zip_path):
            raise _error("Give either a folder on the station or a zip file (one of the two).")
        upload = None
        if folder:
            try:
                root = self.config.batch_folder_allowed(folder)
            except PermissionError as exc:
                raise _error(str(exc)) from exc
            if not root.is_dir():
                raise _error(f"Not a folder: {folder}")
            roots = tuple(self.config.allowed_batch_roots)
        else:
            try:
                root = upload = self._extract_zip(zip_path)
            finally:
                self._drop_upload(zip_path)
            roots = (root,)
        progress(0, desc="Scoring…")

        def on_progress(done: int, total: int) -> None:
            progress((done, total), desc="Scoring", unit="images")

        # Not under the station-wide lock: the product's runtime serialises each model call (one
        # chunk of images at a time), so operators' inspections interleave with a long batch.
        try:
            summary = self.station.batch(root, product, progress=False, on_progress=on_progress, roots=roots,
                                         **({"engine": "ray", "address": self.config.ray_address}
                                            if self.config.ray_address else {}))
        except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: Ray/runtime unavailable
            raise _error(str(exc)) from exc
        finally:
            if upload is not None and not self.config.keep_uploads:
                shutil.rmtree(upload, ignore_errors=True)  # rows, heatmaps and reports stay
        rows = self.store.history(batch_id=summary.batch_id, limit=None)
        df = views.batch_frame(rows, summary.folder)
        counts = {v: sum(1 for r in rows if r.get("verdict") == v) for v in ("OK", "UNCERTAIN", "NG", "ERROR")}
        msg = (f"Batch `{summary.batch_id}` on **{product}**: {summary.n_files} files, {summary.n_scored} scored, "
               f"{summary.n_errors} errors ({summary.n_skipped} already done earlier) — "
               + ", ".join(f"{k} {v}" for k, v in counts.items()) + f". {summary.images_per_s:.1f} images/s.")
        files = [f for f in (self._download_copy(getattr(summary, "csv_path", None)),
                             self._download_copy(getattr(summary, "html_path", None))) if f]
        return msg, df, files

    # ---- Synthesize tab ----------------------------------------------------------------------
    def _shot_images(self, product: str) -> list[np.ndarray]:
        try:
            return list(self._product(product).shot_images())
        except (OSError, ImageError):
            return []

    def on_synthesize(self, product: str, upload: str | None, kind: str, n: int, seed: int, score: bool,
                      severity: float | None = None):
        from inspector.synth import generate_defects

        if upload:
            normals = [read_image(upload)]
        elif product:
            normals = self._shot_images(product)
            if not normals:
                raise _error(f"No stored shots for {product}: upload a normal image.")
        else:
            raise _error("Choose a product or upload a normal image.")
        sev = None if severity is None or float(severity) < 0 else float(severity)
        pairs = generate_defects(normals, int(n), rng=int(seed), generator=_generator_choice(kind), severity=sev)
        captions = [f"#{i + 1} · defect {100 * m.mean():.1f}% of image" for i, (_, m) in enumerate(pairs)]
        if score and product:
            p = self._product(product)
            with self.model_lock:
                results = p.inspect([img for img, _ in pairs])
            captions = [f"#{i + 1} · {r.verdict} · {r.score:.3g}" for i, r in enumerate(results)]
        gallery = [(views.mask_outline(img, m), c) for (img, m), c in zip(pairs, captions)]
        return gallery

    # ---- History tab -------------------------------------------------------------------------
    def on_history(self, product: str, verdict: str, since: str, limit: int):
        delta = SINCE.get(since)
        rows = self.store.history(product=None if product in (None, "", "(all)") else product,
                                  verdict=None if verdict in (None, "", "(all)") else verdict,
                                  since=datetime.now(UTC) - delta if delta else None, limit=int(limit))
        df = views.history_frame(rows)
        gallery = []
        for r in rows:
            hp = r.get("heatmap_path")
            if hp and Path(hp).is_file() and len(gallery) < 24:
                with contextlib.suppress(ImageError):
                    gallery.append((read_image(hp), f"#{r['id']} · {r.get('verdict')} · {_score(r)}"))
        return df, gallery, f"{len(rows)} inspections."

    def on_history_select(self, df, evt: gr.SelectData):
        try:
            row = evt.index[0]
            iid = int(df.iloc[row, 0])
            rec = self.store.get(iid)
        except Exception:  # noqa: BLE001
            return gr.skip(), ""
        hp = rec.get("heatmap_path")
        img = None
        if hp and Path(hp).is_file():
            with contextlib.suppress(ImageError):
                img = read_image(hp)
        text = (f"**#{iid}** {rec.get('product')} · {rec.get('verdict')} · score {_score(rec)} · "
                f"{rec.get('source')}" + (f" · decision: {rec['decision']} by {rec.get('operator')}"
                                           if rec.get("decision") else ""))
        return img, text

    # ---- layout ------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        cfg = self.config
        names = self.product_names()
        first = names[0] if names else None
        device = getattr(self.station, "device", None) or _device_name()
        with gr.Blocks(title=cfg.title, analytics_enabled=False, fill_width=True) as demo:
            gr.Markdown(f"# {cfg.title}\nFew-shot and zero-shot defect detection · device **{device}** · "
                        f"data `{self.data_dir}`", elem_id="station-header")
            with gr.Tabs():
                # -- Inspect
                with gr.Tab("Inspect", id="inspect"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=2):
                            in_product = gr.Dropdown(names, value=first, label="Product", elem_id="inspect-product")
                            in_image = gr.Image(type="filepath", label="Image to inspect", sources=["upload", "clipboard"],
                                                height=340, elem_id="inspect-image",
                                                image_mode=None)  # file as uploaded: one alpha rule (inspector.io)
                            in_btn = gr.Button("Inspect", variant="primary", size="lg", elem_id="inspect-button")
                            in_cam_btn = gr.Button("Next frame from camera", elem_id="inspect-camera")
                        with gr.Column(scale=3):
                            in_overlay = gr.Image(label="Heatmap and defect outline", interactive=False, height=420,
                                                  format="png", elem_id="inspect-overlay")
                        with gr.Column(scale=2):
                            in_verdict = gr.HTML(views.verdict_html(), elem_id="inspect-verdict")
                            with gr.Row():
                                acc_btn = gr.Button("Accept", interactive=False, elem_id="accept-button")
                                rej_btn = gr.Button("Reject", variant="stop", interactive=False, elem_id="reject-button")
                            in_decision = gr.Markdown(elem_id="inspect-decision")
                            with gr.Accordion("Details", open=False):
                                in_details = gr.JSON(label="Inspection", elem_id="inspect-details")
                    in_id = gr.State(None)

                # -- Live
                with gr.Tab("Live", id="live"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=2):
                            lv_product = gr.Dropdown(names, value=first, label="Product", elem_id="live-product")
                            lv_source = gr.Textbox(value=cfg.camera or "", label="Camera source",
                                                   placeholder="a configured camera (name or URL) · a folder under the allowed roots",
                                                   elem_id="live-source")
                            with gr.Row():
                                lv_start = gr.Button("Start", variant="primary", elem_id="live-start")
                                lv_stop = gr.Button("Stop", interactive=False, elem_id="live-stop")
                                lv_reset = gr.Button("Reset counts", size="sm")
                            lv_cam = gr.HTML(views.camera_html(None), elem_id="live-camera")
                            lv_counts = gr.HTML(views.counts_html({}), elem_id="live-counts")
                        with gr.Column(scale=3):
                            lv_image = gr.Image(label="Last frame", interactive=False, height=420, format="jpeg",
                                                elem_id="live-image")
                        with gr.Column(scale=2):
                            lv_verdict = gr.HTML(views.verdict_html(placeholder="Not running"), elem_id="live-verdict")
                    lv_gallery = gr.Gallery(label=f"Last {NG_GALLERY} NG", columns=NG_GALLERY, height=200,
                                            object_fit="contain", fit_columns=False, elem_id="live-ng")
                    lv_counts_state = gr.State(self._new_counts())
                    lv_ng_state = gr.State([])
                    timer = gr.Timer(cfg.live_interval, active=False)

                # -- Register
                with gr.Tab("Register", id="register"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=2):
                            gr.Markdown("### New product\nUpload 1–8 images of good parts. Registration fits the "
                                        "detector, scores generated defects and calibrates the two thresholds.")
                            rg_name = gr.Textbox(label="Product name", placeholder="e.g. bracket-a12",
                                                 elem_id="register-name")
                            rg_files = gr.File(file_count="multiple", file_types=["image"], label="Normal images (1–8)",
                                               elem_id="register-files")
                            with gr.Row():
                                rg_detector = gr.Dropdown(cfg.detectors, value=cfg.detectors[0], label="Detector",
                                                          elem_id="register-detector")
                                rg_backbone = gr.Dropdown(cfg.backbones, value=cfg.backbones[0], label="Backbone",
                                                          elem_id="register-backbone")
                                rg_size = gr.Dropdown(cfg.image_sizes, value=cfg.image_sizes[0], label="Input size (px)",
                                                      elem_id="register-size")
                            rg_generator = gr.Dropdown(_generator_choices(), value=FALLBACK_CHOICE,
                                                       label="Defect generator (calibration, training)",
                                                       elem_id="register-generator")
                            rg_replace = gr.Checkbox(False, label="Replace the product if it exists")
                            rg_btn = gr.Button("Register", variant="primary", elem_id="register-button")
                            rg_status = gr.Markdown(elem_id="register-status")
                        with gr.Column(scale=3):
                            gr.Markdown("### Calibration and thresholds")
                            cb_product = gr.Dropdown(names, value=first, label="Product", elem_id="calib-product")
                            cb_plot = gr.Plot(label="Score histogram", elem_id="calib-plot")
                            with gr.Row():
                                cb_ok = gr.Slider(0, 1, value=0.3, label="OK below", elem_id="calib-ok")
                                cb_ng = gr.Slider(0, 1, value=0.6, label="NG from", elem_id="calib-ng")
                            cb_save = gr.Button("Save thresholds", variant="primary", elem_id="calib-save")
                            cb_saved = gr.Markdown(elem_id="calib-saved")
                            cb_note = gr.Markdown(elem_classes="note")
                            cb_table = gr.Dataframe(views.reverdict_frame([], None)[0],
                                                    label="Recent inspections under these thresholds",
                                                    interactive=False, wrap=True, max_height=260)

                # -- Batch
                with gr.Tab("Batch", id="batch"):
                    roots = ", ".join(f"`{r}`" for r in cfg.allowed_batch_roots) or "none configured (zip only)"
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=2):
                            bt_product = gr.Dropdown(names, value=first, label="Product", elem_id="batch-product")
                            bt_folder = gr.Textbox(label="Folder on the station", elem_id="batch-folder",
                                                   info=f"Allowed under: {roots}")
                            bt_zip = gr.File(label="…or upload a zip of images", file_types=[".zip"], type="filepath",
                                             elem_id="batch-zip")
                            bt_btn = gr.Button("Run batch", variant="primary", elem_id="batch-button")
                        with gr.Column(scale=3):
                            bt_status = gr.Markdown(elem_id="batch-status")
                            bt_files = gr.File(label="Reports (CSV, HTML)", file_count="multiple", interactive=False)
                    bt_table = gr.Dataframe(views.batch_frame([]), label="Results (highest score first)",
                                            interactive=False, max_height=420, elem_id="batch-table")

                # -- Synthesize
                with gr.Tab("Synthesize", id="synth"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=1):
                            sy_product = gr.Dropdown(names, value=first, label="Product (uses its stored shots)")
                            sy_upload = gr.Image(type="filepath", label="…or a normal image", sources=["upload"],
                                                 height=200, image_mode=None)
                            sy_kind = gr.Dropdown(["any", "perlin", "cutpaste", "scar"] + _generator_choices()[1:],
                                                  value="any", label="Generator (weight-free kind or diffusion model)")
                            sy_sev = gr.Slider(-0.05, 1, value=-0.05, step=0.05, label="Severity (below 0: spread 0-1)")
                            with gr.Row():
                                sy_n = gr.Slider(1, 16, value=8, step=1, label="How many")
                                sy_seed = gr.Number(0, precision=0, label="Seed")
                            sy_score = gr.Checkbox(True, label="Score them with the product")
                            sy_btn = gr.Button("Generate", variant="primary")
                        with gr.Column(scale=3):
                            sy_gallery = gr.Gallery(label="Generated defects (exact mask outlined in red)", columns=4,
                                                    height=520, object_fit="contain")

                # -- History
                with gr.Tab("History", id="history") as hist_tab:
                    with gr.Row():
                        hs_product = gr.Dropdown(["(all)"] + names, value="(all)", label="Product")
                        hs_verdict = gr.Dropdown(["(all)", "OK", "UNCERTAIN", "NG", "ERROR"], value="(all)",
                                                 label="Verdict")
                        hs_since = gr.Dropdown(list(SINCE), value="last 24 h", label="Since")
                        hs_limit = gr.Slider(10, 1000, value=100, step=10, label="Rows")
                        hs_btn = gr.Button("Refresh", variant="primary", scale=0)
                    hs_note = gr.Markdown()
                    hs_table = gr.Dataframe(views.history_frame([]), interactive=False, wrap=False, max_height=420,
                                            elem_id="history-table")
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=1):
                            hs_image = gr.Image(label="Selected inspection (click a row)", interactive=False,
                                                height=300)
                            hs_caption = gr.Markdown()
                        with gr.Column(scale=3):
                            hs_gallery = gr.Gallery(label="Heatmaps (newest first)", columns=6, height=340,
                                                    object_fit="contain", fit_columns=False)

            # -- events
            decision_outs = [in_overlay, in_verdict, in_details, in_id, acc_btn, rej_btn, in_decision]
            in_btn.click(self.on_inspect, [in_product, in_image], [in_image, *decision_outs], api_name="inspect")
            in_cam_btn.click(self.on_camera_frame, [in_product, lv_source], [in_image, *decision_outs],
                             api_name="inspect_camera")
            acc_btn.click(self.on_accept, [in_id], [in_decision], api_name="accept")
            rej_btn.click(self.on_reject, [in_id], [in_decision], api_name="reject")

            lv_start.click(self.on_live_start, [lv_product, lv_source], [timer, lv_cam, lv_start, lv_stop],
                           api_name=False)
            lv_stop.click(self.on_live_stop, [lv_source], [timer, lv_cam, lv_start, lv_stop], api_name=False)
            timer.tick(self.on_live_tick, [lv_product, lv_source, lv_counts_state, lv_ng_state],
                       [lv_image, lv_verdict, lv_cam, lv_counts, lv_counts_state, lv_gallery, lv_ng_state],
                       show_progress="hidden", api_name=False, trigger_mode="once")
            lv_reset.click(self.on_live_reset, None, [lv_counts, lv_counts_state, lv_gallery, lv_ng_state],
                           api_name=False)

            dropdowns = [in_product, lv_product, cb_product, bt_product, sy_product, hs_product]
            calib_outs = [cb_plot, cb_ok, cb_ng, cb_table, cb_note]
            rg_btn.click(self.on_register, [rg_name, rg_files, rg_detector, rg_backbone, rg_size, rg_replace,
                                            rg_generator],
                         [rg_status, *dropdowns, *calib_outs], api_name="register")
            # .input (user picks), not .change: register/load already return the calibration view, and a
            # second, late refresh would reset sliders the engineer is moving
            cb_product.input(self.on_calibration_select, [cb_product], calib_outs, api_name=False)
            for s in (cb_ok, cb_ng):
                # .input: user moves only (a programmatic update must not re-validate against old bounds)
                s.input(self.on_threshold_preview, [cb_product, cb_ok, cb_ng], calib_outs, show_progress="hidden",
                        trigger_mode="always_last", api_name=False)
            cb_save.click(self.on_threshold_save, [cb_product, cb_ok, cb_ng], [cb_saved], api_name="set_thresholds")
            cb_product.input(lambda: "", None, [cb_saved], api_name=False)

            bt_btn.click(self.on_batch, [bt_product, bt_folder, bt_zip], [bt_status, bt_table, bt_files],
                         api_name="batch")
            sy_btn.click(self.on_synthesize, [sy_product, sy_upload, sy_kind, sy_n, sy_seed, sy_score, sy_sev],
                         [sy_gallery],
                         api_name="synthesize")
            hist_outs = [hs_table, hs_gallery, hs_note]
            hs_btn.click(self.on_history, [hs_product, hs_verdict, hs_since, hs_limit], hist_outs, api_name="history")
            hist_tab.select(self.on_history, [hs_product, hs_verdict, hs_since, hs_limit], hist_outs, api_name=False)
            hs_table.select(self.on_history_select, [hs_table], [hs_image, hs_caption], api_name=False)

            def _refresh(current):
                names = self.product_names()
                keep = current if current in names else (names[0] if names else None)
                return (*self._product_dropdowns(names, keep), *self._calibration(keep))

            demo.load(_refresh, [in_product], [*dropdowns, *calib_outs], api_name=False)
        self.demo = demo
        return demo

    # ---- serving -----------------------------------------------------------------------------
    def launch_kwargs(self) -> dict:
        cfg = self.config
        guard = cfg.auth(audit=self._audit_login)
        auth = None
        if guard is not None:
            async def auth(username: str, password: str) -> bool:  # scrypt off the event loop
                return await asyncio.to_thread(guard, username, password)
        return dict(server_name=cfg.host, server_port=cfg.port, auth=auth,
                    auth_message="Inspection station: sign in" if cfg.users else None,
                    max_file_size=cfg.max_file_size, blocked_paths=[str(self.data_dir.resolve())],
                    css=views.CSS, theme=gr.themes.Soft(primary_hue="blue"), footer_links=["api"],
                    show_error=True)

    def _audit_login(self, user: str, reason: str, details: dict) -> None:
        """Failed logins go to the audit trail (and the log), like every registry change."""
        log.warning("login refused for %r: %s", user[:128], reason)
        self.store.audit(actor=user[:128] or "?", action="login_failed", product=None,
                         details={"reason": reason, **details})

    def launch(self, **overrides) -> Any:
        demo = self.demo or self.build()
        demo.queue(default_concurrency_limit=self.config.concurrency, max_size=self.config.max_queue)
        for w in self.config.warnings():
            log.warning(w)
        kw = self.launch_kwargs()
        kw.update(overrides)
        return demo.launch(**kw)

    def close(self) -> None:
        self.pool.close_all()
        if self.demo is not None:
            with contextlib.suppress(Exception):
                self.demo.close()
        shutil.rmtree(self._downloads, ignore_errors=True)


FALLBACK_CHOICE = "fallback (weight-free)"


def _generator_choices() -> list[str]:
    """The Register/Synthesize generator choices: weight-free, then every models/synth/NAME."""
    from inspector.synth import list_generators

    return [FALLBACK_CHOICE] + [f"diffusion: {p.name}" for p in list_generators()]


def _generator_choice(choice: str | None):
    """Dropdown value -> ``generate_defects``'s ``generator`` (None, a kind, or a model folder)."""
    if not choice or choice in (FALLBACK_CHOICE, "any"):
        return None
    if choice.startswith("diffusion: "):
        from inspector.synth import synth_models_dir

        return str(synth_models_dir() / choice.split(": ", 1)[1])
    return choice


def _score(r: dict) -> str:
    return "-" if r.get("score") is None else f"{float(r['score']):.4g}"


def _device_name() -> str:
    try:
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "cpu"


def build_app(station, config: StationConfig | None = None, pool: CameraPool | None = None) -> gr.Blocks:
    return StationApp(station, config, pool).build()


def launch(station, config: StationConfig | None = None, **overrides):
    app = StationApp(station, config)
    return app.launch(**overrides)
