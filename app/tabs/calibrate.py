"""Calibration and thresholds (the Register tab's right column): the product's score histogram,
two sliders that preview the verdicts of recent inspections under new thresholds, and Save.
"""

from __future__ import annotations

import math

import gradio as gr

from app import views
from app.common import _error, _user

RECENT = 25  # inspections re-verdicted live under new thresholds


class CalibrateTab:
    """Handlers and layout of calibration and thresholds (a part of :class:`app.shell.StationApp`)."""

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

    # ---- layout and events ----------------------------------------------------------------
    def layout_calibrate(self, ui, names: list[str], first: str | None) -> None:
        """Components of the column, stored on ``ui``; ``ui.calib_outs`` are the outputs that every
        calibration view fills."""
        gr.Markdown("### Calibration and thresholds")
        ui.cb_product = gr.Dropdown(names, value=first, label="Product", elem_id="calib-product")
        ui.cb_plot = gr.Plot(label="Score histogram and separability", show_label=False,
                             elem_id="calib-plot")
        with gr.Row():
            ui.cb_ok = gr.Slider(0, 1, value=0.3, label="OK below", elem_id="calib-ok")
            ui.cb_ng = gr.Slider(0, 1, value=0.6, label="NG from", elem_id="calib-ng")
        ui.cb_save = gr.Button("Save thresholds", variant="primary", elem_id="calib-save")
        ui.cb_saved = gr.Markdown(elem_id="calib-saved")
        ui.cb_note = gr.Markdown(elem_classes="note", elem_id="calib-note")
        ui.cb_table = gr.Dataframe(views.reverdict_frame([], None)[0],
                                   label="Recent inspections under these thresholds",
                                   interactive=False, wrap=True, max_height=260)
        ui.calib_outs = [ui.cb_plot, ui.cb_ok, ui.cb_ng, ui.cb_table, ui.cb_note]

    def events_calibrate(self, ui) -> None:
        """Choosing a product or arriving at the tab shows its saved thresholds; sliders preview; Save."""
        # .input (user picks), not .change: register/load already return the calibration view, and a
        # second, late refresh would reset sliders the engineer is moving
        ui.cb_product.input(self.on_calibration_select, [ui.cb_product], ui.calib_outs, api_name=False)
        # arriving at the tab: the saved thresholds and the inspections made since the last visit
        ui.register_tab.select(self.on_calibration_select, [ui.cb_product], ui.calib_outs, api_name=False,
                               show_progress="hidden")
        for s in (ui.cb_ok, ui.cb_ng):
            # .input: user moves only (a programmatic update must not re-validate against old bounds)
            s.input(self.on_threshold_preview, [ui.cb_product, ui.cb_ok, ui.cb_ng], ui.calib_outs,
                    show_progress="hidden", trigger_mode="always_last", api_name=False)
        ui.cb_save.click(self.on_threshold_save, [ui.cb_product, ui.cb_ok, ui.cb_ng], [ui.cb_saved],
                         api_name="set_thresholds"
                         ).success(self.on_calibration_select, [ui.cb_product], ui.calib_outs, api_name=False,
                                   show_progress="hidden")  # the view now shows what is saved, not a preview
        ui.cb_product.input(lambda: "", None, [ui.cb_saved], api_name=False)
