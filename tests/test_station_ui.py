"""The station's handlers in-process (no browser): what an operator is shown must be current or
visibly not; decisions form an append-only trail; bad uploads are the app's own ERROR records;
registration reports its stages; threshold sliders follow the score range and one rule."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
from conftest import random_crops

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

    def slow_read():  # a slow camera: the frame is still in flight when Stop is pressed
        entered.set()
        time.sleep(0.6)
        return read()

    cam.source.read = slow_read
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("tick", app.on_live_tick(PRODUCT, src, None, None, run)))
    th.start()
    assert entered.wait(5)
    t0 = time.perf_counter()
    stopped = app.on_live_stop(first[4], first[6], run)
    waited = time.perf_counter() - t0
    th.join(5)
    assert "tick" in result and waited > 0.3  # Stop returned only after the frame in flight
    assert cam.state == "closed" and not cam._open  # the source is closed
    for out in (stopped, result["tick"]):  # neither may show LIVE or a current verdict
        assert 'data-state="live"' not in out[2] and 'data-stale="1"' in out[1]
        assert out[7].active is False
    assert "Stopped" in stopped[1] and "CAMERA STOPPED" in stopped[2]
    assert app.on_live_tick(PRODUCT, src, None, None, run)[7].active is False  # a late tick stays stopped


def test_registration_keeps_each_users_product_choice(app):
    upd = app.on_products_changed(PRODUCT, None, PRODUCT, "gone", PRODUCT)
    assert upd[0]["value"] == PRODUCT and upd[1]["value"] == PRODUCT  # kept / filled when empty
    assert upd[2]["value"] == PRODUCT  # a removed choice falls back to an existing product


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
