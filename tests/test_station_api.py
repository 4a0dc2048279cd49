"""The station's API through gradio_client: 8 parallel inspect calls are all answered, with the
same scores as the library's ``StationService.inspect``; operator decisions reach the store; config
safety (auth, allowed batch roots, zip limits) is enforced by the app."""

from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import free_port, random_crops

from inspector.io import write_image
from inspector.security.passwords import check_password, hash_password
from inspector.station.config import StationConfig

PRODUCT = "brick-api"


@pytest.fixture(scope="module")
def served(tmp_path_factory, brick):
    """A station (tiny-cnn product) served in this process on a free port."""
    from app.shell import StationApp
    from inspector.station.service import StationService

    tmp = tmp_path_factory.mktemp("station-api")
    station = StationService(tmp / "data")
    station.registry.register(PRODUCT, random_crops(brick, 2), detector="graphcore", backbone="tiny-cnn",
                              actor="test", n_synthetic=4)
    images = []
    for i, img in enumerate(random_crops(brick, 8, seed=1)):
        if i % 2:  # every other image gets a dark scratch
            img = img.copy()
            img[40:46, 10:80] = 20
        images.append(write_image(tmp / f"img{i}.png", img))
    allowed = tmp / "allowed"
    allowed.mkdir()
    cfg = StationConfig(port=free_port(), data_dir=tmp / "data", concurrency=4, backbones=["tiny-cnn"],
                        allowed_batch_roots=[allowed])
    app = StationApp(station, cfg)
    app.launch(prevent_thread_lock=True, quiet=True)
    yield app, station, images, f"http://127.0.0.1:{cfg.port}/"
    app.close()


def test_eight_parallel_inspect_calls_match_library(served):
    from gradio_client import Client, handle_file

    app, station, images, url = served
    client = Client(url, verbose=False)

    def call(path):
        out = client.predict(PRODUCT, handle_file(str(path)), api_name="/inspect")
        return next(o for o in out if isinstance(o, dict) and "score" in o)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, images))
    assert len(answers) == 8 and all(a["error"] is None for a in answers)
    ids = {a["id"] for a in answers}
    assert len(ids) == 8  # eight distinct stored inspections
    for path, a in zip(images, answers):
        ref = station.inspect(PRODUCT, path, source="test")
        assert a["score"] == pytest.approx(ref.score, rel=1e-6, abs=1e-9), path.name
        assert a["verdict"] == str(ref.verdict)
    rows = {r["id"]: r for r in station.store.history(product=PRODUCT, limit=None)}
    assert ids <= set(rows)
    # the operator's decision is recorded in the store
    first = answers[0]["id"]
    station.decide(first, "reject", "tester")
    assert station.store.get(first)["decision"] == "reject"


def test_batch_folder_outside_allowed_roots_is_refused(served, tmp_path):
    from gradio_client import Client

    app, station, images, url = served
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="outside the allowed"):
        client.predict(PRODUCT, str(tmp_path), None, api_name="/batch")
    with pytest.raises(PermissionError):
        app.config.batch_folder_allowed(app.config.allowed_batch_roots[0] / ".." / "img0.png")


def test_zip_extraction_skips_zip_slip(served, tmp_path):
    app, station, images, url = served
    z = tmp_path / "batch.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(images[0], "good/a.png")
        zf.writestr("../../evil.png", b"x")
        zf.writestr("notes.txt", b"hello")
    dest = app._extract_zip(str(z))
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["good/a.png"]
    assert not (dest.parent.parent / "evil.png").exists()


def test_config_precedence_and_auth(tmp_path):
    f = tmp_path / "station.toml"
    f.write_text('host = "0.0.0.0"\nport = 8000\nallowed_batch_roots = ["imgs"]\n'
                 f'[users]\nalice = "{hash_password("pw1")}"\nbob = "pw2"\n')
    cfg = StationConfig.load(f, env={"INSPECTOR_PORT": "8100"}, port=None, host=None)
    assert cfg.host == "0.0.0.0" and cfg.port == 8100
    assert cfg.allowed_batch_roots == [tmp_path / "imgs"]
    auth = cfg.auth()
    assert auth("alice", "pw1") and auth("bob", "pw2") and not auth("alice", "pw2") and not auth("eve", "x")
    assert check_password(hash_password("x"), "x")
    assert cfg.warnings() == [w for w in cfg.warnings() if "bob" in w and "hash-password" in w]  # login set;
    # bob's plain-text password is flagged
    assert StationConfig.load(None, env={}).host == "127.0.0.1"  # safe default
    open_cfg = StationConfig.load(None, env={"INSPECTOR_HOST": "0.0.0.0"})
    assert open_cfg.auth() is None and "without login" in open_cfg.warnings()[0]
    with pytest.raises(ValueError, match="unknown setting"):
        StationConfig.load(None, env={}, bogus=1)
    from pathlib import Path

    example = StationConfig.load(Path(__file__).parents[1] / "deploy" / "station.example.toml", env={})
    assert example.host == "127.0.0.1" and example.port == 7860 and example.users == {}


def test_live_tick_shows_camera_error_state_and_recovers(served, tmp_path):
    """The Live tab's loop over a replay folder: a corrupt frame shows the error state (counts
    untouched), the next tick inspects again; a removed folder shows RECONNECTING until it is back."""
    import shutil

    app, station, images, url = served
    cam_dir = app.config.allowed_batch_roots[0] / "line"  # camera folders must lie under the allowed roots
    cam_dir.mkdir()
    shutil.copy(images[0], cam_dir / "a.png")
    (cam_dir / "b.png").write_bytes(b"garbage, not a png")
    shutil.copy(images[1], cam_dir / "c.png")
    src = str(cam_dir.resolve())
    counts, ngs = app._new_counts(), []
    run = app.on_live_start(PRODUCT, src, counts, ngs, None)[-1]

    def tick():
        nonlocal counts, ngs
        out = app.on_live_tick(PRODUCT, src, counts, ngs, run)
        counts, ngs = out[4], out[6]
        return out

    out = tick()
    assert 'data-state="live"' in out[2] and sum(counts.values()) == 1
    assert out[1].count('data-verdict="') == 1 and 'data-stale' not in out[1]
    out = tick()  # the corrupt frame: the last verdict is greyed out, not shown as current
    assert 'data-state="error"' in out[2] and "b.png" in out[2] and sum(counts.values()) == 1
    assert 'data-stale="1"' in out[1] and "Frame error" in out[1]
    out = tick()  # recovered
    assert 'data-state="live"' in out[2] and sum(counts.values()) == 2
    app.pool.get(src).backoff = 0.01
    shutil.rmtree(cam_dir)
    out = tick()
    assert 'data-state="reconnecting"' in out[2] and 'data-stale="1"' in out[1] and "Camera lost" in out[1]
    cam_dir.mkdir()
    shutil.copy(images[2], cam_dir / "d.png")
    import time

    time.sleep(0.05)  # past the 0.01 s back-off: the time passing is the condition (load only lengthens it)
    out = tick()
    assert 'data-state="live"' in out[2] and sum(counts.values()) == 3
    assert app.pool.get(src).reconnects == 1
