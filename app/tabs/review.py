"""The Review tab: the queue of UNCERTAIN inspections, oldest first, settled one after another.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import gradio as gr

from app import views
from app.common import _error, _operator
from inspector.io import ImageError, read_image
from inspector.station.store import REASON_CODES, DecisionConflict


class ReviewTab:
    """Handlers and layout of the Review tab (a part of :class:`app.shell.StationApp`)."""

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

    # ---- layout and events ----------------------------------------------------------------
    def layout_review(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``."""
        with gr.Tab("Review", id="review"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    ui.rv_product = gr.Dropdown(["(all)"] + names, value="(all)", label="Product",
                                                elem_id="review-product")
                    ui.rv_load = gr.Button("Load queue", variant="primary", elem_id="review-load")
                    ui.rv_status = gr.Markdown(elem_id="review-status")
                with gr.Column(scale=3):
                    ui.rv_image = gr.Image(label="Heatmap", interactive=False, height=420, elem_id="review-image")
                with gr.Column(scale=2):
                    ui.rv_verdict = gr.HTML(views.verdict_html(placeholder="Press Load queue"),
                                            elem_id="review-verdict")
                    with gr.Row():
                        ui.rv_acc = gr.Button("Accept (A)", interactive=False, elem_id="review-accept",
                                              elem_classes="kbd-accept")
                        ui.rv_rej = gr.Button("Reject (R)", variant="stop", interactive=False,
                                              elem_id="review-reject", elem_classes="kbd-reject")
                        ui.rv_skip = gr.Button("Skip (N)", interactive=False, elem_id="review-skip",
                                               elem_classes="kbd-next")
                    with gr.Row():
                        ui.rv_reason = gr.Dropdown(["", *REASON_CODES], value="", label="Reason (optional)")
                        ui.rv_note = gr.Textbox(label="Note (optional)", max_length=500)
                    ui.rv_trail = gr.HTML()
            ui.rv_id = gr.State(None)
            ui.rv_skipped = gr.State([])

    def events_review(self, ui) -> None:
        """Load the queue; accept, reject or skip the oldest waiting inspection."""
        rv_outs = [ui.rv_image, ui.rv_verdict, ui.rv_status, ui.rv_id, ui.rv_acc, ui.rv_rej, ui.rv_skip, ui.rv_trail,
                   ui.rv_skipped]
        ui.rv_load.click(self.on_review_load, [ui.rv_product], rv_outs, api_name=False)
        rv_in = [ui.rv_product, ui.rv_id, ui.rv_skipped, ui.op_name, ui.rv_reason, ui.rv_note]
        ui.rv_acc.click(self.on_review_accept, rv_in, rv_outs, api_name=False)
        ui.rv_rej.click(self.on_review_reject, rv_in, rv_outs, api_name=False)
        ui.rv_skip.click(self.on_review_skip, [ui.rv_product, ui.rv_id, ui.rv_skipped], rv_outs, api_name=False)
