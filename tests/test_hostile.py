"""The hostile-input probes of issue 16, kept as regression tests.

Decompression bombs in every accepted format (refused from the header; peak RSS measured in a
fresh subprocess with ``resource.getrusage``), batch walks over link loops, dangling links, FIFOs,
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
from PIL import Image

from inspector.batch import iter_files, run_batch
from inspector.io import MAX_PIXELS, ImageError, read_image, write_image
from inspector.paths import decode_source, encode_source
from inspector.service import Station

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

_RSS_PROBE = r"""
import json, resource, sys
from pathlib import Path
from inspector import io as imio
from inspector.batch import load_file
import cv2, numpy as np
path = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
try:
    imio.read_image(path)
    out["read_image"] = None
except imio.ImageError as exc:
    out["read_image"] = exc.reason
out["load_file"] = load_file(path).error  # the batch's path (bytes, in a worker)
out["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(out))
"""


def _rss_probe(script: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV, timeout=120)
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
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
print(json.dumps({"cv2": cv, "pil": pil, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""
    out = _rss_probe(script, str(path))
    assert out["cv2"] in (None, "error") and out["pil"] == "refused"
    assert out["rss_kb"] < BOMB_RSS_MB * 1024, out


# ---------------------------------------------------------------------------------------------
# a station with one tiny product (module-wide; each test makes its own folders)
# ---------------------------------------------------------------------------------------------
def _crop(brick, rng, size=64):
    y, x = rng.integers(0, brick.shape[0] - size, 2)
    return np.ascontiguousarray(brick[y:y + size, x:x + size])


@pytest.fixture(scope="module")
def station(tmp_path_factory, brick):
    st = Station(tmp_path_factory.mktemp("hostile") / "data", device="cpu")
    rng = np.random.default_rng(0)
    st.registry.register("brick", [_crop(brick, rng, 96) for _ in range(2)], detector="patchcore",
                         backbone="tiny-cnn", image_size=64, n_synthetic=2)
    return st


def _cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "inspector", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


NON_UTF8 = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8


def _hostile_folder(folder: Path, brick, outside: Path) -> dict[str, str | None]:
    """Good images plus every kind of entry that used to end a batch walk. Returns the expected
    error fragment per entry name (None: scored)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    expect: dict[str, str | None] = {}
    for i in range(3):
        write_image(folder / f"good{i}.png", _crop(brick, rng))
        expect[f"good{i}.png"] = None
    write_image(folder / NON_UTF8, _crop(brick, rng))
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
    write_image(outside / "secret.png", _crop(brick, rng))
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
        write_image(folder / "ok.png", _crop(brick, np.random.default_rng(2)))
        write_image(folder / "locked.png", _crop(brick, np.random.default_rng(3)))
        (folder / "locked.png").chmod(0)
        (folder / "closed").mkdir()
        write_image(folder / "closed" / "inner.png", _crop(brick, np.random.default_rng(4)))
        (folder / "closed").chmod(0)
        folder.chmod(0o755)
        script = ("import json, sys; from pathlib import Path; from inspector.batch import iter_files, load_file; "
                  "f = Path(sys.argv[1]); print(json.dumps({p.name: load_file(p).error for p in iter_files(f)}))")
        cmd = [sys.executable, "-c", script, str(folder)]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: no way to lose permission")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120, cwd=base)
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
    write_image(path, _crop(brick, np.random.default_rng(5)))
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
    good = write_image(tmp_path / "good.png", _crop(brick, np.random.default_rng(6)))
    os.symlink("loop2.png", tmp_path / "loop1.png")
    os.symlink("loop1.png", tmp_path / "loop2.png")
    os.mkfifo(tmp_path / "fifo.png")
    write_image(tmp_path / NON_UTF8, _crop(brick, np.random.default_rng(7)))
    args = [str(tmp_path / "loop1.png"), str(tmp_path / "fifo.png"), str(tmp_path), str(tmp_path / NON_UTF8),
            str(good)]
    n0 = station.store.count(product="brick")
    res = _cli("inspect", *args, "--product", "brick", "--data-dir", str(station.data_dir), "--device", "cpu",
               timeout=180)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 5, res.stdout  # one line per argument, in order, none skipped
    assert "Too many levels of symbolic links" in lines[0] and "not a regular file" in lines[1]
    assert "not a regular file" in lines[2]
    assert "ERROR" not in lines[3] and "caf\\xe9" in lines[3] and "ERROR" not in lines[4]
    assert station.store.count(product="brick") == n0 + 5  # every one recorded


def test_bombs_in_a_batch_cost_no_memory(station, tmp_path, brick):
    """The issue's zip of four bombs took the station from 1.6 to 13 GB: a batch over them (and the
    other formats) now records ERROR rows while the process's peak RSS stays where a batch of good
    images puts it."""
    folder = tmp_path / "bombs"
    folder.mkdir()
    for fmt, make in BOMBS.items():
        for k in range(2):
            (folder / f"{fmt}{k}{SUFFIX[fmt]}").write_bytes(make())
    write_image(folder / "good.png", _crop(brick, np.random.default_rng(8)))
    good = tmp_path / "good"
    good.mkdir()
    write_image(good / "good.png", _crop(brick, np.random.default_rng(8)))
    script = r"""
import resource, runpy, sys
sys.argv = ["inspector", *sys.argv[1:]]
try:
    runpy.run_module("inspector", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code)
"""
    peaks = {}
    for name, f in (("good", good), ("bombs", folder)):
        res = subprocess.run([sys.executable, "-c", script, "batch", str(f), "--product", "brick", "--data-dir",
                              str(station.data_dir), "--device", "cpu", "--no-progress", "--workers", "4"],
                             capture_output=True, text=True, env=ENV, timeout=240)
        last = res.stdout.strip().splitlines()[-1].split()
        assert last[0] == "MAXRSS_KB" and last[2] == "0", res.stdout + res.stderr
        peaks[name] = int(last[1])
    rows = [r for r in station.store.history(limit=None) if decode_source(r["source"]).startswith(str(folder.resolve()))]
    assert len(rows) == 2 * len(BOMBS) + 1
    assert sum(r["verdict"] == "ERROR" and "image too large" in r["error"] for r in rows) == 2 * len(BOMBS)
    assert peaks["bombs"] - peaks["good"] < 100 * 1024, peaks
