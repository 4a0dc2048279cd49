"""The station's web UI: a shell over one :class:`~inspector.station.service.StationService`.

Tabs, in page order: Inspect (operators: one part, verdict, accept / reject), Review (the queue of
UNCERTAIN or NG inspections, with a mask brush), Live (camera), Register (engineers: a new product;
calibration and thresholds), Learning (engineers: evidence, candidate versions, shadow, promote),
Batch, Synthesize, History. Each tab is a mixin in :mod:`app.tabs` holding its
handlers (``on_*``), its layout and its events; this shell holds what they share (the station,
config, camera pool, model lock, product lists, start-up banner) and builds, launches and closes
the Blocks. Every handler is a few lines that call the library and format its answer; scoring,
verdicts, storage and reports all live in :mod:`inspector`.

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
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from app import views
from app.common import _error, _score, _user, log
from app.tabs.batch import BatchTab
from app.tabs.calibrate import CalibrateTab
from app.tabs.history import HistoryTab
from app.tabs.inspect import InspectTab
from app.tabs.learning import LearningTab
from app.tabs.live import LiveRun, LiveTab
from app.tabs.register import RegisterTab
from app.tabs.review import ReviewTab
from app.tabs.synthesize import SynthesizeTab
from inspector.cameras.camera import CameraPool
from inspector.io import ImageError, read_image
from inspector.products.progress import StartupStatus
from inspector.station.config import StationConfig


class StationApp(InspectTab, ReviewTab, LiveTab, RegisterTab, CalibrateTab, LearningTab, BatchTab, SynthesizeTab,
                 HistoryTab):
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

    # ---- shared by the tabs ------------------------------------------------------------------
    def _product_dropdowns(self, names: list[str], value: str | None) -> list:
        # order: inspect, live, calibration, batch, synth, history, review
        upd = [gr.update(choices=names, value=value) for _ in range(5)]
        upd += [gr.update(choices=["(all)"] + names), gr.update(choices=["(all)"] + names)]
        return upd

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
        ui = SimpleNamespace()  # every component, by name, for the tabs' events
        with gr.Blocks(title=cfg.title, analytics_enabled=False, fill_width=True) as demo:
            with gr.Row(equal_height=True):
                gr.Markdown(f"# {cfg.title}\nFew-shot and zero-shot defect detection · device **{device}**",
                            elem_id="station-header")
                ui.op_name = gr.Textbox(label="Operator", placeholder="your name (needed to accept / reject)",
                                        max_length=128, scale=0, min_width=260, elem_id="operator-name")
            ui.startup = gr.HTML(self._startup_html(), elem_id="startup")
            ui.startup_timer = gr.Timer(1.0, active=self.startup.snapshot()[2] == "running")
            with gr.Tabs():
                self.layout_inspect(ui, names, first)
                self.layout_review(ui, names, first)
                self.layout_live(ui, names, first)
                self.layout_register(ui, names, first)
                self.layout_learning(ui, names, first)
                self.layout_batch(ui, names, first)
                self.layout_synthesize(ui, names, first)
                self.layout_history(ui, names, first)

            # -- events, tab by tab in page order
            self.events_inspect(ui)
            self.events_review(ui)
            self.events_live(ui)
            self.events_register(ui)
            self.events_calibrate(ui)
            self.events_learning(ui)
            self.events_batch(ui)
            self.events_synthesize(ui)
            self.events_history(ui)
            dropdowns = [ui.in_product, ui.lv_product, ui.cb_product, ui.bt_product, ui.sy_product, ui.hs_product,
                         ui.rv_product]
            ui.startup_timer.tick(self.on_startup_tick,
                                  [ui.in_product, ui.lv_product, ui.cb_product, ui.bt_product, ui.sy_product],
                                  [ui.startup, ui.startup_timer, *dropdowns, *ui.calib_outs], api_name=False,
                                  show_progress="hidden", concurrency_limit=None)  # cheap: never queued behind work

            def _refresh(current, request: gr.Request):
                names = self.product_names()
                keep = current if current in names else (names[0] if names else None)
                user = _user(request)
                op = gr.update(value=user, interactive=False) if user else gr.skip()
                return (*self._product_dropdowns(names, keep), *self._calibration(keep), op)

            demo.load(_refresh, [ui.in_product], [*dropdowns, *ui.calib_outs, ui.op_name], api_name=False,
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
