"""The Learning tab, for the engineer: the operators' decisions as evidence, a candidate version
built from it, its before/after table and selection decision, shadow running, and Promote / Roll
back, each behind a confirmation.

Thin over :class:`inspector.station.service.StationService`: ``feedback_summary``, ``refit``,
``versions``, ``set_shadow``, ``shadow_tally``, ``disagreements``, ``promote``, ``rollback``. The
candidate is built under the station's model lock, like a registration: one model job at a time,
so a build never competes with an inspection for memory (inspections wait; a build is bounded by
the evidence, see ``bench/`` for its cost).
"""

from __future__ import annotations

import contextlib
import html
import time
from pathlib import Path

import gradio as gr

from app import views
from app.common import _error, _user, log
from inspector.io import ImageError, read_image
from inspector.products.progress import StageProgress

DISAGREEMENTS = 50  # rows of the disagreements list


class LearningTab:
    """Handlers and layout of the Learning tab (a part of :class:`app.shell.StationApp`)."""

    # ---- library access ----------------------------------------------------------------------
    @staticmethod
    def _actor(name: str | None, request: gr.Request | None) -> str | None:
        """Who changes a product: the signed-in user, else the name in the Operator box, else the
        library's default actor (None)."""
        return _user(request) or (name or "").strip()[:128] or None

    def _call(self, what: str, fn, *args, **kwargs):
        """A service call whose refusal (unknown product or version, nothing to roll back to...)
        is shown as a sentence, not a bare error."""
        try:
            return fn(*args, **kwargs)
        except (KeyError, ValueError) as exc:
            raise _error(f"{what}: {exc.args[0] if exc.args else exc}") from exc
        except Exception as exc:  # noqa: BLE001
            log.exception("%s failed", what)
            raise _error(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    def _versions(self, product: str) -> list[dict]:
        return list(self.station.versions(product))

    @staticmethod
    def _active(versions: list[dict]) -> dict | None:
        return next((v for v in versions if v.get("active")), None)

    def _selection(self, product: str, version: str | None, versions: list[dict]) -> dict | None:
        """The selection decision of one version: its record's, else its product.json's."""
        rec = next((v for v in versions if v.get("version") == version), None) or {}
        if rec.get("selection"):
            return rec["selection"]
        try:
            p = self.registry.get(product, version=version) if version else self.registry.get(product)
        except (KeyError, TypeError, ValueError):
            return None
        return (p.registration or {}).get("selection")

    # ---- views -------------------------------------------------------------------------------
    def _version_detail(self, product: str, version: str | None, versions: list[dict]) -> tuple:
        """(before/after table, caption, selection) for one version."""
        rec = next((v for v in versions if v.get("version") == version), None)
        if rec is None:
            return views.before_after_frame(None), "Choose a version.", ""
        try:
            detector = self.registry.get(product).detector
        except KeyError:
            detector = None
        sel = views.selection_markdown(self._selection(product, version, versions), detector)
        table = rec.get("table")
        n, m = views._label_counts(rec.get("evidence"))
        who = f"{rec.get('action') or 'built'} by {rec.get('actor') or '?'} at {views._when(rec.get('created'))[:19]}"
        state = "the active version" if rec.get("active") else ("running in shadow" if rec.get("shadow") else
                                                                 "not active")
        if table:
            cap = (f"Version `{version}` ({state}; {who}): built from {n} confirmed normal(s) and {m} confirmed "
                   "defect(s). Before = the version active when it was built, after = this version; both "
                   "scored on the same evidence, held out by cross-validation.")
        else:
            cap = f"Version `{version}` ({state}; {who}): built from the shots alone, no before/after table."
        return views.before_after_frame(table), cap, sel

    def _active_sentence(self, product: str, versions: list[dict]) -> str:
        act = self._active(versions)
        shadow = next((v for v in versions if v.get("shadow")), None)
        if act is None:
            return f"No version of {html.escape(product)} is active."
        out = (f"Active now: version <code>{html.escape(str(act['version']))}</code> of "
               f"<b>{html.escape(product)}</b> ({html.escape(str(act.get('action') or 'registered'))} by "
               f"{html.escape(str(act.get('actor') or '?'))}); every new inspection uses it.")
        out += (f" In shadow: <code>{html.escape(str(shadow['version']))}</code>." if shadow
                else " No version runs in shadow.")
        return f'<div data-active="{html.escape(str(act["version"]))}">{out}</div>'

    def _disagreement_images(self, row: dict | None) -> tuple:
        """Both heatmaps of one disagreement: the active version's and the candidate's."""
        if not row:
            return None, None, ""
        imgs = []
        for key in ("heatmap_path", "shadow_heatmap_path"):
            p, img = row.get(key), None
            if p and Path(p).is_file():
                with contextlib.suppress(ImageError):
                    img = read_image(p)
            imgs.append(img)
        iid = row.get("inspection_id", row.get("id"))
        cap = (f"#{iid}: active {row.get('verdict') or '-'} ({views._fmt(row.get('score'))}), candidate "
               f"{row.get('shadow_verdict') or '-'} ({views._fmt(row.get('shadow_score'))})"
               + (f"; operator decided {row['decision'].upper()}" if row.get("decision") else
                  "; no operator decision yet"))
        return imgs[0], imgs[1], cap

    def _learning_view(self, product: str | None, version: str | None = None) -> tuple:
        """Every output of the tab for ``product`` (``version`` chosen in the picker, else the
        newest version that is not active: the candidate)."""
        if not product:
            empty = views.before_after_frame(None)
            return ("Choose a product.", views.versions_frame([]), gr.update(choices=[], value=None), empty, "",
                    "", views.shadow_html(None), views.disagreements_frame([]), None, None, "", "")
        self._product(product)
        versions = self._call("Versions", self._versions, product)
        names = [v["version"] for v in versions]
        if version not in names:
            version = next((v["version"] for v in versions if not v.get("active")), names[0] if names else None)
        act = self._active(versions)
        summary = self._call("Evidence", self.station.feedback_summary, product)
        tally = self._call("Shadow tally", self.station.shadow_tally, product)
        rows = self._call("Disagreements", self.station.disagreements, product, limit=DISAGREEMENTS)
        table, cap, sel = self._version_detail(product, version, versions)
        a, b, dcap = self._disagreement_images(rows[0] if rows else None)
        return (views.evidence_html(summary, act and act["version"]), views.versions_frame(versions),
                gr.update(choices=names, value=version), table, cap, sel, views.shadow_html(tally),
                views.disagreements_frame(rows), a, b, dcap, self._active_sentence(product, versions))

    # ---- handlers ----------------------------------------------------------------------------
    def on_learning_select(self, product: str | None, version: str | None = None):
        """Arriving at the tab or choosing a product: every product is listed, the view is current."""
        names = self.product_names()
        product = product if product in names else (names[0] if names else None)
        return (gr.update(choices=names, value=product), *self._learning_view(product, version))

    def on_version_pick(self, product: str | None, version: str | None):
        if not product:
            return views.before_after_frame(None), "", ""
        return self._version_detail(product, version, self._call("Versions", self._versions, product))

    def on_versions_row(self, product: str | None, df, evt: gr.SelectData):
        """A click on a row of the versions list picks that version."""
        try:
            version = str(df.iloc[evt.index[0]]["version"])
        except Exception:  # noqa: BLE001
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (gr.update(value=version), *self.on_version_pick(product, version))

    def on_disagreement_row(self, product: str | None, df, evt: gr.SelectData):
        try:
            iid = int(df.iloc[evt.index[0]]["id"])
        except Exception:  # noqa: BLE001
            return gr.skip(), gr.skip(), gr.skip()
        rows = self._call("Disagreements", self.station.disagreements, product, limit=DISAGREEMENTS)
        row = next((r for r in rows if int(r.get("inspection_id", r.get("id", -1))) == iid), None)
        return self._disagreement_images(row)

    def on_build_start(self):
        """The button is off while the build runs (a second press cannot start a second build)."""
        return gr.update(interactive=False, value="Building candidate…"), ""

    def on_build_end(self):
        return gr.update(interactive=True, value="Build candidate")

    def on_build(self, product: str | None, operator: str | None = None, request: gr.Request = None,
                 progress=gr.Progress()):
        """Build a candidate version from the shots plus the evidence; the active version is
        untouched. Returns (status, *the tab's view with the candidate chosen)."""
        self._product(product)
        progress(0.0, desc="Building candidate: loading the evidence…")
        sink = StageProgress(lambda f, d: progress(f, desc=f"Building candidate: {d}"), spans=StageProgress.REFIT_SPANS)
        t0 = time.perf_counter()
        with self.model_lock:
            res = self._call("Build candidate", self.station.refit, product, actor=self._actor(operator, request),
                             progress=sink)
        secs = float(res.get("seconds") or (time.perf_counter() - t0))
        n, m = views._label_counts(res.get("evidence"))
        msg = (f"Built candidate **`{res['version']}`** of {product} from the shots, {n} confirmed normal(s) and "
               f"{m} confirmed defect(s) in {secs:.1f} s (parent `{res.get('parent')}`). "
               + ("It is active now." if res.get("promoted") else
                  "It is **not active**: run it in shadow, or promote it once its before/after table convinces you."))
        return (msg, *self._learning_view(product, res["version"]))

    def on_shadow_start(self, product: str | None, version: str | None, operator: str | None = None,
                        request: gr.Request = None):
        self._product(product)
        if not version:
            raise _error("Choose the version to run in shadow.")
        versions = self._call("Versions", self._versions, product)
        act = self._active(versions)
        if act and act["version"] == version:
            raise _error(f"{version} is the active version already; choose a candidate to run in shadow.")
        self._call("Run in shadow", self.station.set_shadow, product, version, actor=self._actor(operator, request))
        msg = (f"Version `{version}` now runs in shadow: every inspection of {product} is also scored by it, "
               "no verdict or output changes.")
        return (msg, *self._learning_view(product, version))

    def on_shadow_stop(self, product: str | None, operator: str | None = None, request: gr.Request = None):
        self._product(product)
        self._call("Stop shadow", self.station.set_shadow, product, None, actor=self._actor(operator, request))
        return (f"No version of {product} runs in shadow now.", *self._learning_view(product))

    def on_promote_ask(self, product: str | None, version: str | None):
        """First step of Promote: say exactly what would change; nothing happens before Confirm."""
        self._product(product)
        if not version:
            raise _error("Choose the version to promote.")
        versions = self._call("Versions", self._versions, product)
        rec = next((v for v in versions if v["version"] == version), None)
        if rec is None:
            raise _error(f"{product} has no version {version}.")
        act = self._active(versions)
        if rec.get("active"):
            raise _error(f"{version} is the active version already.")
        text = (f"**Promote `{version}`?** It replaces `{act and act['version']}` as the active version of "
                f"{product}: every new inspection uses it at once. Roll back returns to `{act and act['version']}`."
                + _table_words(rec.get("table")))
        pending = {"action": "promote", "product": product, "version": version,
                   "active": act and act["version"]}
        return text, gr.update(visible=True), pending

    def on_rollback_ask(self, product: str | None):
        self._product(product)
        versions = self._call("Versions", self._versions, product)
        act = self._active(versions)
        if act is None:
            raise _error(f"{product} has no active version.")
        text = (f"**Roll back {product}?** The version that was active before `{act['version']}` becomes active "
                f"again at once; `{act['version']}` is kept and can be promoted again.")
        pending = {"action": "rollback", "product": product, "version": None, "active": act["version"]}
        return text, gr.update(visible=True), pending

    def on_confirm_action(self, pending: dict | None, operator: str | None = None, request: gr.Request = None):
        """Second step: carry out the pending Promote / Roll back, unless the active version
        changed since it was asked (someone else promoted meanwhile): then nothing is done."""
        if not pending:
            return ("Nothing to confirm.", gr.update(visible=False), None, *[gr.skip()] * 12)
        product = pending["product"]
        versions = self._call("Versions", self._versions, product)
        act = self._active(versions)
        if (act and act["version"]) != pending.get("active"):
            msg = (f"Not done: the active version of {product} changed meanwhile (now `{act and act['version']}`). "
                   "Check the list and ask again.")
            return (msg, gr.update(visible=False), None, *self._learning_view(product, pending.get("version")))
        who = self._actor(operator, request)
        if pending["action"] == "promote":
            self._call("Promote", self.station.promote, product, pending["version"], actor=who)
        else:
            self._call("Roll back", self.station.rollback, product, actor=who)
        now = self.registry.get(product).version
        word = "Promoted" if pending["action"] == "promote" else "Rolled back"
        msg = (f"{word}. **Active now: version `{now}` of {product}** (was `{pending['active']}`); every new "
               "inspection uses it.")
        return (msg, gr.update(visible=False), None, *self._learning_view(product, now))

    def on_cancel_action(self):
        return "Nothing changed.", gr.update(visible=False), None

    # ---- layout and events -------------------------------------------------------------------
    def layout_learning(self, ui, names: list[str], first: str | None) -> None:
        """Components of the tab, stored on ``ui``; ``ui.learning_outs`` are what every view fills."""
        with gr.Tab("Learning", id="learning") as ui.learning_tab:
            with gr.Row():
                ui.lr_product = gr.Dropdown(names, value=first, label="Product", elem_id="learning-product", scale=2)
                ui.lr_refresh = gr.Button("Refresh", scale=0, elem_id="learning-refresh")
            ui.lr_active = gr.HTML(elem_id="learning-active")
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    gr.Markdown("### Evidence\nOperators' decisions: an accepted NG/UNCERTAIN or OK part is a "
                                "confirmed normal, a rejected part a confirmed defect.")
                    ui.lr_evidence = gr.HTML(elem_id="learning-evidence")
                    ui.lr_build = gr.Button("Build candidate", variant="primary", size="lg",
                                            elem_id="learning-build")
                    ui.lr_status = gr.Markdown("A candidate is a new version built from the shots plus the "
                                               "evidence; the active version stays until you promote it.",
                                               elem_id="learning-status")
                with gr.Column(scale=3):
                    gr.Markdown("### Before / after")
                    ui.lr_version = gr.Dropdown([], label="Version", elem_id="learning-version")
                    ui.lr_table = gr.Dataframe(views.before_after_frame(None), interactive=False, wrap=True,
                                               elem_id="learning-table")
                    ui.lr_caption = gr.Markdown(elem_classes="note", elem_id="learning-caption")
                    ui.lr_selection = gr.Markdown(elem_id="learning-selection")
                    with gr.Row():
                        ui.lr_shadow_on = gr.Button("Run in shadow", elem_id="learning-shadow")
                        ui.lr_shadow_off = gr.Button("Stop shadow", elem_id="learning-shadow-stop")
                        ui.lr_promote = gr.Button("Promote", variant="primary", elem_id="learning-promote")
                        ui.lr_rollback = gr.Button("Roll back", variant="stop", elem_id="learning-rollback")
                    with gr.Column(visible=False, elem_id="learning-confirm") as ui.lr_confirm_row:
                        ui.lr_confirm_text = gr.Markdown(elem_id="learning-confirm-text")
                        with gr.Row():
                            ui.lr_confirm = gr.Button("Confirm", variant="primary", elem_id="learning-confirm-button")
                            ui.lr_cancel = gr.Button("Cancel (Esc)", elem_id="learning-cancel",
                                                     elem_classes="kbd-cancel")
                    ui.lr_done = gr.Markdown(elem_id="learning-done")
            gr.Markdown("### Versions")
            ui.lr_versions = gr.Dataframe(views.versions_frame([]), interactive=False, wrap=False, max_height=260,
                                          elem_id="learning-versions")
            gr.Markdown("### Shadow")
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    ui.lr_shadow = gr.HTML(views.shadow_html(None), elem_id="learning-shadow-tally")
                    ui.lr_disagree = gr.Dataframe(views.disagreements_frame([]), interactive=False, wrap=False,
                                                  max_height=300, label="Disagreements (click a row)",
                                                  elem_id="learning-disagreements")
                with gr.Column(scale=3):
                    with gr.Row():
                        ui.lr_dis_active = gr.Image(label="Active version's heatmap", interactive=False, height=260,
                                                    elem_id="learning-heatmap-active")
                        ui.lr_dis_shadow = gr.Image(label="Candidate's heatmap", interactive=False, height=260,
                                                    elem_id="learning-heatmap-shadow")
                    ui.lr_dis_caption = gr.Markdown(elem_id="learning-disagreement-caption")
            ui.lr_pending = gr.State(None)
        ui.learning_outs = [ui.lr_evidence, ui.lr_versions, ui.lr_version, ui.lr_table, ui.lr_caption,
                            ui.lr_selection, ui.lr_shadow, ui.lr_disagree, ui.lr_dis_active, ui.lr_dis_shadow,
                            ui.lr_dis_caption, ui.lr_active]

    def events_learning(self, ui) -> None:
        """Arrive / choose / refresh; build (button off while it runs); shadow; promote and roll
        back behind a confirmation."""
        view = [ui.lr_product, *ui.learning_outs]
        ui.learning_tab.select(self.on_learning_select, [ui.lr_product], view, api_name=False,
                               show_progress="hidden")
        ui.lr_product.input(self.on_learning_select, [ui.lr_product], view, api_name=False)
        ui.lr_refresh.click(self.on_learning_select, [ui.lr_product, ui.lr_version], view, api_name=False)
        ui.lr_version.input(self.on_version_pick, [ui.lr_product, ui.lr_version],
                            [ui.lr_table, ui.lr_caption, ui.lr_selection], api_name=False)
        ui.lr_versions.select(self.on_versions_row, [ui.lr_product, ui.lr_versions],
                              [ui.lr_version, ui.lr_table, ui.lr_caption, ui.lr_selection], api_name=False)
        ui.lr_disagree.select(self.on_disagreement_row, [ui.lr_product, ui.lr_disagree],
                              [ui.lr_dis_active, ui.lr_dis_shadow, ui.lr_dis_caption], api_name=False)
        ui.lr_build.click(self.on_build_start, None, [ui.lr_build, ui.lr_status], api_name=False, queue=False
                          ).then(self.on_build, [ui.lr_product, ui.op_name], [ui.lr_status, *ui.learning_outs],
                                 api_name="refit", show_progress_on=[ui.lr_status], concurrency_id="refit",
                                 concurrency_limit=1
                                 ).then(self.on_build_end, None, [ui.lr_build], api_name=False, queue=False)
        acts = [ui.lr_done, *ui.learning_outs]
        ui.lr_shadow_on.click(self.on_shadow_start, [ui.lr_product, ui.lr_version, ui.op_name], acts,
                              api_name="set_shadow")
        ui.lr_shadow_off.click(self.on_shadow_stop, [ui.lr_product, ui.op_name], acts, api_name="stop_shadow")
        ask = [ui.lr_confirm_text, ui.lr_confirm_row, ui.lr_pending]
        ui.lr_promote.click(self.on_promote_ask, [ui.lr_product, ui.lr_version], ask, api_name=False)
        ui.lr_rollback.click(self.on_rollback_ask, [ui.lr_product], ask, api_name=False)
        ui.lr_confirm.click(self.on_confirm_action, [ui.lr_pending, ui.op_name],
                            [ui.lr_done, ui.lr_confirm_row, ui.lr_pending, *ui.learning_outs], api_name=False)
        ui.lr_cancel.click(self.on_cancel_action, None, [ui.lr_done, ui.lr_confirm_row, ui.lr_pending],
                           api_name=False)


def _table_words(table: dict | None) -> str:
    """The before/after table in one sentence for a confirmation, with a warning when the
    candidate does worse on the evidence than the version it was built from."""
    if not table:
        return " It has no before/after table (built from the shots alone)."
    b, a = table.get("before") or {}, table.get("after") or {}
    parts, worse = [], []
    for name, key, fmt, higher in (("image AUROC", "auroc", views._auroc, True),
                                   ("false alarms", "false_alarm_rate", views._rate, False),
                                   ("missed defects", "missed_rate", views._rate, False)):
        if b.get(key) is None or a.get(key) is None:
            continue
        parts.append(f"{name} {fmt(b[key])} → {fmt(a[key])}")
        if (a[key] < b[key]) if higher else (a[key] > b[key]):
            worse.append(name)
    out = f" On its evidence: {', '.join(parts)}." if parts else ""
    if worse:
        out += f" **Worse than before on {', '.join(worse)}.**"
    return out
