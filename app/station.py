"""The station's Gradio Blocks, built over one :class:`inspector.station.service.Station`.

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

from inspector.cameras.sources import CameraPool, FolderSource, make_source
from inspector.io import ImageError, is_image_file, read_image
from inspector.products.heatmap import MAX_SIDE
from inspector.products.heatmap import overlay as heat_overlay
from inspector.station.config import CAMERA_REFUSED, SourceNotAllowed, StationConfig
from inspector.station.store import REASON_CODES, DecisionConflict

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
    default actor for registry changes; decisions need a name entered at the station)."""
    name = getattr(request, "username", None) if request is not None else None
    return name or None


def _operator(name: str | None, request: gr.Request | None) -> str:
    """Who decides: the signed-in user, else the name entered at the station; never blank."""
    who = _user(request) or (name or "").strip()
    if not who:
        raise _error("Enter your name in the Operator box (top of the page) before deciding.")
    if len(who) > 128:
        raise _error("Operator name: at most 128 characters.")
    return who


def _upload_label(path: str) -> str:
    """``upload:<original name>#<sha256 prefix>``: two different files named 000.png stay distinct
    in History, and no server path appears."""
    from inspector.station.service import _sha256_of

    sha = _sha256_of(path) or uuid.uuid4().hex
    return f"upload:{Path(path).name}#{sha[:8]}"


class LiveRun:
    """One Start..Stop of the Live tab in one browser session. ``lock`` is held for a whole tick,
    so Stop (which clears ``active`` and then takes the lock) waits for the frame in flight and no
    tick can report LIVE after Stop."""

    def __init__(self, cam):
        self.cam = cam  # the pooled camera (source already checked against the configuration)
        self.active = True
        self.lock = threading.Lock()
        self.last_frame: np.ndarray | None = None
        self.last: dict = {}  # verdict_html kwargs of the last result, for the greyed "not current" view


class StartupStatus:
    """What the station is doing before it is ready (first start: registering the sample product),
    shown as a banner with progress; thread-safe (set from the worker thread, read by the page)."""

    def __init__(self, message: str = ""):
        self._lock = threading.Lock()
        self.message, self.fraction, self.state = message, 0.0, "running" if message else "done"
        self.t0 = time.monotonic()

    def update(self, message: str, fraction: float | None = None, state: str = "running") -> None:
        with self._lock:
            self.message, self.state = message, state
            if fraction is not None:
                self.fraction = float(fraction)

    def snapshot(self) -> tuple[str, float, str, float]:
        with self._lock:
            return self.message, self.fraction, self.state, time.monotonic() - self.t0


class StageProgress:
    """Turns ``progress(stage, done, total)`` from ProductRegistry.register into an overall fraction,
    a description and an ETA (time elapsed over the fraction done)."""

    # share of the whole registration each stage takes (measured on the sample product)
    # (fit first: its learned head is reused by the held-out folds)
    SPANS = {"fit": (0.02, 0.55), "held-out scoring": (0.55, 0.95), "save": (0.95, 1.0)}

    def __init__(self, sink):
        self.sink = sink  # sink(fraction, description)
        self.t0 = time.perf_counter()
        self.defects = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "generated defects":
            self.defects = f" · {done}/{total} generated defects"
            return
        a, b = self.SPANS.get(stage, (0.0, 0.0))
        frac = a + (b - a) * (done / total if total else 1.0)
        elapsed = time.perf_counter() - self.t0
        eta = f" · about {elapsed * (1 - frac) / frac:.0f} s left" if frac > 0.05 else ""
        what = {"held-out scoring": f"held-out scoring fold {done}/{total}" + self.defects,
                "fit": "fitting the detector on all shots" if done < total else "fitted",
                "save": "saving" if done < total else "saved"}.get(stage, f"{stage} {done}/{total}")
        self.sink(frac, f"{what} · {elapsed:.0f} s{eta}")


class StationApp:
    """Holds the station, its config, the camera pool and the model lock; builds the Blocks."""

    def __init__(self, station, config: StationConfig | None = None, pool: CameraPool | None = None,
                 startup: StartupStatus | None = None):
        self.station = station
        self.config = config or StationConfig()
        self.pool = pool or CameraPool()
        self.model_lock = getattr(station, "lock", None) or threading.RLock()
        self._downloads = Path(tempfile.mkdtemp(prefix="inspector-station-"))
        self.demo: gr.Blocks | None = None
        self._runs: dict[str, LiveRun] = {}
        self._runs_lock = threading.Lock()
        self.startup = startup or StartupStatus()

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
        """(overlay, badge, details, id, accept, reject, decision note, trail, view state, colour bar)."""
        p = self.registry.get(product)
        t = getattr(rec, "thresholds", None) or p.thresholds  # the ones this inspection was decided with
        verdict = None if getattr(rec, "error", None) else rec.verdict
        err = f"Not a usable image: {rec.error}" if rec.error else None
        badge = views.verdict_html(verdict, score=rec.score, thresholds=t, latency_ms=rec.latency_ms,
                                   inspection_id=rec.id, error=err, product=product)
        details = {"id": rec.id, "product": product, "source": rec.source,
                   "score": None if rec.score is None else float(rec.score),
                   "verdict": str(verdict) if verdict is not None else "ERROR", "latency_ms": rec.latency_ms,
                   "thresholds": {"ok_below": t.ok_below, "ng_above": t.ng_above},
                   "model_version": getattr(rec, "model_version", None) or p.version, "error": rec.error}
        overlay = getattr(rec, "overlay", None)
        can_decide = rec.id is not None and not rec.error
        view = None
        if getattr(rec, "image", None) is not None and getattr(rec, "map", None) is not None:
            view = {"image": rec.image, "map": rec.map, "ok": t.ok_below, "ng": t.ng_above, "low": p.map_low,
                    "peak": rec.score}
        trail = views.decisions_html(self.store.decisions(rec.id)) if rec.id is not None else ""
        return (overlay, badge, details, rec.id, gr.update(interactive=can_decide),
                gr.update(interactive=can_decide), "", trail, view,
                views.colorbar_html(t, p.map_low) if view else "", gr.update(visible=False), None)

    def on_inspect(self, product: str, file_path: str | None, operator: str | None = None,
                   request: gr.Request = None):
        """Inspect an uploaded file. The app reads the upload itself (``inspector.io``), so a bad
        file is an ERROR record with "Not a usable image: <reason>", never a framework error."""
        self._product(product)
        if not file_path:
            raise _error("Upload an image to inspect.")
        who = _user(request) or (operator or "").strip() or None
        rec = self.inspect(product, file_path, source=_upload_label(file_path), operator=who)
        return self._record_outputs(product, rec)

    def on_upload(self, file_path: str | None):
        """A new file replaces the last result at once: its verdict is not this file's."""
        note = views.verdict_html(placeholder="Not inspected yet: press Inspect")
        off = gr.update(interactive=False)
        if not file_path:
            return None, views.verdict_html(), off, off, "", "", None, "", None
        try:
            img = read_image(file_path)
        except ImageError as exc:
            note = views.verdict_html(placeholder=f"Not a usable image: {exc.reason}")
            img = None
        return img, note, off, off, "", "", None, "", None

    def on_camera_frame(self, product: str, source: str, operator: str | None = None,
                        request: gr.Request = None):
        self._product(product)
        cam = self._camera(source)
        frame = cam.next_frame()
        if not frame.ok:
            if frame.state == "failed":
                cam.close()  # reported once; the next press tries again
            raise _error(f"Camera: {frame.error}")
        who = _user(request) or (operator or "").strip() or None
        rec = self.inspect(product, frame.image, source=f"camera:{cam.source.short}/{frame.name or frame.index}",
                           operator=who)
        return self._record_outputs(product, rec)

    def on_view(self, view: dict | None, opacity: float, mode: str):
        """Re-draw the overlay: opacity, or the original image (before / after)."""
        if not view:
            return gr.skip()
        if mode == "original":
            return view["image"]
        from inspector.verdict import Thresholds

        return heat_overlay(view["image"], view["map"], Thresholds(view["ok"], view["ng"]), alpha=float(opacity),
                            low=view["low"], max_side=MAX_SIDE, peak=view.get("peak"))

    def _decide(self, inspection_id, decision, operator, reason, note, expect_latest):
        try:
            return self.station.decide(int(inspection_id), decision, operator, reason=reason or None,
                                       note=note or None, expect_latest=expect_latest)
        except DecisionConflict as exc:
            raise _error(f"{exc}. The trail below is up to date; decide again if needed.") from exc
        except (KeyError, ValueError) as exc:
            raise _error(str(exc.args[0] if exc.args else exc)) from exc

    def on_decide(self, inspection_id: int | None, decision: str, operator: str | None, reason: str | None,
                  note: str | None, request: gr.Request = None):
        """Record a decision; a second decision on the same inspection first asks for confirmation.

        Returns (message, trail html, confirm row, pending state)."""
        if inspection_id is None:
            raise _error("Inspect an image first.")
        who = _operator(operator, request)
        trail = self.store.decisions(int(inspection_id))
        if trail:
            last = trail[-1]
            msg = (f"Inspection #{int(inspection_id)} was already {last['decision'].upper()}ED by {last['operator']} "
                   f"at {views._when(last['created_at'])} UTC. Confirm to record {decision.upper()} as {who}; "
                   "the earlier decision stays in the trail.")
            pending = {"id": int(inspection_id), "decision": decision, "latest": int(last["id"])}
            return ("", views.decisions_html(trail, pending=msg), gr.update(visible=True), pending)
        row = self._decide(inspection_id, decision, who, reason, note, expect_latest=None)
        return (self._decided_msg(row), views.decisions_html(self.store.decisions(int(inspection_id))),
                gr.update(visible=False), None)

    @staticmethod
    def _decided_msg(row: dict) -> str:
        word = "Accepted" if row["decision"] == "accept" else "Rejected"
        again = " (replaces the earlier decision)" if row.get("replaces") else ""
        return f"**{word}** inspection #{row['inspection_id']} — recorded by {row['operator']}{again}."

    def on_confirm(self, pending: dict | None, operator: str | None, reason: str | None, note: str | None,
                   request: gr.Request = None):
        if not pending:
            return gr.skip(), gr.skip(), gr.update(visible=False), None
        who = _operator(operator, request)
        row = self._decide(pending["id"], pending["decision"], who, reason, note, expect_latest=pending["latest"])
        return (self._decided_msg(row), views.decisions_html(self.store.decisions(pending["id"])),
                gr.update(visible=False), None)

    def on_cancel(self, inspection_id: int | None):
        trail = self.store.decisions(int(inspection_id)) if inspection_id is not None else []
        return "Not changed.", views.decisions_html(trail), gr.update(visible=False), None

    def on_accept(self, inspection_id: int | None, operator: str | None = None, reason: str | None = None,
                  note: str | None = None, request: gr.Request = None):
        return self.on_decide(inspection_id, "accept", operator, reason, note, request)

    def on_reject(self, inspection_id: int | None, operator: str | None = None, reason: str | None = None,
                  note: str | None = None, request: gr.Request = None):
        return self.on_decide(inspection_id, "reject", operator, reason, note, request)

    # ---- Review tab (UNCERTAIN queue) -----------------------------------------------------------
    def _review_item(self, product: str | None, skipped: list | None):
        rows = self.store.pending_review(product=None if product in (None, "", "(all)") else product, limit=None)
        skipped = set(skipped or [])
        waiting = [r for r in rows if r["id"] not in skipped]
        if not waiting:
            msg = ("No UNCERTAIN inspection waits for a decision." if not rows
                   else f"{len(rows)} waiting, all skipped in this session: press Load queue to start again.")
            off = gr.update(interactive=False)
            return None, views.verdict_html(placeholder="Queue empty"), msg, None, off, off, off, ""
        r = waiting[0]
        img = None
        if r.get("heatmap_path") and Path(r["heatmap_path"]).is_file():
            with contextlib.suppress(ImageError):
                img = read_image(r["heatmap_path"])
        try:
            t = self.registry.get(r["product"]).thresholds
        except KeyError:
            t = None
        badge = views.verdict_html(r["verdict"], score=r.get("score"), thresholds=t, inspection_id=r["id"],
                                   product=f"{r['product']} · {views._short(r.get('source'), 40)}")
        on = gr.update(interactive=True)
        msg = f"**{len(waiting)}** UNCERTAIN inspection(s) waiting · oldest first · {views._when(r['created_at'])} UTC"
        return img, badge, msg, r["id"], on, on, on, views.decisions_html([])

    def on_review_load(self, product: str | None):
        return (*self._review_item(product, []), [])

    def on_review_decide(self, product, iid, skipped, decision, operator, reason, note, request: gr.Request = None):
        if iid is None:
            raise _error("The queue is empty.")
        who = _operator(operator, request)
        done = ""
        try:
            row = self.station.decide(int(iid), decision, who, reason=reason or None, note=note or None,
                                      expect_latest=None)
            done = self._decided_msg(row)
        except DecisionConflict:
            done = f"Inspection #{int(iid)} was decided meanwhile by someone else; moving on."
        item = self._review_item(product, skipped)
        return (*item[:2], done + "  \n" + item[2], *item[3:], skipped)

    def on_review_accept(self, product, iid, skipped, operator, reason, note, request: gr.Request = None):
        return self.on_review_decide(product, iid, skipped, "accept", operator, reason, note, request)

    def on_review_reject(self, product, iid, skipped, operator, reason, note, request: gr.Request = None):
        return self.on_review_decide(product, iid, skipped, "reject", operator, reason, note, request)

    def on_review_skip(self, product, iid, skipped):
        skipped = [*(skipped or []), iid] if iid is not None else list(skipped or [])
        return (*self._review_item(product, skipped), skipped)

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

    def _live_out(self, *, image, verdict, cam, counts, ng_list, gallery, running: bool, run_id):
        """Outputs of every Live handler, in one order: image, verdict, camera, counts html, counts,
        NG gallery, NG list, timer, Start, Stop, run id."""
        return (image, verdict, cam, views.counts_html(counts), counts, gallery, ng_list,
                gr.Timer(active=running), gr.update(interactive=not running), gr.update(interactive=running), run_id)

    def _live_stale(self, run: LiveRun | None, reason: str, state: str, detail: str | None, status: dict | None,
                    counts, ng_list, running: bool, run_id):
        last = run.last if run is not None else {}
        frame = views.stale_frame(run.last_frame if run is not None else None)
        return self._live_out(image=frame, verdict=views.verdict_html(stale=reason, **last),
                              cam=views.camera_box(state, detail, status), counts=counts, ng_list=ng_list,
                              gallery=gr.skip(), running=running, run_id=run_id)

    def on_live_start(self, product: str, source: str, counts: dict, ng_list: list, run_id: str | None):
        self._product(product)
        cam = self._camera(source)
        with self._runs_lock:
            old = self._runs.pop(run_id, None) if run_id else None
        if old is not None:
            old.active = False
        cam.close()  # a fresh start: clears a setup error and opens the source again on the first frame
        run_id = uuid.uuid4().hex
        with self._runs_lock:
            self._runs[run_id] = LiveRun(cam)
        return self._live_out(image=None, verdict=views.verdict_html(placeholder="Waiting for the first frame…"),
                              cam=views.camera_box("starting", cam.label), counts=dict(counts or self._new_counts()),
                              ng_list=list(ng_list or []), gallery=gr.skip(), running=True, run_id=run_id)

    def on_live_stop(self, counts: dict, ng_list: list, run_id: str | None):
        """Stop: no new tick, the source closed, and only after the frame in flight is done."""
        with self._runs_lock:
            run = self._runs.pop(run_id, None) if run_id else None
        status = None
        if run is not None:
            run.active = False
            with run.lock:  # the tick in flight (if any) finishes first
                run.cam.close()
                status = run.cam.status()
        reason = f"Stopped at {datetime.now(UTC):%H:%M:%S} UTC: nothing is being inspected."
        return self._live_stale(run, reason, "closed", status["source"] if status else None, status,
                                dict(counts or self._new_counts()), list(ng_list or []), False, None)

    def on_live_tick(self, product: str, source: str, counts: dict, ng_list: list, run_id: str | None = None):
        counts = dict(counts or self._new_counts())
        ng_list = list(ng_list or [])
        with self._runs_lock:
            run = self._runs.get(run_id) if run_id else None
        if run is None or not run.active:
            return self._live_stale(run, "Stopped: nothing is being inspected.", "closed", None, None, counts,
                                    ng_list, False, None)
        with run.lock:
            if not run.active:
                return self._live_stale(run, "Stopped: nothing is being inspected.", "closed", None, None,
                                        counts, ng_list, False, None)
            return self._tick(run, run_id, product, counts, ng_list)

    def _tick(self, run: LiveRun, run_id: str, product: str, counts: dict, ng_list: list):
        cam = run.cam
        try:
            self._product(product)
        except gr.Error as exc:
            return self._live_stale(run, html.unescape(str(exc.message)), "closed", None, None, counts, ng_list,
                                    False, None)
        frame = cam.next_frame()
        if frame.state == "failed":  # setup error: reported once, the loop stops
            run.active = False
            cam.close()
            with self._runs_lock:
                self._runs.pop(run_id, None)
            msg = (frame.error or "setup error").removeprefix("setup error: ")
            return self._live_stale(run, f"Camera setup error: {msg}. Check the source and press Start.",
                                    "failed", msg, None, counts, ng_list, False, None)
        if not frame.ok:
            lost = cam.state == "reconnecting"
            reason = ("Camera lost: " if lost else "Frame error: ") + str(frame.error)
            if not run.active:  # Stop pressed while the read was in flight
                return self._live_stale(run, "Stopped: nothing is being inspected.", "closed", None, None, counts,
                                        ng_list, False, None)
            return self._live_stale(run, reason, "reconnecting" if lost else "error", frame.error, cam.status(),
                                    counts, ng_list, True, run_id)
        name = frame.name or frame.index
        try:
            rec = self.inspect(product, frame.image, source=f"camera:{cam.source.short}/{name}", operator=None)
        except gr.Error as exc:  # keep the loop alive: count it and show it
            counts["ERROR"] = counts.get("ERROR", 0) + 1
            badge = views.verdict_html(error=html.unescape(str(exc.message)), product=f"{product} · {name}")
            run.last_frame, run.last = frame.image, {"error": "inspection failed", "product": f"{product} · {name}"}
            if not run.active:
                return self._live_stale(run, "Stopped: nothing is being inspected.", "closed", None, None, counts,
                                        ng_list, False, None)
            return self._live_out(image=frame.image, verdict=badge, cam=views.camera_box("live", None, cam.status()),
                                  counts=counts, ng_list=ng_list, gallery=gr.skip(), running=True, run_id=run_id)
        p = self.registry.get(product)
        key = "ERROR" if rec.error else str(rec.verdict)
        counts[key] = counts.get(key, 0) + 1
        if not run.active:  # Stop was pressed while this frame was in flight: recorded, not shown as live
            return self._live_stale(run, "Stopped: nothing is being inspected.", "closed", None, None, counts,
                                    ng_list, False, None)
        t = getattr(rec, "thresholds", None) or p.thresholds
        kw = {"score": rec.score, "thresholds": t, "latency_ms": rec.latency_ms, "inspection_id": rec.id,
              "error": rec.error, "product": f"{product} · {name}"}
        badge = views.verdict_html(None if rec.error else rec.verdict, **kw)
        if key == "NG":
            ng_list = ([(rec.overlay, f"#{rec.id} · {frame.name or ''} · {rec.score:.4g}")] + ng_list)[:NG_GALLERY]
        shown = rec.overlay if getattr(rec, "overlay", None) is not None else frame.image
        run.last_frame = shown
        run.last = {"verdict": None if rec.error else rec.verdict, "score": rec.score, "inspection_id": rec.id,
                    "error": rec.error, "product": f"{product} · {name}"}
        return self._live_out(image=shown, verdict=badge, cam=views.camera_box("live", cam.label, cam.status()),
                              counts=counts, ng_list=ng_list, gallery=ng_list if key == "NG" else gr.skip(),
                              running=True, run_id=run_id)

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
        progress(0.0, desc=f"Loading {backbone} and starting {detector} on {len(images)} shots…")
        stages = StageProgress(lambda frac, desc: progress(frac, desc=desc))
        t0 = time.perf_counter()
        try:
            with self.model_lock:
                product = self.registry.register(name, images, detector=detector, backbone=backbone,
                                                 image_size=int(size), replace=bool(replace), actor=_user(request),
                                                 generator=_generator_choice(generator), progress=stages)
        except (ValueError, KeyError) as exc:  # ProductExists, bad detector/backbone name...
            raise _error(str(exc.args[0] if exc.args else exc)) from exc
        except Exception as exc:  # noqa: BLE001 - e.g. missing weights for the chosen backbone
            log.exception("registration of %s failed", name)
            raise _error(f"Registration failed: {type(exc).__name__}: {exc}") from exc
        secs = time.perf_counter() - t0
        _, nd = self._slider_range(product)
        msg = (f"Registered **{product.name}**: {product.detector} on {product.backbone}, {len(images)} shots, "
               f"version `{product.version}` in {secs:.1f} s. Thresholds: OK below "
               f"{product.thresholds.ok_below:.{nd}f}, NG from {product.thresholds.ng_above:.{nd}f}. "
               "Operators keep inspecting their current product until they choose this one.")
        return (msg, gr.update(choices=self.product_names(), value=product.name), *self._calibration(product.name))

    def on_products_changed(self, *current):
        """After a registration: every product list gets the new names, but each keeps the product
        its user chose (a registration must not switch what an operator is inspecting)."""
        names = self.product_names()
        out = []
        for cur in current[:-1]:
            out.append(gr.update(choices=names, value=cur if cur in names else (names[0] if names else None)))
        out.append(gr.update(choices=["(all)"] + names))  # history filter
        out.append(gr.update(choices=["(all)"] + names))  # review filter
        return out

    def _product_dropdowns(self, names: list[str], value: str | None) -> list:
        # order: inspect, live, calibration, batch, synth, history, review
        upd = [gr.update(choices=names, value=value) for _ in range(5)]
        upd += [gr.update(choices=["(all)"] + names), gr.update(choices=["(all)"] + names)]
        return upd

    @staticmethod
    def _slider_range(p) -> tuple[tuple[float, float, float], int]:
        """((min, max, step), decimals) for the threshold sliders, from the product's score range."""
        cal = getattr(p, "calibration", None) or {}
        vals = [float(v) for v in (*cal.get("normal_scores", []), *cal.get("defect_scores", []))
                if math.isfinite(float(v))] + [p.thresholds.ok_below, p.thresholds.ng_above]
        lo, hi = min(vals), max(vals)
        span = (hi - lo) or max(abs(hi), 1.0)
        lo, hi = (max(0.0, lo - 0.25 * span) if lo >= 0 else lo - 0.25 * span), hi + 0.25 * span
        step, nd = views.slider_spec(lo, hi)
        lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
        return (round(lo, nd), round(hi, nd), step), nd

    def _calibration(self, name: str | None, t=None) -> tuple:
        """(plot, ok slider, ng slider, re-verdict table, note) for product ``name``; ``t`` previews
        other thresholds."""
        if not name:
            return None, gr.update(), gr.update(), None, "Choose a product."
        p = self._product(name)
        cal = getattr(p, "calibration", None) or {}
        normal = [float(s) for s in cal.get("normal_scores", [])]
        defects = [float(s) for s in cal.get("defect_scores", [])]
        preview = t is not None
        t = t or p.thresholds
        fig = views.calibration_figure(normal, defects, t.ok_below, t.ng_above,
                                       title=f"{p.name}: {p.detector} / {p.backbone}, {p.shots} shots")
        rows = self.store.history(product=p.name, limit=RECENT)
        table, note = views.reverdict_frame(rows, t)
        from inspector.synth.severity import severity_markdown

        sev = severity_markdown(cal, t.ok_below, t.ng_above)
        note = f"{note}\n\n{sev}" if sev else note
        if preview:
            # first, not last: appended after the severity table it would be swallowed by its last row
            return fig, gr.skip(), gr.skip(), table, f"**Preview, not saved yet.** {note}"
        (lo, hi, step), nd = self._slider_range(p)
        return (fig, gr.update(minimum=lo, maximum=hi, value=round(t.ok_below, nd), step=step),
                gr.update(minimum=lo, maximum=hi, value=round(t.ng_above, nd), step=step), table, note)

    def on_calibration_select(self, name: str):
        return self._calibration(name)

    def on_threshold_preview(self, name: str, ok: float, ng: float):
        """Live re-verdict under the sliders' values, with the same rule as Save (no silent fix)."""
        if not name:
            return None, gr.skip(), gr.skip(), None, "Choose a product."
        try:
            t = views.slider_thresholds(ok, ng)
        except ValueError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"**Cannot use these thresholds: {exc}.**"
        return self._calibration(name, t)

    def on_threshold_save(self, name: str, ok: float, ng: float, request: gr.Request):
        p = self._product(name)
        try:
            t = views.slider_thresholds(ok, ng)
        except ValueError as exc:
            raise _error(f"Cannot use these thresholds: {exc}.") from exc
        self.registry.set_thresholds(name, t, actor=_user(request))
        who = _user(request)
        _, nd = self._slider_range(p)
        return (f"Saved thresholds for **{name}**: OK below {t.ok_below:.{nd}f}, NG from {t.ng_above:.{nd}f}"
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

    def on_batch(self, product: str, folder: str, zip_path: str | None, rescore: bool = False,
                 request: gr.Request = None, progress=gr.Progress()):
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
                                         resume=not rescore,
                                         **({"engine": "ray", "address": self.config.ray_address}
                                            if self.config.ray_address else {}))
        except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: Ray/runtime unavailable
            raise _error(str(exc)) from exc
        finally:
            if upload is not None and not self.config.keep_uploads:
                shutil.rmtree(upload, ignore_errors=True)  # rows, heatmaps and reports stay
        rows = self.store.history(batch_id=summary.batch_id, limit=None)
        df = views.style_verdicts(views.batch_frame(rows, summary.folder))
        counts = {v: sum(1 for r in rows if r.get("verdict") == v) for v in ("OK", "UNCERTAIN", "NG", "ERROR")}
        again = (f"; {summary.n_skipped} already done by an earlier run"
                 + ("" if rescore else ", tick Re-score to score them again")) if summary.n_skipped else ""
        msg = (f"Batch `{summary.batch_id}` on **{product}**: {summary.n_files} files, {summary.n_new} scored by this "
               f"run{again}; {summary.n_errors} errors — "
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

    def on_batch_select(self, df, evt: gr.SelectData):
        """A click on a batch row opens that file's heatmap."""
        return self._open_row(df, evt, "id")

    # ---- History tab -------------------------------------------------------------------------
    def _history_rows(self, product: str, verdict: str, since: str, limit: int | None) -> list[dict]:
        delta = SINCE.get(since)
        return self.store.history(product=None if product in (None, "", "(all)") else product,
                                  verdict=None if verdict in (None, "", "(all)") else verdict,
                                  since=datetime.now(UTC) - delta if delta else None,
                                  limit=None if limit is None else int(limit))

    def on_history(self, product: str, verdict: str, since: str, limit: int):
        rows = self._history_rows(product, verdict, since, limit)
        df = views.style_verdicts(views.history_frame(rows))
        gallery = []
        for r in rows:
            hp = r.get("heatmap_path")
            if hp and Path(hp).is_file() and len(gallery) < 24:
                with contextlib.suppress(ImageError):
                    gallery.append((read_image(hp), f"#{r['id']} · {r.get('verdict')} · {_score(r)}"))
        return df, gallery, f"{len(rows)} inspections. Click a row to open its heatmap and decision trail."

    def on_history_csv(self, product: str, verdict: str, since: str):
        """Every inspection matching the filters (not only the rows shown) as a CSV download."""
        rows = self._history_rows(product, verdict, since, None)
        d = self._downloads / uuid.uuid4().hex[:8]
        d.mkdir(parents=True, exist_ok=True)
        path = views.history_csv(rows, d / f"inspections-{datetime.now(UTC):%Y%m%d-%H%M%S}.csv")
        return gr.update(value=path, visible=True)

    def _open_row(self, df, evt: gr.SelectData, column: str = "id"):
        try:
            row = evt.index[0]
            iid = int(df.iloc[row][column])
            rec = self.store.get(iid)
        except Exception:  # noqa: BLE001
            log.warning("could not open the selected row", exc_info=True)
            return gr.skip(), ""
        hp = rec.get("heatmap_path")
        img = None
        if hp and Path(hp).is_file():
            with contextlib.suppress(ImageError):
                img = read_image(hp)
        trail = self.store.decisions(iid)
        text = html.escape(f"{rec.get('product')} · {rec.get('verdict')} · score {_score(rec)} · "
                           f"{views._short(rec.get('source'), 80)}" + (f" · {rec['error']}" if rec.get("error") else ""))
        return img, f"<p><b>#{iid}</b> {text}</p>" + views.decisions_html(trail)

    def on_history_select(self, df, evt: gr.SelectData):
        return self._open_row(df, evt, "id")

    # ---- start-up banner ---------------------------------------------------------------------
    def on_startup_tick(self, *current):
        """While the first start registers the sample product: the banner with progress; when it is
        done, the product lists are filled and the timer stops."""
        msg, frac, state, elapsed = self.startup.snapshot()
        if state == "running":
            return (self._startup_html(), gr.Timer(active=True), *[gr.skip()] * 7, *[gr.skip()] * 5)
        names = self.product_names()
        keep = [c if c in names else (names[0] if names else None) for c in current]
        drops = [gr.update(choices=names, value=k) for k in keep[:5]]
        drops += [gr.update(choices=["(all)"] + names)] * 2
        return (self._startup_html(), gr.Timer(active=False), *drops, *self._calibration(keep[2]))

    def _startup_html(self) -> str:
        msg, frac, state, elapsed = self.startup.snapshot()
        if state == "done" and not msg:
            return '<div class="startup done" data-state="done"></div>'
        pct = f" · {100 * frac:.0f}%" if state == "running" else ""
        return (f'<div class="startup {state}" data-state="{state}">{html.escape(msg)}{pct}'
                f'<progress max="1" value="{frac:.3f}" style="width:100%"></progress></div>'
                if state == "running" else f'<div class="startup {state}" data-state="{state}">{html.escape(msg)}</div>')

    # ---- layout ------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        cfg = self.config
        names = self.product_names()
        first = names[0] if names else None
        device = getattr(self.station, "device", None) or _device_name()
        with gr.Blocks(title=cfg.title, analytics_enabled=False, fill_width=True) as demo:
            with gr.Row(equal_height=True):
                gr.Markdown(f"# {cfg.title}\nFew-shot and zero-shot defect detection · device **{device}**",
                            elem_id="station-header")
                op_name = gr.Textbox(label="Operator", placeholder="your name (needed to accept / reject)",
                                     max_length=128, scale=0, min_width=260, elem_id="operator-name")
            startup = gr.HTML(self._startup_html(), elem_id="startup")
            startup_timer = gr.Timer(1.0, active=self.startup.snapshot()[2] == "running")
            with gr.Tabs():
                # -- Inspect
                with gr.Tab("Inspect", id="inspect"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=2):
                            in_product = gr.Dropdown(names, value=first, label="Product", elem_id="inspect-product")
                            # gr.File, not gr.Image: the app reads the upload itself (inspector.io), so a
                            # bad file gets the app's own message and an ERROR record
                            in_image = gr.File(label="Image to inspect", type="filepath", file_count="single",
                                               height=120, elem_id="inspect-image")
                            in_btn = gr.Button("Inspect", variant="primary", size="lg", elem_id="inspect-button")
                            in_cam_btn = gr.Button("Next frame from camera (N)", elem_id="inspect-camera",
                                                   elem_classes="kbd-next")
                            with gr.Accordion("Details", open=False):
                                in_details = gr.JSON(label="Inspection", elem_id="inspect-details")
                        with gr.Column(scale=3):
                            in_overlay = gr.Image(label="Heatmap and defect outline", interactive=False, height=420,
                                                  format="png", elem_id="inspect-overlay")
                            in_colorbar = gr.HTML(elem_id="inspect-colorbar")
                            with gr.Row():
                                in_mode = gr.Radio(["heatmap", "original"], value="heatmap", label="Show",
                                                   elem_id="inspect-mode")
                                in_opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity",
                                                       elem_id="inspect-opacity")
                        with gr.Column(scale=2):
                            in_verdict = gr.HTML(views.verdict_html(), elem_id="inspect-verdict")
                            with gr.Row():
                                acc_btn = gr.Button("Accept (A)", interactive=False, elem_id="accept-button",
                                                    elem_classes="kbd-accept")
                                rej_btn = gr.Button("Reject (R)", variant="stop", interactive=False,
                                                    elem_id="reject-button", elem_classes="kbd-reject")
                            with gr.Row():
                                in_reason = gr.Dropdown(["", *REASON_CODES], value="", label="Reason (optional)",
                                                        elem_id="inspect-reason")
                                in_note = gr.Textbox(label="Note (optional)", max_length=500, elem_id="inspect-note")
                            with gr.Row(visible=False, elem_id="confirm-row") as confirm_row:
                                cf_btn = gr.Button("Confirm change", variant="primary", elem_id="confirm-button")
                                cf_cancel = gr.Button("Cancel (Esc)", elem_id="cancel-button",
                                                      elem_classes="kbd-cancel")
                            in_decision = gr.Markdown(elem_id="inspect-decision")
                            in_trail = gr.HTML(elem_id="inspect-trail")
                    gr.Markdown("Keys: **A** accept · **R** reject · **N** next camera frame · **Esc** cancel a change. "
                                "Enter never re-runs an inspection.", elem_classes="note")
                    in_id = gr.State(None)
                    in_view = gr.State(None)
                    in_pending = gr.State(None)

                # -- Review (UNCERTAIN queue)
                with gr.Tab("Review", id="review"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=2):
                            rv_product = gr.Dropdown(["(all)"] + names, value="(all)", label="Product",
                                                     elem_id="review-product")
                            rv_load = gr.Button("Load queue", variant="primary", elem_id="review-load")
                            rv_status = gr.Markdown(elem_id="review-status")
                        with gr.Column(scale=3):
                            rv_image = gr.Image(label="Heatmap", interactive=False, height=420, elem_id="review-image")
                        with gr.Column(scale=2):
                            rv_verdict = gr.HTML(views.verdict_html(placeholder="Press Load queue"),
                                                 elem_id="review-verdict")
                            with gr.Row():
                                rv_acc = gr.Button("Accept (A)", interactive=False, elem_id="review-accept",
                                                   elem_classes="kbd-accept")
                                rv_rej = gr.Button("Reject (R)", variant="stop", interactive=False,
                                                   elem_id="review-reject", elem_classes="kbd-reject")
                                rv_skip = gr.Button("Skip (N)", interactive=False, elem_id="review-skip",
                                                    elem_classes="kbd-next")
                            with gr.Row():
                                rv_reason = gr.Dropdown(["", *REASON_CODES], value="", label="Reason (optional)")
                                rv_note = gr.Textbox(label="Note (optional)", max_length=500)
                            rv_trail = gr.HTML()
                    rv_id = gr.State(None)
                    rv_skipped = gr.State([])

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
                            lv_counts = gr.HTML(views.counts_html({}), elem_id="live-counts")
                        with gr.Column(scale=3):
                            lv_image = gr.Image(label="Last frame", interactive=False, height=420, format="jpeg",
                                                elem_id="live-image")
                        with gr.Column(scale=2):
                            lv_cam = gr.HTML(views.camera_box("closed"), elem_id="live-camera")
                            lv_verdict = gr.HTML(views.verdict_html(placeholder="Not running"), elem_id="live-verdict")
                    lv_gallery = gr.Gallery(label=f"Last {NG_GALLERY} NG", columns=NG_GALLERY, height=200,
                                            object_fit="contain", fit_columns=False, elem_id="live-ng")
                    lv_counts_state = gr.State(self._new_counts())
                    lv_ng_state = gr.State([])
                    lv_run = gr.State(None)
                    timer = gr.Timer(cfg.live_interval, active=False)

                # -- Register
                with gr.Tab("Register", id="register") as register_tab:
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
                        with gr.Column(scale=4):
                            gr.Markdown("### Calibration and thresholds")
                            cb_product = gr.Dropdown(names, value=first, label="Product", elem_id="calib-product")
                            cb_plot = gr.Plot(label="Score histogram and separability", show_label=False,
                                              elem_id="calib-plot")
                            with gr.Row():
                                cb_ok = gr.Slider(0, 1, value=0.3, label="OK below", elem_id="calib-ok")
                                cb_ng = gr.Slider(0, 1, value=0.6, label="NG from", elem_id="calib-ng")
                            cb_save = gr.Button("Save thresholds", variant="primary", elem_id="calib-save")
                            cb_saved = gr.Markdown(elem_id="calib-saved")
                            cb_note = gr.Markdown(elem_classes="note", elem_id="calib-note")
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
                            bt_rescore = gr.Checkbox(False, label="Re-score files this folder's batch already scored",
                                                     elem_id="batch-rescore")
                            bt_btn = gr.Button("Run batch", variant="primary", elem_id="batch-button")
                        with gr.Column(scale=3):
                            bt_status = gr.Markdown(elem_id="batch-status")
                            bt_files = gr.File(label="Reports (CSV, HTML)", file_count="multiple", interactive=False)
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3):
                            bt_table = gr.Dataframe(views.batch_frame([]), label="Results (highest score first; "
                                                    "click a row for its heatmap)", datatype=views.BATCH_TYPES,
                                                    interactive=False, max_height=420, elem_id="batch-table")
                        with gr.Column(scale=1):
                            bt_image = gr.Image(label="Selected file", interactive=False, height=300,
                                                elem_id="batch-image")
                            bt_caption = gr.HTML(elem_id="batch-caption")

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
                        hs_csv_btn = gr.Button("Export CSV", scale=0, elem_id="history-csv")
                    hs_note = gr.Markdown()
                    hs_csv = gr.File(label="CSV export (all matching inspections)", interactive=False, visible=False,
                                     elem_id="history-csv-file")
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3):
                            hs_table = gr.Dataframe(views.history_frame([]), interactive=False, wrap=False,
                                                    max_height=460, datatype=views.HISTORY_TYPES,
                                                    elem_id="history-table")
                        with gr.Column(scale=1):
                            hs_image = gr.Image(label="Selected inspection (click a row)", interactive=False,
                                                height=300, elem_id="history-image")
                            hs_caption = gr.HTML(elem_id="history-caption")
                    hs_gallery = gr.Gallery(label="Heatmaps (newest first)", columns=8, height=240,
                                            object_fit="contain", fit_columns=False)

            # -- events
            # Inspect: a new upload clears the last result at once; Inspect / next frame / decisions
            view_outs = [in_overlay, in_verdict, acc_btn, rej_btn, in_decision, in_trail, in_view, in_colorbar,
                         in_id]
            in_image.change(self.on_upload, [in_image], view_outs, api_name=False, show_progress="hidden")
            decision_outs = [in_overlay, in_verdict, in_details, in_id, acc_btn, rej_btn, in_decision, in_trail,
                             in_view, in_colorbar, confirm_row, in_pending]
            in_btn.click(self.on_inspect, [in_product, in_image, op_name], decision_outs, api_name="inspect")
            in_cam_btn.click(self.on_camera_frame, [in_product, lv_source, op_name], decision_outs,
                             api_name="inspect_camera")
            for c in (in_opacity, in_mode):
                c.change(self.on_view, [in_view, in_opacity, in_mode], [in_overlay], api_name=False,
                         show_progress="hidden")
            dec_in = [in_id, op_name, in_reason, in_note]
            dec_out = [in_decision, in_trail, confirm_row, in_pending]
            acc_btn.click(self.on_accept, dec_in, dec_out, api_name="accept")
            rej_btn.click(self.on_reject, dec_in, dec_out, api_name="reject")
            cf_btn.click(self.on_confirm, [in_pending, op_name, in_reason, in_note], dec_out, api_name=False)
            cf_cancel.click(self.on_cancel, [in_id], dec_out, api_name=False)

            rv_outs = [rv_image, rv_verdict, rv_status, rv_id, rv_acc, rv_rej, rv_skip, rv_trail, rv_skipped]
            rv_load.click(self.on_review_load, [rv_product], rv_outs, api_name=False)
            rv_in = [rv_product, rv_id, rv_skipped, op_name, rv_reason, rv_note]
            rv_acc.click(self.on_review_accept, rv_in, rv_outs, api_name=False)
            rv_rej.click(self.on_review_reject, rv_in, rv_outs, api_name=False)
            rv_skip.click(self.on_review_skip, [rv_product, rv_id, rv_skipped], rv_outs, api_name=False)

            live_outs = [lv_image, lv_verdict, lv_cam, lv_counts, lv_counts_state, lv_gallery, lv_ng_state, timer,
                         lv_start, lv_stop, lv_run]
            lv_start.click(self.on_live_start, [lv_product, lv_source, lv_counts_state, lv_ng_state, lv_run],
                           live_outs, api_name=False)
            lv_stop.click(self.on_live_stop, [lv_counts_state, lv_ng_state, lv_run], live_outs, api_name=False)
            timer.tick(self.on_live_tick, [lv_product, lv_source, lv_counts_state, lv_ng_state, lv_run], live_outs,
                       show_progress="hidden", api_name=False, trigger_mode="once")
            lv_reset.click(self.on_live_reset, None, [lv_counts, lv_counts_state, lv_gallery, lv_ng_state],
                           api_name=False)

            dropdowns = [in_product, lv_product, cb_product, bt_product, sy_product, hs_product, rv_product]
            calib_outs = [cb_plot, cb_ok, cb_ng, cb_table, cb_note]
            rg_btn.click(self.on_register, [rg_name, rg_files, rg_detector, rg_backbone, rg_size, rg_replace,
                                            rg_generator],
                         [rg_status, cb_product, *calib_outs], api_name="register",
                         show_progress_on=[rg_status]).success(
                self.on_products_changed, [in_product, lv_product, bt_product, sy_product, cb_product],
                [in_product, lv_product, bt_product, sy_product, hs_product, rv_product], api_name=False)
            # .input (user picks), not .change: register/load already return the calibration view, and a
            # second, late refresh would reset sliders the engineer is moving
            cb_product.input(self.on_calibration_select, [cb_product], calib_outs, api_name=False)
            # arriving at the tab: the saved thresholds and the inspections made since the last visit
            register_tab.select(self.on_calibration_select, [cb_product], calib_outs, api_name=False,
                                show_progress="hidden")
            for s in (cb_ok, cb_ng):
                # .input: user moves only (a programmatic update must not re-validate against old bounds)
                s.input(self.on_threshold_preview, [cb_product, cb_ok, cb_ng], calib_outs, show_progress="hidden",
                        trigger_mode="always_last", api_name=False)
            cb_save.click(self.on_threshold_save, [cb_product, cb_ok, cb_ng], [cb_saved], api_name="set_thresholds"
                          ).success(self.on_calibration_select, [cb_product], calib_outs, api_name=False,
                                    show_progress="hidden")  # the view now shows what is saved, not a preview
            cb_product.input(lambda: "", None, [cb_saved], api_name=False)

            bt_btn.click(self.on_batch, [bt_product, bt_folder, bt_zip, bt_rescore], [bt_status, bt_table, bt_files],
                         api_name="batch", show_progress_on=[bt_status])
            bt_table.select(self.on_batch_select, [bt_table], [bt_image, bt_caption], api_name=False)
            sy_btn.click(self.on_synthesize, [sy_product, sy_upload, sy_kind, sy_n, sy_seed, sy_score, sy_sev],
                         [sy_gallery],
                         api_name="synthesize")
            hist_outs = [hs_table, hs_gallery, hs_note]
            hs_btn.click(self.on_history, [hs_product, hs_verdict, hs_since, hs_limit], hist_outs, api_name="history")
            hist_tab.select(self.on_history, [hs_product, hs_verdict, hs_since, hs_limit], hist_outs, api_name=False)
            hs_table.select(self.on_history_select, [hs_table], [hs_image, hs_caption], api_name=False)
            hs_csv_btn.click(self.on_history_csv, [hs_product, hs_verdict, hs_since], [hs_csv],
                             api_name="history_csv")

            startup_timer.tick(self.on_startup_tick, [in_product, lv_product, cb_product, bt_product, sy_product],
                               [startup, startup_timer, *dropdowns, *calib_outs], api_name=False,
                               show_progress="hidden", concurrency_limit=None)  # cheap: never queued behind work

            def _refresh(current, request: gr.Request):
                names = self.product_names()
                keep = current if current in names else (names[0] if names else None)
                user = _user(request)
                op = gr.update(value=user, interactive=False) if user else gr.skip()
                return (*self._product_dropdowns(names, keep), *self._calibration(keep), op)

            demo.load(_refresh, [in_product], [*dropdowns, *calib_outs, op_name], api_name=False,
                      show_progress="hidden", concurrency_limit=None)
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
                    head=views.SHORTCUTS_JS,
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
