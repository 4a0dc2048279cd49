"""The Register tab's left column: a new product from 1-8 images of good parts (fit, generated
defects, calibration), with the registration's progress; every product list then learns the new
name without switching anyone's choice. Below it, the chosen product's selection decision: which
optional detector parts its own real evidence switched on, with the numbers. The right column is
:mod:`app.tabs.calibrate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from app import views
from app.common import FALLBACK_CHOICE, _error, _generator_choice, _generator_choices, _user, log
from inspector.io import ImageError, read_image
from inspector.paths import NAME_RE
from inspector.products.progress import StageProgress

MAX_SHOTS = 8


class RegisterTab:
    """Handlers and layout of the Register tab (a part of :class:`app.shell.StationApp`)."""

    def on_register(self, name: str, files: list | None, detector: str, backbone: str, size: int | str,
                    replace: bool, request: gr.Request, generator: str | None = None, progress=gr.Progress()):
        name = (name or "").strip()
        if not NAME_RE.fullmatch(name):
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

    def on_selection_view(self, name: str | None) -> str:
        """The product's selection decision in words (GraphCore's optional parts, switched on only
        by the product's own real evidence): what the active version's product.json records."""
        if not name:
            return ""
        try:
            p = self.registry.get(name)
        except KeyError:
            return ""
        sel = (p.registration or {}).get("selection")
        return f"Version `{p.version}`, {p.detector}: " + views.selection_markdown(sel, p.detector)

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

    # ---- layout and events ----------------------------------------------------------------
    def layout_register(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``; the calibration column is :meth:`layout_calibrate`'s."""
        cfg = self.config
        with gr.Tab("Register", id="register") as ui.register_tab:
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    gr.Markdown("### New product\nUpload 1–8 images of good parts. Registration fits the "
                                "detector, scores generated defects and calibrates the two thresholds.")
                    ui.rg_name = gr.Textbox(label="Product name", placeholder="e.g. bracket-a12",
                                            elem_id="register-name")
                    ui.rg_files = gr.File(file_count="multiple", file_types=["image"], label="Normal images (1–8)",
                                          elem_id="register-files")
                    with gr.Row():
                        ui.rg_detector = gr.Dropdown(cfg.detectors, value=cfg.detectors[0], label="Detector",
                                                     elem_id="register-detector")
                        ui.rg_backbone = gr.Dropdown(cfg.backbones, value=cfg.backbones[0], label="Backbone",
                                                     elem_id="register-backbone")
                        ui.rg_size = gr.Dropdown(cfg.image_sizes, value=cfg.image_sizes[0], label="Input size (px)",
                                                 elem_id="register-size")
                    ui.rg_generator = gr.Dropdown(_generator_choices(), value=FALLBACK_CHOICE,
                                                  label="Defect generator (calibration, training)",
                                                  elem_id="register-generator")
                    ui.rg_replace = gr.Checkbox(False, label="Replace the product if it exists")
                    ui.rg_btn = gr.Button("Register", variant="primary", elem_id="register-button")
                    ui.rg_status = gr.Markdown(elem_id="register-status")
                    gr.Markdown("### Detector parts\nWhich optional parts the chosen product (right) uses, and "
                                "why: only its own real evidence can switch one on.")
                    ui.rg_selection = gr.Markdown(elem_id="register-selection")
                with gr.Column(scale=4):
                    self.layout_calibrate(ui, names, first)

    def events_register(self, ui) -> None:
        """Register, then refresh every product list (each keeps its choice)."""
        ui.rg_btn.click(self.on_register, [ui.rg_name, ui.rg_files, ui.rg_detector, ui.rg_backbone, ui.rg_size,
                                           ui.rg_replace, ui.rg_generator],
                        [ui.rg_status, ui.cb_product, *ui.calib_outs], api_name="register",
                        show_progress_on=[ui.rg_status]).success(
            self.on_products_changed,
            [ui.in_product, ui.lv_product, ui.bt_product, ui.sy_product, ui.cb_product],
            [ui.in_product, ui.lv_product, ui.bt_product, ui.sy_product, ui.hs_product, ui.rv_product],
            api_name=False)
        # the selection decision follows the product chosen in the calibration column
        ui.cb_product.change(self.on_selection_view, [ui.cb_product], [ui.rg_selection], api_name=False,
                             show_progress="hidden")
        ui.register_tab.select(self.on_selection_view, [ui.cb_product], [ui.rg_selection], api_name=False,
                               show_progress="hidden")
