"""The Batch tab: a folder on the station (under the allowed roots) or an uploaded zip, scored
through the product's runtime; results table, reports to download, a row opens its heatmap.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import gradio as gr

from app import views
from app.common import _error
from inspector.batch.uploads import UploadError, drop_upload, extract_zip


class BatchTab:
    """Handlers and layout of the Batch tab (a part of :class:`app.shell.StationApp`)."""

    def _extract_zip(self, path: str) -> Path:
        """The images of an uploaded zip, unpacked under ``<data dir>/uploads`` within the configured
        limits (:func:`inspector.batch.uploads.extract_zip`)."""
        cfg = self.config
        try:
            return extract_zip(path, self.data_dir / "uploads", max_members=cfg.max_zip_members,
                               max_bytes=cfg.max_zip_bytes)
        except UploadError as exc:
            raise _error(str(exc)) from exc

    def _drop_upload(self, zip_path: str | None) -> None:
        """Delete the uploaded zip (Gradio's cached copy) once it has been read, unless configured to
        keep uploads."""
        drop_upload(zip_path, keep=self.config.keep_uploads)

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

    def on_batch_select(self, df, evt: gr.SelectData):
        """A click on a batch row opens that file's heatmap."""
        return self._open_row(df, evt, "id")

    # ---- layout and events ----------------------------------------------------------------
    def layout_batch(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``."""
        cfg = self.config
        with gr.Tab("Batch", id="batch"):
            roots = ", ".join(f"`{r}`" for r in cfg.allowed_batch_roots) or "none configured (zip only)"
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    ui.bt_product = gr.Dropdown(names, value=first, label="Product", elem_id="batch-product")
                    ui.bt_folder = gr.Textbox(label="Folder on the station", elem_id="batch-folder",
                                              info=f"Allowed under: {roots}")
                    ui.bt_zip = gr.File(label="…or upload a zip of images", file_types=[".zip"], type="filepath",
                                        elem_id="batch-zip")
                    ui.bt_rescore = gr.Checkbox(False, label="Re-score files this folder's batch already scored",
                                                elem_id="batch-rescore")
                    ui.bt_btn = gr.Button("Run batch", variant="primary", elem_id="batch-button")
                with gr.Column(scale=3):
                    ui.bt_status = gr.Markdown(elem_id="batch-status")
                    ui.bt_files = gr.File(label="Reports (CSV, HTML)", file_count="multiple", interactive=False)
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    ui.bt_table = gr.Dataframe(views.batch_frame([]), label="Results (highest score first; "
                                               "click a row for its heatmap)", datatype=views.BATCH_TYPES,
                                               interactive=False, max_height=420, elem_id="batch-table")
                with gr.Column(scale=1):
                    ui.bt_image = gr.Image(label="Selected file", interactive=False, height=300,
                                           elem_id="batch-image")
                    ui.bt_caption = gr.HTML(elem_id="batch-caption")

    def events_batch(self, ui) -> None:
        """Run a batch; a click on a row opens its heatmap."""
        ui.bt_btn.click(self.on_batch, [ui.bt_product, ui.bt_folder, ui.bt_zip, ui.bt_rescore],
                        [ui.bt_status, ui.bt_table, ui.bt_files],
                        api_name="batch", show_progress_on=[ui.bt_status])
        ui.bt_table.select(self.on_batch_select, [ui.bt_table], [ui.bt_image, ui.bt_caption], api_name=False)
