"""End to end in a real browser: start `inspector serve` on a free port with a temporary data dir,
drive it in headless Chromium (Debian's package, through Playwright) to register a product, set
its thresholds with the sliders, inspect a good and a defective image, record an operator
decision, and check the verdicts shown. Screenshots go to tests/artifacts/station_*.png.

In CI (``CI`` set) a missing Chromium or Playwright is a failure, never a silent skip;
``scripts/install_browser.sh`` (run by ``.ci/run``) installs Chromium.
"""

from __future__ import annotations

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
from conftest import free_port

from inspector.io import write_image
from inspector.store import Store
from inspector.verdict import Thresholds

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("INSPECTOR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PRODUCT = "brick-e2e"
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
    return {"shots": shots, "good": good, "bad": bad}


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
    deadline = time.monotonic() + 180
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
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"station did not answer within 180 s:\n{(tmp / 'server.log').read_text()[-4000:]}")
        time.sleep(0.5)
    yield {"url": url, "data": data, "log": tmp / "server.log"}
    proc.terminate()
    try:
        proc.wait(20)
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
        pg.set_default_timeout(30_000)
        yield pg
        browser.close()


def _verdict(pg, prev_id=None, timeout=120_000) -> dict:
    """Wait for a new inspection in the Inspect tab; return what the badge and details show."""
    pg.wait_for_function(
        """(prev) => { const b = document.querySelector('#inspect-verdict [data-verdict]');
                      const m = document.querySelector('#inspect-verdict .verdict-meta');
                      if (!b || !b.dataset.verdict || !m) return false;
                      const id = (m.textContent.match(/#(\\d+)/) || [])[1];
                      return id && id !== prev; }""", arg=str(prev_id), timeout=timeout)
    badge = pg.locator("#inspect-verdict [data-verdict]")
    meta = pg.locator("#inspect-verdict .verdict-meta").inner_text()
    iid = int(meta.rsplit("#", 1)[1].split()[0])
    return {"verdict": badge.get_attribute("data-verdict"), "text": badge.inner_text().strip(), "id": iid,
            "meta": meta}


def _settle(pg, timeout=15_000) -> None:
    """Wait until Gradio shows no pending output (faded blocks) so screenshots are final."""
    try:
        pg.wait_for_function("!document.querySelector('.pending, .generating')", timeout=timeout)
    except Exception:  # noqa: BLE001 - a screenshot of a still-busy page is still useful
        pass


def _upload(pg, selector: str, path) -> None:
    remove = pg.locator(f"{selector} button[aria-label='Remove Image']")
    if remove.count():
        remove.first.click()
    pg.locator(f"{selector} input[type=file]").set_input_files(str(path))
    pg.locator(f"{selector} img").first.wait_for(state="visible")


def _set_slider(pg, elem_id: str, value: float) -> None:
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(f"{value:.4f}")
    box.press("Enter")


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
    pg.wait_for_function("document.querySelector('#register-files').innerText.includes('shot1')", timeout=60_000)
    pg.locator("#register-button").click()
    status = pg.locator("#register-status")
    status.get_by_text("Registered").wait_for(timeout=240_000)
    assert PRODUCT in status.inner_text()
    pg.locator("#calib-plot img, #calib-plot canvas, #calib-plot svg").first.wait_for(state="visible")
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
    good0 = inspect(images["good"])
    bad0 = inspect(images["bad"], prev_id=good0["id"])
    assert good0["verdict"] == str(auto.decide(good0["score"]))
    assert bad0["verdict"] == str(auto.decide(bad0["score"]))
    assert bad0["score"] > good0["score"], (good0, bad0)  # the dark blob scores higher
    assert bad0["verdict"] != "OK", bad0

    # -- engineer moves the threshold sliders between the two parts (live re-verdict of the
    # recent inspections), saves; then the operator's verdicts are OK and NG
    pg.get_by_role("tab", name="Register").click()
    gap = bad0["score"] - good0["score"]
    ok_below = round(good0["score"] + 0.4 * gap, 3)
    ng_above = round(good0["score"] + 0.6 * gap, 3)
    _set_slider(pg, "calib-ng", ng_above)
    _set_slider(pg, "calib-ok", ok_below)
    _settle(pg)  # the live re-verdict preview has answered
    pg.locator("#calib-save").click()
    pg.locator("#calib-saved").get_by_text("Saved thresholds").wait_for()
    saved = Thresholds.from_dict(json.loads(product_json.read_text())["thresholds"])
    assert saved.ok_below == pytest.approx(ok_below, abs=2e-3) and saved.ng_above == pytest.approx(ng_above, abs=2e-3)
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_thresholds.png"), full_page=True)

    pg.get_by_role("tab", name="Inspect").click()
    good = inspect(images["good"], prev_id=bad0["id"], shot="station_inspect_good.png")
    assert good["verdict"] == "OK" and good["score"] == pytest.approx(good0["score"], rel=1e-5), good
    assert "rgb(21, 128, 61)" in pg.locator("#inspect-verdict [data-verdict]").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    pg.locator("#accept-button").click()
    pg.locator("#inspect-decision").get_by_text("Accepted").wait_for()
    assert store.get(good["id"])["decision"] == "accept"

    bad = inspect(images["bad"], prev_id=good["id"], shot="station_inspect_defective.png")
    assert bad["verdict"] == "NG", bad
    assert "rgb(220, 38, 38)" in pg.locator("#inspect-verdict [data-verdict]").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    store.close()

    # -- history tab lists both
    pg.get_by_role("tab", name="History").click()
    pg.wait_for_function("document.querySelector('#history-table')?.innerText.includes('defective.png')")
    _settle(pg)
    pg.screenshot(path=str(artifacts_dir / "station_history.png"), full_page=True)
    print(f"\nbrowser e2e: register {t_reg - t0:.1f} s, total {time.perf_counter() - t0:.1f} s; auto {auto}: "
          f"good {good0['score']:.4g} {good0['verdict']}, defective {bad0['score']:.4g} {bad0['verdict']}; "
          f"saved {saved}: good {good['verdict']}, defective {bad['verdict']}")
