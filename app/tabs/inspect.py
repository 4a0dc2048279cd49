"""The Inspect tab: an operator inspects one part (upload or camera frame), sees the verdict and
heatmap, and accepts or rejects it; a second decision on one inspection asks first.
"""

from __future__ import annotations

import gradio as gr

from app import views
from app.common import _error, _operator, _upload_label, _user, reason_refusal
from inspector.io import ImageError, read_image
from inspector.products.heatmap import MAX_SIDE
from inspector.products.heatmap import overlay as heat_overlay
from inspector.station.store import REASON_CODES, DecisionConflict


class InspectTab:
    """Handlers and layout of the Inspect tab (a part of :class:`app.shell.StationApp`)."""

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
        refusal = reason_refusal(self.store.get(int(inspection_id)).get("verdict"), decision, reason)
        if refusal:  # nothing recorded, nothing asked: the sentence says what is missing
            return (refusal, views.decisions_html(self.store.decisions(int(inspection_id))), gr.update(visible=False),
                    None)
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
        refusal = reason_refusal(self.store.get(pending["id"]).get("verdict"), pending["decision"], reason)
        if refusal:  # the change stays pending until a reason is chosen
            return refusal, gr.skip(), gr.skip(), pending
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

    # ---- layout and events ----------------------------------------------------------------
    def layout_inspect(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``."""
        with gr.Tab("Inspect", id="inspect"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    ui.in_product = gr.Dropdown(names, value=first, label="Product", elem_id="inspect-product")
                    # gr.File, not gr.Image: the app reads the upload itself (inspector.io), so a
                    # bad file gets the app's own message and an ERROR record
                    ui.in_image = gr.File(label="Image to inspect", type="filepath", file_count="single",
                                          height=120, elem_id="inspect-image")
                    ui.in_btn = gr.Button("Inspect", variant="primary", size="lg", elem_id="inspect-button")
                    ui.in_cam_btn = gr.Button("Next frame from camera (N)", elem_id="inspect-camera",
                                              elem_classes="kbd-next")
                    with gr.Accordion("Details", open=False):
                        ui.in_details = gr.JSON(label="Inspection", elem_id="inspect-details")
                with gr.Column(scale=3):
                    ui.in_overlay = gr.Image(label="Heatmap and defect outline", interactive=False, height=420,
                                             format="png", elem_id="inspect-overlay")
                    ui.in_colorbar = gr.HTML(elem_id="inspect-colorbar")
                    with gr.Row():
                        ui.in_mode = gr.Radio(["heatmap", "original"], value="heatmap", label="Show",
                                              elem_id="inspect-mode")
                        ui.in_opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity",
                                                  elem_id="inspect-opacity")
                with gr.Column(scale=2):
                    ui.in_verdict = gr.HTML(views.verdict_html(), elem_id="inspect-verdict")
                    with gr.Row():
                        ui.acc_btn = gr.Button("Accept (A)", interactive=False, elem_id="accept-button",
                                               elem_classes="kbd-accept")
                        ui.rej_btn = gr.Button("Reject (R)", variant="stop", interactive=False,
                                               elem_id="reject-button", elem_classes="kbd-reject")
                    with gr.Row():
                        ui.in_reason = gr.Dropdown(["", *REASON_CODES], value="", label="Reason (required to accept an NG part)",
                                                   elem_id="inspect-reason")
                        ui.in_note = gr.Textbox(label="Note (optional)", max_length=500, elem_id="inspect-note")
                    with gr.Row(visible=False, elem_id="confirm-row") as ui.confirm_row:
                        ui.cf_btn = gr.Button("Confirm change", variant="primary", elem_id="confirm-button")
                        ui.cf_cancel = gr.Button("Cancel (Esc)", elem_id="cancel-button",
                                                 elem_classes="kbd-cancel")
                    ui.in_decision = gr.Markdown(elem_id="inspect-decision")
                    ui.in_trail = gr.HTML(elem_id="inspect-trail")
            gr.Markdown("Keys: **A** accept · **R** reject · **N** next camera frame · **Esc** cancel a change. "
                        "Enter never re-runs an inspection.", elem_classes="note")
            ui.in_id = gr.State(None)
            ui.in_view = gr.State(None)
            ui.in_pending = gr.State(None)

    def events_inspect(self, ui) -> None:
        """A new upload clears the last result at once; Inspect, next camera frame, decisions."""
        view_outs = [ui.in_overlay, ui.in_verdict, ui.acc_btn, ui.rej_btn, ui.in_decision, ui.in_trail, ui.in_view,
                     ui.in_colorbar, ui.in_id]
        ui.in_image.change(self.on_upload, [ui.in_image], view_outs, api_name=False, show_progress="hidden")
        decision_outs = [ui.in_overlay, ui.in_verdict, ui.in_details, ui.in_id, ui.acc_btn, ui.rej_btn, ui.in_decision,
                         ui.in_trail, ui.in_view, ui.in_colorbar, ui.confirm_row, ui.in_pending]
        ui.in_btn.click(self.on_inspect, [ui.in_product, ui.in_image, ui.op_name], decision_outs, api_name="inspect")
        ui.in_cam_btn.click(self.on_camera_frame, [ui.in_product, ui.lv_source, ui.op_name], decision_outs,
                            api_name="inspect_camera")
        for c in (ui.in_opacity, ui.in_mode):
            c.change(self.on_view, [ui.in_view, ui.in_opacity, ui.in_mode], [ui.in_overlay], api_name=False,
                     show_progress="hidden")
        dec_in = [ui.in_id, ui.op_name, ui.in_reason, ui.in_note]
        dec_out = [ui.in_decision, ui.in_trail, ui.confirm_row, ui.in_pending]
        ui.acc_btn.click(self.on_accept, dec_in, dec_out, api_name="accept")
        ui.rej_btn.click(self.on_reject, dec_in, dec_out, api_name="reject")
        ui.cf_btn.click(self.on_confirm, [ui.in_pending, ui.op_name, ui.in_reason, ui.in_note], dec_out,
                        api_name=False)
        ui.cf_cancel.click(self.on_cancel, [ui.in_id], dec_out, api_name=False)
