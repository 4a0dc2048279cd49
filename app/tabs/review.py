"""The Review tab: the queue of UNCERTAIN (or NG) inspections, oldest first, settled one after
another. The heatmap is a canvas: the operator may paint where the defect is before rejecting, and
that mask goes with the decision (evidence for the product's next version). Accepting an NG part
needs a reason code; without one nothing is recorded and the screen says why.
"""

from __future__ import annotations

import contextlib
import html
from pathlib import Path

import gradio as gr
import numpy as np

from app import views
from app.common import _error, _operator, log, reason_refusal
from inspector.io import ImageError, read_image
from inspector.station.store import REASON_CODES, DecisionConflict

QUEUES = ("UNCERTAIN", "NG")
BRUSH = "#ff00ff"  # magenta: no colour of the heatmap's scale


def painted_mask(value, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The operator's brush strokes as an HxW bool mask (``shape``, else the canvas's size), or
    None when nothing was painted. ``value`` is the ImageEditor's ``{"background", "layers",
    "composite"}``; a stroke is any pixel a layer covers (alpha > 0)."""
    if not isinstance(value, dict):
        return None
    mask = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        a = np.asarray(layer)
        if a.ndim == 3 and a.shape[2] == 4:
            hit = a[..., 3] > 0
        elif a.ndim == 3:
            hit = a.any(axis=2)
        else:
            hit = a > 0
        mask = hit if mask is None or mask.shape != hit.shape else (mask | hit)
    if mask is None or not mask.any():
        return None
    if shape is not None and tuple(mask.shape) != tuple(shape[:2]):
        import cv2

        mask = cv2.resize(mask.astype(np.uint8), (int(shape[1]), int(shape[0])),
                          interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


class ReviewTab:
    """Handlers and layout of the Review tab (a part of :class:`app.shell.StationApp`)."""

    def _review_item(self, product: str | None, skipped: list | None, queue: str = "UNCERTAIN"):
        queue = queue if queue in QUEUES else "UNCERTAIN"
        rows = self.store.pending_review(product=None if product in (None, "", "(all)") else product,
                                         verdict=queue, limit=None)
        skipped = set(skipped or [])
        waiting = [r for r in rows if r["id"] not in skipped]
        if not waiting:
            msg = (f"No {queue} inspection waits for a decision." if not rows
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
        msg = (f"**{len(waiting)}** {queue} inspection(s) waiting · oldest first · {views._when(r['created_at'])} UTC"
               + ("  \nPaint where the defect is before rejecting (optional)." if img is not None else ""))
        return img, badge, msg, r["id"], on, on, on, views.decisions_html([])

    def on_review_load(self, product: str | None, queue: str = "UNCERTAIN"):
        return (*self._review_item(product, [], queue), [])

    def _image_shape(self, row: dict) -> tuple[int, int] | None:
        """The inspected image's size (the mask is stored at it), from the evidence store; None
        when the image is not kept (the mask then keeps the heatmap's size, same aspect)."""
        ev, sha = getattr(self.station, "evidence_images", None), row.get("image_sha256")
        if ev is None or not sha:
            return None
        try:
            return tuple(ev.read(sha).shape[:2]) if ev.has(sha) else None
        except Exception:  # noqa: BLE001 - rolled over meanwhile, unreadable: the heatmap's size
            log.debug("no evidence image for %s", sha, exc_info=True)
            return None

    def on_review_decide(self, product, iid, skipped, decision, operator, reason, note, editor=None,
                         queue: str = "UNCERTAIN", request: gr.Request = None):
        if iid is None:
            raise _error("The queue is empty.")
        who = _operator(operator, request)
        row = self.store.get(int(iid))
        refusal = reason_refusal(row.get("verdict"), decision, reason)
        if refusal:  # nothing recorded; the part stays on screen with its painting
            return (gr.skip(), gr.skip(), f'<div class="reason-required">{html.escape(refusal)}</div>',
                    *[gr.skip()] * 6)
        mask = painted_mask(editor, self._image_shape(row)) if decision == "reject" else None
        kw = {"mask": mask} if mask is not None else {}
        done = ""
        try:
            rec = self.station.decide(int(iid), decision, who, reason=reason or None, note=note or None,
                                      expect_latest=None, **kw)
            done = self._decided_msg(rec) + (" Mask recorded." if mask is not None else "")
        except DecisionConflict:
            done = f"Inspection #{int(iid)} was decided meanwhile by someone else; moving on."
        except (KeyError, ValueError) as exc:  # the service's own refusal: said on screen, not recorded
            msg = f"Not recorded: {exc.args[0] if exc.args else exc}"
            return (gr.skip(), gr.skip(), f'<div class="reason-required">{html.escape(str(msg))}</div>',
                    *[gr.skip()] * 6)
        item = self._review_item(product, skipped, queue)
        return (*item[:2], done + "  \n" + item[2], *item[3:], skipped)

    def on_review_accept(self, product, iid, skipped, operator, reason, note, editor=None, queue="UNCERTAIN",
                         request: gr.Request = None):
        return self.on_review_decide(product, iid, skipped, "accept", operator, reason, note, editor, queue, request)

    def on_review_reject(self, product, iid, skipped, operator, reason, note, editor=None, queue="UNCERTAIN",
                         request: gr.Request = None):
        return self.on_review_decide(product, iid, skipped, "reject", operator, reason, note, editor, queue, request)

    def on_review_skip(self, product, iid, skipped, queue: str = "UNCERTAIN"):
        skipped = [*(skipped or []), iid] if iid is not None else list(skipped or [])
        return (*self._review_item(product, skipped, queue), skipped)

    # ---- layout and events ----------------------------------------------------------------
    def layout_review(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``."""
        with gr.Tab("Review", id="review"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    ui.rv_product = gr.Dropdown(["(all)"] + names, value="(all)", label="Product",
                                                elem_id="review-product")
                    ui.rv_queue = gr.Radio(list(QUEUES), value="UNCERTAIN", label="Queue", elem_id="review-queue")
                    ui.rv_load = gr.Button("Load queue", variant="primary", elem_id="review-load")
                    ui.rv_status = gr.Markdown(elem_id="review-status")
                with gr.Column(scale=3):
                    # the heatmap as a canvas: the brush marks the defect (sent with Reject)
                    ui.rv_image = gr.ImageEditor(label="Heatmap: paint the defect, then Reject", type="numpy",
                                                 image_mode="RGBA", sources=(), transforms=(), layers=False,
                                                 brush=gr.Brush(colors=[BRUSH], default_color=BRUSH,
                                                                color_mode="fixed", default_size=18),
                                                 interactive=True, height=460, elem_id="review-image")
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
                        ui.rv_reason = gr.Dropdown(["", *REASON_CODES], value="",
                                                   label="Reason (required to accept an NG part)",
                                                   elem_id="review-reason")
                        ui.rv_note = gr.Textbox(label="Note (optional)", max_length=500)
                    ui.rv_trail = gr.HTML()
            ui.rv_id = gr.State(None)
            ui.rv_skipped = gr.State([])

    def events_review(self, ui) -> None:
        """Load the queue; accept, reject (with the painted mask) or skip the oldest waiting inspection."""
        rv_outs = [ui.rv_image, ui.rv_verdict, ui.rv_status, ui.rv_id, ui.rv_acc, ui.rv_rej, ui.rv_skip, ui.rv_trail,
                   ui.rv_skipped]
        ui.rv_load.click(self.on_review_load, [ui.rv_product, ui.rv_queue], rv_outs, api_name=False)
        ui.rv_queue.input(self.on_review_load, [ui.rv_product, ui.rv_queue], rv_outs, api_name=False)
        rv_in = [ui.rv_product, ui.rv_id, ui.rv_skipped, ui.op_name, ui.rv_reason, ui.rv_note, ui.rv_image,
                 ui.rv_queue]
        # progress on the status line only: a refused decision leaves the canvas (and its strokes) as it is
        ui.rv_acc.click(self.on_review_accept, rv_in, rv_outs, api_name=False, show_progress_on=[ui.rv_status])
        ui.rv_rej.click(self.on_review_reject, rv_in, rv_outs, api_name=False, show_progress_on=[ui.rv_status])
        ui.rv_skip.click(self.on_review_skip, [ui.rv_product, ui.rv_id, ui.rv_skipped, ui.rv_queue], rv_outs,
                         api_name=False)
