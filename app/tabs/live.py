"""The Live tab: a camera (or a replay folder) inspected frame after frame until Stop, with counts
and the last NG parts; what is shown is current or visibly not (greyed, with the reason).
"""

from __future__ import annotations

import html
import threading
import uuid
from datetime import UTC, datetime

import gradio as gr
import numpy as np

from app import views
from app.common import _error, log
from inspector.cameras.registry import make_source
from inspector.cameras.sources import FolderSource
from inspector.station.config import CAMERA_REFUSED, SourceNotAllowed

NG_GALLERY = 8


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


class LiveTab:
    """Handlers and layout of the Live tab (a part of :class:`app.shell.StationApp`)."""

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

    # ---- layout and events ----------------------------------------------------------------
    def layout_live(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``."""
        cfg = self.config
        with gr.Tab("Live", id="live"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    ui.lv_product = gr.Dropdown(names, value=first, label="Product", elem_id="live-product")
                    ui.lv_source = gr.Textbox(value=cfg.camera or "", label="Camera source",
                                              placeholder="a configured camera (name or URL) · a folder under the allowed roots",
                                              elem_id="live-source")
                    with gr.Row():
                        ui.lv_start = gr.Button("Start", variant="primary", elem_id="live-start")
                        ui.lv_stop = gr.Button("Stop", interactive=False, elem_id="live-stop")
                        ui.lv_reset = gr.Button("Reset counts", size="sm")
                    ui.lv_counts = gr.HTML(views.counts_html({}), elem_id="live-counts")
                with gr.Column(scale=3):
                    ui.lv_image = gr.Image(label="Last frame", interactive=False, height=420, format="jpeg",
                                           elem_id="live-image")
                with gr.Column(scale=2):
                    ui.lv_cam = gr.HTML(views.camera_box("closed"), elem_id="live-camera")
                    ui.lv_verdict = gr.HTML(views.verdict_html(placeholder="Not running"), elem_id="live-verdict")
            ui.lv_gallery = gr.Gallery(label=f"Last {NG_GALLERY} NG", columns=NG_GALLERY, height=200,
                                       object_fit="contain", fit_columns=False, elem_id="live-ng")
            ui.lv_counts_state = gr.State(self._new_counts())
            ui.lv_ng_state = gr.State([])
            ui.lv_run = gr.State(None)
            ui.timer = gr.Timer(cfg.live_interval, active=False)

    def events_live(self, ui) -> None:
        """Start, Stop, the timer that inspects the next frame, reset counts."""
        live_outs = [ui.lv_image, ui.lv_verdict, ui.lv_cam, ui.lv_counts, ui.lv_counts_state, ui.lv_gallery,
                     ui.lv_ng_state, ui.timer, ui.lv_start, ui.lv_stop, ui.lv_run]
        live_in = [ui.lv_product, ui.lv_source, ui.lv_counts_state, ui.lv_ng_state, ui.lv_run]
        ui.lv_start.click(self.on_live_start, live_in, live_outs, api_name=False)
        ui.lv_stop.click(self.on_live_stop, [ui.lv_counts_state, ui.lv_ng_state, ui.lv_run], live_outs, api_name=False)
        ui.timer.tick(self.on_live_tick, live_in, live_outs, show_progress="hidden", api_name=False,
                      trigger_mode="once")
        ui.lv_reset.click(self.on_live_reset, None, [ui.lv_counts, ui.lv_counts_state, ui.lv_gallery, ui.lv_ng_state],
                          api_name=False)
