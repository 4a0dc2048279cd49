"""The History tab: inspections filtered by product, verdict and time, a heatmap gallery, a row
opens its heatmap and decision trail, and a CSV export of every matching row.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import gradio as gr

from app import views
from app.common import _score
from inspector.io import ImageError, read_image

SINCE = {"last hour": timedelta(hours=1), "last 24 h": timedelta(days=1), "last 7 days": timedelta(days=7),
         "all time": None}


class HistoryTab:
    """Handlers and layout of the History tab (a part of :class:`app.shell.StationApp`)."""

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

    def on_history_select(self, df, evt: gr.SelectData):
        return self._open_row(df, evt, "id")

    # ---- layout and events ----------------------------------------------------------------
    def layout_history(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``."""
        with gr.Tab("History", id="history") as ui.hist_tab:
            with gr.Row():
                ui.hs_product = gr.Dropdown(["(all)"] + names, value="(all)", label="Product")
                ui.hs_verdict = gr.Dropdown(["(all)", "OK", "UNCERTAIN", "NG", "ERROR"], value="(all)",
                                            label="Verdict")
                ui.hs_since = gr.Dropdown(list(SINCE), value="last 24 h", label="Since")
                ui.hs_limit = gr.Slider(10, 1000, value=100, step=10, label="Rows")
                ui.hs_btn = gr.Button("Refresh", variant="primary", scale=0)
                ui.hs_csv_btn = gr.Button("Export CSV", scale=0, elem_id="history-csv")
            ui.hs_note = gr.Markdown()
            ui.hs_csv = gr.File(label="CSV export (all matching inspections)", interactive=False, visible=False,
                                elem_id="history-csv-file")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    ui.hs_table = gr.Dataframe(views.history_frame([]), interactive=False, wrap=False,
                                               max_height=460, datatype=views.HISTORY_TYPES,
                                               elem_id="history-table")
                with gr.Column(scale=1):
                    ui.hs_image = gr.Image(label="Selected inspection (click a row)", interactive=False,
                                           height=300, elem_id="history-image")
                    ui.hs_caption = gr.HTML(elem_id="history-caption")
            ui.hs_gallery = gr.Gallery(label="Heatmaps (newest first)", columns=8, height=240,
                                       object_fit="contain", fit_columns=False)

    def events_history(self, ui) -> None:
        """Refresh (button or arriving at the tab), open a row, export CSV."""
        hist_outs = [ui.hs_table, ui.hs_gallery, ui.hs_note]
        filters = [ui.hs_product, ui.hs_verdict, ui.hs_since, ui.hs_limit]
        ui.hs_btn.click(self.on_history, filters, hist_outs, api_name="history")
        ui.hist_tab.select(self.on_history, filters, hist_outs, api_name=False)
        ui.hs_table.select(self.on_history_select, [ui.hs_table], [ui.hs_image, ui.hs_caption], api_name=False)
        ui.hs_csv_btn.click(self.on_history_csv, [ui.hs_product, ui.hs_verdict, ui.hs_since], [ui.hs_csv],
                            api_name="history_csv")
