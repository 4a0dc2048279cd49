"""The station's handlers in-process (no browser): what an operator is shown must be current or
visibly not; decisions form an append-only trail; bad uploads are the app's own ERROR records;
registration reports its stages; threshold sliders follow the score range and one rule. The learning
loop: Review's brush becomes the decision's mask and an NG part is accepted only with a reason; the
Learning tab builds a candidate with progress, shows its table and selection decision, runs it in
shadow, and promotes / rolls back only after a confirmation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
from conftest import deadline, random_crops

from inspector.io import write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRODUCT = "brick-ui"


@pytest.fixture(scope="module")
def app(tmp_path_factory, brick):
    from app.shell import StationApp
    from inspector.station.config import StationConfig
    from inspector.station.service import StationService

    tmp = tmp_path_factory.mktemp("station-ui")
    station = StationService(tmp / "data")
    stages = []
    station.registry.register(PRODUCT, random_crops(brick, 2), detector="graphcore", backbone="tiny-cnn",
                              actor="test", n_synthetic=4, progress=lambda *a: stages.append(a))
    # camera folders must lie under the allowed roots: every test's tmp_path does
    a = StationApp(station, StationConfig(data_dir=tmp / "data", backbones=["tiny-cnn"],
                                          allowed_batch_roots=[tmp_path_factory.getbasetemp().resolve()]))
    a.registration_stages = stages
    yield a
    a.close()


def test_registration_reports_every_stage_in_order(app):
    from inspector.products.progress import StageProgress

    stages = app.registration_stages
    folds = [(d, t) for s, d, t in stages if s == "held-out scoring"]
    assert folds == [(0, 2), (1, 2), (2, 2)]  # 2 shots: leave-one-out, 2 folds
    assert [d for s, d, t in stages if s == "generated defects"][-1] == 4  # n_synthetic
    order = [s for s, _, _ in stages if s != "generated defects"]
    # the final fit comes first: GraphCore's held-out folds reuse its trained head
    assert order.index("fit") < order.index("held-out scoring") and order[-2:] == ["save", "save"]
    shown = []
    sp = StageProgress(lambda f, d: shown.append((f, d)))
    for st in stages:
        sp(*st)
    fracs = [f for f, _ in shown]
    assert fracs == sorted(fracs) and fracs[-1] == pytest.approx(1.0) and fracs[0] < 0.1
    assert any("fold 1/2" in d and "generated defects" in d for _, d in shown)


def test_bad_upload_is_an_error_record_with_the_apps_message(app, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text, not an image")
    out = app.on_inspect(PRODUCT, str(bad), "ann")
    badge, details, iid = out[1], out[2], out[3]
    assert "Not a usable image: " in badge and 'data-verdict="ERROR"' in badge
    row = app.store.get(iid)
    assert row["verdict"] == "ERROR" and row["error"] and row["operator"] is None
    shown = badge + str(details)
    assert str(tmp_path) not in shown and "/tmp" not in shown  # no server path anywhere
    assert out[4]["interactive"] is False  # nothing to accept


def test_two_uploads_with_one_name_stay_distinct(app, tmp_path, brick_crops):
    a, b = brick_crops(2, seed=5)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    ids = [app.on_inspect(PRODUCT, str(write_image(tmp_path / d / "000.png", img)), "")[3]
           for d, img in (("x", a), ("y", b))]
    sources = [app.store.get(i)["source"] for i in ids]
    assert sources[0] != sources[1] and all(s.startswith("upload:000.png#") for s in sources)


def test_redeciding_asks_first_and_keeps_the_whole_trail(app, tmp_path, brick_crops):
    iid = app.on_inspect(PRODUCT, str(write_image(tmp_path / "p.png", brick_crops(1, seed=7)[0])), "")[3]
    with pytest.raises(Exception, match="Operator"):  # never a blank operator
        app.on_accept(iid, "  ", "", "")
    msg, trail, confirm, pending = app.on_accept(iid, "ann", "", "")
    assert "Accepted" in msg and "ann" in msg and confirm["visible"] is False and pending is None
    msg, trail, confirm, pending = app.on_reject(iid, "bob", "scratch", "edge")
    assert msg == "" and confirm["visible"] is True and 'data-pending="1"' in trail and "ACCEPTED by ann" in trail
    assert app.store.get(iid)["decision"] == "accept"  # nothing recorded before the confirmation
    assert app.on_cancel(iid)[0] == "Not changed." and len(app.store.decisions(iid)) == 1
    msg, trail, confirm, pending2 = app.on_confirm(pending, "bob", "scratch", "edge")
    assert "Rejected" in msg and "replaces" in msg and pending2 is None
    rows = app.store.decisions(iid)
    assert [(r["decision"], r["operator"], r["previous"], r["reason"]) for r in rows] == [
        ("accept", "ann", None, None), ("reject", "bob", "accept", "scratch")]
    with pytest.raises(Exception, match="decided meanwhile"):  # a stale confirmation is refused
        app.on_confirm(pending, "carl", "", "")


def test_review_queue_settles_uncertain_parts_one_after_another(app):
    st, q = app.store, "line-7"  # a product of its own: other tests' inspections stay out of this queue
    ids = [st.record_inspection(product=q, source=f"q{i}", image_sha256=None, score=0.1, verdict="UNCERTAIN",
                                model_version="v") for i in range(3)]
    out = app.on_review_load(q)
    assert out[3] == ids[0] and "**3**" in out[2]
    out = app.on_review_accept(q, out[3], out[-1], "ann", "", "")
    assert out[3] == ids[1] and st.get(ids[0])["decision"] == "accept"
    out = app.on_review_skip(q, out[3], out[-1])
    assert out[3] == ids[2]
    out = app.on_review_reject(q, out[3], out[-1], "ann", "stain", "")
    assert out[3] is None and st.get(ids[2])["decision"] == "reject" and st.get(ids[1])["decision"] is None
    assert [r["id"] for r in st.pending_review(q)] == [ids[1]]


def test_missing_camera_source_is_a_setup_error_that_stops_the_loop(app, tmp_path):
    src = str(tmp_path.resolve() / "no-such-folder")
    run = app.on_live_start(PRODUCT, src, None, None, None)[-1]
    out = app.on_live_tick(PRODUCT, src, None, None, run)
    assert 'data-state="failed"' in out[2] and "SETUP ERROR" in out[2]
    assert 'data-stale="1"' in out[1] and "setup error" in out[1].lower()
    assert out[7].active is False and out[-1] is None  # the timer stops: no endless retry
    assert out[8]["interactive"] is True and out[9]["interactive"] is False  # Start again, Stop off


def test_stop_waits_for_the_frame_in_flight_and_greys_the_verdict(app, tmp_path, brick_crops):
    folder = tmp_path / "line"
    folder.mkdir()
    for i, img in enumerate(brick_crops(3, seed=3)):
        write_image(folder / f"{i}.png", img)
    src = str(folder.resolve())
    run = app.on_live_start(PRODUCT, src, None, None, None)[-1]
    first = app.on_live_tick(PRODUCT, src, None, None, run)
    assert 'data-state="live"' in first[2] and 'data-stale' not in first[1]
    cam = app.pool.get(src)
    read = cam.source.read
    entered = threading.Event()
    read_done = []

    def slow_read():  # a slow camera: the frame is still in flight when Stop is pressed
        entered.set()
        time.sleep(0.6)  # the frame in flight (the thing under test), not a wait for a condition
        out = read()
        read_done.append(time.perf_counter())
        return out

    cam.source.read = slow_read
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("tick", app.on_live_tick(PRODUCT, src, None, None, run)))
    th.start()
    assert entered.wait(deadline(5))
    stopped = app.on_live_stop(first[4], first[6], run)
    stopped_at = time.perf_counter()
    th.join(deadline(5))
    # Stop returned only after the frame in flight was read (timestamps, not a duration: holds under load)
    assert "tick" in result and read_done and stopped_at >= read_done[0]
    assert cam.state == "closed" and not cam._open  # the source is closed
    for out in (stopped, result["tick"]):  # neither may show LIVE or a current verdict
        assert 'data-state="live"' not in out[2] and 'data-stale="1"' in out[1]
        assert out[7].active is False
    assert "Stopped" in stopped[1] and "CAMERA STOPPED" in stopped[2]
    assert app.on_live_tick(PRODUCT, src, None, None, run)[7].active is False  # a late tick stays stopped


def test_registration_keeps_each_users_product_choice(app):
    # other tests of this module may have registered products of their own: compare with the list
    names = app.product_names()
    assert PRODUCT in names
    upd = app.on_products_changed(PRODUCT, None, PRODUCT, "gone", PRODUCT)
    assert upd[0]["value"] == PRODUCT and upd[2]["value"] == PRODUCT  # each user's choice kept
    assert upd[1]["value"] == names[0]  # an empty choice filled with the first product
    assert upd[3]["value"] == names[0]  # a removed choice falls back to an existing product


def test_slider_step_and_rule_shared_by_preview_and_save(app):
    from app import views

    step, nd = views.slider_spec(0.26, 0.82)
    assert 80 <= (0.82 - 0.26) / step <= 200 and nd == 3 and step in (0.002, 0.005)  # 1-2-5 steps, ~200
    step, nd = views.slider_spec(120.0, 4500.0)
    assert 80 <= 4380 / step <= 200 and nd == 0
    with pytest.raises(ValueError, match="above the NG"):
        views.slider_thresholds(0.6, 0.4)
    note = app.on_threshold_preview(PRODUCT, 0.6, 0.4)[-1]
    with pytest.raises(Exception, match="above the NG") as exc:
        app.on_threshold_save(PRODUCT, 0.6, 0.4, None)
    assert "above the NG" in note and "Cannot use these thresholds" in str(exc.value)
    (lo, hi, step), nd = app._slider_range(app.registry.get(PRODUCT))
    assert 80 <= (hi - lo) / step <= 400


def test_heatmap_has_no_tint_below_ok_and_the_colour_bar_marks_both_thresholds(rng):
    from app import views
    from inspector.products.heatmap import overlay
    from inspector.verdict import Thresholds

    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[:, 32:] = np.linspace(0.0, 1.0, 32)[None]
    t = Thresholds(0.4, 0.8)
    out = overlay(img, amap, t, outline=False)
    below = amap < 0.4
    assert np.array_equal(out[below], img[below])  # untouched where the part is OK-level
    assert (out[amap >= 0.8] != img[amap >= 0.8]).any()
    # a detector whose image score is above its map's maximum (global branch): the map's peak is tied
    # to the score, so an NG image is tinted and outlined in red although no pixel reached NG
    weak = amap * 0.35  # max 0.35 < OK threshold
    assert np.array_equal(overlay(img, weak, t, outline=False), img)  # without the score: no tint at all
    tied = overlay(img, weak, t, low=0.0, peak=0.9)
    hot = weak == weak.max()
    assert (tied[hot] != img[hot]).any() and (tied[weak < 0.35 * 0.4 / 0.9] == img[weak < 0.35 * 0.4 / 0.9]).all()
    ok_img = overlay(img, weak, t, low=0.0, peak=0.3)  # an OK score: nothing reaches OK, nothing tinted
    assert np.array_equal(ok_img, img)
    bar = views.colorbar_html(t, low=0.0)
    assert 'data-ok="0.4"' in bar and 'data-ng="0.8"' in bar and "OK &lt; 0.4" in bar and "NG ≥ 0.8" in bar


def test_history_csv_has_every_matching_row(app):
    upd = app.on_history_csv("(all)", "(all)", "all time")
    assert upd["visible"] is True
    df = pd.read_csv(upd["value"])
    assert len(df) == app.store.count() and {"source", "image_sha256", "decision", "operator"} <= set(df.columns)


def test_batch_rows_have_thumbnails_open_their_heatmap_and_can_be_rescored(app, tmp_path, brick_crops):
    from types import SimpleNamespace

    folder = tmp_path / "lot"
    folder.mkdir()
    for i, img in enumerate(brick_crops(3, seed=11)):
        write_image(folder / f"p{i}.png", img)
    msg, styled, _ = app.on_batch(PRODUCT, str(folder.resolve()), None, False, None, lambda *a, **k: None)
    df = styled.data  # a pandas Styler: the verdict column is coloured like the badges
    assert "background-color" in styled.to_html() and len(df) == 3 and all(str(c).startswith("![heatmap](data:image/jpeg;base64,") for c in df["heatmap"])
    img, caption = app.on_batch_select(df, SimpleNamespace(index=[0, 1]))
    assert img is not None and f"#{int(df.iloc[0]['id'])}" in caption
    again, df2, _ = app.on_batch(PRODUCT, str(folder.resolve()), None, False, None, lambda *a, **k: None)
    assert "0 scored by this run; 3 already done" in again and "Re-score" in again  # resumed: nothing new
    forced, df3, _ = app.on_batch(PRODUCT, str(folder.resolve()), None, True, None, lambda *a, **k: None)
    df3 = df3.data
    assert "3 scored by this run" in forced and "already done" not in forced
    assert set(df3["id"]).isdisjoint(set(df["id"]))  # a new batch, scored again


def test_overlay_opacity_and_before_after_toggle(app, tmp_path, brick_crops):
    out = app.on_inspect(PRODUCT, str(write_image(tmp_path / "v.png", brick_crops(1, seed=13)[0])), "")
    view = out[8]
    assert view is not None and "NG ≥" in out[9]
    original = app.on_view(view, 0.45, "original")
    assert np.array_equal(original, view["image"])
    faint, strong = app.on_view(view, 0.1, "heatmap"), app.on_view(view, 0.9, "heatmap")
    diff = lambda a: np.abs(a.astype(int) - view["image"].astype(int)).sum()  # noqa: E731
    assert diff(faint) <= diff(strong)


# ---- the learning loop: Review's brush and reason rule, the Learning tab, the Register tab's selection ------------

LEARN = "brick-learn"


def _defective(img: np.ndarray) -> np.ndarray:
    import cv2

    out = img.copy()
    cv2.circle(out, (48, 44), 14, (20, 20, 20), -1)  # a dark blob on the bricks
    return out


@pytest.fixture(scope="module")
def learn(app, brick):
    """A GraphCore product of its own with operator evidence: 4 good parts accepted (a false alarm
    among them needs a reason) and 3 defective parts rejected."""
    st = app.station
    st.registry.register(LEARN, random_crops(brick, 2, seed=21), detector="graphcore", backbone="tiny-cnn",
                         actor="test", n_synthetic=4)
    goods = random_crops(brick, 4, seed=22)
    bads = [_defective(c) for c in random_crops(brick, 3, seed=23)]
    ids = {"normal": [], "defect": []}
    for img in goods:
        rec = st.inspect(LEARN, img, source="good")
        st.decide(rec.id, "accept", "ann", reason="false-alarm" if str(rec.verdict) == "NG" else None)
        ids["normal"].append(rec.id)
    for img in bads:
        rec = st.inspect(LEARN, img, source="bad")
        st.decide(rec.id, "reject", "ann", reason="stain")
        ids["defect"].append(rec.id)
    return {"version": st.registry.get(LEARN).version, "ids": ids, "goods": goods, "bads": bads}


def _visible(upd) -> bool:
    return (upd.get("visible") if isinstance(upd, dict) else getattr(upd, "visible", None)) is True


def test_review_reason_is_required_to_accept_an_ng_part_and_the_brush_becomes_the_mask(app):
    from app.tabs.review import painted_mask

    st, q = app.store, "line-ng"  # a queue of its own
    ids = [st.record_inspection(product=q, source=f"n{i}", image_sha256=None, score=0.9, verdict="NG",
                                model_version="v") for i in range(2)]
    out = app.on_review_load(q, "NG")
    assert out[3] == ids[0] and "NG inspection" in out[2]
    assert app.on_review_load(q, "UNCERTAIN")[3] is None  # the other queue is empty
    # accepting an NG part without a reason: a sentence on screen, nothing recorded, the part stays
    refused = app.on_review_accept(q, ids[0], [], "ann", "", "", None, "NG")
    assert "needs a reason code" in refused[2] and 'class="reason-required"' in refused[2]
    assert st.get(ids[0])["decision"] is None and st.decisions(ids[0]) == []
    assert all(isinstance(x, dict) and x.get("__type__") == "update" and len(x) == 1 for x in refused[3:8])  # skip
    # the brush: strokes on a layer (alpha > 0) become the mask sent with the rejection
    layer = np.zeros((60, 80, 4), np.uint8)
    layer[10:30, 20:50] = (255, 0, 255, 255)
    editor = {"background": np.zeros((60, 80, 4), np.uint8), "layers": [layer], "composite": None}
    assert painted_mask({"background": None, "layers": [np.zeros((60, 80, 4), np.uint8)]}) is None  # unpainted
    assert painted_mask(editor, (120, 160)).sum() == 4 * 20 * 30  # resized to the image, nearest
    out = app.on_review_reject(q, ids[0], [], "ann", "scratch", "", editor, "NG")
    assert out[3] == ids[1] and "Mask recorded" in out[2]
    dec = st.decisions(ids[0])[-1]
    assert dec["decision"] == "reject" and dec["mask_sha256"]
    stored = app.station.evidence_images.read_mask(dec["mask_sha256"])
    assert stored.shape[:2] == (60, 80) and np.array_equal(np.asarray(stored).astype(bool), layer[..., 3] > 0)
    # with a reason the NG part is accepted (a confirmed normal), and no mask goes with an accept
    out = app.on_review_accept(q, ids[1], [], "ann", "false-alarm", "", editor, "NG")
    assert out[3] is None and st.get(ids[1])["decision"] == "accept"
    assert st.decisions(ids[1])[-1]["mask_sha256"] is None


def test_inspect_tab_refuses_accepting_an_ng_part_without_a_reason(app):
    st = app.store
    iid = st.record_inspection(product="line-ng2", source="x", image_sha256=None, score=0.9, verdict="NG",
                               model_version="v")
    msg, trail, confirm, pending = app.on_accept(iid, "ann", "", "")
    assert "needs a reason code" in msg and pending is None and st.decisions(iid) == []
    msg, trail, confirm, pending = app.on_accept(iid, "ann", "false-alarm", "")
    assert "Accepted" in msg and st.get(iid)["decision"] == "accept"
    # a change of mind to accept is asked first; its confirmation also needs the reason
    msg, trail, confirm, pending = app.on_reject(iid, "bob", "", "")
    assert _visible(confirm) and pending
    assert "Rejected" in app.on_confirm(pending, "bob", "", "")[0]  # a rejection needs no reason
    msg, trail, confirm, pending = app.on_accept(iid, "carl", "", "")
    assert pending is None and "needs a reason code" in msg and not _visible(confirm)  # refused before asking
    assert [d["decision"] for d in st.decisions(iid)] == ["accept", "reject"]


def test_learning_tab_builds_a_candidate_and_promotes_and_rolls_back_only_after_confirmation(app, learn):
    reg = app.registry
    first = learn["version"]
    out = app.on_learning_select(LEARN)
    assert out[0]["value"] == LEARN and LEARN in out[0]["choices"]
    evidence = out[1]
    assert 'data-normal="4"' in evidence and 'data-defect="3"' in evidence and first in evidence
    state = dict(zip(out[2]["version"], out[2]["state"], strict=True))
    assert state[first] == "ACTIVE" and list(state.values()).count("ACTIVE") == 1
    seen = []

    class Progress:  # what gr.Progress receives
        def __call__(self, frac, desc=None):
            seen.append((float(frac), desc))

    built = app.on_build(LEARN, "eve", None, progress=Progress())
    msg, table, selection, versions = built[0], built[4], built[6], built[2]
    cand = built[3]["value"]
    assert cand and cand != first and f"`{cand}`" in msg and "4 confirmed normal(s) and 3 confirmed defect(s)" in msg
    assert reg.get(LEARN).version == first  # built, not active
    fracs = [f for f, _ in seen]
    assert len(seen) >= 3 and fracs == sorted(fracs) and all(d and "Building candidate" in d for _, d in seen)
    rows = dict(zip(table.iloc[:, 0], zip(table.iloc[:, 1], table.iloc[:, 2], strict=True), strict=True))
    assert set(rows) >= {"image AUROC", "false-alarm rate at the OK threshold", "missed defects at the NG threshold"}
    res_table = next(v for v in app.station.versions(LEARN) if v["version"] == cand)["table"]
    assert rows["image AUROC"][1] == f"{res_table['after']['auroc']:.3f}"
    assert rows["missed defects at the NG threshold"][0] == f"{100 * res_table['before']['missed_rate']:.1f} %"
    state = dict(zip(versions["version"], versions["state"], strict=True))
    assert versions["version"].iloc[0] == cand and state[cand] == "" and state[first] == "ACTIVE"  # newest first

    # Promote asks first: nothing changes until Confirm
    text, row, pending = app.on_promote_ask(LEARN, cand)
    assert _visible(row) and cand in text and first in text and reg.get(LEARN).version == first
    assert app.on_cancel_action()[0] == "Nothing changed." and reg.get(LEARN).version == first
    text, row, pending = app.on_promote_ask(LEARN, cand)
    done = app.on_confirm_action(pending, "eve")
    assert reg.get(LEARN).version == cand and f"Active now: version `{cand}`" in done[0]
    assert done[2] is None and not _visible(done[1]) and f'data-active="{cand}"' in done[-1]
    with pytest.raises(Exception, match="active version already"):
        app.on_promote_ask(LEARN, cand)

    # a stale confirmation (someone promoted or rolled back meanwhile) does nothing
    _, _, pending = app.on_rollback_ask(LEARN)
    app.station.rollback(LEARN, actor="someone-else")
    stale = app.on_confirm_action(pending, "eve")
    assert stale[0].startswith("Not done") and reg.get(LEARN).version == first
    app.station.promote(LEARN, cand, actor="eve")
    # Roll back, confirmed: the earlier version is active again
    _, row, pending = app.on_rollback_ask(LEARN)
    assert _visible(row) and reg.get(LEARN).version == cand
    done = app.on_confirm_action(pending, "eve")
    assert reg.get(LEARN).version == first and f"Active now: version `{first}`" in done[0]
    # the candidate's selection decision, in words, with the evidence it was decided on
    assert "3 confirmed defect(s)" in selection and "| configuration | AUROC | separation |" in selection


def test_learning_tab_shadow_tally_and_disagreements(app, learn):
    """A version that disagrees by construction (the active model with thresholds that call every
    part OK, or every part NG) runs in shadow: the tally counts every part, the disagreements list
    has exactly the parts whose verdicts differ, with both heatmaps."""
    from inspector.verdict import Thresholds

    st, reg = app.station, app.registry
    active = reg.get(LEARN)
    parts = learn["goods"][:2] + learn["bads"][:2]
    verdicts = [str(i.verdict) for i in active.inspect(parts)]
    everything = "OK" if any(v != "OK" for v in verdicts) else "NG"
    reg.set_thresholds(LEARN, Thresholds(1e9, 2e9) if everything == "OK" else Thresholds(-2e9, -1e9), actor="test")
    other = reg.get(LEARN).version
    reg.rollback(LEARN, actor="test")
    assert reg.get(LEARN).version == active.version != other
    expected = sum(v != everything for v in verdicts)
    assert expected >= 1
    with pytest.raises(Exception, match="active version already"):
        app.on_shadow_start(LEARN, active.version, "eve")
    out = app.on_shadow_start(LEARN, other, "eve")
    assert "runs in shadow" in out[0] and f'data-version="{other}"' in out[7] and "In shadow" in out[-1]
    assert st.registry.shadow_version(LEARN) == other
    ids = [st.inspect(LEARN, img, source=f"shadowed-{k}").id for k, img in enumerate(parts)]
    assert st.shadow.wait_idle(timeout=120)
    st.decide(ids[-1], "reject", "ann", reason="stain")  # the operator settles one part
    view = app.on_learning_select(LEARN)
    tally = st.shadow_tally(LEARN)
    assert tally["scored"] == 4 and tally["dropped"] == 0 and tally["disagree"] == expected
    html_ = view[7]
    assert 'data-k="scored"><b>4</b>' in html_ and f'data-k="disagree"><b>{expected}</b>' in html_
    assert "Settled by the operators' decisions on 1 part(s)" in html_
    dis = view[8]
    assert len(dis) == expected and set(dis["id"]) <= set(ids)
    assert all(everything in c for c in dis["candidate"])
    newest = int(dis.iloc[0]["id"])
    assert view[9] is not None and view[10] is not None and f"#{newest}: active" in view[11]
    assert view[9].shape[:2] == view[10].shape[:2]  # both heatmaps of the same part
    out = app.on_shadow_stop(LEARN, "eve")
    assert "No version" in out[0] and 'data-version=""' in out[7] and st.registry.shadow_version(LEARN) is None


def test_register_tab_and_views_state_the_selection_decision_in_words(app, learn):
    from app import views

    text = app.on_selection_view(LEARN)
    assert text.startswith(f"Version `{app.registry.get(LEARN).version}`, graphcore: ")
    # registered from the shots alone: no real evidence, so nothing optional is on, and it says so
    assert "Nothing optional is switched on" in text and "0 confirmed defect(s)" in text and "Why: " in text
    sel = {"rule": "keep a part only if it raises cross-validated separation", "min_defects": 3,
           "evidence": {"normals": 12, "defects": 5},
           "candidates": [{"name": "bank", "auroc": 0.91, "separation": 1.2},
                          {"name": "bank+head", "auroc": 0.95, "separation": 1.8}],
           "enabled": {"head": True, "global_branch": False, "views": False}, "weights": {"head": 0.5},
           "reason": "the head raised separation from 1.2 to 1.8"}
    md = views.selection_markdown(sel, "graphcore")
    assert "Switched on by this product's real evidence:** learned head." in md
    assert "Kept off: global branch, augmented views." in md and "12 confirmed normal(s) and 5 confirmed" in md
    assert "| bank+head | 0.950 | 1.8 |" in md and "learned head 0.5" in md
    assert "| head&#64;1 | 0.930 | - |" in views.selection_markdown({**sel, "candidates": [{"name": "head@1", "auroc": 0.93}]})
    few = views.selection_markdown({**sel, "evidence": {"normals": 2, "defects": 1}, "reason": None,
                                    "enabled": dict.fromkeys(sel["enabled"], False)})
    assert "Nothing optional is switched on" in few and "fewer than the 3 confirmed defects needed" in few
    assert "no optional parts" in views.selection_markdown(None, "patchcore")
    df = views.before_after_frame({"before": {"auroc": 0.8, "false_alarm_rate": 0.25, "missed_rate": 0.5},
                                   "after": {"auroc": 0.9, "false_alarm_rate": 0.1, "missed_rate": 0.6}})
    change = dict(zip(df.iloc[:, 0], df["change"], strict=False))
    assert change["image AUROC"] == "+0.100 (better)"
    assert change["false-alarm rate at the OK threshold"] == "-15.0 pts (better)"
    assert change["missed defects at the NG threshold"] == "+10.0 pts (worse)"
