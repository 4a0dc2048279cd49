"""End to end in a real browser: start `inspector serve` on a free port with a temporary data dir,
drive it in headless Chromium (Debian's package, through Playwright) to register a product, set
its thresholds with the sliders, inspect a good and a defective image, record operator decisions
(keyboard shortcuts, a confirmed change, the trail in History), upload a non-image, and run the
Live tab into a missing source, a lost camera and Stop, checking that no stale verdict is shown as
current. A second test drives the Learning tab: build a candidate version from operator evidence
(the button is off while it builds), read its before/after table, promote it through the
confirmation. Screenshots go to tests/artifacts/station_*.png.

In CI (``CI`` set) a missing Chromium or Playwright is a failure, never a silent skip;
``scripts/install_browser.sh`` (run by ``.ci/run``) installs Chromium.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import deadline, free_port

from inspector.io import write_image
from inspector.station.store import Store
from inspector.verdict import Thresholds

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("INSPECTOR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PRODUCT = "brick-e2e"


def _ms(seconds: float) -> int:
    """A Playwright timeout in ms: ``deadline(seconds)`` (tests/conftest.py, scaled for busy machines)."""
    return int(deadline(seconds) * 1000)
REPO = Path(__file__).resolve().parents[1]


def _need(what: str) -> None:
    msg = f"{what} (run scripts/install_browser.sh)"
    if os.environ.get("CI"):
        pytest.fail(f"browser test cannot run in CI: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def images(tmp_path_factory, brick):
    """Shots, a good part and a defective part (a dark blob on the bricks), 192 px crops."""
    d = tmp_path_factory.mktemp("e2e-images")
    rng = np.random.default_rng(0)

    def crop():
        y, x = rng.integers(0, brick.shape[0] - 192, 2)
        return np.ascontiguousarray(brick[y:y + 192, x:x + 192])

    shots = [write_image(d / f"shot{i}.png", crop()) for i in range(2)]
    good = write_image(d / "good.png", crop())
    bad_img = crop().copy()
    cv2.circle(bad_img, (80, 90), 22, (25, 25, 25), -1)
    bad = write_image(d / "defective.png", bad_img)
    text = d / "notes.png"
    text.write_text("an operator picked the wrong file: this is text")
    return {"shots": shots, "good": good, "bad": bad, "text": text}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-station")
    data = tmp / "data"
    cfg = tmp / "station.toml"
    cfg.write_text('backbones = ["efficientnet-lite0"]\nimage_sizes = [128]\nconcurrency = 2\n'
                   f'allowed_batch_roots = ["{tmp.resolve()}"]\n')  # the Live test's camera folders
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "inspector.cli", "serve", "--data-dir", str(data), "--port",
                             str(port), "--config", str(cfg)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    until = time.monotonic() + deadline(180)
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"station exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > until:
            proc.kill()
            pytest.fail(f"station did not answer within {deadline(180):g} s:\n{(tmp / 'server.log').read_text()[-4000:]}")
        time.sleep(0.5)
    yield {"url": url, "data": data, "log": tmp / "server.log"}
    proc.terminate()
    try:
        proc.wait(deadline(20))
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server):
    if not CHROMIUM.exists():
        _need(f"{CHROMIUM} not found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("the playwright package is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1440, "height": 900})
        pg.set_default_timeout(_ms(90))
        yield pg
        browser.close()


def _verdict(pg, prev_id=None, timeout=_ms(120)) -> dict:
    """Wait for a new inspection in the Inspect tab; return what the badge and details show."""
    pg.wait_for_function(
        """(prev) => { const b = document.querySelector('#inspect-verdict [data-verdict]');
                      const m = document.querySelector('#inspect-verdict .verdict-meta');
                      if (!b || !b.dataset.verdict || !m) return false;
                      const id = (m.textContent.match(/#(\\d+)/) || [])[1];
                      return id && id !== prev; }""", arg=str(prev_id), timeout=timeout, polling=250)
    badge = pg.locator("#inspect-verdict [data-verdict]")
    meta = pg.locator("#inspect-verdict .verdict-meta").inner_text()
    iid = int(meta.rsplit("#", 1)[1].split()[0])
    return {"verdict": badge.get_attribute("data-verdict"), "text": badge.inner_text().strip(), "id": iid,
            "meta": meta}


def _settle(pg, timeout=_ms(15)) -> None:
    """Wait until Gradio shows no pending output (faded blocks) so screenshots are final."""
    try:
        pg.wait_for_function("!document.querySelector('.pending, .generating')", timeout=timeout)
    except Exception:  # noqa: BLE001 - a screenshot of a still-busy page is still useful
        pass


def _upload(pg, selector: str, path) -> None:
    """Upload through the File component; the app previews it (or says it is not an image)."""
    clear = pg.locator(f"{selector} button[aria-label='Clear'], {selector} button[title='Clear']")
    if clear.count():
        clear.first.click()
    pg.locator(f"{selector} input[type=file]").wait_for(state="attached")
    pg.locator(f"{selector} input[type=file]").set_input_files(str(path))
    # the preview shows the name as "stem ext" in two spans (whitespace between them), so match
    # the visible text with whitespace removed; an upload-progress line with the name is not enough
    try:
        pg.wait_for_function(
            """([sel, name]) => { const el = document.querySelector(sel);
                                  return el && !el.querySelector('.uploading, progress')
                                     && el.innerText.replace(/\\s+/g, '').includes(name); }""",
            arg=[selector, Path(path).name], timeout=_ms(150), polling=250)
    except Exception:
        print("DOM of", selector, ":", pg.locator(selector).inner_html()[:4000])
        raise
    # the last verdict was replaced at once: it is not this file's
    pg.locator("#inspect-verdict").get_by_text("Not ", exact=False).first.wait_for(timeout=_ms(150))


def _wait_calib_note(pg, text: str, preview: bool) -> None:
    """Wait until the Register tab's note says ``text`` and is (or is not) an unsaved preview."""
    pg.wait_for_function("""([want, preview]) => { const t = document.querySelector('#calib-note').innerText;
                                                   return t.includes(want)
                                                       && t.startsWith('Preview, not saved yet.') === preview; }""",
                         arg=[text, preview], timeout=_ms(60))


def _set_slider(pg, elem_id: str, value: float) -> None:
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(f"{value:.4f}")
    box.press("Enter")


def _live(pg, server, images, artifacts_dir, store) -> None:
    """Live tab: a missing source is a setup error (no retry loop); a lost camera greys the verdict
    and the frame out; Stop shows STOPPED and no current verdict."""
    import shutil

    pg.get_by_role("tab", name="Live").click()
    src = pg.locator("#live-source input, #live-source textarea").first
    src.fill(str(server["data"].parent.resolve() / "no-such-camera-folder"))
    pg.locator("#live-start").click()
    pg.locator('#live-camera [data-state="failed"]').wait_for(timeout=_ms(30))
    assert "SETUP ERROR" in pg.locator("#live-camera").inner_text()
    assert pg.locator('#live-verdict [data-stale="1"]').count() == 1
    assert pg.locator("#live-start").is_enabled() and not pg.locator("#live-stop").is_enabled()
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_live_setup_error.png"), full_page=True)

    line = server["data"].parent / "line-camera"
    line.mkdir(exist_ok=True)
    for i, p in enumerate([images["good"], images["bad"]] * 2):
        shutil.copy(p, line / f"{i:03d}.png")
    src.fill(str(line.resolve()))
    pg.locator("#live-start").click()
    pg.locator('#live-camera [data-state="live"]').wait_for(timeout=_ms(60))
    pg.wait_for_function("document.querySelector('#live-verdict [data-verdict]')?.dataset.verdict", timeout=_ms(60))
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_live.png"), full_page=True)
    shutil.rmtree(line)  # the camera is lost
    pg.locator('#live-camera [data-state="reconnecting"]').wait_for(timeout=_ms(30))
    pg.locator('#live-verdict [data-stale="1"]').wait_for()
    assert "CAMERA LOST" in pg.locator("#live-camera").inner_text()
    assert "Camera lost" in pg.locator("#live-verdict").inner_text()
    # the big badge is grey, never the colour of the last verdict
    assert "rgb(148, 163, 184)" in pg.locator("#live-verdict .verdict-box").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_live_camera_lost.png"), full_page=True)
    pg.locator("#live-stop").click()
    pg.locator('#live-camera [data-state="closed"]').wait_for()
    pg.wait_for_timeout(2500)  # a quiet window (the thing under test): two timer periods, nothing brings LIVE back
    assert pg.locator('#live-camera [data-state="closed"]').count() == 1
    assert "Stopped" in pg.locator("#live-verdict").inner_text()
    assert pg.locator('#live-verdict [data-stale="1"]').count() == 1
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_live_stopped.png"), full_page=True)


def test_register_then_inspect_good_and_defective(server, page, images, artifacts_dir):
    try:
        _scenario(server, page, images, artifacts_dir)
    except BaseException:
        page.screenshot(path=str(artifacts_dir / "station_failure.png"), full_page=True)
        print(Path(server["log"]).read_text()[-3000:])
        raise


def _scenario(server, pg, images, artifacts_dir):
    t0 = time.perf_counter()
    pg.goto(server["url"])
    pg.locator("#inspect-verdict [data-verdict]").wait_for()
    pg.get_by_role("tab", name="Register").click()
    pg.locator("#register-files input[type=file]").wait_for(state="attached")

    # -- register from two normal shots
    pg.locator("#register-name input, #register-name textarea").first.fill(PRODUCT)
    pg.locator("#register-files input[type=file]").set_input_files([str(p) for p in images["shots"]])
    pg.wait_for_function("document.querySelector('#register-files').innerText.includes('shot1')", timeout=_ms(60))
    pg.locator("#register-button").click()
    # staged progress while it registers: fold i/n and the time left, not a bar stuck at 5%
    pg.wait_for_function("document.body.innerText.includes('held-out scoring fold')", timeout=_ms(120))
    pg.screenshot(path=str(artifacts_dir / "station_register_progress.png"), full_page=True)
    status = pg.locator("#register-status")
    status.get_by_text("Registered").wait_for(timeout=_ms(240))
    assert PRODUCT in status.inner_text()
    pg.locator("#calib-plot img").first.wait_for(state="visible")  # the matplotlib figure
    t_reg = time.perf_counter()
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_register.png"), full_page=True)

    product_json = server["data"] / "products" / PRODUCT / "product.json"
    auto = Thresholds.from_dict(json.loads(product_json.read_text())["thresholds"])
    store = Store(f"sqlite:///{(server['data'] / 'inspector.db').resolve()}")

    def inspect(path, prev_id=None, shot=None) -> dict:
        _upload(pg, "#inspect-image", path)
        pg.locator("#inspect-button").click()
        shown = _verdict(pg, prev_id)
        pg.locator("#inspect-overlay img").first.wait_for(state="visible")
        row = store.get(shown["id"])
        shown["score"] = row["score"]
        assert f"{row['score']:.4g}" in shown["meta"], (shown, row)  # the score shown is the one stored
        assert shown["verdict"] == shown["text"] == row["verdict"], (shown, row)
        assert row["heatmap_path"] and Path(row["heatmap_path"]).is_file()
        if shot:
            _settle(pg)
            pg.screenshot(path=str(artifacts_dir / shot), full_page=True)
        return shown

    # -- operator inspects a good and a defective part with the calibrated thresholds
    pg.get_by_role("tab", name="Inspect").click()
    assert pg.locator("#inspect-product input").input_value() == PRODUCT  # set by the registration
    pg.locator("#operator-name input, #operator-name textarea").first.fill("olga")
    good0 = inspect(images["good"])
    bad0 = inspect(images["bad"], prev_id=good0["id"])
    assert good0["verdict"] == str(auto.decide(good0["score"]))
    assert bad0["verdict"] == str(auto.decide(bad0["score"]))
    assert bad0["score"] > good0["score"], (good0, bad0)  # the dark blob scores higher
    assert bad0["verdict"] != "OK", bad0

    # -- engineer moves the threshold sliders between the two parts (live re-verdict of the
    # recent inspections), saves; then the operator's verdicts are OK and NG
    pg.get_by_role("tab", name="Register").click()
    # arriving refreshes the view: the two inspections made since registering are listed
    _wait_calib_note(pg, "2 recent inspections", preview=False)
    _settle(pg)
    gap = bad0["score"] - good0["score"]
    ok_below = round(good0["score"] + 0.4 * gap, 3)
    ng_above = round(good0["score"] + 0.6 * gap, 3)
    _set_slider(pg, "calib-ng", ng_above)
    _set_slider(pg, "calib-ok", ok_below)
    # the live re-verdict preview answers for the last slider move: both recent inspections
    # re-judged under the new values, marked as not saved yet
    moved = Thresholds(ok_below, ng_above)
    n_changed = sum(str(moved.decide(x["score"])) != x["verdict"] for x in (good0, bad0))
    _wait_calib_note(pg, f"2 recent inspections; {n_changed} would change verdict", preview=True)
    _settle(pg)
    pg.locator("#calib-save").click()
    pg.locator("#calib-saved").get_by_text("Saved thresholds").wait_for()
    # and the view says what is saved: no preview banner, the same two inspections
    _wait_calib_note(pg, "2 recent inspections", preview=False)
    saved = Thresholds.from_dict(json.loads(product_json.read_text())["thresholds"])
    assert saved.ok_below == pytest.approx(ok_below, abs=2e-3) and saved.ng_above == pytest.approx(ng_above, abs=2e-3)
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_thresholds.png"), full_page=True)

    pg.get_by_role("tab", name="Inspect").click()
    good = inspect(images["good"], prev_id=bad0["id"], shot="station_inspect_good.png")
    assert good["verdict"] == "OK" and good["score"] == pytest.approx(good0["score"], rel=1e-5), good
    assert "rgb(21, 128, 61)" in pg.locator("#inspect-verdict [data-verdict]").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    pg.locator("#inspect-verdict").click()  # focus leaves the upload field; keys act on the page
    pg.keyboard.press("a")  # shortcut: accept
    pg.locator("#inspect-decision").get_by_text("Accepted").wait_for()
    assert store.get(good["id"])["decision"] == "accept"
    n_before = store.count()
    pg.keyboard.press("Enter")  # after the (mouse) Inspect click, Enter must not inspect again
    pg.wait_for_timeout(1500)  # a quiet window (the thing under test): no second inspection comes
    assert store.count() == n_before
    pg.keyboard.press("r")  # change of mind: asks first, records nothing yet
    pg.locator("#inspect-trail [data-pending]").wait_for()
    assert store.get(good["id"])["decision"] == "accept"
    pg.locator("#confirm-button").click()
    pg.locator("#inspect-decision").get_by_text("replaces").wait_for()
    trail = store.decisions(good["id"])
    assert [(d["decision"], d["operator"], d["previous"]) for d in trail] == [
        ("accept", "olga", None), ("reject", "olga", "accept")]
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_decision_trail.png"), full_page=True)

    bad = inspect(images["bad"], prev_id=good["id"], shot="station_inspect_defective.png")
    assert bad["verdict"] == "NG", bad
    assert "rgb(220, 38, 38)" in pg.locator("#inspect-verdict [data-verdict]").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    assert "NG ≥" in pg.locator("#inspect-colorbar").inner_text()

    # -- a non-image upload: the app's own message and an ERROR record, no framework error or path
    _upload(pg, "#inspect-image", images["text"])
    pg.locator("#inspect-button").click()
    err = _verdict(pg, prev_id=bad["id"])
    assert err["verdict"] == "ERROR" and store.get(err["id"])["verdict"] == "ERROR"
    shown = pg.locator("#inspect-verdict").inner_text()
    assert "Not a usable image: " in shown and "/tmp" not in shown and "gradio" not in shown.lower()
    assert not pg.locator(".toast-body").count() or "preprocess" not in pg.locator(".toast-body").first.inner_text()
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_bad_upload.png"), full_page=True)

    # -- history lists all three with distinct names; a row opens its heatmap and decision trail
    pg.get_by_role("tab", name="History").click()
    pg.wait_for_function("document.querySelector('#history-table')?.innerText.includes('defective.png')")
    table = pg.locator("#history-table").inner_text()
    assert "upload:good.png#" in table and "upload:notes.png#" in table
    pg.wait_for_function("[...document.querySelectorAll('#history-table img')].filter(i => i.offsetParent "
                         "&& i.naturalWidth > 0).length >= 3")  # heatmap thumbnails of the scored rows
    pg.locator("#history-table").get_by_text("upload:good.png#", exact=False).first.click()
    pg.locator("#history-caption table.decision-trail").wait_for()
    assert "replaces accept" in pg.locator("#history-caption").inner_text()
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_history.png"), full_page=True)

    _live(pg, server, images, artifacts_dir, store)
    store.close()
    print(f"\nbrowser e2e: register {t_reg - t0:.1f} s, total {time.perf_counter() - t0:.1f} s; auto {auto}: "
          f"good {good0['score']:.4g} {good0['verdict']}, defective {bad0['score']:.4g} {bad0['verdict']}; "
          f"saved {saved}: good {good['verdict']}, defective {bad['verdict']}")


LEARN = "brick-learn-e2e"


@pytest.fixture
def learn_product(server, brick):
    """A product with operator evidence on the server's data dir, made in-process (the Learning tab
    is under test here, not registration or inspection): GraphCore on the tiny test network, 4 good
    parts accepted, 3 parts with a dark blob rejected. Deleted afterwards: the server is shared by
    the module, and the registration scenario expects to register into an empty station."""
    from conftest import random_crops

    from inspector.station.service import StationService

    st = StationService(server["data"], device="cpu")
    try:
        st.registry.register(LEARN, random_crops(brick, 2, seed=31), detector="graphcore", backbone="tiny-cnn",
                             actor="test", n_synthetic=4)
        for img in random_crops(brick, 4, seed=32):
            rec = st.inspect(LEARN, img, source="good")
            st.decide(rec.id, "accept", "olga", reason="false-alarm" if str(rec.verdict) == "NG" else None)
        for img in random_crops(brick, 3, seed=33):
            img = img.copy()
            cv2.circle(img, (48, 44), 14, (20, 20, 20), -1)
            st.decide(st.inspect(LEARN, img, source="bad").id, "reject", "olga", reason="stain")
        yield {"version": st.registry.get(LEARN).version, "station": st}
    finally:
        with contextlib.suppress(Exception):
            st.registry.delete(LEARN, actor="test")
        with contextlib.suppress(Exception):
            st.close()


def _active_version(server) -> str:
    return json.loads((server["data"] / "products" / LEARN / "product.json").read_text())["version"]


def test_learning_tab_builds_a_candidate_and_promotes_it_after_confirmation(server, page, learn_product,
                                                                             artifacts_dir):
    try:
        _learning(server, page, learn_product, artifacts_dir)
    except BaseException:
        page.screenshot(path=str(artifacts_dir / "station_learning_failure.png"), full_page=True)
        print(Path(server["log"]).read_text()[-3000:])
        raise


def _learning(server, pg, learn, artifacts_dir):
    first = learn["version"]
    pg.goto(server["url"])
    pg.locator("#inspect-verdict [data-verdict]").wait_for()
    pg.get_by_role("tab", name="Learning").click()
    box = pg.locator("#learning-product input")
    box.wait_for()
    if box.input_value() != LEARN:  # other tests' products may come first
        box.click()
        pg.get_by_role("option", name=LEARN, exact=True).click()
    ev = pg.locator('#learning-evidence [data-normal="4"][data-defect="3"]')
    ev.wait_for(timeout=_ms(60))
    assert first in pg.locator("#learning-evidence").inner_text()
    assert f"Active now: version {first}" in " ".join(pg.locator("#learning-active").inner_text().split())

    # Build candidate: the button is off while it runs, the progress is shown, then the table
    build = pg.locator("#learning-build")
    build.click()
    pg.wait_for_function("document.querySelector('#learning-build').disabled", timeout=_ms(10), polling=50)
    # the progress line (the button's own label reads "Building candidate…", without the colon)
    pg.wait_for_function("document.body.innerText.includes('Building candidate: ')", timeout=_ms(60), polling=100)
    with contextlib.suppress(Exception):  # a later stage for the screenshot: the bar has moved
        pg.wait_for_function("/Building candidate: (fitt|held-out|generated)/.test(document.body.innerText)",
                             timeout=_ms(30), polling=100)
    pg.screenshot(path=str(artifacts_dir / "station_learning_progress.png"), full_page=True)
    pg.locator("#learning-status").get_by_text("Built candidate").wait_for(timeout=_ms(300))
    pg.wait_for_function("!document.querySelector('#learning-build').disabled", timeout=_ms(30))
    assert _active_version(server) == first  # built, not active
    versions = learn["station"].versions(LEARN)
    cand = versions[0]["version"]
    assert cand != first and not versions[0]["active"]
    assert cand in pg.locator("#learning-status").inner_text()
    table = pg.locator("#learning-table").inner_text()
    after = versions[0]["table"]["after"]
    assert "image AUROC" in table and "missed defects at the NG threshold" in table
    assert f"{after['auroc']:.3f}" in table and f"{100 * after['false_alarm_rate']:.1f} %" in table
    assert cand in pg.locator("#learning-versions").inner_text()

    # Promote asks first; nothing changes before Confirm
    assert not pg.locator("#learning-confirm").is_visible()
    pg.locator("#learning-promote").click()
    pg.locator("#learning-confirm").get_by_text("Promote").first.wait_for()
    assert cand in pg.locator("#learning-confirm").inner_text()
    pg.wait_for_timeout(500)  # a quiet window (the thing under test): nothing is promoted before Confirm
    assert _active_version(server) == first
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_learning_confirm.png"), full_page=True)
    pg.locator("#learning-confirm-button").click()
    pg.locator("#learning-done").get_by_text("Active now").wait_for(timeout=_ms(60))
    assert f"Active now: version {cand}" in " ".join(pg.locator("#learning-done").inner_text().split())
    assert _active_version(server) == cand
    pg.locator(f'#learning-active [data-active="{cand}"]').wait_for()
    assert not pg.locator("#learning-confirm").is_visible()
    assert "ACTIVE" in pg.locator("#learning-versions").inner_text()
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_learning.png"), full_page=True)
    # the selection decision of the candidate, in words, with the evidence it was decided on (and
    # configuration names such as head@0.5 as text, not as e-mail links)
    assert "3 confirmed defect(s)" in pg.locator("#learning-selection").inner_text()
    assert pg.locator("#learning-selection a").count() == 0

    # the Register tab states the active version's selection decision too
    pg.get_by_role("tab", name="Register").click()
    box = pg.locator("#calib-product input")
    if box.input_value() != LEARN:
        box.click()
        pg.get_by_role("option", name=LEARN, exact=True).click()
    pg.wait_for_function("([v]) => document.querySelector('#register-selection')?.innerText.includes(v)",
                         arg=[cand], timeout=_ms(30))
    shown = pg.locator("#register-selection").inner_text()
    assert "3 confirmed defect(s)" in shown and ("Switched on" in shown or "Nothing optional" in shown)
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_register_selection.png"), full_page=True)
