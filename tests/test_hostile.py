"""The hostile-input probes of issue 16, kept as regression tests.

Decompression bombs in every accepted format (refused from the header; peak RSS measured in a
fresh subprocess from its VmHWM, which unlike ``ru_maxrss`` does not inherit the parent's peak), batch walks over link loops, dangling links, FIFOs,
unreadable folders and non-UTF-8 names (every entry one row, names stored losslessly), symlinks
out of the allowed roots, camera sources outside the configuration and SSRF URLs, uploaded zips
left on disk, login rate limiting, the RGBA rule, tiny images, product names, stale ``.tmp`` files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import brick_station, deadline, random_crop
from PIL import Image

from inspector.batch.common import iter_files
from inspector.batch.local import run_batch
from inspector.io import MAX_PIXELS, ImageError, read_image, write_image
from inspector.paths import decode_source, encode_source
from inspector.station.store import Store

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
#: peak-RSS growth allowed while refusing a bomb (the decoded bombs below would need 0.8-3 GB)
BOMB_RSS_MB = 40

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# tiny bombs: real files of each format whose header claims a huge image
# ---------------------------------------------------------------------------------------------
def _pil_bytes(fmt: str, **kw) -> bytearray:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(b, fmt, **kw)
    return bytearray(b.getvalue())


def bomb_png(w=32000, h=32000) -> bytes:
    """A valid PNG: IHDR claims w x h, IDAT holds 64 deflated rows of zeros (about 6 KB)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = zlib.compress(b"\0" * (1 + 3 * w) * 64, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def bomb_jpeg(w=32000, h=32000) -> bytes:
    """The issue's probe: a sub-KB baseline JPEG whose SOF0 claims w x h (libjpeg would allocate it)."""
    d = _pil_bytes("JPEG", quality=50)
    i = d.index(b"\xff\xc0")
    d[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(d)


def bomb_tiff(w=20000, h=20000) -> bytes:
    d = _pil_bytes("TIFF")
    ifd = struct.unpack("<I", d[4:8])[0]
    for k in range(struct.unpack("<H", d[ifd:ifd + 2])[0]):
        e = ifd + 2 + 12 * k
        tag, typ = struct.unpack("<HH", d[e:e + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            v = w if tag == 256 else h
            d[e + 8:e + 12] = (struct.pack("<H", v) + b"\0\0") if typ == 3 else struct.pack("<I", v)
    return bytes(d)


def bomb_webp(w=16383, h=16383) -> bytes:
    """VP8 key frame with the largest size its 14-bit fields allow (268 MP)."""
    d = _pil_bytes("WEBP", quality=50)
    i = d.index(b"\x9d\x01\x2a")
    d[i + 3:i + 7] = struct.pack("<HH", w, h)
    return bytes(d)


def bomb_bmp(w=30000, h=30000) -> bytes:
    d = _pil_bytes("BMP")
    d[18:26] = struct.pack("<ii", w, h)
    return bytes(d)


BOMBS = {"png": bomb_png, "jpeg": bomb_jpeg, "tiff": bomb_tiff, "webp": bomb_webp, "bmp": bomb_bmp}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "webp": ".webp", "bmp": ".bmp"}

PEAK = "from inspector.eval.measure import peak_rss_kb as peak_kb, reset_peak_rss as reset_peak\n"

_RSS_PROBE = r"""
import json, resource, sys
from pathlib import Path
from inspector import io as imio
from inspector.batch.common import load_file
import cv2, numpy as np
path = Path(sys.argv[1])
before = reset_peak()
out = {}
try:
    imio.read_image(path)
    out["read_image"] = None
except imio.ImageError as exc:
    out["read_image"] = exc.reason
out["load_file"] = load_file(path).error  # the batch's path (bytes, in a worker)
out["rss_kb"] = peak_kb() - before
print(json.dumps(out))
"""


def _rss_probe(script: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PEAK + script, *args], capture_output=True, text=True, env=ENV,
                         timeout=deadline(120))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", sorted(BOMBS))
def test_bomb_is_refused_from_the_header_with_bounded_memory(fmt, tmp_path):
    data = BOMBS[fmt]()
    w, h = _claimed_size(data)  # the file really claims the huge size...
    assert len(data) < 8000 and w * h > 4 * MAX_PIXELS
    path = tmp_path / f"bomb{SUFFIX[fmt]}"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="image too large"):
        read_image(path)
    with pytest.raises(ImageError, match="image too large"):
        read_image(data)
    out = _rss_probe(_RSS_PROBE, str(path))  # ...and refusing it costs no decoded pixel
    assert "image too large" in out["read_image"] and "image too large" in out["load_file"]
    assert out["rss_kb"] < BOMB_RSS_MB * 1024, out


def _claimed_size(data: bytes) -> tuple[int, int]:
    """The size the header claims, read with Pillow's own cap lifted for this one call."""
    cap = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    finally:
        Image.MAX_IMAGE_PIXELS = cap


def test_decoder_caps_are_a_second_line(tmp_path):
    """Even past the header check, OpenCV's decoder cap (set before cv2 loads) and Pillow's refuse."""
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bomb_jpeg())
    script = r"""
import json, resource, sys
import inspector.io  # sets OPENCV_IO_MAX_IMAGE_PIXELS before cv2 loads, and Pillow's cap
import cv2, numpy as np
from PIL import Image
before = reset_peak()
data = np.fromfile(sys.argv[1], np.uint8)
try:
    cv = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    cv = None if cv is None else list(cv.shape)
except cv2.error:
    cv = "error"
try:
    Image.open(sys.argv[1]).load()
    pil = "decoded"
except Image.DecompressionBombError:
    pil = "refused"
print(json.dumps({"cv2": cv, "pil": pil, "rss_kb": peak_kb() - before}))
"""
    out = _rss_probe(script, str(path))
    assert out["cv2"] in (None, "error") and out["pil"] == "refused"
    assert out["rss_kb"] < BOMB_RSS_MB * 1024, out


# ---------------------------------------------------------------------------------------------
# a station with one tiny product (module-wide; each test makes its own folders)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def station(tmp_path_factory, brick):
    return brick_station(tmp_path_factory, brick, "hostile")


def _cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "inspector", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=deadline(timeout))


NON_UTF8 = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8


def _hostile_folder(folder: Path, brick, outside: Path) -> dict[str, str | None]:
    """Good images plus every kind of entry that used to end a batch walk. Returns the expected
    error fragment per entry name (None: scored)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    expect: dict[str, str | None] = {}
    for i in range(3):
        write_image(folder / f"good{i}.png", random_crop(brick, rng))
        expect[f"good{i}.png"] = None
    write_image(folder / NON_UTF8, random_crop(brick, rng))
    expect[NON_UTF8] = None
    os.symlink("loop-b.png", folder / "loop-a.png")
    os.symlink("loop-a.png", folder / "loop-b.png")
    expect["loop-a.png"] = expect["loop-b.png"] = "Too many levels of symbolic links"
    os.symlink("gone.png", folder / "dangling.png")
    expect["dangling.png"] = "dangling link"
    os.mkfifo(folder / "fifo.png")
    expect["fifo.png"] = "not a regular file"
    os.symlink(folder, folder / "selflink")
    expect["selflink"] = "link to a folder"
    write_image(outside / "secret.png", random_crop(brick, rng))
    os.symlink(outside / "secret.png", folder / "escape.png")
    expect["escape.png"] = "outside the allowed folders"
    return expect


def test_batch_walk_records_every_entry_and_never_raises(station, brick, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "line"
    expect = _hostile_folder(folder, brick, outside)
    got = sorted(p.name for p in iter_files(folder))
    assert got == sorted(expect)  # every entry, loops included, nothing followed into itself
    s = run_batch(folder, "brick", station.registry, station.store, batch_size=2, progress=False,
                  roots=(folder,))
    rows = {Path(decode_source(r["source"])).name: r for r in station.store.history(batch_id=s.batch_id, limit=None)}
    assert set(rows) == set(expect) and s.n_files == len(expect)  # one row per entry
    for name, frag in expect.items():
        r = rows[name]
        if frag is None:
            assert r["verdict"] in ("OK", "UNCERTAIN", "NG") and r["error"] is None, (name, r["error"])
        else:
            assert r["verdict"] == "ERROR" and frag in r["error"], (name, r["error"])
    assert rows["escape.png"]["image_sha256"] is None  # the file outside was never read
    # the non-UTF-8 name is stored as text and decodes back to the exact path
    stored = rows[NON_UTF8]["source"]
    stored.encode("utf-8")
    assert decode_source(stored) == str(folder.resolve() / NON_UTF8)
    assert Path(rows[NON_UTF8]["heatmap_path"]).is_file()
    again = run_batch(folder, "brick", station.registry, station.store, batch_size=2, progress=False,
                      roots=(folder,))
    assert (again.n_new, again.n_skipped) == (0, len(expect))  # resume recognises every name


def test_source_encoding_round_trips_any_name():
    names = ["/a/b.png", "upload:x.png", "/a/" + NON_UTF8, "pathbytes:/x", "pathbytes:/a/caf%E9.png",
             "/a/100% sure.png", "/ü/ß.png", os.fsdecode(bytes(range(1, 256)))]
    enc = [encode_source(n) for n in names]
    assert [decode_source(e) for e in enc] == names
    assert len(set(enc)) == len(names)  # injective, also against look-alikes of the escaped form
    for e in enc:
        e.encode("utf-8")
    assert enc[:2] == names[:2] and enc[6] == names[6]  # ordinary names stay as they are


def test_a_failing_row_never_rolls_back_its_neighbours(station):
    rows = [dict(product="brick", source=f"/x/{i}.png", image_sha256=None, score=0.1, verdict="OK",
                 model_version="v", batch_id="rollback-probe") for i in range(5)]
    rows[2]["score"] = "not a number"
    rows[3]["source"] = "/x/" + NON_UTF8  # the old killer: now stored losslessly
    assert station.store.record_inspections(rows) == 5
    got = {r["source"]: r for r in station.store.history(batch_id="rollback-probe", limit=None)}
    assert len(got) == 5 and got["/x/2.png"]["verdict"] == "ERROR" and "could not record" in got["/x/2.png"]["error"]
    assert decode_source(got[encode_source("/x/" + NON_UTF8)]["source"]) == "/x/" + NON_UTF8
    assert all(got[f"/x/{i}.png"]["verdict"] == "OK" for i in (0, 1, 4))


def test_unreadable_entries_get_rows_as_an_unprivileged_user(brick):
    """Permission errors (an unreadable sub-folder, an unreadable file) are real only for a user
    without CAP_DAC_OVERRIDE: as root the walk runs under ``setpriv`` as ``nobody``."""
    base = Path(tempfile.mkdtemp(prefix="i16-perm-"))
    try:
        base.chmod(0o755)
        folder = base / "line"
        folder.mkdir()
        write_image(folder / "ok.png", random_crop(brick, np.random.default_rng(2)))
        write_image(folder / "locked.png", random_crop(brick, np.random.default_rng(3)))
        (folder / "locked.png").chmod(0)
        (folder / "closed").mkdir()
        write_image(folder / "closed" / "inner.png", random_crop(brick, np.random.default_rng(4)))
        (folder / "closed").chmod(0)
        folder.chmod(0o755)
        script = ("import json, sys; from pathlib import Path; from inspector.batch.common import iter_files, load_file; "
                  "f = Path(sys.argv[1]); print(json.dumps({p.name: load_file(p).error for p in iter_files(f)}))")
        cmd = [sys.executable, "-c", script, str(folder)]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: no way to lose permission")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=deadline(120), cwd=base)
        assert res.returncode == 0, res.stderr
        errors = json.loads(res.stdout.strip().splitlines()[-1])
        assert set(errors) == {"ok.png", "locked.png", "closed"}
        assert errors["ok.png"] is None
        assert "Permission denied" in errors["locked.png"] and "Permission denied" in errors["closed"]
    finally:
        for p in (base / "line" / "closed", base / "line" / "locked.png"):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_inspect_records_a_non_utf8_name_and_leaves_no_orphan_heatmap(station, brick, tmp_path, monkeypatch):
    path = tmp_path / NON_UTF8
    write_image(path, random_crop(brick, np.random.default_rng(5)))
    rec = station.inspect("brick", str(path))
    assert rec.error is None and Path(rec.heatmap_path).is_file()
    assert decode_source(station.store.get(rec.id)["source"]) == str(path)

    def pngs():
        return set(station.heatmap_dir.rglob("*.png"))

    before = pngs()

    def broken(**kw):
        raise RuntimeError("database went away")

    monkeypatch.setattr(station.store, "record_inspection", broken)  # failure injection, not a mock
    with pytest.raises(RuntimeError, match="went away"):
        station.inspect("brick", str(path))
    assert pngs() == before  # the heatmap written for the unrecorded inspection was removed


def test_cli_inspect_reports_each_bad_file_and_goes_on(station, brick, tmp_path):
    good = write_image(tmp_path / "good.png", random_crop(brick, np.random.default_rng(6)))
    os.symlink("loop2.png", tmp_path / "loop1.png")
    os.symlink("loop1.png", tmp_path / "loop2.png")
    os.mkfifo(tmp_path / "fifo.png")
    write_image(tmp_path / NON_UTF8, random_crop(brick, np.random.default_rng(7)))
    args = [str(tmp_path / "loop1.png"), str(tmp_path / "fifo.png"), str(tmp_path), str(tmp_path / NON_UTF8),
            str(good)]
    res = _cli("inspect", *args, "--product", "brick", "--data-dir", str(station.data_dir), "--device", "cpu",
               timeout=180)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 5, res.stdout  # one line per argument, in order, none skipped
    assert "Too many levels of symbolic links" in lines[0] and "not a regular file" in lines[1]
    assert "not a regular file" in lines[2]
    assert "ERROR" not in lines[3] and "caf\\xe9" in lines[3] and "ERROR" not in lines[4]
    fresh = Store(station.store.url)  # another process wrote them: read through a new engine
    mine = [r for r in fresh.history(product="brick", limit=None)
            if decode_source(r["source"]).startswith(str(tmp_path))]
    old = [r for r in station.store.history(product="brick", limit=None)
           if decode_source(r["source"]).startswith(str(tmp_path))]
    fresh.close()
    assert len(mine) == 5, [(r["source"], r["verdict"]) for r in mine]  # every one recorded
    assert len(old) == 5, ("long-lived store does not see them", len(old))


def test_bombs_in_a_batch_cost_no_memory(station, tmp_path, brick):
    """The issue's zip of four bombs took the station from 1.6 to 13 GB: a batch over them (and the
    other formats) now records ERROR rows while the process's peak RSS stays where a batch of good
    images puts it."""
    folder = tmp_path / "bombs"
    folder.mkdir()
    for fmt, make in BOMBS.items():
        for k in range(2):
            (folder / f"{fmt}{k}{SUFFIX[fmt]}").write_bytes(make())
    write_image(folder / "good.png", random_crop(brick, np.random.default_rng(8)))
    good = tmp_path / "good"
    good.mkdir()
    write_image(good / "good.png", random_crop(brick, np.random.default_rng(8)))
    script = r"""
import resource, sys
from inspector.station.service import StationService
from inspector.station.store import Store
st = StationService(sys.argv[1], device="cpu")
peaks = []
for folder in sys.argv[2:]:
    st.batch(folder, "brick", progress=False, workers=4)
    peaks.append(peak_kb())
print("MAXRSS_KB", *peaks)
"""
    res = subprocess.run([sys.executable, "-c", PEAK + script, str(station.data_dir), str(good), str(folder)],
                         capture_output=True, text=True, env=ENV, timeout=deadline(240))
    last = res.stdout.strip().splitlines()[-1].split() if res.stdout.strip() else [""]
    assert last[0] == "MAXRSS_KB", res.stdout + res.stderr
    peaks = {"good": int(last[1]), "bombs": int(last[2])}  # peak after the good batch, then after the bombs
    rows = [r for r in station.store.history(limit=None) if decode_source(r["source"]).startswith(str(folder.resolve()))]
    assert len(rows) == 2 * len(BOMBS) + 1
    assert sum(r["verdict"] == "ERROR" and "image too large" in r["error"] for r in rows) == 2 * len(BOMBS)
    assert peaks["bombs"] - peaks["good"] < 100 * 1024, peaks


# ---------------------------------------------------------------------------------------------
# the station: camera confinement, SSRF, login, uploads, the alpha rule
# ---------------------------------------------------------------------------------------------
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


@pytest.fixture(scope="module")
def served(station, tmp_path_factory):
    """The station served on a free port with login; ``allowed`` is its one allowed root."""
    from conftest import free_port

    from app.shell import StationApp
    from inspector.security.passwords import hash_password
    from inspector.station.config import StationConfig

    tmp = tmp_path_factory.mktemp("served")
    allowed = tmp / "allowed"
    allowed.mkdir()
    cfg = StationConfig(port=free_port(), data_dir=station.data_dir, backbones=["tiny-cnn"],
                        allowed_batch_roots=[allowed], users={u: hash_password(p) for u, p in PASSWORDS.items()},
                        login_max_failures=5, login_lockout_s=600)
    app = StationApp(station, cfg)
    app.launch(prevent_thread_lock=True, quiet=True)
    yield app, f"http://127.0.0.1:{cfg.port}/", allowed, tmp
    app.close()


def _client(url):
    from gradio_client import Client

    return Client(url, auth=("alice", PASSWORDS["alice"]), verbose=False)


def _http_server():
    """A real HTTP server on loopback that records every request path (the SSRF target)."""
    import http.server
    import threading

    hits: list[str] = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, hits


def test_camera_sources_come_from_the_configuration_only(served, brick, tmp_path):
    from inspector.station.config import CAMERA_REFUSED

    app, url, allowed, _ = served
    outside = tmp_path / "private"
    outside.mkdir()
    write_image(outside / "a.png", random_crop(brick, np.random.default_rng(9)))
    os.symlink(outside, allowed / "sneaky")  # a link inside the root to a folder outside it
    srv, hits = _http_server()
    client = _client(url)
    probes = {
        "folder outside": str(outside),
        "missing folder outside": str(tmp_path / "nope"),
        "link out of the root": str(allowed / "sneaky"),
        "ssrf url": f"http://127.0.0.1:{srv.server_address[1]}/admin/video.mjpg",
        "device index": "0",
        "dotdot": str(allowed / ".." / "private"),
    }
    messages = {}
    try:
        for name, src in probes.items():
            with pytest.raises(Exception) as err:  # noqa: B017 - gradio_client's AppError
                client.predict("brick", src, api_name="/inspect_camera")
            messages[name] = str(err.value)
    finally:
        srv.shutdown()
    assert hits == []  # the station never fetched the URL
    assert len(set(messages.values())) == 1, messages  # one answer: nothing learned about what exists
    assert CAMERA_REFUSED in next(iter(messages.values()))
    # a folder under the allowed root works, but a frame file linking out of it is not read
    cam = allowed / "line"
    cam.mkdir()
    write_image(cam / "a.png", random_crop(brick, np.random.default_rng(10)))
    os.symlink(outside / "a.png", cam / "b.png")
    out = client.predict("brick", str(cam), api_name="/inspect_camera")
    details = next(o for o in out if isinstance(o, dict) and "score" in o)
    assert details["error"] is None and details["score"] is not None
    with pytest.raises(Exception, match="outside the allowed folders"):  # noqa: B017
        client.predict("brick", str(cam), api_name="/inspect_camera")


def test_camera_source_resolution_rules():
    from inspector.station.config import SourceNotAllowed, StationConfig

    root = Path(tempfile.mkdtemp(prefix="i16-cam-"))
    try:
        cfg = StationConfig(camera="rtsp://cam1.local/s", cameras={"line2": "genicam://Fake-1"},
                            camera_urls=["http://cam3.local/video"], allowed_batch_roots=[root])
        assert cfg.camera_source("rtsp://cam1.local/s") == "rtsp://cam1.local/s"
        assert cfg.camera_source("line2") == "genicam://Fake-1"  # a name (any scheme a factory knows)
        assert cfg.camera_source("genicam://Fake-1") == "genicam://Fake-1"
        assert cfg.camera_source("http://cam3.local/video") == "http://cam3.local/video"
        assert cfg.camera_source(str(root / "a" / ".." / "b")) == os.path.realpath(root / "b")
        for bad in ("http://cam3.local/video/../admin", "rtsp://cam1.local/s2", "1", "/etc", "", "~",
                    str(root) + "-sibling", os.fsdecode(str(root).encode() + b"/\xff")):
            with pytest.raises(SourceNotAllowed):
                cfg.camera_source(bad)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_login_is_rate_limited_locked_out_and_audited(served, station):
    import time

    import httpx

    _, url, _, _ = served
    n0 = len([a for a in station.store.audit_log(limit=None) if a["action"] == "login_failed"])
    t0 = time.perf_counter()
    codes = [httpx.post(url + "login", data={"username": "bob", "password": f"guess{i}"}).status_code
             for i in range(12)]
    elapsed = time.perf_counter() - t0
    assert codes == [400] * 12
    # locked: the right password is refused too, while another user is unaffected
    assert httpx.post(url + "login", data={"username": "bob", "password": PASSWORDS["bob"]}).status_code == 400
    assert httpx.post(url + "login", data={"username": "alice", "password": PASSWORDS["alice"]}).status_code == 200
    failed = [a for a in station.store.audit_log(limit=None) if a["action"] == "login_failed"]
    assert len(failed) - n0 == 13 and all(a["actor"] == "bob" for a in failed[: len(failed) - n0])
    reasons = [a["details"]["reason"] for a in failed[: len(failed) - n0]]
    assert reasons.count("wrong password") == 5 and reasons.count("locked") == 8
    print(f"12 wrong logins in {elapsed:.2f} s; 5 checked, 7 refused by the lockout")


def test_login_guard_lockout_expires_doubles_and_hashes_are_salted():
    from inspector.security.passwords import LoginGuard, check_password, hash_password

    now = [1000.0]
    events = []
    h = hash_password("pw")
    assert h.startswith("scrypt$") and h != hash_password("pw") and check_password(h, "pw")
    assert not check_password(h, "pw ") and check_password("sha256:" + __import__("hashlib").sha256(b"x").hexdigest(), "x")
    g = LoginGuard({"u": h}, max_failures=3, lockout_s=60, audit=lambda *a: events.append(a), clock=lambda: now[0])
    assert g("u", "pw")
    for _ in range(3):
        assert not g("u", "no")
    assert not g("u", "pw") and 59 < g.locked("u") <= 60  # locked, right password or not
    now[0] += 61
    assert g("u", "pw")  # expired; success resets the count
    for _ in range(3):
        g("u", "no")
    now[0] += 61
    for _ in range(3):
        g("u", "no")
    assert 119 < g.locked("u") <= 120  # a second offence doubles the lockout
    assert not g("nobody", "x") and events[-1][:2] == ("nobody", "unknown user")


def test_uploaded_zip_and_its_extraction_are_deleted_after_the_batch(served, station, brick, tmp_path):
    import zipfile

    from gradio_client import handle_file

    app, url, _, _ = served
    z = tmp_path / f"upload-{os.getpid()}-probe.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(2):
            zf.writestr(f"good{i}.png", _png(random_crop(brick, np.random.default_rng(20 + i))))
        zf.writestr("bomb.jpg", bomb_jpeg())
        zf.writestr("bomb.tif", bomb_tiff())
    import re

    msg = _client(url).predict("brick", "", handle_file(str(z)), api_name="/batch")[0]
    batch_id = re.search(r"Batch `([0-9a-f-]+)`", msg).group(1)
    rows = station.store.history(batch_id=batch_id, limit=None)
    assert len(rows) == 4, msg
    assert sorted(r["verdict"] == "ERROR" and "image too large" in r["error"] for r in rows) == [False, False, True, True]
    uploads = station.data_dir / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())  # extraction removed
    cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    assert not [p for p in cache.rglob(z.name)], "the uploaded zip is still in Gradio's cache"


def _png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA if rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def test_rgba_scores_the_same_in_station_and_cli(served, station, brick, tmp_path):
    """One alpha rule: composited on white by inspector.io, wherever the image comes in."""
    rgb = random_crop(brick, np.random.default_rng(30))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, : rgb.shape[1] // 2] = 60  # half the part seen through
    path = tmp_path / "rgba.png"
    path.write_bytes(_png(np.dstack([rgb, alpha])))
    lib = station.inspect("brick", str(path)).score  # what `inspector inspect` runs
    out = _client(served[1]).predict("brick", __import__("gradio_client").handle_file(str(path)), api_name="/inspect")
    web = next(o for o in out if isinstance(o, dict) and "score" in o)["score"]
    assert web == pytest.approx(lib, rel=1e-6)
    dropped = station.inspect("brick", rgb).score  # alpha dropped: the old station behaviour differs
    assert abs(dropped - lib) > 1e-4


def test_tiny_images_are_refused_not_scored(station, tmp_path):
    one = tmp_path / "one.png"
    one.write_bytes(_png(np.zeros((1, 1, 3), np.uint8)))
    rec = station.inspect("brick", str(one))
    assert rec.verdict is None and "too small" in rec.error
    with pytest.raises(ImageError, match="too small"):
        read_image(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ImageError, match="too small"):
        read_image(np.zeros((7, 500), np.uint8))


def test_product_names_match_the_whole_string(station):
    from inspector.paths import NAME_RE as _NAME_RE

    for bad in ("brick\n", "brick\n../x", "-brick", "a" * 65, "brick/x"):
        with pytest.raises(ValueError, match="invalid product name"):
            station.registry.exists(bad)
        assert not _NAME_RE.fullmatch(bad)
    assert _NAME_RE.fullmatch("brick-2.a_b")


def test_stale_tmp_files_are_cleaned_when_the_registry_opens(station):
    import time

    from inspector.products.registry import ProductRegistry

    d = station.registry.root / "brick"
    left = [d / ".product.json.x1y2.tmp", d / ".state-abc.safetensors.q.tmp", d / "shots" / ".tmp-123-456.png"]
    fresh_export = d / "onnx" / ".model.onnx.k.tmp"  # written outside the registry lock: kept while young
    old_export = d / "onnx" / ".model.onnx.j.tmp"
    for f in [*left, fresh_export, old_export]:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"half")
    os.utime(old_export, (time.time() - 7200, time.time() - 7200))
    trash = station.registry.root / ".deleted-gone-1"
    (trash / "shots").mkdir(parents=True)
    reg = ProductRegistry(station.registry.root)
    assert sorted(map(str, reg.cleaned)) == sorted(map(str, [*left, old_export, trash]))
    assert fresh_export.exists() and not trash.exists()
    assert reg.get("brick").inspect(np.zeros((64, 64, 3), np.uint8))  # the product itself is intact
    shutil.rmtree(d / "onnx")


def test_station_batch_never_reads_through_a_link_out_of_the_roots(served, station, brick):
    """The issue's probe: a link inside an allowed root to the station's database was followed and
    the database's sha256 stored. Now the row says why, and nothing of the file is read."""
    app, url, allowed, _ = served
    folder = allowed / "links"
    folder.mkdir()
    write_image(folder / "good.png", random_crop(brick, np.random.default_rng(40)))
    os.symlink((station.data_dir / "inspector.db").resolve(), folder / "db.png")
    _client(url).predict("brick", str(folder), None, api_name="/batch")
    rows = {Path(decode_source(r["source"])).name: r for r in station.store.history(limit=None)
            if decode_source(r["source"]).startswith(str(folder.resolve()))}
    assert set(rows) == {"good.png", "db.png"} and rows["good.png"]["verdict"] != "ERROR"
    assert rows["db.png"]["verdict"] == "ERROR" and "outside the allowed folders" in rows["db.png"]["error"]
    assert rows["db.png"]["image_sha256"] is None
